"""IDX files (the MNIST format) read with NumPy alone: no TensorFlow needed.

`read_idx(path)` reads and validates one file; `find_idx_file` finds the four
files of a dataset folder. `keras_feed.data` builds its pipelines on these,
and `keras_feed.data.arrays` its TensorFlow-free batches.
"""

import gzip
import math
import os
import zlib

import numpy as np


class DataError(ValueError):
    """A dataset problem (bad name, missing/corrupt files, bad labels...).

    The message is a single line naming the problem, the path involved and
    what was expected versus found.
    """



def one_line(text, limit=300):
    """`text` (an error's whole message) on one line, at most `limit` characters.

    For quoting another library's message inside a `DataError`: every line of it
    is kept, joined, and cut to a length a console line holds. (The run layer's
    `keras_feed.run.files.first_line` keeps only an error's first line instead:
    the runtimes it quotes put a summary there and pages of context after it.)
    """
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."



IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = (
    ("train_images", ("train-images-idx3-ubyte", "train-images.idx3-ubyte")),
    ("train_labels", ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")),
    ("test_images", ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte")),
    ("test_labels", ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte")),
)


def read_idx(path):
    """Reads an IDX file (optionally gzip-compressed, by ``.gz`` suffix).

    Validates the magic number (two zero bytes, a known type code, >= 1
    dimension), the header length and that the file holds exactly the number
    of bytes the header declares.  Returns a native-byte-order numpy array.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"cannot read IDX file {path}: corrupt or truncated data "
            f"({one_line(e, 120)})"
        ) from None
    if len(raw) < 4:
        raise DataError(
            f"{path}: not an IDX file: {len(raw)} bytes, expected at least a "
            "4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected "
            "0x0000TTNN with type TT in 08/09/0b/0c/0d/0e and NN >= 1 dimensions"
        )
    dtype = IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX header: {len(raw)} bytes, expected {header} "
            f"for {ndim} dimensions"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {what}: header declares shape {dims} of "
            f"{dtype.name} ({expected} bytes in total), file holds {len(raw)} bytes"
        )
    arr = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def find_idx_file(data_dir, stems):
    for stem in stems:
        for suffix in ("", ".gz"):
            path = os.path.join(data_dir, stem + suffix)
            if os.path.isfile(path):
                return path
    return None
