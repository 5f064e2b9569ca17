"""Reliability: killed runs resume bitwise, outputs are atomic, non-finite losses stop
a run cleanly, bad inputs fail with one line before training, unsafe files are refused.

Every run here is a `python -m keras_feed.cli.train` subprocess on tiny synthetic data;
independent runs go concurrently (a few at a time) to keep the file's time modest.
Interrupted runs are stopped by the run itself at an exact point
(`keras_feed.run.interrupts.signal_point`), never by a signal timed from outside, so a
slow, busy machine only makes the tests slower.
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from conftest import snapshot

from keras_feed.run import checkpointing, files, interrupts, run_folder, storage

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

TIMEOUT = 600  # seconds for one run on a busy machine
POOL = 3  # runs at a time

# 16 steps an epoch, 2 epochs for the teacher and 2 for the student, a checkpoint every
# 3 steps.
RUN = [
    "--method=pfeed",
    "--dataset=synthetic",
    "--model=resnet8",
    "--num_teachers=1",
    "--train_examples=256",
    "--batch_size=16",
    "--epochs=2",
    "--teacher_epochs=2",
    "--learning_rate=0.05",
    "--lr_schedule=cosine",
    "--checkpoint_steps=3",
    "--eval_batch_size=128",
    "--deterministic",
    "--verbose=0",
]
# For the inputs that must be refused: small, so that a wrongly accepted one ends fast.
SMALL = ["--dataset=synthetic", "--model=resnet8", "--train_examples=64", "--batch_size=16",
         "--epochs=1", "--teacher_epochs=1", "--num_teachers=1", "--verbose=0"]


def command(*args):
    return [sys.executable, "-m", "keras_feed.cli.train", *args]


def start(args, log_path, environment=None):
    """Starts a training run in its own process group; its output goes to `log_path`.

    `environment`: variables to set for it (e.g. `interrupts.SIGNAL_AT`).
    """
    log = open(log_path, "w")
    env = {key: value for key, value in os.environ.items() if key != interrupts.SIGNAL_AT}
    process = subprocess.Popen(command(*args), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**env, **(environment or {})})
    log.close()
    return process


def finish(process, log_path):
    """Waits for `process`; returns `(returncode, output)`."""
    process.wait(timeout=TIMEOUT)
    with open(log_path) as handle:
        return process.returncode, handle.read()


def run(args, log_path):
    return finish(start(args, log_path), log_path)


def error_lines(output):
    """The output lines that are not TensorFlow's C++ start-up chatter."""
    return [line for line in output.splitlines()
            if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))]


def student_weights(model_dir):
    model = storage.load_model(os.path.join(model_dir, "student.keras"))
    return [np.asarray(w) for w in model.get_weights()]


def assert_bitwise_equal(weights, reference):
    assert len(weights) == len(reference)
    for index, (value, expected) in enumerate(zip(weights, reference)):
        assert value.dtype == expected.dtype and value.shape == expected.shape, index
        assert value.tobytes() == expected.tobytes(), f"weight {index} differs"


