"""`load` and `describe`: the argument checks, the dispatch to the sources, the
seeded training subset and validation split, and the `DatasetInfo` they report.
"""

from __future__ import annotations

import os

import numpy as np

from keras_feed.data import folder as folder_source
from keras_feed.data import idx_source, imagenet, synthetic, tfds_source
from keras_feed.data.common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NO_FLIP,
    DatasetInfo,
    channel_stats,
    check_int,
    check_validation_examples,
    check_validation_size,
    norm_image_size,
    norm_name,
    not_held_out,
    split_indices,
)
from keras_feed.data.idx import DataError
from keras_feed.data.pipeline import Data


def load(name, *, data_dir=None, train_examples=None, seed=0, image_size=None,
         subset_seed=None, validation_examples=None):
    """Loads and validates a dataset; raises :class:`DataError` on any problem.

    Args:
      name: one of :func:`dataset_names` (case-insensitive, '-' == '_').
      data_dir: local data folder (required for ``idx`` and ``folder``; for
        TFDS datasets the TFDS data dir, or a folder of IDX files for
        ``mnist``/``fashion_mnist``; ignored for ``synthetic``).
      train_examples: use a seeded random subset of this many training
        examples (``numpy.random.RandomState(subset_seed).permutation``); for
        ``synthetic`` this is the number of examples generated.
      seed: seed of the epoch order and augmentation (and of the subset unless
        ``subset_seed`` is given).
      image_size: int or (H, W) the model sees; images are resized (and for
        ImageNet-style data randomly / centrally cropped) to it.
      subset_seed: seed of the ``train_examples`` subset and of the validation
        split; defaults to ``seed``.
      validation_examples: hold out this many examples of the training split
        as a validation split (``Data.validation()``): the last
        ``validation_examples`` of ``RandomState(subset_seed).permutation`` of
        the full training split, so they do not depend on ``train_examples``;
        the training subset is the first ``train_examples`` of the same
        permutation (the subset it is without a validation split), or the rest
        of the split.  Mean/std are computed without the held-out examples.
        ``synthetic`` draws its validation examples separately from its task.
        ``None`` or 0: no validation split.  Not available for
        ``imagenet2012`` (a stream).
    """
    name = norm_name(name)
    seed = check_int(seed, "seed", 0)
    if seed >= 2**32:
        raise DataError(f"seed must be < 2**32, got {seed}")
    subset_seed = seed if subset_seed is None else check_int(subset_seed, "subset_seed", 0)
    if subset_seed >= 2**32:
        raise DataError(f"subset_seed must be < 2**32, got {subset_seed}")
    if train_examples is not None:
        train_examples = check_int(train_examples, "train_examples", 1)
    size = norm_image_size(image_size)
    validation_examples = check_validation_examples(validation_examples)
    if name != "synthetic":
        if data_dir is not None:
            data_dir = os.path.expanduser(os.fspath(data_dir))
            if not os.path.exists(data_dir):
                raise DataError(f"data_dir does not exist: {data_dir}")
            if not os.path.isdir(data_dir):
                raise DataError(f"data_dir is not a directory: {data_dir}")
        elif name in ("idx", "folder"):
            raise DataError(f"dataset '{name}' needs data_dir (a local folder)")

    flip = name not in NO_FLIP
    if name == "imagenet2012":
        if validation_examples:
            raise imagenet.no_validation_error(validation_examples)
        source, idx, num_classes, n_test = imagenet.load_imagenet(
            data_dir, train_examples, subset_seed)
        info = DatasetInfo(
            name="imagenet2012",
            num_classes=num_classes,
            image_shape=tuple(size or (224, 224)) + (3,),
            num_train=len(idx),
            num_test=n_test,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            augment="imagenet",
        )
        return Data(info, seed=seed, train_indices=idx, flip=True, source=source, channels=3)
    if name == "folder":
        return _load_folder(data_dir, size, train_examples, validation_examples, seed,
                            subset_seed, flip)
    return _load_arrays(name, data_dir, size, train_examples, validation_examples, seed,
                        subset_seed, flip)


def _load_folder(data_dir, size, train_examples, validation_examples, seed, subset_seed,
                 flip):
    folder = folder_source.load_folder(data_dir, size)
    channels = folder["channels"]
    if channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
    if "arrays" in folder:
        x_tr, y_tr, x_te, y_te = folder["arrays"]
        idx, val = split_indices(len(y_tr), train_examples, validation_examples, subset_seed,
                                 "folder")
        source = {"kind": "array", "x_train": x_tr[idx], "y_train": y_tr[idx],
                  "x_test": x_te, "y_test": y_te}
        if val is not None:
            source.update(x_val=x_tr[val], y_val=y_tr[val])
    else:
        p_tr, y_tr, p_te, y_te = folder["files"]
        idx, val = split_indices(len(y_tr), train_examples, validation_examples, subset_seed,
                                 "folder")
        encode = lambda paths: np.array([os.fsencode(q) for q in paths], object)  # noqa
        paths = encode(p_tr)
        source = {"kind": "files", "p_train": paths[idx], "y_train": y_tr[idx],
                  "p_test": encode(p_te), "y_test": y_te}
        if val is not None:
            source.update(p_val=paths[val], y_val=y_tr[val])
    info = DatasetInfo(
        name="folder",
        num_classes=folder["num_classes"],
        image_shape=folder["size"] + (channels,),
        num_train=len(idx),
        num_test=len(y_te),
        mean=tuple(mean),
        std=tuple(std),
        augment=folder["augment"],
        num_validation=0 if val is None else len(val),
    )
    return Data(info, seed=seed, train_indices=idx, flip=flip, source=source,
                class_names=folder["class_names"], channels=channels, validation_indices=val)


