"""Reading and writing models and results without ever leaving half a file.

Every writer here writes to a temporary name beside its target, flushes it to
disk and renames it into place, so a crash (even SIGKILL or a power cut) leaves
either the old file or the new one, never a truncated file (or export folder)
that looks complete. Temporary names carry `PARTIAL_MARK`; what a killed
writer left behind is removed by `remove_partial_files`. A folder is replaced
in one atomic swap where the system allows it (`exchange_paths`), and an
export replaces only an earlier export (`foreign_export`, `OutputExistsError`).
"""

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import mmap
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


class OutputExistsError(ValueError):
    """An output path holding something the writer does not write: refused, never replaced.

    Its message is one line naming the path and what is there, e.g. `Refusing
    to replace out: it is a folder holding keep.txt, not a SavedModel; pass
    overwrite=True to replace it`. `path` and `found` are its parts; `hint`
    says how to replace it anyway (a command says `--overwrite`).
    """

    def __init__(self, path, found, hint="overwrite=True"):
        self.path, self.found, self.hint = path, found, hint
        super().__init__(f"Refusing to replace {path}: it is {found}; pass {hint} to replace it.")

    def with_hint(self, hint):
        """The same refusal, saying `hint` (e.g. `--overwrite`) replaces it."""
        return OutputExistsError(self.path, self.found, hint)


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
def atomic_path(path, *, directory=False, replaceable=None):
    """Yields a temporary path beside `path`; moves it onto `path` on success.

    What was written to the temporary path is flushed to disk (fsync) before
    the move, and the move itself after. On an exception the temporary file
    or folder is removed and `path` is left as it was. For a folder, the old
    one is replaced only once the new one is complete, in one atomic swap
    where the system allows it (`exchange_paths`). An `OSError` while
    writing, flushing or renaming becomes a `WriteError` naming `path`.

    Args:
      path: the file or folder to write.
      directory: whether a folder is written.
      replaceable: None, or `(path) -> None or str`: None when what is at
        `path` may be replaced, else what is there ("a folder holding
        keep.txt"). It is asked before anything is written, and again about
        what the move retires; a refusal raises `OutputExistsError` and
        leaves `path` as it was.
    """
    path = os.fspath(path)
    _refuse_unless_replaceable(path, path, replaceable)
    try:
        with _atomic_path(path, directory, replaceable) as temporary:
            yield temporary
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error


def _refuse_unless_replaceable(checked, path, replaceable):
    """Raises `OutputExistsError` for `path` if `replaceable` refuses what is at `checked`."""
    if replaceable is not None and os.path.lexists(checked):
        found = replaceable(checked)
        if found is not None:
            raise OutputExistsError(path, found)


@contextlib.contextmanager
def _atomic_path(path, directory, replaceable):
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
        if (not directory and replaceable is None) or not os.path.lexists(path):
            os.replace(temporary, path)
        else:
            _swap_into_place(temporary, path, replaceable, prefix, parent)
        _fsync(parent)
    except BaseException:
        _remove(temporary)
        raise


def _swap_into_place(temporary, path, replaceable, prefix, parent):
    """Puts `temporary` at `path`, retiring what was there (after asking `replaceable`).

    With `exchange_paths` the two swap in one step, so a crash leaves the old
    or the new one at `path`, never neither. Elsewhere the old one is first
    renamed aside, then the new one into place. Only what was at `path` at
    the moment of the swap is retired, and only if `replaceable` accepts it;
    otherwise it is put back.
    """
    if exchange_paths(temporary, path):
        retired = temporary  # the swap left the old one there
        try:
            _refuse_unless_replaceable(retired, path, replaceable)
        except BaseException:
            exchange_paths(temporary, path)  # put it back
            raise
    else:
        retired = tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=parent)
        os.rmdir(retired)
        os.replace(path, retired)
        try:
            _refuse_unless_replaceable(retired, path, replaceable)
        except BaseException:
            os.replace(retired, path)
            raise
        os.replace(temporary, path)
    _remove(retired)


def _remove(path):
    """Removes a file, link or folder tree, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100
_NOT_SUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV)


def exchange_paths(first, second):
    """Swaps two existing paths in one atomic step; False where the system cannot.

    Linux's `renameat2(..., RENAME_EXCHANGE)` (through ctypes): a file or
    folder each, on one file system. Returns False, changing nothing, where
    `renameat2` or the flag is unavailable (other systems, old kernels, some
    file systems); raises `OSError` for other failures.
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in _NOT_SUPPORTED:
        return False
    raise OSError(number, os.strerror(number), second)


