"""Two runs sharing one --teacher_dir: one trains the teachers, the other waits and reuses them."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from keras_feed.run import files

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

TIMEOUT = 600  # seconds, for a busy machine

RUN = [
    "--method=pfeed",
    "--dataset=synthetic",
    "--model=resnet8",
    "--num_teachers=1",
    "--train_examples=128",
    "--batch_size=32",
    "--epochs=1",
    "--learning_rate=0.05",
    "--eval_batch_size=128",
    "--verbose=0",
]


def start(args, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keras_feed.cli.train", *RUN, *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def read(log_path):
    with open(log_path) as handle:
        return handle.read()


def wait_for_text(log_path, text, process):
    deadline = time.time() + TIMEOUT
    while text not in read(log_path):
        assert process.poll() is None, f"the run ended without saying {text!r}:\n{read(log_path)}"
        assert time.time() < deadline, f"no {text!r} within {TIMEOUT} s"
        time.sleep(0.05)


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_runs_sharing_a_teacher_dir_train_its_teachers_once(tmp_path, processes):
    teacher_dir = str(tmp_path / "teachers")
    logs = {name: str(tmp_path / f"{name}.txt") for name in ("first", "second")}
    # The test holds the folder's lock until both runs wait for it, then lets them race.
    with files.folder_lock(teacher_dir):
        for name, log_path in logs.items():
            process = start([f"--model_dir={tmp_path / name}", f"--teacher_dir={teacher_dir}"],
                            log_path)
            processes.append(process)
            wait_for_text(log_path, f"Waiting for the lock on {teacher_dir}", process)
        for name in logs:
            assert not os.path.exists(tmp_path / name / "checkpoints"), name
    for process, log_path in zip(processes, logs.values()):
        assert process.wait(timeout=TIMEOUT) == 0, read(log_path)
    stages = []
    for name in logs:
        with open(tmp_path / name / "metrics.json") as handle:
            stages.append(set(json.load(handle)["stages"]))
    # One run trained teacher 0; the other waited for it and reused its file.
    assert sorted(stages, key=len) == [{"student"}, {"teacher_0", "student"}]
    reused = [name for name, got in zip(logs, stages) if got == {"student"}][0]
    assert "Reusing teacher 1/1" in read(logs[reused]), read(logs[reused])


def test_folder_lock_waits_for_its_holder(tmp_path):
    folder = str(tmp_path / "shared")
    events = []
    with files.folder_lock(folder):
        def second():
            with files.folder_lock(folder, on_wait=lambda: events.append("waiting")):
                events.append("locked")

        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.time() + 60
        while not events and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert events == ["waiting"]
    thread.join(timeout=60)
    assert events == ["waiting", "locked"]
    # Released: the lock can be taken at once, and the file stays empty.
    with open(os.path.join(folder, files.LOCK_NAME), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert os.path.getsize(os.path.join(folder, files.LOCK_NAME)) == 0
