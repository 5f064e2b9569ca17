"""The ``idx`` source (and local ``mnist`` / ``fashion_mnist``): a folder of the
four IDX files, read with the TensorFlow-free :mod:`keras_feed.data.idx` reader and
validated (dtypes, shapes, counts, labels) into in-memory arrays.
"""

from __future__ import annotations

import numpy as np

from keras_feed.data import idx
from keras_feed.data.common import check_labels
from keras_feed.data.idx import DataError, read_idx

IDX_FILES = idx.IDX_FILES
find_idx_file = idx.find_idx_file


def has_idx_files(data_dir):
    return any(find_idx_file(data_dir, stems) for _, stems in IDX_FILES)


def load_idx_dir(data_dir, name):
    """(x_train, y_train int32, x_test, y_test int32, num_classes) of an IDX folder."""
    paths = {role: find_idx_file(data_dir, stems) for role, stems in IDX_FILES}
    missing = [stems[0] + "[.gz]" for role, stems in IDX_FILES if paths[role] is None]
    if missing:
        raise DataError(
            f"missing IDX file(s) in {data_dir}: expected {', '.join(missing)}"
        )
    arrays = {}
    for role, _ in IDX_FILES:
        path = paths[role]
        arr = read_idx(path)
        if role.endswith("images"):
            if arr.dtype != np.uint8:
                raise DataError(
                    f"{path}: expected unsigned-byte (0x08) images, found {arr.dtype.name}"
                )
            if arr.ndim == 3:
                arr = arr[..., None]
            if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
                raise DataError(
                    f"{path}: expected images of shape (N, H, W) or (N, H, W, 1|3), "
                    f"found {arr.shape}"
                )
        else:
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise DataError(
                    f"{path}: expected a 1-D integer label array, found shape "
                    f"{arr.shape} of {arr.dtype.name}"
                )
        arrays[role] = arr
    for split in ("train", "test"):
        n_img = arrays[f"{split}_images"].shape[0]
        n_lab = arrays[f"{split}_labels"].shape[0]
        if n_img != n_lab:
            raise DataError(
                f"IDX count mismatch in {data_dir}: {paths[split + '_images']} has "
                f"{n_img} images but {paths[split + '_labels']} has {n_lab} labels"
            )
        if n_img == 0:
            raise DataError(f"{paths[split + '_images']}: holds no images")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"IDX image shape mismatch in {data_dir}: train "
            f"{arrays['train_images'].shape[1:]} vs test {arrays['test_images'].shape[1:]}"
        )
    num_classes = 10 if name in ("mnist", "fashion_mnist") else None
    num_classes = check_labels(
        {paths["train_labels"]: arrays["train_labels"],
         paths["test_labels"]: arrays["test_labels"]},
        num_classes,
    )
    return (
        arrays["train_images"],
        arrays["train_labels"].astype(np.int32),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int32),
        num_classes,
    )