@functools.lru_cache(maxsize=None)
def _renameat2():
    """The C library's `renameat2`, or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


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


def write_json(path, data, *, replaceable=None):
    """Writes `data` as indented JSON to `path`, atomically (`replaceable`: see `atomic_path`)."""
    with atomic_path(path, replaceable=replaceable) as temporary:
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


def export_model(model, path, export_format="tf_saved_model", *, overwrite=False):
    """Exports `model` alone with Keras' `model.export`, atomically.

    Every format takes uint8 images `(N, H, W, C)` (`serving_signature`) and
    gives the model's own outputs (logits, or probabilities for a softmax
    head). `tf_saved_model` writes a folder with a `serving_default`
    signature, which reloads with `keras.layers.TFSMLayer(path,
    call_endpoint="serving_default")`; `litert` a `.tflite` file (run it with
    `tf.lite.Interpreter` or `ai_edge_litert`); `onnx` an `.onnx` file (run it
    with onnxruntime). Runs on the TensorFlow backend.

    What is at `path` is replaced only if it is an export of that format (an
    earlier one, even a damaged one) or an empty folder: anything else (a
    folder holding other files, a file where a folder goes, a `.tflite` that
    is no LiteRT model, ...) raises `OutputExistsError` unless `overwrite`.
    Files beside `path` are never touched.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    check_export_path(path, export_format, overwrite=overwrite)
    signature = serving_signature(model)
    replaceable = None if overwrite else functools.partial(foreign_export, export_format=export_format)
    directory = export_format == "tf_saved_model"
    with atomic_path(path, directory=directory, replaceable=replaceable) as temporary:
        try:
            model.export(temporary, format=export_format, verbose=False, input_signature=signature)
        except tf.errors.OpError as error:  # TensorFlow's own file system errors
            raise WriteError(path, _tensorflow_reason(error.message)) from error


def export_saved_model(model, path, *, overwrite=False):
    """Exports `model` alone as a TensorFlow SavedModel folder, atomically.

    Its `serving_default` signature takes uint8 images `(N, H, W, C)` and
    reloads with `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`
    (see `export_model`, also for what it may replace).
    """
    export_model(model, path, "tf_saved_model", overwrite=overwrite)


def check_export_path(path, export_format="tf_saved_model", *, overwrite=False):
    """Raises `ValueError` (one line) unless `export_model` may write `path` in `export_format`.

    An unknown format, a file name of another format, a missing package for
    ONNX, or (unless `overwrite`) something at `path` that is not an export
    of that format (`OutputExistsError`). Cheap: check before a long job.
    """
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
    if not overwrite:
        _refuse_unless_replaceable(path, path, functools.partial(foreign_export, export_format=export_format))


#: What `model.export(format="tf_saved_model")` (TensorFlow's SavedModel writer) puts in its folder.
SAVED_MODEL_ENTRIES = ("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables", "assets",
                       "assets.extra")
_VARIABLES_FILE = re.compile(r"variables\.(index|data-\d+-of-\d+)$")
#: The FlatBuffer file identifier of a LiteRT (TensorFlow Lite) model, at bytes 4..8.
LITERT_IDENTIFIER = b"TFL3"


