"""The FEED core on JAX: its tests pass there, and a step gives TensorFlow's numbers.

Run from the TensorFlow test process: the JAX side runs in subprocesses
(`KERAS_BACKEND` is read once, at `import keras`). Run as a script,
`python tests/test_backends.py FOLDER` takes the steps of
`test_a_feed_step_gives_the_same_numbers_on_tensorflow_and_jax` on the backend
it is started with.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import tiny_net, WITHOUT_TENSORFLOW_PRELUDE
from keras_feed import FEEDDistiller
from test_teacher_inference import randomise_batchnorm

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# The core tests run on JAX: every test of these files (TensorFlow-only ones
# skip themselves) but the slow `keras.applications` ones and those of
# TensorFlow-side plumbing (tf.data equivalence, the import check).
JAX_TESTS = [
    "test_losses.py", "test_teacher_inference.py", "test_distiller.py", "test_keras_contract.py",
    "test_precision.py",
]
NOT_ON_JAX = (
    "not applications and not nested_backbone and not py_dataset_and_tf_data"
    " and not import_keras_feed"
)


def jax_environment():
    """The environment of a JAX subprocess: its backend, on CPU.

    The models are tiny: XLA's compile time, not their run time, is what takes
    long, and at optimisation level 0 it compiles several times faster.
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def skip_unless_tensorflow_with_jax():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares JAX with TensorFlow: run with KERAS_BACKEND=tensorflow")
    try:
        import jax  # noqa: F401, PLC0415
    except ImportError:
        pytest.skip("jax is not installed (pip install 'keras-feed[test]' installs jax[cpu])")


def test_core_tests_pass_on_jax():
    skip_unless_tensorflow_with_jax()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", NOT_ON_JAX,
         *(os.path.join(TESTS, name) for name in JAX_TESTS)],
        cwd=ROOT, env=jax_environment(), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# -- one FEED step on both backends ---------------------------------------------------

CLASSES = 4


def step_distiller():
    """Student, two teachers (BatchNorm statistics far from their initial values),
    FEED, KD and weight decay: every term of the loss."""
    student = tiny_net("student", classes=CLASSES)
    teachers = [tiny_net(f"teacher_{i}", width=12 + 4 * i, classes=CLASSES, seed=10 + i) for i in range(2)]
    for index, teacher in enumerate(teachers):
        randomise_batchnorm(teacher, index)
    distiller = FEEDDistiller(student, teachers, beta=10.0, kd_weight=0.3, temperature=4.0, weight_decay=5e-4)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
    return distiller


def take_steps(distiller, folder):
    """From the weights and batch in `folder`/start.npz: two training steps and a
    test step. Returns `(logs of each step, the distiller's weights after)`."""
    start = np.load(os.path.join(folder, "start.npz"))
    distiller.set_weights([start[f"distiller_{i}"] for i in range(len(distiller.weights))])
    for n, teacher in enumerate(distiller.frozen_teachers()):
        teacher.set_weights([start[f"teacher_{n}_{i}"] for i in range(len(teacher.weights))])
    images, labels = start["images"], start["labels"]
    logs = [distiller.train_on_batch(images, labels, return_dict=True) for _ in range(2)]
    logs.append(distiller.test_on_batch(images, labels, return_dict=True))
    logs = [{name: float(value) for name, value in step.items()} for step in logs]
    return logs, distiller.get_weights()


def test_a_feed_step_gives_the_same_numbers_on_tensorflow_and_jax(tmp_path):
    skip_unless_tensorflow_with_jax()
    distiller = step_distiller()
    rng = np.random.default_rng(0)
    start = {
        "images": rng.normal(size=(16, 16, 16, 3)).astype("float32"),
        "labels": rng.integers(0, CLASSES, size=16).astype("int32"),
    }
    start.update({f"distiller_{i}": w for i, w in enumerate(distiller.get_weights())})
    for n, teacher in enumerate(distiller.frozen_teachers()):
        start.update({f"teacher_{n}_{i}": w for i, w in enumerate(teacher.get_weights())})
    np.savez(tmp_path / "start.npz", **start)

    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)],
        cwd=ROOT, env=jax_environment(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    tensorflow_logs, tensorflow_weights = take_steps(distiller, str(tmp_path))
    jax_logs = json.loads((tmp_path / "jax_logs.json").read_text())
    jax_weights = np.load(tmp_path / "jax_weights.npz")

    for step, (ours, theirs) in enumerate(zip(tensorflow_logs, jax_logs)):
        assert set(ours) == set(theirs)
        for name in ours:
            assert theirs[name] == pytest.approx(ours[name], rel=1e-4, abs=1e-7), (step, name)
    assert {"feed_loss_0", "feed_loss_1", "kd_loss", "weight_decay_loss"} <= set(jax_logs[0])
    # The updates, not the weights (which they barely move), to the same tolerance.
    for index, ours in enumerate(tensorflow_weights):
        before = start[f"distiller_{index}"]
        np.testing.assert_allclose(
            jax_weights[f"w{index}"] - before, ours - before, rtol=1e-4, atol=1e-6, err_msg=str(index)
        )


if __name__ == "__main__":  # one side of the comparison, on the backend it runs on
    folder = sys.argv[1]
    logs, weights = take_steps(step_distiller(), folder)
    with open(os.path.join(folder, "jax_logs.json"), "w") as handle:
        json.dump(logs, handle)
    np.savez(os.path.join(folder, "jax_weights.npz"), **{f"w{i}": w for i, w in enumerate(weights)})


WITHOUT_TENSORFLOW = WITHOUT_TENSORFLOW_PRELUDE + """
import numpy as np, keras
import keras_feed as kf
statistics = dict(mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29))  # raw pixels in, as keras-feed trains
student = kf.models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=0, **statistics)
teacher = kf.models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=1, **statistics)
distiller = kf.FEEDDistiller(student, [teacher], beta=10.0, kd_weight=0.3, weight_decay=5e-4)
distiller.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, size=(32, 16, 16, 3)).astype("float32")
labels = rng.integers(0, 4, size=32)
history = distiller.fit(images, labels, batch_size=16, epochs=1, verbose=0).history
assert np.isfinite(history["loss"][-1]) and {"feed_loss_0", "kd_loss"} <= set(history)
assert distiller.predict(images[:3], verbose=0).shape == (3, 4)
assert "tensorflow" not in {name.split(".")[0] for name, module in sys.modules.items() if module}
print("ok", keras.backend.backend())
"""


def test_the_core_runs_where_tensorflow_cannot_be_imported():
    """`import keras_feed`, the zoo, the distiller and `fit` on numpy, TensorFlow blocked."""
    skip_unless_tensorflow_with_jax()
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW], cwd=ROOT, env=jax_environment(),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", "jax"]


