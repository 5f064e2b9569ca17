"""Ctrl-C and SIGTERM stop `keras-feed-train` with one line; the same command resumes.

Each run is a `python -m keras_feed.train` subprocess on tiny synthetic data,
interrupted once its student stage has written a periodic checkpoint.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

TIMEOUT = 600  # seconds, for a busy machine

# 32 steps an epoch, 3 epochs, a checkpoint every 3 steps: interrupted mid-epoch, with
# time to spare before the stage ends.
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
    r"again to resume from its last checkpoint, step (\d+) \(epoch \d+, batch \d+\)"
)


def start(model_dir, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keras_feed.train", *RUN, f"--model_dir={model_dir}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def output_lines(log_path):
    """The output lines that are not TensorFlow's C++ start-up chatter."""
    with open(log_path) as handle:
        return [line for line in handle.read().splitlines() if line.strip() and not
                line.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))]


def wait_for_checkpoint(path, process):
    deadline = time.time() + TIMEOUT
    while not os.path.exists(path):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, f"no checkpoint {path} within {TIMEOUT} s"
        time.sleep(0.05)


@pytest.mark.parametrize("signal_number,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_says_where_and_the_same_command_resumes(tmp_path, signal_number,
                                                                  status):
    model_dir = str(tmp_path / "run")
    log_path = str(tmp_path / "interrupted.txt")
    process = start(model_dir, log_path)
    try:
        checkpoint = os.path.join(model_dir, "checkpoints", "student", "state.npz")
        wait_for_checkpoint(checkpoint, process)
        process.send_signal(signal_number)
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = output_lines(log_path)
    assert process.returncode == status, "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    match = MESSAGE.fullmatch(lines[-1])
    assert match, lines[-1]
    step, saved_step = int(match[1]), int(match[2])
    # The signal takes effect at the end of its step, which is checkpointed first.
    assert 3 <= saved_step == step < 96
    # The lock is released, and the checkpoint the message names is what a rerun resumes.
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    log_path = str(tmp_path / "resumed.txt")
    process = start(model_dir, log_path)
    assert process.wait(timeout=TIMEOUT) == 0, "\n".join(output_lines(log_path))
    output = "\n".join(output_lines(log_path))
    assert f"Stage student: resuming at step {saved_step + 1} " in output, output
    assert os.path.exists(os.path.join(model_dir, "metrics.json"))


def test_message_names_the_checkpoint_on_disk(tmp_path, monkeypatch):
    import json

    import numpy as np

    from keras_feed import checkpointing

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
