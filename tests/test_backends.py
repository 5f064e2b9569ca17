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
from conftest import WITHOUT_TENSORFLOW_PRELUDE, tiny_net
from test_teacher_inference import randomise_batchnorm

from keras_feed import FEEDDistiller
from keras_feed.run import interrupts

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# The core tests run on JAX: every test of these files (TensorFlow-only ones
# skip themselves) but the slow `keras.applications` ones and those of
# TensorFlow-side plumbing (tf.data equivalence, the import check).
JAX_TESTS = [
    "test_losses.py", "test_teacher_inference.py", "test_distiller.py", "test_keras_contract.py",
    "test_precision.py", "test_weighting.py", "test_logged_terms.py", "test_weighted_distiller.py",
    "test_terms.py",
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


#: `(teacher weighting, KD form, dtype policy)` of each comparison, and the relative
#: tolerance of its logs. Under mixed_bfloat16 the backends sum the bfloat16 gradients
#: of the biases differently (measured: a pre-BatchNorm bias moved 3.9e-6 on TensorFlow
#: and 1.6e-2 on JAX, NTL biases up to 60 % apart; kernels within 1.3 %), so the
#: updates and the logs after them are compared in float32 only; in bfloat16, the
#: logs of the two training steps (the weights, the terms and the loss they give,
#: measured within 3e-4) and the teacher weights of every step.
STEP_SETTINGS = {
    ("equal", "ensemble", "float32"): 1e-4,
    ("confidence", "per_teacher", "float32"): 1e-4,
    ("agreement", "ensemble", "float32"): 1e-4,
    ("entropy", "ensemble", "mixed_bfloat16"): 1e-3,
}


def step_distiller(weighting="equal", kd_form="ensemble", policy="float32"):
    """Student, two teachers (BatchNorm statistics far from their initial values),
    FEED, KD and weight decay: every term of the loss, the teachers weighted by
    `weighting`, under the dtype `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        student = tiny_net("student", classes=CLASSES)
        teachers = [tiny_net(f"teacher_{i}", width=12 + 4 * i, classes=CLASSES, seed=10 + i)
                    for i in range(2)]
        for index, teacher in enumerate(teachers):
            randomise_batchnorm(teacher, index)
        distiller = FEEDDistiller(student, teachers, beta=10.0, kd_weight=0.3, temperature=4.0,
                                  weight_decay=5e-4, teacher_weighting=weighting,
                                  kd_form=kd_form)
    finally:
        keras.mixed_precision.set_global_policy("float32")
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


@pytest.mark.parametrize("settings", sorted(STEP_SETTINGS), ids="-".join)
def test_a_feed_step_gives_the_same_numbers_on_tensorflow_and_jax(tmp_path, settings):
    skip_unless_tensorflow_with_jax()
    tolerance = STEP_SETTINGS[settings]
    distiller = step_distiller(*settings)
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
        [sys.executable, os.path.abspath(__file__), str(tmp_path), *settings],
        cwd=ROOT, env=jax_environment(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    tensorflow_logs, tensorflow_weights = take_steps(distiller, str(tmp_path))
    jax_logs = json.loads((tmp_path / "jax_logs.json").read_text())
    jax_weights = np.load(tmp_path / "jax_weights.npz")

    exact = settings[2] == "float32"
    for step, (ours, theirs) in enumerate(zip(tensorflow_logs, jax_logs)):
        assert set(ours) == set(theirs)
        for name in ours:
            if not (exact or step < 2 or name.startswith("teacher_weight_")):
                continue
            assert theirs[name] == pytest.approx(ours[name], rel=tolerance, abs=1e-7), (step, name)
    assert {"feed_loss_0", "feed_loss_1", "kd_loss", "weight_decay_loss"} <= set(jax_logs[0])
    if settings[0] != "equal":
        assert {"teacher_weight_0", "teacher_weight_1"} <= set(jax_logs[0])
    # The updates, not the weights (which they barely move), to the same tolerance.
    for index, ours in enumerate(tensorflow_weights if exact else ()):
        before = start[f"distiller_{index}"]
        np.testing.assert_allclose(
            jax_weights[f"w{index}"] - before, ours - before, rtol=tolerance, atol=1e-6,
            err_msg=str(index)
        )


if __name__ == "__main__":  # one side of the comparison, on the backend it runs on
    folder = sys.argv[1]
    logs, weights = take_steps(step_distiller(*sys.argv[2:]), folder)
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
import keras_feed.run.config  # the settings and their flags; --strategy's names
assert kf.run.distribute.make_strategy("mirrored").num_replicas_in_sync == len(keras.distribution.list_devices())
assert "tensorflow" not in {name.split(".")[0] for name, module in sys.modules.items() if module}
print("ok", keras.backend.backend())
"""


def test_the_core_runs_where_tensorflow_cannot_be_imported():
    """`import keras_feed`, the zoo, the distiller and `fit` on numpy, the settings and
    `--strategy=mirrored`'s devices, TensorFlow blocked."""
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


def two_device_environment():
    """`jax_environment()` with two CPU devices (XLA's host platform split in two)."""
    env = jax_environment()
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2"
    return env


def test_data_parallel_on_two_jax_devices_matches_one():
    """`keras.distribution.DataParallel` over 2 CPU devices: the same logs and weights."""
    skip_unless_tensorflow_with_jax()
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL, TESTS], cwd=ROOT, env=two_device_environment(),
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


