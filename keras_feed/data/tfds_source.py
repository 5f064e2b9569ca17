"""TensorFlow Datasets: the lazy ``tensorflow_datasets`` import, its failures as
one-line :class:`DataError`, in-memory loading (``cifar10``, ``cifar100``,
``mnist``, ``fashion_mnist``) and the known sizes used to describe a dataset
without downloading it. The streamed ``imagenet2012`` is in :mod:`.imagenet`.
"""

from __future__ import annotations

import numpy as np

from keras_feed.data.common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_labels,
)
from keras_feed.data.idx import DataError
from keras_feed.data.idx import one_line as _one_line

#: What the TFDS datasets hold, for describing a run without downloading them:
#: (classes, image shape, train size, test size, mean, std, augmentation).
TFDS_INFO = {
    "cifar10": (10, (32, 32, 3), 50000, 10000, CIFAR10_MEAN, CIFAR10_STD, "cifar"),
    "cifar100": (100, (32, 32, 3), 50000, 10000, CIFAR100_MEAN, CIFAR100_STD, "cifar"),
    "mnist": (10, (28, 28, 1), 60000, 10000, (0.1307,), (0.3081,), "cifar"),
    "fashion_mnist": (10, (28, 28, 1), 60000, 10000, (0.2860,), (0.3530,), "cifar"),
    "imagenet2012": (1000, (224, 224, 3), 1281167, 50000, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
}


def import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except Exception as e:  # pragma: no cover - depends on the installation
        raise DataError(
            f"tensorflow_datasets cannot be imported ({_one_line(e, 120)}); "
            "install it or use a local dataset (idx / folder) with --data_dir"
        ) from None
    return tfds


def tfds_error(name, data_dir, err):
    where = data_dir or "the default TFDS data dir"
    hint = "pass --data_dir with local files"
    if name in ("mnist", "fashion_mnist"):
        hint = "pass --data_dir pointing at a folder with the 4 IDX files"
    elif name == "imagenet2012":
        hint = ("put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                "<data_dir>/downloads/manual and pass --data_dir")
    return DataError(
        f"could not download/prepare TFDS dataset '{name}' in {where} "
        f"({type(err).__name__}: {_one_line(err, 160)}); {hint}"
    )


def tfds_load(tfds, name, split, data_dir, **kwargs):
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
            shuffle_files=False,
            **kwargs,
        )
    except Exception as e:  # network errors, missing manual files, ...
        raise tfds_error(name, data_dir, e) from None


def load_memory(name, data_dir):
    """(x_train, y_train int32, x_test, y_test int32, num_classes) of a TFDS dataset."""
    tfds = import_tfds()
    out = []
    info = None
    for split in ("train", "test"):
        ds, info = tfds_load(tfds, name, split, data_dir)
        xs, ys = [], []
        try:
            for x, y in tfds.as_numpy(ds.batch(8192)):
                xs.append(x)
                ys.append(y)
        except Exception as e:
            raise tfds_error(name, data_dir, e) from None
        if not xs:
            raise DataError(f"TFDS dataset '{name}' split '{split}' is empty")
        x = np.concatenate(xs).astype(np.uint8)
        if x.ndim == 3:
            x = x[..., None]
        out += [x, np.concatenate(ys).astype(np.int32)]
    num_classes = int(info.features["label"].num_classes)
    check_labels({f"{name}/train": out[1], f"{name}/test": out[3]}, num_classes)
    return out[0], out[1], out[2], out[3], num_classes


def split_size(info, split, ds):
    try:
        n = int(info.splits[split].num_examples)
        if n > 0:
            return n
    except Exception:  # pylint: disable=broad-except
        pass
    n = int(ds.cardinality().numpy())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())  # slow fallback
