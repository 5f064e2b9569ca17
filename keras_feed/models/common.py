"""Building blocks shared by the keras-feed model zoo.

Conventions used by every architecture in :mod:`keras_feed.models`:

* channels-last tensors, ``(batch, height, width, channels)``;
* convolutions have no bias and use ``he_normal`` (Keras ``HeNormal``,
  fan-in, truncated normal) initialisation; each is followed by
  ``BatchNormalization(momentum=0.9, epsilon=1e-5)`` (the PyTorch defaults:
  Keras ``momentum=0.9`` is PyTorch ``momentum=0.1``);
* strided convolutions with a kernel larger than 1x1 are preceded by an
  explicit symmetric ``ZeroPadding2D`` (``padding="valid"``) so the sampling
  grid matches the PyTorch reference implementations (TensorFlow's
  ``padding="same"`` pads bottom/right only for stride 2 on even inputs);
* no kernel regulariser (weight decay is applied by the trainer);
* the classifier is ``GlobalAveragePooling2D`` -> ``Dense(num_classes)``
  returning logits in float32 (the Dense layer has ``dtype="float32"``, so
  the output stays float32 under a ``mixed_float16`` policy). The Dense
  kernel uses the PyTorch ``nn.Linear`` default (uniform with bound
  ``1/sqrt(fan_in)``), the bias starts at zero;
* only built-in Keras layers are used (no ``Lambda``), so every model saves
  to ``.keras`` and reloads with ``keras.models.load_model(safe_mode=True)``
  without importing keras-feed.

Seeding: :func:`seed_scope` (entered by :func:`keras_feed.models.build` when
a ``seed`` is given) makes :func:`next_seed` return a deterministic stream of
integer seeds, one per initialiser or dropout layer, so two builds with the
same seed give identical weights without touching TensorFlow's global random
state.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from typing import Iterator, Optional, Sequence

import keras
from keras import layers

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

FEATURES_LAYER = "features"

_SEED_STREAM: contextvars.ContextVar[Optional[random.Random]] = (
    contextvars.ContextVar("keras_feed_models_seed_stream", default=None)
)


@contextlib.contextmanager
def seed_scope(seed: Optional[int]) -> Iterator[None]:
    """Make model construction inside the block deterministic.

    With an integer ``seed``:

    * :func:`next_seed` (used by all keras-feed builders) yields a
      reproducible sequence of per-layer integer seeds;
    * Python's global :mod:`random` generator is temporarily re-seeded with
      ``seed``. Keras draws the seed of every initialiser or dropout layer
      created without an explicit seed from that generator, so builders
      registered by users that rely on Keras' default initialisers are also
      reproducible. The previous state of :mod:`random` is restored on exit.

    With ``seed=None`` the block is a no-op (fresh random weights each time).
    """
    if seed is None:
        token = _SEED_STREAM.set(None)
        try:
            yield
        finally:
            _SEED_STREAM.reset(token)
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    token = _SEED_STREAM.set(random.Random(seed))
    saved_state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved_state)
        _SEED_STREAM.reset(token)


def next_seed() -> Optional[int]:
    """Next per-layer seed of the active :func:`seed_scope`, or ``None``."""
    stream = _SEED_STREAM.get()
    if stream is None:
        return None
    return stream.randrange(1, 2**31 - 1)


def conv_initializer() -> keras.initializers.Initializer:
    """``he_normal`` initialiser, seeded from the active :func:`seed_scope`."""
    return keras.initializers.HeNormal(seed=next_seed())


def dense_initializer() -> keras.initializers.Initializer:
    """PyTorch ``nn.Linear`` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=next_seed()
    )


def model_input(input_shape: Sequence[Optional[int]]) -> keras.KerasTensor:
    return keras.Input(shape=tuple(input_shape), name="input")


def conv(
    x,
    filters: int,
    kernel_size: int,
    strides: int = 1,
    *,
    groups: int = 1,
    name: str,
):
    """Bias-free ``kernel_size`` x ``kernel_size`` convolution.

    Padding follows PyTorch's ``padding=kernel_size // 2``: ``"same"`` for
    stride 1 (symmetric for odd kernels), explicit symmetric zero padding +
    ``"valid"`` for strided convolutions.
    """
    padding = "same"
    if strides > 1:
        padding = "valid"
        if kernel_size > 1:
            x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=False,
        kernel_initializer=conv_initializer(),
        name=name,
    )(x)


