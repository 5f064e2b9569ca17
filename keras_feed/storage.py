"""Reading and writing models and results without ever leaving half a file.

Every writer here writes to a temporary name beside its target, flushes it to
disk and renames it into place, so a crash (even SIGKILL or a power cut) leaves
either the old file or the new one, never a truncated file (or export folder)
that looks complete. Temporary names carry `PARTIAL_MARK`; what a killed
writer left behind is removed by `remove_partial_files`.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import zipfile

import keras
import numpy as np

#: In the name of every temporary file or folder a writer here creates.
PARTIAL_MARK = ".partial-"
#: The file in a folder whose `flock` is the folder's lock (see `folder_lock`).
LOCK_NAME = ".lock"


class ModelFileError(ValueError):
    """A model file that is missing, not a Keras model, or refused as unsafe."""


class WriteError(OSError):
    """An output that could not be written: a full disk, no permission, ...

    Its message is one line naming the file being written (never the temporary
    name it is written under) and the reason, e.g. `cannot write
    runs/r/student.keras: [Errno 28] No space left on device`. `errno` and
    `filename` are those of an `OSError`.
    """

    def __init__(self, path, error):
        number = getattr(error, "errno", None)
        if isinstance(number, int) and number > 0:
            reason = f"[Errno {number}] {os.strerror(number)}"  # h5py's strerror is a page long
        else:
            reason = first_line(error)
        super().__init__(number, reason, path)

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


@contextlib.contextmanager
def atomic_path(path, *, directory=False):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    What was written to the temporary path is flushed to disk (fsync) before
    the rename, and the rename itself after. On an exception the temporary
    file or folder is removed and `path` is left as it was. For a folder, the
    old one is replaced only once the new one is complete. An `OSError` while
    writing, flushing or renaming becomes a `WriteError` naming `path`.
    """
    path = os.fspath(path)
    try:
        with _atomic_path(path, directory) as temporary:
            yield temporary
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error


@contextlib.contextmanager
def _atomic_path(path, directory):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    prefix = f".{base}{PARTIAL_MARK}"
    if directory:
        temporary = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    else:
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(handle)
        os.unlink(temporary)
        # Keep the suffix Keras checks for (".keras", ".weights.h5").
        for suffix in (".weights.h5", ".keras", ".json", ".h5", ".npz", ".tflite", ".onnx"):
            if base.endswith(suffix):
                temporary += suffix
                break
    try:
        yield temporary
        _flush_to_disk(temporary)
        if directory:
            os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp made it private
            retired = None
            if os.path.exists(path):
                retired = tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=parent)
                os.rmdir(retired)
                os.replace(path, retired)
            os.replace(temporary, path)
            if retired:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
        _fsync(parent)
    except BaseException:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path):
    """Flushes one file's (or folder's entries') data to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _flush_to_disk(path):
    """fsyncs a file, or every file and folder below a folder."""
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def remove_partial_files(folder):
    """Removes what killed writers left below `folder` (names with `PARTIAL_MARK`).

    Only call it while no other process writes below `folder`.
    """
    removed = []
    for root, directories, files in os.walk(folder):
        for name in list(directories):
            if name.startswith(".") and PARTIAL_MARK in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                directories.remove(name)
                removed.append(os.path.join(root, name))
        for name in files:
            if name.startswith(".") and PARTIAL_MARK in name:
                os.unlink(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


@contextlib.contextmanager
def folder_lock(folder, *, on_wait=None):
    """Holds the exclusive lock of `folder` (created if missing) in the `with` block.

    One process at a time holds it; another one calls `on_wait()` (e.g. to say
    that it waits) and blocks until the holder leaves its block or dies: the
    lock is an `fcntl.flock` on `<folder>/.lock`, which the system releases
    with the process. Ctrl-C or SIGTERM still stop a process that waits.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, LOCK_NAME), "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield folder
    finally:
        handle.close()  # closing the file releases the lock


def write_json(path, data):
    """Writes `data` as indented JSON to `path`, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")


def save_model(model, path):
    """Saves a `keras.Model` to a `.keras` file, atomically."""
    with atomic_path(path) as temporary:
        model.save(temporary)


def save_weights(layer_or_model, path):
    """Saves weights to a `.weights.h5` file, atomically."""
    with atomic_path(path) as temporary:
        layer_or_model.save_weights(temporary)


def save_arrays(path, arrays):
    """Writes a dict of numpy arrays to an uncompressed `.npz` file, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