def foreign_export(path, export_format="tf_saved_model"):
    """What is at `path`, if it is not an `export_format` export that `export_model` may replace.

    None when `path` is missing, an empty folder, or an export of that format
    (an earlier one: a SavedModel folder, a file with LiteRT's identifier, a
    file that parses as an ONNX model with a graph); else a few words saying
    what is there, e.g. "a folder holding keep.txt, not a SavedModel".
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        return "a symbolic link"
    if export_format == "tf_saved_model":
        if not os.path.isdir(path):
            return "a file, where a SavedModel folder is to go"
        return _foreign_saved_model(path)
    if os.path.isdir(path):
        return f"a folder, where {EXPORT_FORMATS[export_format]} is to go"
    if not os.path.isfile(path):
        return "not a regular file"
    if export_format == "litert":
        return _foreign_litert(path)
    return _foreign_onnx(path)


def _foreign_saved_model(folder):
    """None for an empty folder or a SavedModel's; else what else the folder holds."""
    names = sorted(os.listdir(folder))
    if not names:
        return None
    foreign = [name for name in names if name not in SAVED_MODEL_ENTRIES]
    variables = os.path.join(folder, "variables")
    if os.path.isdir(variables):
        foreign += [f"variables/{name}" for name in sorted(os.listdir(variables))
                    if not _VARIABLES_FILE.match(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"a folder holding {shown}, not a SavedModel"
    if not os.path.isfile(os.path.join(folder, "saved_model.pb")) and not os.path.isfile(
            os.path.join(folder, "saved_model.pbtxt")):
        return f"a folder holding {', '.join(names)} but no saved_model.pb, not a SavedModel"
    return None


def _foreign_litert(path):
    """None for a file with LiteRT's FlatBuffer identifier; else what the file is."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[4:8] == LITERT_IDENTIFIER:
        return None
    return f"a file of {os.path.getsize(path):,} bytes that is not a LiteRT model (no TFL3 identifier)"


def _foreign_onnx(path):
    """None for a file that parses as an ONNX model with a graph; else what the file is."""
    problem = _onnx_problem(path)
    if problem is None:
        return None
    return f"a file of {os.path.getsize(path):,} bytes that is not an ONNX model ({problem})"


def _onnx_problem(path):
    """None when `path` parses as an ONNX ModelProto with a graph; else what is wrong."""
    import onnx  # pylint: disable=import-outside-toplevel

    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError, or others for odd bytes)
        return "it does not parse as an ONNX ModelProto"
    if not model.HasField("graph") or not model.graph.node or not model.graph.output:
        return "an ONNX ModelProto without a graph"
    return None


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


def check_litert_file(path):
    """Raises `ModelFileError` (one line) unless `path` is a whole LiteRT (.tflite) model.

    The LiteRT runtime trusts the file: a truncated or foreign one can crash
    the process (SIGSEGV). Here it is read in Python first, through the
    generated FlatBuffer schema (every table, vector and buffer, bounds
    checked), mapped rather than copied: a few milliseconds per megabyte.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if handle.read(8)[4:8] != LITERT_IDENTIFIER:
            raise ModelFileError(f"Not a LiteRT model (no TFL3 identifier at bytes 4-8): {path}")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as content:
            problem = _litert_problem(content, size)
    if problem:
        raise ModelFileError(f"Damaged or truncated LiteRT model {path} ({size:,} bytes): {problem}")


def _litert_problem(content, size):
    """What is wrong with a LiteRT FlatBuffer's structure, or None."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel

    try:
        model = schema.ModelT.InitFromPackedBuf(content, 0)
    except Exception:  # noqa: BLE001 (struct.error, ValueError, IndexError past the end)
        return "its tables point past its end"
    try:
        for buffer in model.buffers or []:
            if (buffer.offset or 0) > 1 and buffer.offset + buffer.size > size:
                return f"a weight buffer lies at bytes {buffer.offset:,}-{buffer.offset + buffer.size:,}"
        graph = model.subgraphs[0] if model.subgraphs else None
        if graph is None or _empty(graph.inputs) or _empty(graph.outputs):
            return "it has no graph with inputs and outputs"
    finally:
        del model  # release the views into `content` before it is closed
    return None


def _empty(vector):
    """Whether a FlatBuffer vector (None, a list or a numpy array) has no entries."""
    return vector is None or len(vector) == 0


def check_onnx_file(path):
    """Raises `ModelFileError` (one line) unless `path` parses as an ONNX model with a graph.

    Needs the `onnx` package; without it nothing is checked here (onnxruntime
    then reports a damaged file with an exception of its own).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    try:
        import onnx  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return
    problem = _onnx_problem(path)
    if problem:
        raise ModelFileError(f"Damaged or not an ONNX model: {path} ({problem})")


def check_saved_model(path):
    """Raises `ModelFileError` (one line) unless `path` is a folder with a readable saved_model.pb.

    Its `saved_model.pb` must parse as a SavedModel protocol buffer holding a
    MetaGraph, and its variables index must be there when it has variables.
    """
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    graph_file = os.path.join(path, "saved_model.pb")
    if not os.path.isfile(graph_file):
        if os.path.isfile(os.path.join(path, "saved_model.pbtxt")):
            return
        raise ModelFileError(f"Not a SavedModel folder (no saved_model.pb): {path}")
    with open(graph_file, "rb") as handle:
        content = handle.read()
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(content)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError)
        raise ModelFileError(f"Damaged or not a SavedModel: {graph_file} ({len(content):,} bytes) does "
                             "not parse as a SavedModel protocol buffer") from None
    if not saved_model.meta_graphs:
        raise ModelFileError(f"Damaged or not a SavedModel: {graph_file} ({len(content):,} bytes) "
                             "holds no MetaGraph")
    variables = os.path.join(path, "variables")
    if os.path.isdir(variables) and os.listdir(variables) and not os.path.isfile(
            os.path.join(variables, "variables.index")):
        raise ModelFileError(f"Damaged SavedModel {path}: variables/variables.index is missing")


def first_line(error):
    """The first non-empty line of an exception's message."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