def start_cli(model_dir, log_path, arguments=CLI_RUN, env=None):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keras_feed.cli.train", *arguments, f"--model_dir={model_dir}"],
            cwd=ROOT, env=env or jax_environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def student_weights(model_dir):
    model = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    return [np.asarray(weight) for weight in model.get_weights()]


def test_the_cli_on_jax_resumes_a_sigterm_bitwise(tmp_path):
    """keras-feed-train with KERAS_BACKEND=jax: SIGTERM in step 5 of the student stage
    (raised by the run itself, between the checkpoints of steps 4 and 6) stops it with a
    checkpoint of that step; the same command resumes there and ends with the weights of
    an uninterrupted JAX run, bit for bit (--deterministic; XLA on the CPU)."""
    skip_unless_tensorflow_with_jax()
    reference_dir, model_dir = str(tmp_path / "reference"), str(tmp_path / "run")
    reference = start_cli(reference_dir, str(tmp_path / "reference.txt"))
    interrupted = start_cli(model_dir, str(tmp_path / "interrupted.txt"),
                            env={**jax_environment(), interrupts.SIGNAL_AT: "student/5=SIGTERM"})
    assert interrupted.wait(timeout=600) == 143, open(tmp_path / "interrupted.txt").read()[-3000:]
    log = open(tmp_path / "interrupted.txt").read()
    assert ("keras-feed-train: interrupted at step 5 of stage student; run the same command "
            "again to resume from its last checkpoint, step 5 ") in log, log[-3000:]
    resumed = start_cli(model_dir, str(tmp_path / "resumed.txt"))
    assert resumed.wait(timeout=600) == 0, open(tmp_path / "resumed.txt").read()[-3000:]
    assert "Stage student: resuming at step 6 " in open(tmp_path / "resumed.txt").read()
    assert reference.wait(timeout=600) == 0, open(tmp_path / "reference.txt").read()[-3000:]
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["config"]["method"] == "pfeed" and os.path.isdir(os.path.join(model_dir, "export"))
    for ours, theirs in zip(student_weights(model_dir), student_weights(reference_dir)):
        np.testing.assert_array_equal(ours, theirs)


# -- --strategy on JAX: keras.distribution over two CPU devices -----------------------

# Two stages (the teacher, the student) of 2 epochs x 4 steps; validation every epoch;
# the test split (256) in batches of 75: predictions pad their odd batches.
MIRRORED_RUN = [
    "--method=pfeed", "--dataset=synthetic", "--model=resnet8", "--num_teachers=1",
    "--train_examples=64", "--batch_size=16", "--epochs=2", "--learning_rate=0.05",
    "--eval_batch_size=75", "--validation_freq=1", "--checkpoint_steps=2", "--deterministic",
    "--verbose=0",
]

# The largest difference allowed between the weights of the mirrored and the one-device
# run. Measured 6e-7 (student) and 4e-7 (teacher), 3e-5 of the weight at most: XLA sums
# the two devices' halves of each batch in another order than one device sums the batch,
# and 8 steps a stage carry the rounding on. Every variable moves by 1e-2 or more in
# those steps, so a step on another batch than the global one lands far outside.
MIRRORED_ATOL = 1e-5


def log_of(path):
    with open(path) as handle:
        return handle.read()


