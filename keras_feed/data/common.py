"""What the sources and the pipeline of `keras_feed.data` share: `DatasetInfo`,
the dataset names and normalisation constants, argument checks, label checks,
channel statistics and the seeded training subset / validation split.

NumPy only: no TensorFlow here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_feed.data.idx import DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet constants averaged over channels, for grayscale folders.
IMAGENET_GRAY_MEAN = (0.449,)
IMAGENET_GRAY_STD = (0.226,)

NAMES = (
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "folder",
    "idx",
    "imagenet2012",
    "mnist",
    "synthetic",
)
#: Datasets whose augmentation has no horizontal flip (digits, unknown IDX data).
NO_FLIP = ("mnist", "idx", "synthetic")
SALT = 0x0FEED  # mixed into every derived random key


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str  # e.g. "cifar100", "idx", "folder", "synthetic"
    num_classes: int
    image_shape: tuple  # (H, W, C) of the images the model sees
    num_train: int  # examples in the (possibly subset) training split
    num_test: int
    # The normalisation (x / 255 - mean) / std that models built for the data
    # carry as their first layer; per channel, in [0, 1] pixel units.
    mean: tuple
    std: tuple
    augment: str  # "cifar" | "imagenet" | "none"
    num_validation: int = 0  # examples held out of the training split (validation_examples)


def dataset_names():
    """Names accepted by :func:`keras_feed.data.load`."""
    return list(NAMES)


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def norm_name(name):
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in NAMES:
        raise DataError(f"unknown dataset '{name}'; expected one of: {', '.join(NAMES)}")
    return key


def norm_image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in image_size
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise DataError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(size) < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size!r}")
    return size


def check_int(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def check_validation_examples(value):
    """``validation_examples`` as an int; ``None`` and 0 mean no validation split."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(
            f"validation_examples (--validation_examples) must be a non-negative integer, "
            f"got {value!r}"
        )
    return int(value)


def check_labels(labels_by_source, num_classes):
    """Checks labels lie in [0, num_classes); infers num_classes if None."""
    if num_classes is None:
        top = max(int(y.max()) for y in labels_by_source.values())
        num_classes = top + 1
        if num_classes < 2:
            src = next(iter(labels_by_source))
            raise DataError(
                f"{src}: labels out of range: need at least 2 classes, found max "
                f"label {top}"
            )
    for src, y in labels_by_source.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{src}: labels out of range: expected 0..{num_classes - 1}, "
                f"found {lo}..{hi}"
            )
    return num_classes


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def channel_stats(images, indices=None):
    """Per-channel mean/std in [0, 1] units of a uint8 (N, H, W, C) array.

    With ``indices`` (sorted int array), over ``images[indices]`` only.
    """
    c = images.shape[-1]
    total = np.zeros(c, np.float64)
    total_sq = np.zeros(c, np.float64)
    n = images.shape[0] if indices is None else len(indices)
    for i in range(0, n, 4096):
        rows = images[i : i + 4096] if indices is None else images[indices[i : i + 4096]]
        chunk = rows.astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = n * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # constant channel: do not blow up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------
# Training subset and validation split
# --------------------------------------------------------------------------


def subset_indices(n_full, train_examples, seed):
    if train_examples is None:
        return np.arange(n_full, dtype=np.int64)
    if train_examples > n_full:
        raise DataError(
            f"train_examples={train_examples} exceeds the {n_full} training "
            "examples available"
        )
    perm = np.random.RandomState(seed).permutation(n_full)
    return np.sort(perm[:train_examples]).astype(np.int64)


def check_validation_size(n_full, train_examples, validation_examples, name):
    """Refuses a validation split that leaves no (or too few) training examples."""
    if validation_examples >= n_full:
        raise DataError(
            f"validation_examples={validation_examples} (--validation_examples) must be "
            f"smaller than the {n_full} training examples of '{name}'"
        )
    if train_examples is not None and train_examples + validation_examples > n_full:
        raise DataError(
            f"train_examples={train_examples} plus validation_examples={validation_examples} "
            f"(--train_examples + --validation_examples) exceed the {n_full} training "
            f"examples of '{name}'"
        )


def split_indices(n_full, train_examples, validation_examples, seed, name):
    """(training indices, held-out indices) into a training split of ``n_full`` examples.

    Both sorted int64. Without ``validation_examples`` (0) the held-out indices
    are ``None`` and the training indices are :func:`subset_indices`'. With it,
    ``perm = RandomState(seed).permutation(n_full)``: the last
    ``validation_examples`` of ``perm`` are held out (so they do not depend on
    ``train_examples``) and the training subset is the first ``train_examples``
    of ``perm`` (the same subset as without a validation split), or all of
    ``perm`` that is not held out.
    """
    if not validation_examples:
        return subset_indices(n_full, train_examples, seed), None
    if train_examples is not None and train_examples > n_full:
        subset_indices(n_full, train_examples, seed)  # raises "exceeds"
    check_validation_size(n_full, train_examples, validation_examples, name)
    perm = np.random.RandomState(seed).permutation(n_full)
    kept = n_full - validation_examples
    held_out = np.sort(perm[kept:]).astype(np.int64)
    train = perm[:kept] if train_examples is None else perm[:train_examples]
    return np.sort(train).astype(np.int64), held_out


def not_held_out(n_full, held_out):
    """Sorted indices of the training split outside ``held_out`` (None: all)."""
    if held_out is None:
        return None
    keep = np.ones(n_full, bool)
    keep[held_out] = False
    return np.flatnonzero(keep).astype(np.int64)