#: `export_model` formats: Keras' `model.export` names, and what each writes.
EXPORT_FORMATS = {
    "tf_saved_model": "a TensorFlow SavedModel folder",
    "litert": "a LiteRT (TensorFlow Lite) .tflite file",
    "onnx": "an ONNX .onnx file (needs the tf2onnx and onnx packages)",
}
_EXPORT_SUFFIXES = {"litert": ".tflite", "onnx": ".onnx"}


def serving_signature(model):
    """The export's input: uint8 images `(N, H, W, C)`, as image files and IDX files hold them.

    The model casts them to its input's float dtype; its own first layer
    normalises them (see `keras_feed.models.preprocessing`).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if len(model.inputs) != 1:
        raise ValueError(f"Model '{model.name}' has {len(model.inputs)} inputs; one image input is needed.")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"Model '{model.name}' takes inputs of shape {shape}; images (N, H, W, C) are needed.")
    return [tf.TensorSpec((None,) + shape[1:], tf.uint8, name="images")]


def export_model(model, path, export_format="tf_saved_model"):
    """Exports `model` alone with Keras' `model.export`, atomically.

    Every format takes uint8 images `(N, H, W, C)` (`serving_signature`) and
    gives the model's own outputs (logits, or probabilities for a softmax
    head). `tf_saved_model` writes a folder with a `serving_default`
    signature, which reloads with `keras.layers.TFSMLayer(path,
    call_endpoint="serving_default")`; `litert` a `.tflite` file (run it with
    `tf.lite.Interpreter` or `ai_edge_litert`); `onnx` an `.onnx` file (run it
    with onnxruntime). Runs on the TensorFlow backend.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"Unknown export format '{export_format}'; choose from {', '.join(EXPORT_FORMATS)}."
        )
    suffix = _EXPORT_SUFFIXES.get(export_format)
    if suffix and not path.endswith(suffix):
        raise ValueError(f"The {export_format} export is a file ending in {suffix}; got {path}.")
    if export_format == "onnx":
        for package in ("tf2onnx", "onnx"):
            try:
                __import__(package)
            except ImportError:
                raise ValueError(
                    f"--format=onnx needs the '{package}' package: pip install onnx tf2onnx "
                    "(and onnxruntime to run the model)."
                ) from None
    signature = serving_signature(model)
    with atomic_path(path, directory=suffix is None) as temporary:
        try:
            model.export(temporary, format=export_format, verbose=False, input_signature=signature)
        except tf.errors.OpError as error:  # TensorFlow's own file system errors
            raise WriteError(path, _tensorflow_reason(error.message)) from error


def export_saved_model(model, path):
    """Exports `model` alone as a TensorFlow SavedModel folder, atomically.

    Its `serving_default` signature takes uint8 images `(N, H, W, C)` and
    reloads with `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`
    (see `export_model`).
    """
    export_model(model, path, "tf_saved_model")


def _tensorflow_reason(message):
    """`File too large` from `{{function_node ...}} <file>; File too large [Op:SaveV2]`."""
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", " ", first_line(message))
    return message.rsplit("; ", 1)[-1].strip()


def load_model(path, *, unsafe=False):
    """Loads a `.keras` model in Keras' safe mode, without compiling it.

    Args:
      path: a `.keras` file.
      unsafe: allow files that carry code (Lambda layers); only for files you
        trust.

    Raises:
      ModelFileError: one line naming the problem (missing file, not a Keras
        model file, or refused because it carries code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ModelFileError(f"Not a Keras model file (.keras archive): {path}")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except ValueError as error:
        if "safe_mode" in str(error) or "lambda" in str(error).lower():
            raise ModelFileError(
                f"Refusing to load {path}: it carries code (e.g. a Lambda layer); "
                "pass --unsafe_load only if you trust it."
            ) from None
        raise ModelFileError(f"Cannot load {path} as a Keras model: {first_line(error)}") from None
    except Exception as error:  # corrupt archives fail in many ways
        raise ModelFileError(f"Cannot load {path} as a Keras model: {first_line(error)}") from None
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not a keras.Model.")
    return model


def first_line(error):
    """The first non-empty line of an exception's message."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
