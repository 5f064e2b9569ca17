"""Ctrl-C and SIGTERM stop `keras-feed-train` with one line; the same command resumes.

Each run is a `python -m keras_feed.cli.train` subprocess on tiny synthetic data. The
signal is raised by the run itself at an exact step (`keras_feed.run.interrupts`'
`KERAS_FEED_SIGNAL_AT` hook), so where it lands never depends on timing: a step
between two periodic checkpoints, and an epoch's last step.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from keras_feed.run import interrupts

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

TIMEOUT = 600  # seconds, for a busy machine
STEPS_PER_EPOCH = 32

# 32 steps an epoch, 3 epochs, a checkpoint every 3 steps.
RUN = [
    "--method=ce",
    "--dataset=synthetic",
    "--model=resnet8",
    "--train_examples=512",
    "--batch_size=16",
    "--epochs=3",
    "--learning_rate=0.05",
    "--eval_batch_size=128",
    "--checkpoint_steps=3",
    "--verbose=0",
]

MESSAGE = re.compile(
    r"keras-feed-train: interrupted at step (\d+) of stage student; run the same command "
    r"again to resume from its last checkpoint, step (\d+) \(epoch (\d+), batch (\d+)\)"
)


def train(model_dir, log_path, signal_at=None):
    """Runs the training command to its end; returns its exit status."""
    environment = dict(os.environ)
    environment.pop(interrupts.SIGNAL_AT, None)
    if signal_at:
        environment[interrupts.SIGNAL_AT] = signal_at
    with open(log_path, "w") as log:
        return subprocess.run(
            [sys.executable, "-m", "keras_feed.cli.train", *RUN, f"--model_dir={model_dir}"],
            stdout=log, stderr=subprocess.STDOUT, env=environment, timeout=TIMEOUT,
        ).returncode


def output_lines(log_path):
    """The output lines that are not TensorFlow's C++ start-up chatter."""
    with open(log_path) as handle:
        return [line for line in handle.read().splitlines() if line.strip() and not
                line.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))]


@pytest.mark.parametrize("signal_name,step,status", [
    ("SIGTERM", 4, 143),  # between the checkpoints of steps 3 and 6
    ("SIGINT", STEPS_PER_EPOCH, 130),  # the first epoch's last step
])
def test_interrupted_run_says_where_and_the_same_command_resumes(tmp_path, signal_name, step,
                                                                  status):
    model_dir = str(tmp_path / "run")
    log_path = str(tmp_path / "interrupted.txt")
    returncode = train(model_dir, log_path, signal_at=f"student/{step}={signal_name}")
    lines = output_lines(log_path)
    assert returncode == status, "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    match = MESSAGE.fullmatch(lines[-1])
    assert match, lines[-1]
    # The signal takes effect at the end of its step, which is checkpointed first.
    epoch, batch = divmod(step - 1, STEPS_PER_EPOCH)
    assert [int(group) for group in match.groups()] == [step, step, epoch + 1, batch + 1]
    # The lock is released, and the checkpoint the message names is what a rerun resumes.
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    log_path = str(tmp_path / "resumed.txt")
    assert train(model_dir, log_path) == 0, "\n".join(output_lines(log_path))
    output = "\n".join(output_lines(log_path))
    assert f"Stage student: resuming at step {step + 1} " in output, output
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        history = json.load(handle)["stages"]["student"]["history"]
    # Every epoch's logs are kept, the interrupted one's too.
    assert history and all(len(values) == 3 for values in history.values()), history


def test_signal_point_raises_the_named_signal_once(monkeypatch):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    monkeypatch.setattr(interrupts, "_FIRED", [])
    try:
        monkeypatch.setenv(interrupts.SIGNAL_AT, "student/16=SIGUSR1")
        interrupts.signal_point("student", 15)
        interrupts.signal_point("teacher_0", 16)
        assert received == []
        interrupts.signal_point("student", 16)
        interrupts.signal_point("student", 16)
        assert received == [signal.SIGUSR1]
        monkeypatch.setattr(interrupts, "_FIRED", [])
        monkeypatch.setenv(interrupts.SIGNAL_AT, "student/1=SIGNOPE")
        with pytest.raises(ValueError, match="SIGNOPE is not a signal name"):
            interrupts.signal_point("student", 1)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_message_names_the_checkpoint_on_disk(tmp_path, monkeypatch):
    import json

    import numpy as np

    from keras_feed.run import checkpointing

    monkeypatch.setattr(checkpointing, "_TRAINING", [])
    assert checkpointing.interruption_message().startswith("interrupted before training began;")
    stage = checkpointing.StageCheckpoint(str(tmp_path), stage="student", steps_per_epoch=16,
                                          epochs=3)
    checkpointing._TRAINING[:] = [stage]  # what its on_train_begin does
    stage.step = 7
    assert checkpointing.interruption_message() == (
        "interrupted at step 7 of stage student; run the same command again to resume from "
        "the stage's start (it had no checkpoint yet)"
    )
    # Interrupted after a save renamed its file into place, before it recorded the step.
    stage.saved_step = 3
    meta = np.frombuffer(json.dumps({"step": 6}).encode("utf-8"), dtype=np.uint8)
    np.savez(os.path.join(str(tmp_path), checkpointing.STATE_FILE), meta=meta)
    assert checkpointing.interruption_message() == (
        "interrupted at step 7 of stage student; run the same command again to resume from "
        "its last checkpoint, step 6 (epoch 1, batch 6)"
    )
    stage.step = 48
    assert checkpointing.interruption_message() == (
        "interrupted after stage student; run the same command again to resume"
    )
