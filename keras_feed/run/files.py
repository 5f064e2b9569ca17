"""Writing files without ever leaving half a file, and folders' locks.

Every writer here writes to a temporary name beside its target, flushes it to
disk and renames it into place, so a crash (even SIGKILL or a power cut) leaves
either the old file or the new one, never a truncated file (or folder) that
looks complete. Temporary names carry `PARTIAL_MARK`; what a killed writer
left behind is removed by `remove_partial_files`. A folder is replaced in one
atomic swap where the system allows it (`exchange_paths`), and a writer given a
`replaceable` check replaces only what passes it (`OutputExistsError`).
"""

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import tempfile

import numpy as np

#: The formats `keras_feed.run.storage.export_model` writes (Keras' `model.export`
#: names) and what each is: the choices and help of keras-feed-export's `--format`.
#: Defined here, where no Keras is imported, so that `--help` loads none.
EXPORT_FORMATS = {
    "tf_saved_model": "a TensorFlow SavedModel folder",
    "litert": "a LiteRT (TensorFlow Lite) .tflite file",
    "onnx": "an ONNX .onnx file (needs the tf2onnx and onnx packages)",
}
#: The file name ending of each export format written as one file.
EXPORT_SUFFIXES = {"litert": ".tflite", "onnx": ".onnx"}

#: In the name of every temporary file or folder a writer here creates.
PARTIAL_MARK = ".partial-"
#: The file in a folder whose `flock` is the folder's lock (see `folder_lock`).
LOCK_NAME = ".lock"


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
    refuse_unless_replaceable(path, path, replaceable)
    try:
        with _atomic_path(path, directory, replaceable) as temporary:
            yield temporary
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error


def refuse_unless_replaceable(checked, path, replaceable):
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
            refuse_unless_replaceable(retired, path, replaceable)
        except BaseException:
            exchange_paths(temporary, path)  # put it back
            raise
    else:
        retired = tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=parent)
        os.rmdir(retired)
        os.replace(path, retired)
        try:
            refuse_unless_replaceable(retired, path, replaceable)
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
def folder_lock(folder, *, on_wait=None, wait=True):
    """Holds the exclusive lock of `folder` (created if missing) in the `with` block.

    One process at a time holds it: the lock is an `fcntl.flock` on
    `<folder>/.lock`, which the system releases with the process. Another
    process calls `on_wait()` (e.g. to say that it waits) and blocks until the
    holder leaves its block or dies; with `wait=False` it raises `FolderLocked`
    at once instead. Ctrl-C or SIGTERM still stop a process that waits.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, LOCK_NAME), "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FolderLocked(folder) from None
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield folder
    finally:
        handle.close()  # closing the file releases the lock


class FolderLocked(BlockingIOError):
    """`folder_lock(..., wait=False)` found the folder locked by another process."""


def write_json(path, data, *, replaceable=None):
    """Writes `data` as indented JSON to `path`, atomically (`replaceable`: see `atomic_path`)."""
    with atomic_path(path, replaceable=replaceable) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")


def save_arrays(path, arrays):
    """Writes a dict of numpy arrays to an uncompressed `.npz` file, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def first_line(error):
    """The first non-empty line of an exception's message.

    For quoting a runtime's error (TensorFlow, h5py, NumPy's file readers) in one
    line: they summarise on the first line and add pages of context after it.
    (`keras_feed.data.idx.one_line` instead joins every line of a short message.)
    """
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