def test_mirrored_on_two_jax_devices_trains_as_one_device_and_resumes(tmp_path):
    """keras-feed-train on JAX with --strategy=mirrored over 2 CPU devices: interrupted
    in the student stage (the in-process SIGTERM of KERAS_FEED_SIGNAL_AT) and resumed,
    it ends with the weights and logs of a one-device run at the same global batch."""
    skip_unless_tensorflow_with_jax()
    env = two_device_environment()
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    logs = {name: str(tmp_path / f"{name}.txt") for name in ("one", "interrupted", "resumed")}
    # Mirrored on JAX compiles its steps with XLA, --jit_compile or not: so does the reference.
    mirrored = [*MIRRORED_RUN, "--strategy=mirrored"]
    one = start_cli(one_dir, logs["one"], [*MIRRORED_RUN, "--jit_compile"], env)
    interrupted = start_cli(two_dir, logs["interrupted"], mirrored,
                            {**env, interrupts.SIGNAL_AT: "student/3=SIGTERM"})
    try:
        assert interrupted.wait(timeout=600) == 143, log_of(logs["interrupted"])[-3000:]
        log = log_of(logs["interrupted"])
        assert "devices: mirrored over 2 CPU devices (cpu:0, cpu:1), global batch 16 = 8 per device" in log
        assert "interrupted at step 3 of stage student" in log, log[-3000:]
        resumed = start_cli(two_dir, logs["resumed"], mirrored, env)
        assert resumed.wait(timeout=600) == 0, log_of(logs["resumed"])[-3000:]
        assert "Stage student: resuming at step 4" in log_of(logs["resumed"])
        assert one.wait(timeout=600) == 0, log_of(logs["one"])[-3000:]
    finally:
        for process in (one, interrupted):
            if process.poll() is None:
                process.kill()
    assert "devices: default, one CPU device (cpu:0), batch 16" in log_of(logs["one"])

    for ours, theirs in zip(student_weights(two_dir), student_weights(one_dir)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=MIRRORED_ATOL)
    metrics = {name: json.loads((folder / "metrics.json").read_text())
               for name, folder in (("one", one_dir), ("two", two_dir))}
    assert metrics["two"]["config"]["strategy"] == "mirrored"
    for stage in ("teacher_0", "student"):
        history = metrics["one"]["stages"][stage]["history"]
        assert {"loss", "val_loss", "val_accuracy"} <= set(history)
        for name, values in history.items():
            np.testing.assert_allclose(metrics["two"]["stages"][stage]["history"][name], values,
                                       rtol=1e-4, atol=1e-5, err_msg=f"{stage} {name}")
    # Test accuracy from padded predictions: at most one of 256 examples may tip over.
    for model in ("student", "ensemble"):
        assert metrics["two"][model]["test_accuracy"] == pytest.approx(
            metrics["one"][model]["test_accuracy"], abs=1 / 256 + 1e-9), model


def run_cli(arguments, env, model_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "keras_feed.cli.train", *arguments, f"--model_dir={model_dir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_strategies_on_jax_are_planned_or_refused_in_one_line(tmp_path):
    """The dry run names the strategy and its devices; a batch that does not split over
    them, and the tf.distribute strategies, stop with one error line and exit 1."""
    skip_unless_tensorflow_with_jax()
    env = two_device_environment()
    run = ["--method=pfeed", "--dataset=synthetic", "--model=resnet8", "--num_teachers=1",
           "--train_examples=64", "--batch_size=16"]
    commands = {
        "mirrored": [*run, "--strategy=mirrored", "--dry_run"],
        "default": [*run, "--dry_run"],
        "odd_batch": [*run, "--strategy=mirrored", "--batch_size=15", "--dry_run"],
        "multi_worker": [*run, "--strategy=multi_worker"],
    }
    processes = {name: run_cli(arguments, env, tmp_path / name) for name, arguments in commands.items()}
    results = {name: (process.wait(timeout=300), *process.communicate())
               for name, process in processes.items()}
    for name in ("mirrored", "default"):
        assert results[name][0] == 0, results[name][2][-3000:]
    assert ("  devices: mirrored over 2 CPU devices (cpu:0, cpu:1), global batch 16 = 8 per device"
            in results["mirrored"][1].splitlines()), results["mirrored"][1]
    assert "  devices: default, one CPU device (cpu:0), batch 16" in results["default"][1].splitlines()
    for name, expected in (("odd_batch", "multiple of the 2 devices"),
                           ("multi_worker", "on JAX use --strategy=mirrored")):
        code, _, err = results[name]
        errors = [line for line in err.splitlines() if line.startswith("keras-feed-train:")]
        assert code == 1 and len(errors) == 1 and expected in errors[0], err[-3000:]
        assert errors[0].startswith("keras-feed-train: error: ")
    assert not any((tmp_path / name).exists() for name in commands)