DATA_PARALLEL = """
import json, sys
import jax, keras, numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import tiny_net
import keras_feed as kf


def fitted(distribution):
    keras.distribution.set_distribution(distribution)
    teachers = [tiny_net(f"t{i}", width=6 + 2 * i, classes=4, seed=10 + i) for i in range(2)]
    keras.utils.set_random_seed(1)  # the NTLs
    distiller = kf.FEEDDistiller(tiny_net("s", classes=4, seed=0), teachers, beta=20.0, kd_weight=0.3,
                                 weight_decay=5e-4)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 4, 64)
    history = distiller.fit(images, labels, batch_size=16, epochs=2, verbose=0, shuffle=False).history
    devices = len(distiller.student.weights[0].value.sharding.device_set)
    return history, [np.asarray(w).tolist() for w in distiller.weights], devices


one = fitted(None)
two = fitted(keras.distribution.DataParallel(devices=jax.devices()))
print(json.dumps({"one": one, "two": two, "devices": len(jax.devices())}))
"""


def test_data_parallel_on_two_jax_devices_matches_one():
    """`keras.distribution.DataParallel` over 2 CPU devices: the same logs and weights."""
    skip_unless_tensorflow_with_jax()
    env = jax_environment()
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2"
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL, TESTS], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    (one_history, one_weights, one_devices), (two_history, two_weights, two_devices) = runs["one"], runs["two"]
    assert runs["devices"] == 2 and (one_devices, two_devices) == (1, 2)
    assert set(one_history) == set(two_history) >= {"loss", "student_loss", "feed_loss_0", "kd_loss"}
    # As the mirrored TensorFlow test: 1e-4 (the devices sum their halves in another order).
    for name, values in one_history.items():
        np.testing.assert_allclose(two_history[name], values, rtol=1e-4, atol=1e-5, err_msg=name)
    for expected, got in zip(one_weights, two_weights):  # BatchNorm statistics too
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# -- the command line on JAX: a run, interrupted and resumed ---------------------------

CLI_RUN = [
    "--method=pfeed", "--dataset=synthetic", "--model=resnet8", "--num_teachers=1",
    "--train_examples=256", "--batch_size=16", "--epochs=2", "--learning_rate=0.05",
    "--eval_batch_size=128", "--checkpoint_steps=2", "--deterministic", "--verbose=0",
]


def start_cli(model_dir, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keras_feed.train", *CLI_RUN, f"--model_dir={model_dir}"],
            cwd=ROOT, env=jax_environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def student_weights(model_dir):
    model = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    return [np.asarray(weight) for weight in model.get_weights()]


def test_the_cli_on_jax_resumes_a_sigterm_bitwise(tmp_path):
    """keras-feed-train with KERAS_BACKEND=jax: SIGTERM in the student stage stops at a
    step with its checkpoint; the same command resumes there and ends with the weights
    of an uninterrupted JAX run, bit for bit (--deterministic; XLA on the CPU)."""
    import signal
    import time

    skip_unless_tensorflow_with_jax()
    reference_dir, model_dir = str(tmp_path / "reference"), str(tmp_path / "run")
    reference = start_cli(reference_dir, str(tmp_path / "reference.txt"))
    process = start_cli(model_dir, str(tmp_path / "interrupted.txt"))
    state = os.path.join(model_dir, "checkpoints", "student", "state.npz")
    deadline = time.time() + 600
    try:
        while not os.path.exists(state):
            assert process.poll() is None, open(tmp_path / "interrupted.txt").read()[-3000:]
            assert time.time() < deadline, "no student checkpoint within 600 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=600) == 143, open(tmp_path / "interrupted.txt").read()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    log = open(tmp_path / "interrupted.txt").read()
    assert "keras-feed-train: interrupted at step" in log and "of stage student" in log, log[-3000:]
    resumed = start_cli(model_dir, str(tmp_path / "resumed.txt"))
    assert resumed.wait(timeout=600) == 0, open(tmp_path / "resumed.txt").read()[-3000:]
    assert "Stage student: resuming at step" in open(tmp_path / "resumed.txt").read()
    assert reference.wait(timeout=600) == 0, open(tmp_path / "reference.txt").read()[-3000:]
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["config"]["method"] == "pfeed" and os.path.isdir(os.path.join(model_dir, "export"))
    for ours, theirs in zip(student_weights(model_dir), student_weights(reference_dir)):
        np.testing.assert_array_equal(ours, theirs)
