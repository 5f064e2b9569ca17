"""keras_feed.storage: a write that fails names the file being written."""

import errno
import importlib.util
import os
import resource
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_feed import storage


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(300)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


WRITERS = {
    "metrics.json": lambda model, path: storage.write_json(path, {"text": "x" * 10000}),
    "student.keras": lambda model, path: storage.save_model(model, path),
    "ntl.weights.h5": lambda model, path: storage.save_weights(model, path),
    "state.npz": lambda model, path: storage.save_arrays(path, {"zeros": np.zeros(10000)}),
    "export": lambda model, path: storage.export_saved_model(model, path),
    "student.tflite": lambda model, path: storage.export_model(model, path, "litert"),
}
if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnx"):
    WRITERS["student.onnx"] = lambda model, path: storage.export_model(model, path, "onnx")


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_full_disk_names_the_file(tmp_path, monkeypatch, name):
    def full_disk(temporary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temporary)

    monkeypatch.setattr(storage, "_flush_to_disk", full_disk)
    path = str(tmp_path / name)
    with pytest.raises(OSError) as error:
        WRITERS[name](tiny_model(), path)
    assert isinstance(error.value, storage.WriteError)
    assert error.value.errno == errno.ENOSPC and error.value.filename == path
    assert str(error.value) == f"cannot write {path}: [Errno 28] No space left on device"
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def test_missing_permission_names_the_file(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    path = str(blocker / "metrics.json")
    with pytest.raises(storage.WriteError) as error:
        storage.write_json(path, {})
    assert str(error.value).startswith(f"cannot write {path}: [Errno ")


def test_every_writer_names_its_file_when_the_file_system_refuses(tmp_path):
    # A real failing write, in a child process whose files may not exceed 4 KiB
    # (Python ignores SIGXFSZ, so write() fails with EFBIG, "File too large").
    script = textwrap.dedent(
        f"""
        import os, resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_storage import WRITERS, tiny_model
        model = tiny_model()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        for name, write in sorted(WRITERS.items()):
            try:
                write(model, {str(tmp_path)!r} + "/" + name)
            except OSError as error:
                print(name, "|", type(error).__name__, "|", error)
        sys.stdout.flush()
        os._exit(0)  # HDF5 crashes at exit once it has failed to write a file
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(WRITERS), result.stdout + result.stderr
    for line, name in zip(lines, sorted(WRITERS)):
        target = os.path.join(str(tmp_path), name)
        assert line.startswith(f"{name} | WriteError | cannot write {target}: "), line
        assert "File too large" in line and storage.PARTIAL_MARK not in line, line
    assert os.listdir(tmp_path) == []


def test_write_errors_are_one_line_on_the_command_line(tmp_path):
    source = str(tmp_path / "student.keras")
    tiny_model().save(source)
    export_dir = str(tmp_path / "served")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.export", f"--student={source}",
         f"--export_dir={export_dir}", "--preprocessing=none"],
        capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"keras-feed-export: error: cannot write {export_dir}: File too large", result.stderr
    assert not os.path.exists(export_dir)