def assert_outputs_complete(model_dir):
    """Every output file present is whole: no half-written file looks complete."""
    for root, _, names in os.walk(model_dir):
        if files.PARTIAL_MARK in root:
            continue
        for name in names:
            path = os.path.join(root, name)
            if files.PARTIAL_MARK in name or name == files.LOCK_NAME:
                continue
            if name.endswith(".keras"):
                storage.load_model(path)
            elif name.endswith(".json"):
                with open(path) as handle:
                    json.load(handle)
            elif name.endswith((".npz", ".h5")):
                assert zipfile.is_zipfile(path) or name.endswith(".h5"), path
                if name.endswith(".npz"):
                    with np.load(path) as archive:
                        archive["meta"]
    export = os.path.join(model_dir, "export")
    if os.path.exists(export):
        assert os.path.isfile(os.path.join(export, "saved_model.pb"))
        assert os.path.isdir(os.path.join(export, "variables"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted deterministic run, started at once and awaited when needed."""
    folder = str(tmp_path_factory.mktemp("reference"))
    model_dir = os.path.join(folder, "run")
    log_path = os.path.join(folder, "log.txt")
    process = start(RUN + [f"--model_dir={model_dir}"], log_path)
    done = {}

    def wait():
        if not done:
            done["result"] = finish(process, log_path)
            assert done["result"][0] == 0, done["result"][1]
        return model_dir

    yield wait
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# -- 1. resume -----------------------------------------------------------------


def saved_step(path):
    """The step recorded in the stage checkpoint `path`, or None if there is none to read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return int(json.loads(bytes(archive["meta"]).decode("utf-8"))["step"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


STAGE_STEPS = 32  # 2 epochs x 16 steps, for the teacher and the student alike
# Where each attempt is stopped, by the run itself (`interrupts.signal_point`), so that
# nothing depends on timing: SIGKILL as the teacher begins step 8 (its last checkpoint
# is step 6's), SIGTERM in the student's step 16 (its first epoch's last step), SIGKILL
# once student.keras is written. (stage, signal point, signal, checkpoint left on disk)
INTERRUPTIONS = [
    ("teacher_0", "teacher_0/8", signal.SIGKILL, 6),
    ("student", "student/16", signal.SIGTERM, 16),
    ("outputs", "outputs/student.keras", signal.SIGKILL, None),
]


def test_killed_run_resumes_to_bitwise_equal_weights(reference, tmp_path):
    """SIGKILL mid-stage in the teacher and while the outputs are written, SIGTERM at the
    end of an epoch of the student, rerun: each interrupted stage resumes at the step
    after its last checkpoint (for SIGTERM, the one written at the interruption), the
    stages done are not redone, and the student ends bitwise equal to an uninterrupted
    run."""
    model_dir = str(tmp_path / "run")
    args = RUN + [f"--model_dir={model_dir}"]
    checkpoints = os.path.join(model_dir, "checkpoints")
    logs, resumes = [], []
    for attempt, (stage, point, signal_number, kept) in enumerate(INTERRUPTIONS):
        log_path = str(tmp_path / f"attempt_{attempt}.txt")
        signal_at = {interrupts.SIGNAL_AT: f"{point}={signal_number.name}"}
        returncode, output = finish(start(args, log_path, signal_at), log_path)
        logs.append(output)
        context = f"attempt {attempt}:\n{output}"
        expected = -signal.SIGKILL if signal_number == signal.SIGKILL else 128 + signal_number
        assert returncode == expected, context
        if signal_number == signal.SIGTERM:
            assert re.search(rf"interrupted at step {kept} of stage {stage}; run the same "
                             rf"command again to resume from its last checkpoint, step "
                             rf"{kept} ", output), context
        if stage != "outputs":
            # The process is dead: the checkpoint on disk is the one the rerun restores.
            state = os.path.join(checkpoints, stage, checkpointing.STATE_FILE)
            assert saved_step(state) == kept, context
            resumes.append((attempt + 1, stage, kept + 1))
        assert_outputs_complete(model_dir)
    returncode, output = run(args, str(tmp_path / "final.txt"))
    logs.append(output)
    assert returncode == 0, output
    context = "\n---\n".join(error_lines("\n".join(logs)))

    try:
        assert_bitwise_equal(student_weights(model_dir), student_weights(reference()))
    except AssertionError as error:
        raise AssertionError(f"{error}; {context}") from None
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(reference(), "metrics.json")) as handle:
        expected = json.load(handle)
    assert metrics["student"] == expected["student"], context
    assert metrics["teachers"] == expected["teachers"], context
    for stage in ("teacher_0", "student"):
        assert metrics["stages"][stage]["history"] == expected["stages"][stage]["history"], context
    assert not os.path.exists(checkpoints), "checkpoints are removed once the run is complete"

    # The attempt after each mid-stage kill resumed that stage at the step after its last
    # checkpoint: "Stage <stage>: resuming at step N (epoch e, batch b) of 32", N > 0.
    for attempt, stage, step in resumes:
        found = re.findall(rf"Stage {stage}: resuming at step (\d+) \(.*\) of (\d+)", logs[attempt])
        assert found == [(str(step), str(STAGE_STEPS))] and step > 0, context
    # Once the student had a checkpoint, no attempt trained the teacher or began the
    # student afresh; after the outputs' kill, the finished student was not retrained.
    after_student_kill = "\n".join(logs[2:])
    assert "Reusing teacher" in after_student_kill, context
    assert "Stage teacher_0" not in after_student_kill, context
    assert "Stage student: 2 epochs" not in after_student_kill, context
    assert "Stage student: trained already" in logs[3], context
    assert "Stage student: resuming" not in logs[3], context
    # Every attempt wrote metrics.json at most once; the last attempts did not retrain.
    assert sum("Outputs in" in log for log in logs) == 1, context


def test_run_directory_records_compares_and_locks_settings(tmp_path):
    import dataclasses

    from keras_feed.run.config import TrainConfig

    config = TrainConfig(model_dir=str(tmp_path / "run"), epochs=2, dataset="synthetic")
    with run_folder.RunDirectory(config) as model_dir:
        assert not model_dir.resuming and model_dir.finished is None
        with pytest.raises(ValueError, match="Another process is writing"):
            with run_folder.RunDirectory(config):
                pass
    changed = dataclasses.replace(config, verbose=2, checkpoint_steps=7, strategy="mirrored")
    with run_folder.RunDirectory(changed) as model_dir:
        assert model_dir.resuming
    with pytest.raises(ValueError, match=r"--epochs: 2 there, 3 now; --seed: 0 there, 1 now"):
        with run_folder.RunDirectory(dataclasses.replace(config, epochs=3, seed=1)):
            pass


def test_stage_segments_resume_mid_epoch():
    stage = checkpointing.StageCheckpoint("unused", stage="s", steps_per_epoch=10, epochs=3)
    assert stage.segments() == [(0, 0, 3)]
    stage.step = 14
    assert stage.segments() == [(1, 4, 2), (2, 0, 3)]
    assert stage.describe(15) == "step 15 (epoch 2, batch 5)"
    stage.step = 20
    assert stage.segments() == [(2, 0, 3)]
    stage.step = 30
    assert stage.complete and stage.segments() == []


def test_checkpoint_of_another_schedule_is_refused(tmp_path):
    from conftest import tiny_net

    from keras_feed.core.distiller import FEEDDistiller

    def trainer():
        distiller = FEEDDistiller(tiny_net("student", classes=4))
        distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return distiller

    first = checkpointing.StageCheckpoint(str(tmp_path), stage="student", steps_per_epoch=8, epochs=2)
    assert first.restore(trainer()) == 0
    first.step = 5
    first.save()
    again = checkpointing.StageCheckpoint(str(tmp_path), stage="student", steps_per_epoch=8, epochs=2)
    assert again.restore(trainer()) == 5
    other = checkpointing.StageCheckpoint(str(tmp_path), stage="student", steps_per_epoch=8, epochs=3)
    with pytest.raises(checkpointing.CheckpointError, match="written for 2 epochs x 8 steps"):
        other.restore(trainer())


# -- 2. atomic outputs -------------------------------------------------------------


def test_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "metrics.json"
    files.write_json(path, {"version": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as temporary:
            with open(temporary, "w") as handle:
                handle.write('{"version": ')  # half a file, then a crash
            raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_export_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "export"
    with files.atomic_path(folder, directory=True) as temporary:
        open(os.path.join(temporary, "saved_model.pb"), "w").write("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(folder, directory=True) as temporary:
            open(os.path.join(temporary, "saved_model.pb"), "w").write("new, half")
            raise RuntimeError("crash")
    assert (folder / "saved_model.pb").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert oct(os.stat(folder).st_mode & 0o077) != "0o0", "the folder keeps the umask's permissions"


KILLED_WRITER = """
import os, signal, sys
from keras_feed.run import files

with files.atomic_path(sys.argv[1]) as temporary:
    with open(temporary, "w") as handle:
        handle.write("half of a new file")
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_mid_write_leaves_old_file_and_a_recognised_partial(tmp_path):
    target = tmp_path / "student.keras"
    target.write_text("the old, whole file")
    os.makedirs(tmp_path / "export")
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=TIMEOUT)
    assert result.returncode == -signal.SIGKILL
    assert target.read_text() == "the old, whole file"
    leftovers = [name for name in os.listdir(tmp_path) if name not in ("student.keras", "export")]
    assert len(leftovers) == 1 and files.PARTIAL_MARK in leftovers[0]
    stale_dir = tmp_path / "checkpoints" / f".state.npz{files.PARTIAL_MARK}x.tmp"
    os.makedirs(stale_dir)
    assert len(files.remove_partial_files(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export", "student.keras"]
    assert os.listdir(tmp_path / "checkpoints") == []


# -- 3. non-finite losses, 4. bad inputs, 5. safe loading ---------------------------------


def save_teacher(path, *, classes=10, shape=(16, 16, 3), feature_layer="features",
                 with_lambda=False, kernel_value=None):
    """A tiny functional teacher; optional Lambda layer or constant (huge) kernels."""
    initializer = "glorot_uniform" if kernel_value is None else keras.initializers.Constant(kernel_value)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer=initializer)(inputs)
    if with_lambda:
        x = keras.layers.Lambda(lambda tensor: tensor * 2.0)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer=initializer)(x)
    x = keras.layers.ReLU(name=feature_layer)(x)
    outputs = keras.layers.Dense(classes)(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs, name="tiny_teacher").save(str(path))
    return str(path)


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def idx_folder(folder, *, labels_short=False, truncate=False):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 64), ("t10k", 32)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 255, size=(count, 16, 16)))
        labels = rng.integers(0, 4, size=count - (1 if labels_short and prefix == "train" else 0))
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels)
    if truncate:
        path = os.path.join(folder, "train-images-idx3-ubyte")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-100])
    return str(folder)


def image_folder(folder, *, classes=("a", "b"), corrupt=None):
    import tensorflow as tf

    png = tf.io.encode_png(np.full((16, 16, 3), 128, np.uint8)).numpy()
    for split in ("train", "test"):
        for name in classes:
            os.makedirs(os.path.join(folder, split, name))
            for index in range(8 if split == "train" else 2):
                open(os.path.join(folder, split, name, f"{index}.png"), "wb").write(png)
    if corrupt:
        open(os.path.join(folder, corrupt), "wb").write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 8)
    return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad (and one unsafe) input files, made once."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = {
        "lambda": save_teacher(folder / "lambda.keras", with_lambda=True),
        "three_classes": save_teacher(folder / "three.keras", classes=3),
        "no_features": save_teacher(folder / "nofeat.keras", feature_layer="last_relu"),
        "grey_input": save_teacher(folder / "grey.keras", shape=(28, 28, 1)),
        "inf_features": save_teacher(folder / "inf.keras", kernel_value=1e30),
        "plain": save_teacher(folder / "plain.keras"),
        "truncated_idx": idx_folder(folder / "idx_truncated", truncate=True),
        "short_labels": idx_folder(folder / "idx_short", labels_short=True),
        "corrupt_png": image_folder(str(folder / "png_corrupt"), corrupt="train/b/3.png"),
        "one_class": image_folder(str(folder / "png_one"), classes=("a",)),
        "text_file": str(folder / "notes.txt"),
    }
    open(paths["text_file"], "w").write("not a model\n")
    open(folder / "text.keras", "w").write("not a zip archive\n")
    paths["text_keras"] = str(folder / "text.keras")
    with zipfile.ZipFile(folder / "broken.keras", "w") as archive:
        archive.writestr("config.json", "{not json")
    paths["broken_keras"] = str(folder / "broken.keras")
    return paths


# (id, extra flags, text the one error line must contain); {name} -> inputs[name],
# {done} -> the reference run's finished model_dir, used as --model_dir by default.
BAD_INPUTS = [
    ("epochs_zero", ["--epochs=0"], "--epochs"),
    ("negative_checkpoint_steps", ["--checkpoint_steps=-2"], "--checkpoint_steps"),
    ("lr_decay_not_numbers", ["--lr_decay_epochs=ten,20"], "--lr_decay_epochs"),
    ("unknown_flag", ["--no_such_flag=1"], "no_such_flag"),
    ("flag_of_wrong_type", ["--epochs=many"], "--epochs"),
    ("missing_flagfile", ["--flagfile=/nonexistent/run.cfg"], "/nonexistent/run.cfg"),
    ("stray_argument", ["resnet20"], "Unexpected arguments: resnet20"),
    ("batch_larger_than_data", ["--train_examples=16", "--batch_size=32"], "batch_size"),
    ("teacher_not_a_keras_file", ["--teachers={text_keras}"], "text.keras"),
    ("teacher_broken_archive", ["--teachers={broken_keras}"], "broken.keras"),
    ("teacher_wrong_class_count", ["--teachers={three_classes}"], "3 classes"),
    ("teacher_missing_feature_layer", ["--teachers={no_features}"], "'features'"),
    ("teacher_wrong_input_shape", ["--teachers={grey_input}"], "(28, 28, 1)"),
    ("teacher_with_code_refused", ["--teachers={lambda}"], "--unsafe_load"),
    ("teacher_input_convention_unknown", ["--teachers={plain}"], "--teacher_preprocessing=dataset"),
    ("student_layer_not_a_map", ["--student_layer=logits"], "(batch, H, W, C)"),
    ("idx_truncated", ["--dataset=idx", "--data_dir={truncated_idx}"], "truncated"),
    ("idx_label_count", ["--dataset=idx", "--data_dir={short_labels}"], "labels"),
    ("image_corrupt", ["--dataset=folder", "--data_dir={corrupt_png}"], "3.png"),
    ("image_one_class", ["--dataset=folder", "--data_dir={one_class}"], "at least 2 class"),
    ("model_dir_is_a_file", ["--model_dir={text_file}"], "notes.txt"),
    ("finished_run_other_settings", RUN + ["--model_dir={done}", "--epochs=3"], "--epochs: 2 there, 3 now"),
]
# Runs that must work (or fail) in training; {own} -> a fresh model_dir of their own.
OTHER_RUNS = {
    "finished_rerun": RUN + ["--model_dir={done}"],
    "unsafe_load_accepted": SMALL + ["--teachers={lambda}", "--unsafe_load", "--teacher_preprocessing=none",
                                     "--model_dir={own}"],
    "non_finite_teacher": SMALL + ["--teachers={inf_features}", "--teacher_preprocessing=none",
                                   "--model_dir={own}"],
    "divergence": ["--method=ce", "--dataset=synthetic", "--model=resnet8", "--train_examples=128",
                   "--batch_size=16", "--epochs=2", "--learning_rate=1000", "--checkpoint_steps=1",
                   "--verbose=0", "--model_dir={own}"],
}


@pytest.fixture(scope="module")
def runs(reference, inputs, tmp_path_factory):
    """Every BAD_INPUTS row and OTHER_RUNS entry, run a few at a time.

    Returns `({name: (returncode, output, own model_dir)}, snapshot before, reference dir)`.
    """
    done = reference()
    before = snapshot(done)
    folder = tmp_path_factory.mktemp("runs")
    jobs = {name: SMALL + [f"--model_dir={done}"] + extra for name, extra, _ in BAD_INPUTS}
    jobs.update(OTHER_RUNS)

    def one(name):
        own = str(folder / name)
        args = [arg.format(own=own, done=done, **inputs) for arg in jobs[name]]
        return run(args, str(folder / f"{name}.txt")) + (own,)

    with concurrent.futures.ThreadPoolExecutor(POOL) as pool:
        results = dict(zip(jobs, pool.map(one, jobs)))
    return results, before, done


@pytest.mark.parametrize("name,extra,named", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_fails_with_one_line_before_training(runs, name, extra, named):
    returncode, output, _ = runs[0][name]
    lines = error_lines(output)
    assert returncode == 1, output
    assert len(lines) == 1, output
    assert lines[0].startswith("keras-feed-train: error: ") and named in lines[0], lines[0]
    if name != "finished_run_other_settings":  # refused for itself, not for the model_dir
        assert "other settings" not in lines[0], lines[0]


def test_bad_inputs_and_a_finished_rerun_change_nothing_in_the_model_dir(runs):
    results, before, done = runs
    returncode, output, _ = results["finished_rerun"]
    assert returncode == 0, output
    assert "nothing to train" in output, output
    assert snapshot(done) == before


def test_unsafe_teacher_is_used_with_unsafe_load(runs):
    returncode, output, model_dir = runs[0]["unsafe_load_accepted"]
    assert returncode == 0, output
    assert os.path.isfile(os.path.join(model_dir, "metrics.json"))


def test_safe_mode_refuses_code_unless_asked(inputs):
    with pytest.raises(storage.ModelFileError, match="unsafe_load"):
        storage.load_model(inputs["lambda"])
    model = storage.load_model(inputs["lambda"], unsafe=True)
    assert any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)


def test_non_finite_loss_names_the_term_and_step(runs):
    """A teacher whose feature map overflows makes feed_loss_0 NaN at the first step."""
    returncode, output, model_dir = runs[0]["non_finite_teacher"]
    lines = error_lines(output)
    assert returncode == 1, output
    assert lines[-1].startswith("keras-feed-train: error: Stage student stopped at step 1 "), output
    assert "'feed_loss_0' is nan" in lines[-1], output
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))


def test_divergence_keeps_the_last_good_checkpoint(runs):
    """lr=1000 diverges within the first epoch; the checkpoint on disk is the last finite one."""
    returncode, output, model_dir = runs[0]["divergence"]
    line = error_lines(output)[-1]
    assert returncode == 1, output
    assert line.startswith("keras-feed-train: error: Stage student stopped at step "), line
    assert "last good checkpoint" in line, line
    stopped = int(line.split("stopped at step ")[1].split()[0])
    path = os.path.join(model_dir, "checkpoints", "student", checkpointing.STATE_FILE)
    with np.load(path) as archive:
        meta = json.loads(bytes(archive["meta"]).decode())
        values = [archive[f"v{i}"] for i in range(meta["count"])]
    assert 0 < meta["step"] < stopped
    assert all(np.all(np.isfinite(v)) for v in values if v.dtype.kind == "f")
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
