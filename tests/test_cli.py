"""End to end: the commands on tiny synthetic data, and their one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import snapshot

from keras_feed import data
from keras_feed.run import runner, storage
from keras_feed.run.config import TrainConfig

pytestmark = pytest.mark.slow  # end to end, in-process runs and subprocesses (outside the fast tier)

TINY = dict(
    dataset="synthetic",
    model="resnet8",
    train_examples=128,
    batch_size=32,
    epochs=1,
    teacher_epochs=1,
    learning_rate=0.05,
    eval_batch_size=64,
    verbose=0,
)


@pytest.fixture(scope="module")
def pfeed_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("pfeed"))
    config = TrainConfig(method="pfeed", num_teachers=2, model_dir=model_dir, **TINY)
    metrics = runner.run(config)
    return model_dir, metrics


def test_pfeed_run_writes_every_output(pfeed_run):
    model_dir, metrics = pfeed_run
    for name in ("student.keras", "metrics.json", "translators.weights.h5", "teachers/teacher_0.keras",
                 "teachers/teacher_1.keras", "export/saved_model.pb"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert os.listdir(os.path.join(model_dir, "logs"))
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        written = json.load(handle)
    assert written["method"] == "pfeed"
    # The reported accuracy is the saved student's, on the run's own test split.
    settings = written["config"]
    test_split = data.load(
        settings["dataset"], data_dir=settings["data_dir"], train_examples=settings["train_examples"],
        seed=settings["seed"], subset_seed=settings["subset_seed"], image_size=settings["image_size"],
    ).test(settings["eval_batch_size"])
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in test_split])
    logits = keras.saving.load_model(os.path.join(model_dir, "student.keras")).predict(
        test_split.map(lambda images, _: images), verbose=0
    )
    assert len(labels) == len(logits) == written["num_test"] == 256
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert written["student"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert len(written["teachers"]) == 2 and written["ensemble"]["size"] == 2
    assert set(written["stages"]) == {"teacher_0", "teacher_1", "student"}
    assert "feed_loss_1" in written["stages"]["student"]["last_epoch"]
    assert written == json.loads(json.dumps(metrics))


def test_export_holds_the_student_alone_and_matches(pfeed_run):
    model_dir, _ = pfeed_run
    student = storage.load_model(os.path.join(model_dir, "student.keras"))
    layer = keras.layers.TFSMLayer(os.path.join(model_dir, "export"), call_endpoint="serving_default")
    # The export takes uint8 images, as stored; the normalisation is inside it.
    images = np.random.default_rng(0).integers(
        0, 256, size=(8,) + tuple(student.inputs[0].shape[1:])).astype("uint8")
    outputs = layer(images)
    exported = next(iter(outputs.values())) if isinstance(outputs, dict) else outputs
    np.testing.assert_allclose(np.asarray(exported), student.predict(images, verbose=0), atol=1e-5)
    exported_count = sum(int(np.prod(v.shape)) for v in layer.weights)
    assert exported_count == student.count_params()


def test_rerun_reuses_trained_teachers(pfeed_run, tmp_path):
    model_dir, _ = pfeed_run
    before = snapshot(os.path.join(model_dir, "teachers"))
    config = TrainConfig(
        method="pfeed", num_teachers=2, teacher_dir=os.path.join(model_dir, "teachers"),
        model_dir=str(tmp_path), **TINY
    )
    metrics = runner.run(config)
    assert set(metrics["stages"]) == {"student"}
    assert snapshot(os.path.join(model_dir, "teachers")) == before


def run_command(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"keras_feed.cli.{module}", *args],
        capture_output=True, text=True, timeout=300,
    )


def test_eval_and_export_commands(pfeed_run, tmp_path):
    model_dir, metrics = pfeed_run
    student_path = os.path.join(model_dir, "student.keras")
    result = run_command("evaluate", f"--model_path={student_path}", "--dataset=synthetic")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["accuracy"] == pytest.approx(metrics["student"]["test_accuracy"], abs=1e-6)
    export_dir = str(tmp_path / "served")
    result = run_command("export", f"--student={student_path}", f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr
    result = run_command("evaluate", f"--model_path={export_dir}", "--dataset=synthetic")
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)


BAD_INPUTS = [
    (["--model=resnet9000"], "resnet9000"),
    (["--dataset=nosuchdata"], "nosuchdata"),
    (["--method=magic"], "magic"),
    (["--teachers=/nonexistent/teacher.keras"], "/nonexistent/teacher.keras"),
    (["--student_layer=nope"], "nope"),
    (["--dataset=idx", "--data_dir=/nonexistent/idx"], "/nonexistent/idx"),
    (["--batch_size=0"], "batch_size"),
]


@pytest.mark.parametrize("args,named", BAD_INPUTS)
def test_bad_input_is_one_line_and_changes_nothing(pfeed_run, args, named):
    model_dir, _ = pfeed_run
    before = snapshot(model_dir)
    base = ["--dataset=synthetic", "--model=resnet8", "--epochs=1", f"--model_dir={model_dir}"]
    result = run_command("train", *base, *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and named in lines[-1] and lines[-1].startswith("keras-feed-train: error:"), result.stderr
    assert snapshot(model_dir) == before


def test_teacher_with_wrong_class_count(pfeed_run, tmp_path):
    model_dir, _ = pfeed_run
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.ReLU(name="features")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    path = str(tmp_path / "three_classes.keras")
    keras.Model(inputs, outputs).save(path)
    result = run_command("train", "--dataset=synthetic", "--model=resnet8", f"--teachers={path}",
                         f"--model_dir={tmp_path / 'out'}")
    assert result.returncode == 1
    assert "3 classes" in result.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "out")


# -- every installed command: its own --help, and the Keras backends it runs on ----------

#: Each command, a flag of its own and the start of that flag's help.
COMMANDS = {
    "keras-feed-train": ("lr_decay_factor",
                         "Step schedule: the decay factor (1: no decay). Range: (0, 1]."),
    "keras-feed-eval": ("model_path", "A .keras file, a SavedModel folder"),
    "keras-feed-export": ("student", "The student's .keras file."),
    "keras-feed-analyze": ("runs", "Comma-separated run folders"),
}

#: The flags each command takes besides its own (export reads no dataset).
SHARED_FLAGS = {"keras-feed-export": ("unsafe_load",)}
DATA_AND_LOADING = ("dataset", "data_dir", "image_size", "unsafe_load")


def installed(command):
    path = shutil.which(command)
    assert path, f"{command} is not installed (pip install -e .)"
    return path


def imported_modules(stderr):
    """The modules a run with PYTHONPROFILEIMPORTTIME=1 imported, from its stderr."""
    return set(re.findall(r"^import time:.*\|\s+([\w.]+)$", stderr, re.MULTILINE))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_the_command_s_own_flags(command):
    name, help_text = COMMANDS[command]
    result = subprocess.run([installed(command), "--help"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # absl wraps the help at 80 columns
    assert f"--{name}: {help_text}" in text, result.stdout
    assert command in result.stdout.splitlines()[0]  # the command's own usage first
    for flag in SHARED_FLAGS.get(command, DATA_AND_LOADING):
        assert re.search(rf"--(\[no\])?{flag}:", text), flag
    for absl_flag in ("--flagfile:", "--logtostderr", "--verbosity", "--only_check_args"):
        assert absl_flag not in text
    if command == "keras-feed-train":  # every setting, with its range
        from keras_feed.run import config

        for spec in config.flag_specs():
            assert re.search(rf"--(\[no\])?{spec.name}:", text), spec.name
            if spec.bounds is not None:
                assert f"Range: {'each ' if spec.item else ''}{spec.bounds}." in text, spec.name
    else:  # --method and --teacher_preprocessing need train's registries, and so Keras
        assert "tensorflow" not in imported_modules(result.stderr)
        assert "keras" not in imported_modules(result.stderr)


def test_help_has_a_short_form():
    result = subprocess.run([installed("keras-feed-export"), "-h"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "--student: The student's .keras file." in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unsupported_backend_is_refused_in_one_line(command, tmp_path):
    result = subprocess.run([installed(command), "--dataset=synthetic"], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, KERAS_BACKEND="torch"))
    assert result.returncode == 1
    expected = (
        f"{command}: error: keras-feed runs on the Keras backends tensorflow and jax, not "
        "'torch' (set by KERAS_BACKEND); set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax.")
    assert result.stderr.splitlines() == [expected], result.stderr
    assert not result.stdout


@pytest.mark.parametrize("command,args", [
    ("keras-feed-train", ["--dataset=synthetic", "--dry_run"]),
    ("keras-feed-eval", ["--model_path=student.keras", "--dataset=synthetic"]),
])
def test_a_keras_json_backend_is_refused_in_one_line(command, args, tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "numpy"}))
    environment = dict(os.environ, KERAS_HOME=str(tmp_path))
    environment.pop("KERAS_BACKEND", None)
    model_dir = tmp_path / "run"
    result = subprocess.run([installed(command), *args, f"--model_dir={model_dir}"],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 1
    expected = (
        f"{command}: error: keras-feed runs on the Keras backends tensorflow and jax, not "
        f"'numpy' (from {tmp_path / 'keras.json'}); set KERAS_BACKEND=tensorflow or "
        "KERAS_BACKEND=jax.")
    assert result.stderr.splitlines() == [expected], result.stderr
    assert not model_dir.exists()