def bn(x, *, name: str):
    return layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )(x)


def relu(x, *, name: str):
    return layers.ReLU(name=name)(x)


def conv_bn(x, filters, kernel_size, strides=1, *, groups=1, name: str):
    x = conv(x, filters, kernel_size, strides, groups=groups, name=f"{name}_conv")
    return bn(x, name=f"{name}_bn")


def conv_bn_relu(x, filters, kernel_size, strides=1, *, groups=1, name: str):
    x = conv_bn(x, filters, kernel_size, strides, groups=groups, name=name)
    return relu(x, name=f"{name}_relu")


def zero_pad_shortcut(x, filters: int, strides: int, *, name: str):
    """Parameter-free "option A" shortcut of He et al. (2016).

    Spatial subsampling by ``strides`` (``MaxPooling2D(pool_size=1)`` is the
    same as ``x[:, ::s, ::s, :]``) followed by zero channels appended after
    the identity channels. The PyTorch reference splits the zero channels
    evenly on both sides; the two layouts differ only by a channel
    permutation, which is irrelevant when training from scratch.
    """
    in_channels = x.shape[-1]
    if strides > 1:
        x = layers.MaxPooling2D(
            pool_size=1, strides=strides, padding="valid", name=f"{name}_subsample"
        )(x)
    extra = filters - in_channels
    if extra == 0:
        return x
    if extra < 0 or extra % in_channels:
        raise ValueError(
            "zero-padding shortcut needs the output channels to be a multiple "
            f"of the input channels (got {in_channels} -> {filters})"
        )
    zeros = layers.Rescaling(0.0, name=f"{name}_zeros")(x)
    return layers.Concatenate(axis=-1, name=f"{name}_zeropad")(
        [x] + [zeros] * (extra // in_channels)
    )


def shortcut(x, filters: int, strides: int, kind: str, *, name: str):
    """Identity if shapes match, else projection (1x1 conv + BN) or zero-pad."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    if kind == "projection":
        return conv_bn(x, filters, 1, strides, name=f"{name}_proj")
    if kind == "zero_pad":
        return zero_pad_shortcut(x, filters, strides, name=f"{name}_short")
    raise ValueError(
        f"unknown shortcut type {kind!r}; expected 'projection' or 'zero_pad'"
    )


def basic_block(
    x,
    filters: int,
    strides: int = 1,
    *,
    shortcut_type: str = "projection",
    name: str,
    out_name: Optional[str] = None,
):
    """Post-activation basic residual block (two 3x3 convs), He et al. 2016."""
    y = conv_bn_relu(x, filters, 3, strides, name=f"{name}_1")
    y = conv_bn(y, filters, 3, 1, name=f"{name}_2")
    s = shortcut(x, filters, strides, shortcut_type, name=name)
    y = layers.Add(name=f"{name}_add")([s, y])
    return relu(y, name=out_name or f"{name}_out")


def bottleneck_block(
    x,
    width: int,
    out_filters: int,
    strides: int = 1,
    *,
    groups: int = 1,
    name: str,
    out_name: Optional[str] = None,
):
    """Post-activation bottleneck block: 1x1 (width) -> 3x3 (width, groups,
    stride) -> 1x1 (out_filters); projection shortcut when shapes change.

    The stride sits on the 3x3 convolution (torchvision "ResNet v1.5" and
    the CIFAR ResNeXt reference)."""
    y = conv_bn_relu(x, width, 1, name=f"{name}_1")
    y = conv_bn_relu(y, width, 3, strides, groups=groups, name=f"{name}_2")
    y = conv_bn(y, out_filters, 1, name=f"{name}_3")
    s = shortcut(x, out_filters, strides, "projection", name=name)
    y = layers.Add(name=f"{name}_add")([s, y])
    return relu(y, name=out_name or f"{name}_out")


def classifier(inputs, features, num_classes: int, *, name: str) -> keras.Model:
    """GAP -> Dense(num_classes) logits (float32) and wrap in a Model."""
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    logits = layers.Dense(
        num_classes,
        kernel_initializer=dense_initializer(),
        bias_initializer="zeros",
        dtype="float32",
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=name)


def check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value