def _load_arrays(name, data_dir, size, train_examples, validation_examples, seed, subset_seed,
                 flip):
    """The in-memory sources: synthetic, IDX folders and TFDS datasets."""
    generated_validation = None
    if name == "synthetic":
        n_train = synthetic.NUM_TRAIN if train_examples is None else train_examples
        arrays = synthetic.synthetic(n_train, synthetic.NUM_TEST, size or synthetic.SIZE,
                                     num_validation=validation_examples)
        x_tr, y_tr, x_te, y_te = arrays[:4]
        generated_validation = arrays[4:] or None
        num_classes = synthetic.NUM_CLASSES
        train_examples = None  # all generated examples are used
        validation_examples = 0  # drawn separately, not held out
    elif name == "idx" or (
        name in ("mnist", "fashion_mnist") and data_dir is not None
        and idx_source.has_idx_files(data_dir)
    ):
        x_tr, y_tr, x_te, y_te, num_classes = idx_source.load_idx_dir(data_dir, name)
    else:
        x_tr, y_tr, x_te, y_te, num_classes = tfds_source.load_memory(name, data_dir)

    idx, val = split_indices(len(y_tr), train_examples, validation_examples, subset_seed, name)
    # Statistics over the full training split (not the subset, so that models
    # trained on different subsets normalise identically), less the held-out
    # validation examples.
    kept = not_held_out(len(y_tr), val)
    if name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif name == "cifar100":
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        mean, std = channel_stats(x_tr, kept)
    if len(mean) != x_tr.shape[-1]:  # e.g. grayscale CIFAR-like data
        mean, std = channel_stats(x_tr, kept)
    source = {"kind": "array"}
    if val is not None:
        source.update(x_val=x_tr[val], y_val=y_tr[val])
    elif generated_validation is not None:
        source.update(x_val=generated_validation[0], y_val=generated_validation[1])
        val = np.arange(len(generated_validation[1]), dtype=np.int64)
    if len(idx) != len(y_tr):
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    hw = size or tuple(x_tr.shape[1:3])
    info = DatasetInfo(
        name=name,
        num_classes=int(num_classes),
        image_shape=tuple(int(s) for s in hw) + (int(x_tr.shape[-1]),),
        num_train=int(len(y_tr)),
        num_test=int(len(y_te)),
        mean=tuple(mean),
        std=tuple(std),
        augment="cifar",
        num_validation=0 if val is None else int(len(val)),
    )
    source.update(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return Data(info, seed=seed, train_indices=idx, flip=flip, source=source,
                validation_indices=val)


def describe_augmentation(info):
    """The training augmentation of a dataset (`DatasetInfo.augment`), in words."""
    h, w = info.image_shape[:2]
    flip = " + horizontal flip" if info.name not in NO_FLIP else ""
    if info.augment == "imagenet":
        return (f"random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to {h}x{w}{flip}; "
                f"evaluation: shorter side resized to size / 0.875, central {h}x{w} crop")
    if info.augment == "cifar":
        return f"zero-pad {4 if min(h, w) >= 32 else 2} + random {h}x{w} crop{flip}"
    return "none"


def describe(name, *, data_dir=None, train_examples=None, image_size=None,
             validation_examples=None):
    """A dataset's `DatasetInfo` without downloading it (for plans and dry runs).

    TFDS datasets without local files are described from their known sizes;
    local sources (IDX, folder, synthetic) are loaded and validated as `load`
    does. Raises `DataError` like `load`.
    """
    key = norm_name(name)
    local = data_dir is not None and key in ("mnist", "fashion_mnist") and os.path.isdir(
        os.path.expanduser(os.fspath(data_dir))
    ) and idx_source.has_idx_files(os.path.expanduser(os.fspath(data_dir)))
    if key not in tfds_source.TFDS_INFO or local:
        return load(name, data_dir=data_dir, train_examples=train_examples,
                    image_size=image_size, validation_examples=validation_examples).info
    classes, shape, n_full, num_test, mean, std, augment = tfds_source.TFDS_INFO[key]
    num_train = n_full
    if train_examples is not None:
        train_examples = check_int(train_examples, "train_examples", 1)
        if train_examples > n_full:
            raise DataError(
                f"train_examples={train_examples} exceeds the {n_full} training "
                f"examples of '{key}'"
            )
        num_train = train_examples
    num_validation = check_validation_examples(validation_examples)
    if num_validation:
        if key == "imagenet2012":
            raise imagenet.no_validation_error(num_validation)
        check_validation_size(n_full, train_examples, num_validation, key)
        if train_examples is None:
            num_train = n_full - num_validation
    size = norm_image_size(image_size)
    if size is not None:
        shape = tuple(size) + (shape[-1],)
    return DatasetInfo(name=key, num_classes=classes, image_shape=shape, num_train=num_train,
                       num_test=num_test, mean=tuple(mean), std=tuple(std), augment=augment,
                       num_validation=num_validation)
