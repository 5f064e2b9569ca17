"""keras_feed.run.storage: a write that fails names the file being written."""

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

from keras_feed.run import files, storage


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(300)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


WRITERS = {
    "metrics.json": lambda model, path: files.write_json(path, {"text": "x" * 10000}),
    "student.keras": lambda model, path: storage.save_model(model, path),
    "ntl.weights.h5": lambda model, path: storage.save_weights(model, path),
    "state.npz": lambda model, path: files.save_arrays(path, {"zeros": np.zeros(10000)}),
    "export": lambda model, path: storage.export_saved_model(model, path),
    "student.tflite": lambda model, path: storage.export_model(model, path, "litert"),
}
if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnx"):
    WRITERS["student.onnx"] = lambda model, path: storage.export_model(model, path, "onnx")


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_full_disk_names_the_file(tmp_path, monkeypatch, name):
    def full_disk(temporary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temporary)

    monkeypatch.setattr(files, "_flush_to_disk", full_disk)
    path = str(tmp_path / name)
    with pytest.raises(OSError) as error:
        WRITERS[name](tiny_model(), path)
    assert isinstance(error.value, files.WriteError)
    assert error.value.errno == errno.ENOSPC and error.value.filename == path
    assert str(error.value) == f"cannot write {path}: [Errno 28] No space left on device"
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def test_missing_permission_names_the_file(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    path = str(blocker / "metrics.json")
    with pytest.raises(files.WriteError) as error:
        files.write_json(path, {})
    assert str(error.value).startswith(f"cannot write {path}: [Errno ")


@pytest.mark.slow  # a subprocess
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
        assert "File too large" in line and files.PARTIAL_MARK not in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a subprocess
def test_write_errors_are_one_line_on_the_command_line(tmp_path):
    source = str(tmp_path / "student.keras")
    tiny_model().save(source)
    export_dir = str(tmp_path / "served")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.cli.export", f"--student={source}",
         f"--export_dir={export_dir}"],
        capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"keras-feed-export: error: cannot write {export_dir}: File too large", result.stderr
    assert not os.path.exists(export_dir)


# -- what a writer may replace ---------------------------------------------------------


def test_exchange_paths_swaps_a_file_and_a_folder(tmp_path):
    (tmp_path / "a").write_text("file")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inside").write_text("folder")
    if not files.exchange_paths(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (tmp_path / "b").read_text() == "file"
    assert (tmp_path / "a" / "inside").read_text() == "folder"


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """Runs a test with the atomic swap, and again with the two-rename fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    return request.param


def test_export_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, swap):
    model, export = tiny_model(), tmp_path / "export"
    export.mkdir()
    (export / "keep.txt").write_bytes(b"mine")
    (tmp_path / "beside.txt").write_bytes(b"beside")
    with pytest.raises(files.OutputExistsError) as error:
        storage.export_model(model, export)
    message = str(error.value)
    assert "\n" not in message and str(export) in message and "keep.txt" in message
    assert (export / "keep.txt").read_bytes() == b"mine" and os.listdir(export) == ["keep.txt"]

    storage.export_model(model, export, overwrite=True)
    assert "saved_model.pb" in os.listdir(export) and "keep.txt" not in os.listdir(export)
    first = os.stat(export / "saved_model.pb").st_ino
    storage.export_saved_model(model, export)  # its own earlier export: no overwrite needed
    assert os.stat(export / "saved_model.pb").st_ino != first
    assert sorted(os.listdir(tmp_path)) == ["beside.txt", "export"]
    assert (tmp_path / "beside.txt").read_bytes() == b"beside"


def test_an_empty_folder_is_replaced(tmp_path):
    (tmp_path / "export").mkdir()
    storage.export_saved_model(tiny_model(), tmp_path / "export")
    assert "saved_model.pb" in os.listdir(tmp_path / "export")


def test_what_is_swapped_out_is_checked_again_and_put_back(tmp_path, swap):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"an earlier export")
    asked = []

    def replaceable(path):  # the folder passes at first, then holds the user's file
        asked.append(path)
        if len(asked) == 1:
            return None
        return "a folder holding notes.txt, not a SavedModel"

    with pytest.raises(files.OutputExistsError, match="notes.txt"):
        with files.atomic_path(folder, directory=True, replaceable=replaceable) as temporary:
            (tmp_path / "export" / "notes.txt").write_bytes(b"notes")  # appears meanwhile
            with open(os.path.join(temporary, "saved_model.pb"), "wb") as handle:
                handle.write(b"new")
    assert len(asked) == 2 and asked[1] != str(folder)  # asked about what was swapped out
    assert sorted(os.listdir(folder)) == ["notes.txt", "saved_model.pb"]
    assert (folder / "saved_model.pb").read_bytes() == b"an earlier export"
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left


@pytest.mark.parametrize("name,content,replaceable", [
    ("m.tflite", b"\x1c\x00\x00\x00TFL3" + bytes(24), True),
    ("m.tflite", b"not a model", False),
    ("m.tflite", b"", False),
])
def test_foreign_litert_file(tmp_path, name, content, replaceable):
    (tmp_path / name).write_bytes(content)
    found = storage.foreign_export(str(tmp_path / name), "litert")
    assert (found is None) == replaceable, found


def test_export_never_replaces_a_folder_with_a_file(tmp_path):
    (tmp_path / "m.tflite").mkdir()
    with pytest.raises(files.OutputExistsError, match="a folder"):
        storage.export_model(tiny_model(), tmp_path / "m.tflite", "litert")
    assert os.path.isdir(tmp_path / "m.tflite")
