"""Shared fixtures: tiny functional models that build and train in milliseconds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def tiny_net(name, *, width=8, classes=5, input_shape=(16, 16, 3), strides=1, seed=0):
    """Conv-BN-ReLU("features") -> pool -> dense: a functional model with a feature layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, strides=strides, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs, name=name)


def gradients(function, *arguments):
    """The gradients of the scalar `function(*arguments)` (None where none flows)."""
    if keras.backend.backend() == "jax":
        import jax  # noqa: PLC0415 (the backend under test)

        return [np.asarray(g) for g in jax.grad(function, argnums=tuple(range(len(arguments))))(*arguments)]
    import tensorflow as tf  # noqa: PLC0415

    variables = [tf.Variable(argument) for argument in arguments]
    with tf.GradientTape() as tape:
        value = function(*variables)
    return [None if g is None else g.numpy() for g in tape.gradient(value, variables)]


def count_real_passes(calls):
    """Appends 1 to `calls` when a real batch passes here (not in Keras' symbolic build).

    On JAX every pass in a step is traced (for the gradient, if not by XLA): a
    debug callback runs with each real one, never at `jax.eval_shape`.
    """
    if keras.backend.backend() == "jax":
        import jax  # noqa: PLC0415 (the backend in use)

        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return
    import tensorflow as tf  # noqa: PLC0415

    calls.extend([1] if tf.executing_eagerly() else [])


def forward_passes(layer):
    """A list that gets one entry each time a real batch passes through `layer`."""
    calls = []
    original = layer.call

    def counted(inputs, *args, **kwargs):
        count_real_passes(calls)
        return original(inputs, *args, **kwargs)

    layer.call = counted
    return calls


def snapshot(folder):
    """Every file below `folder` with its size and modification time."""
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            info = os.stat(path)
            state[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture
def learnable_task():
    """Images whose class is set by which colour channel is bright: learnable quickly."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256)
    images = rng.normal(0, 0.5, size=(256, 16, 16, 3)).astype("float32")
    for index, label in enumerate(labels):
        if label < 3:
            images[index, :, :, label] += 1.0
        else:
            images[index] -= 0.7
    return images, labels.astype("int32")


def pytest_configure(config):
    # The fast tier is `pytest -m "not slow"`: the core, losses, distiller, data and the
    # Keras contract. `slow` marks what trains end to end in subprocesses or processes.
    config.addinivalue_line(
        "markers", "slow: end-to-end, subprocess or multi-process (outside the fast tier)")
    # Third-party deprecation noise (Keras' numpy bridge, tf.data adapters) hides real output.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`shuffle=True` was passed:UserWarning")


#: Python source that makes the process behave as on a machine without TensorFlow:
#: `import tensorflow` (and tensorflow_datasets) raises ModuleNotFoundError, and
#: "tensorflow" stays out of `sys.modules` (Keras looks there to tell whether it is loaded).
WITHOUT_TENSORFLOW_PRELUDE = '''
import importlib.abc
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTensorFlow())
'''
