"""Datasets and deterministic input pipelines for keras-feed.

Entry point: :func:`load` returns a :class:`Data` object whose ``train()``,
``test()`` and ``train_eval()`` methods build ``tf.data`` pipelines of
``(images float32 (B, H, W, C), labels int32 (B,))``: raw pixels, values in
[0, 255] as the dataset stores them (after augmentation and resizing), never
normalised -- the models normalise their own inputs (see below).

Sources (``dataset_names()``):

* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` -- TensorFlow
  Datasets, loaded into memory.  ``mnist`` / ``fashion_mnist`` are read
  locally instead when ``data_dir`` holds the four standard IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
  ``.gz``; the ``train-images.idx3-ubyte`` spelling is accepted too).
* ``imagenet2012`` -- TensorFlow Datasets, streamed (JPEG bytes are decoded in
  the pipeline).  TFDS cannot download ImageNet: put ``ILSVRC2012_img_train.tar``
  and ``ILSVRC2012_img_val.tar`` in ``<data_dir>/downloads/manual`` (the
  manual dir passed to TFDS) and the first ``load`` prepares it.  The test
  split is TFDS's ``validation`` split.
* ``idx`` -- any folder holding the four IDX files above;
  ``num_classes = max label + 1`` over train and test.
* ``folder`` -- ``data_dir/train/<class>/*.png|jpg|jpeg`` and
  ``data_dir/test/<class>/...`` (``val`` or ``validation`` are accepted in
  place of ``test``).  Classes are the sorted sub-folder names of ``train``;
  other files (e.g. ``.DS_Store``) are ignored.  Folders with at most
  ``FOLDER_VERIFY_LIMIT`` (20000) images are fully decoded at load time (an
  undecodable file raises :class:`DataError`); larger folders only get their
  magic bytes checked (PNG / JPEG signature) and are decoded while streaming.
  If every image has the same size <= 64 px (or ``image_size <= 64`` is
  given), the folder is treated like CIFAR ("cifar" augmentation, small folders
  are held in memory); otherwise images are streamed from disk with "imagenet"
  augmentation at ``image_size`` (default 224).  Small images of several
  sizes (e.g. 28x28 and 32x32) raise :class:`DataError` naming the sizes
  unless ``image_size`` says which size the model sees.
* ``synthetic`` -- a small, learnable toy task for smoke tests: 10 classes,
  16x16x3 images (``image_size`` overrides), each class a smooth random
  template plus Gaussian noise; 512 training examples (or ``train_examples``)
  and 256 test examples.  The task itself is fixed (it does not depend on
  ``seed``); it is only ever used when asked for by name.

Normalisation: ``DatasetInfo.mean`` and ``.std`` are the per-channel
statistics, in [0, 1] units, of the normalisation ``(x / 255 - mean) / std``
that every model keras-feed builds for the dataset carries as its first layer
(``keras_feed.models.build(..., mean=info.mean, std=info.std)``); the
pipelines themselves yield raw pixels, so a saved model is served with images
as they are stored.  CIFAR-10/100 use the usual per-channel constants,
``imagenet2012`` and ``folder`` ImageNet's; IDX, MNIST, Fashion-MNIST and
synthetic data compute mean/std over the *full* training split (not the
``train_examples`` subset, so models trained on different subsets normalise
their inputs identically).

Augmentation (``DatasetInfo.augment``):

* ``"cifar"``: zero-pad P pixels (P = 4 if the image is at least 32 px, else 2),
  random crop back to H x W, and a random horizontal flip -- except for
  ``mnist``, ``idx`` and ``synthetic`` which get the crop only (digits and
  unknown IDX data are not mirror-symmetric); see ``Data.flip``.
* ``"imagenet"``: random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to
  ``image_size`` plus a horizontal flip; evaluation resizes the shorter side to
  ``image_size / 0.875`` and takes the central crop.
* ``"none"``: no augmentation (what ``train(augment=False)`` does; ``load``
  itself never picks it).

Determinism: ``train()`` is ``Dataset.counter(start_epoch).flat_map(epoch)``.
Epoch ``e``'s order and augmentation depend only on ``(seed, e)`` (never on
TensorFlow's global seed): in-memory and file-list sources are permuted with
``tf.random.experimental.index_shuffle`` keyed by ``(seed, e)``.  "imagenet"
augmentation uses stateless ops keyed by ``(seed, e, position in epoch)``;
"cifar" augmentation is vectorised per batch: one ``stateless_uniform`` draw
keyed by ``(seed, e, position of the batch's first element)`` gives each
example its crop offsets and flip bit (so it also depends on the batch size).
Results are bitwise reproducible, parallel ``map`` is safe, and
``train(b, start_epoch=e, skip_batches=k)`` reproduces the uninterrupted run.
``imagenet2012`` cannot be accessed randomly, so its epochs permute consecutive
blocks of ``Data.stream_block`` (10000) examples instead (TFDS already shuffled
the examples when it prepared the dataset).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from keras_feed import idx
from keras_feed.idx import DataError, read_idx
from keras_feed.idx import one_line as _one_line

__all__ = [
    "DataError",
    "DatasetInfo",
    "Data",
    "dataset_names",
    "describe_augmentation",
    "load",
    "read_idx",
]

AUTOTUNE = tf.data.AUTOTUNE

#: Folders with at most this many images are fully decoded at load time.
FOLDER_VERIFY_LIMIT = 20000
#: Largest side (pixels) for which a folder is treated like CIFAR.
SMALL_IMAGE_MAX = 64

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet constants averaged over channels, for grayscale folders.
IMAGENET_GRAY_MEAN = (0.449,)
IMAGENET_GRAY_STD = (0.226,)

_NAMES = (
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "folder",
    "idx",
    "imagenet2012",
    "mnist",
    "synthetic",
)
_NO_FLIP = ("mnist", "idx", "synthetic")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_TEST_DIRS = ("test", "val", "validation")
_SALT = 0x0FEED  # mixed into every derived random key


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


def dataset_names():
    """Names accepted by :func:`load`."""
    return list(_NAMES)


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------

_IDX_FILES = idx.IDX_FILES
_find_idx_file = idx.find_idx_file


def _has_idx_files(data_dir):
    return any(_find_idx_file(data_dir, stems) for _, stems in _IDX_FILES)


def _load_idx_dir(data_dir, name):
    paths = {role: _find_idx_file(data_dir, stems) for role, stems in _IDX_FILES}
    missing = [stems[0] + "[.gz]" for role, stems in _IDX_FILES if paths[role] is None]
    if missing:
        raise DataError(
            f"missing IDX file(s) in {data_dir}: expected {', '.join(missing)}"
        )
    arrays = {}
    for role, _ in _IDX_FILES:
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
    num_classes = _check_labels(
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


def _check_labels(labels_by_source, num_classes):
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


def _channel_stats(images):
    """Per-channel mean/std in [0, 1] units of a uint8 (N, H, W, C) array."""
    c = images.shape[-1]
    total = np.zeros(c, np.float64)
    total_sq = np.zeros(c, np.float64)
    for i in range(0, images.shape[0], 4096):
        chunk = images[i : i + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # constant channel: do not blow up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------
# TensorFlow Datasets
# --------------------------------------------------------------------------


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except Exception as e:  # pragma: no cover - depends on the installation
        raise DataError(
            f"tensorflow_datasets cannot be imported ({_one_line(e, 120)}); "
            "install it or use a local dataset (idx / folder) with --data_dir"
        ) from None
    return tfds


def _tfds_error(name, data_dir, err):
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


def _tfds_load(tfds, name, split, data_dir, **kwargs):
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
        raise _tfds_error(name, data_dir, e) from None


def _load_tfds_memory(name, data_dir):
    tfds = _import_tfds()
    out = []
    info = None
    for split in ("train", "test"):
        ds, info = _tfds_load(tfds, name, split, data_dir)
        xs, ys = [], []
        try:
            for x, y in tfds.as_numpy(ds.batch(8192)):
                xs.append(x)
                ys.append(y)
        except Exception as e:
            raise _tfds_error(name, data_dir, e) from None
        if not xs:
            raise DataError(f"TFDS dataset '{name}' split '{split}' is empty")
        x = np.concatenate(xs).astype(np.uint8)
        if x.ndim == 3:
            x = x[..., None]
        out += [x, np.concatenate(ys).astype(np.int32)]
    num_classes = int(info.features["label"].num_classes)
    _check_labels({f"{name}/train": out[1], f"{name}/test": out[3]}, num_classes)
    return out[0], out[1], out[2], out[3], num_classes


def _split_size(info, split, ds):
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


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------


def _list_images(class_dir):
    try:
        names = sorted(os.listdir(class_dir))
    except OSError as e:
        raise DataError(f"cannot list {class_dir}: {_one_line(e, 120)}") from None
    return [
        os.path.join(class_dir, f)
        for f in names
        if not f.startswith(".")
        and f.lower().endswith(_IMAGE_EXTS)
        and os.path.isfile(os.path.join(class_dir, f))
    ]


def _scan_split(split_dir, class_names=None):
    """Returns (paths, labels, class_names) of data_dir/<split>/<class>/*."""
    subdirs = sorted(
        d for d in os.listdir(split_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )
    if not subdirs:
        raise DataError(f"no class sub-folders in {split_dir}")
    if class_names is None:
        if len(subdirs) < 2:
            raise DataError(
                f"{split_dir}: expected at least 2 class sub-folders, found {len(subdirs)}"
            )
        class_names = subdirs
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for d in subdirs:
        if d not in index:
            raise DataError(
                f"class folder {os.path.join(split_dir, d)} has no matching class "
                f"folder in train ({len(class_names)} classes)"
            )
        files = _list_images(os.path.join(split_dir, d))
        if not files:
            raise DataError(
                f"class folder {os.path.join(split_dir, d)} contains no "
                ".png/.jpg/.jpeg images"
            )
        paths += files
        labels += [index[d]] * len(files)
    return paths, np.asarray(labels, np.int32), class_names


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _decode_any(contents):
    return tf.io.decode_image(contents, channels=0, expand_animations=False)


def _decode_file(path):
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {_one_line(e, 120)}") from None
    if not contents:
        raise DataError(f"cannot decode image {path}: file is empty")
    try:
        return _decode_any(tf.constant(contents)).numpy()
    except (tf.errors.OpError, ValueError) as e:
        reason = _op_error_reason(e)
        raise DataError(f"cannot decode image {path}: {_one_line(reason, 160)}") from None


def _op_error_reason(err):
    """The failing op's own reason in a TensorFlow error, without the graph preamble.

    A ``tf.function`` error reads ``Graph execution error: Detected at node ...
    defined at (most recent call last): File ... <reason> [[{{node ...}}]]
    [Op:...]``; only ``<reason>`` (e.g. ``Invalid PNG. Failed to initialize
    decoder.``) tells the user anything.
    """
    lines = (getattr(err, "message", None) or str(err)).splitlines()
    # The reason follows the traceback of where the op was defined.
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    if frames:
        lines = lines[frames[-1] + 1:]
    lines = [line for line in lines if not line.startswith(("Graph execution error",
                                                            "Detected at node"))]
    reason = re.sub(r"\[\[\{\{node [^}]*\}\}\]\]|\[Op:[^\]]*\]|\{\{function_node [^}]*\}\}",
                    " ", " ".join(lines))
    return " ".join(reason.split()) or type(err).__name__


def _check_magic(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {_one_line(e, 120)}") from None
    if not (head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff")):
        raise DataError(
            f"cannot decode image {path}: not a PNG or JPEG file "
            f"(first bytes 0x{head.hex() or 'empty'})"
        )


def _to_channels(img, channels):
    if img.shape[-1] in (2, 4):  # drop alpha
        img = img[..., :-1]
    if channels == 3 and img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif channels == 1 and img.shape[-1] == 3:
        img = np.rint(img.astype(np.float32) @ np.array([0.2989, 0.587, 0.114], np.float32))
        img = np.clip(img, 0, 255).astype(np.uint8)[..., None]
    return img


def _resize_uint8(img, size):
    if img.shape[:2] == tuple(size):
        return img
    out = tf.image.resize(img.astype(np.float32), size, antialias=True).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _load_folder(data_dir, image_size):
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"folder dataset: missing {train_dir} (expected train/<class>/*.png|jpg)")
    test_dir = next(
        (os.path.join(data_dir, d) for d in _TEST_DIRS if os.path.isdir(os.path.join(data_dir, d))),
        None,
    )
    if test_dir is None:
        raise DataError(
            f"folder dataset: missing {os.path.join(data_dir, 'test')} "
            "(also accepted: val, validation)"
        )
    train_paths, train_labels, class_names = _scan_split(train_dir)
    test_paths, test_labels, _ = _scan_split(test_dir, class_names)
    all_paths = train_paths + test_paths

    def keep(img):
        # Keep decoded pixels only where they can end up in memory (small
        # images), so verifying a folder of large photos stays cheap.
        if image_size is not None:
            return _resize_uint8(img, image_size) if max(image_size) <= SMALL_IMAGE_MAX else None
        return img if max(img.shape[:2]) <= SMALL_IMAGE_MAX else None

    kept = None
    if len(all_paths) <= FOLDER_VERIFY_LIMIT:
        decoded, shapes, kept = all_paths, [], []
        for p in all_paths:
            img = _decode_file(p)
            shapes.append(img.shape)
            kept.append(keep(img))
    else:
        for p in all_paths:
            _check_magic(p)
        picks = sorted(set(np.linspace(0, len(all_paths) - 1, 64).astype(int).tolist()))
        decoded = [all_paths[i] for i in picks]
        shapes = [_decode_file(p).shape for p in decoded]
    channels = 3 if any(shape[-1] >= 3 for shape in shapes) else 1
    sizes = {tuple(shape[:2]) for shape in shapes}
    if image_size is None:
        if len(sizes) > 1 and min(max(hw) for hw in sizes) <= SMALL_IMAGE_MAX:
            raise _mixed_sizes_error(data_dir, decoded, shapes)
        if len(sizes) == 1 and max(next(iter(sizes))) <= SMALL_IMAGE_MAX:
            size = next(iter(sizes))
        else:
            size = (224, 224)
    else:
        size = image_size
    small = max(size) <= SMALL_IMAGE_MAX
    result = {
        "class_names": list(class_names),
        "channels": channels,
        "size": tuple(int(s) for s in size),
        "augment": "cifar" if small else "imagenet",
        "num_classes": len(class_names),
    }
    if kept is not None and small:
        imgs = [_to_channels(img, channels) for img in kept]
        n = len(train_paths)
        result["arrays"] = (
            np.stack(imgs[:n]), train_labels, np.stack(imgs[n:]), test_labels
        )
    else:
        result["files"] = (train_paths, train_labels, test_paths, test_labels)
    return result


def _mixed_sizes_error(data_dir, paths, shapes, examples=4):
    """DataError for a folder whose small images are not all one size.

    Resizing them all to one guessed size would silently change the task (and
    switch 28x28 digits to ImageNet's 224x224 pipeline), so the user says which
    size the model sees.  Names each size found (most frequent first) with one
    example file, relative to ``data_dir``.
    """
    first_file, counts = {}, {}
    for path, shape in zip(paths, shapes):
        hw = tuple(int(s) for s in shape[:2])
        first_file.setdefault(hw, os.path.relpath(path, data_dir))
        counts[hw] = counts.get(hw, 0) + 1
    order = sorted(counts, key=lambda hw: (-counts[hw], hw))
    found = ", ".join(
        f"{h}x{w} ({counts[(h, w)]} file{'s' * (counts[(h, w)] > 1)}, "
        f"e.g. {first_file[(h, w)]})"
        for h, w in order[:examples]
    )
    more = f" and {len(order) - examples} more sizes" if len(order) > examples else ""
    return DataError(
        f"folder dataset {data_dir}: images of {len(order)} different sizes: {found}{more}; "
        "pass --image_size (image_size= in Python) to resize them all to one size"
    )


# --------------------------------------------------------------------------
# Synthetic toy task
# --------------------------------------------------------------------------


def _synthetic(num_train, num_test, size, num_classes=10):
    h, w = size
    rng = np.random.RandomState(20240611)
    coarse = rng.uniform(0.0, 1.0, (num_classes, 4, 4, 3)).astype(np.float32)
    templates = tf.image.resize(coarse, (h, w), method="bilinear").numpy()

    def make(n, rs):
        y = np.arange(n) % num_classes
        rs.shuffle(y)
        x = 0.25 + 0.5 * templates[y] + rs.normal(0.0, 0.12, (n, h, w, 3))
        x = np.clip(np.rint(255.0 * x), 0, 255).astype(np.uint8)
        return x, y.astype(np.int32)

    x_train, y_train = make(num_train, np.random.RandomState(1))
    x_test, y_test = make(num_test, np.random.RandomState(2))
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _norm_name(name):
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _NAMES:
        raise DataError(f"unknown dataset '{name}'; expected one of: {', '.join(_NAMES)}")
    return key


def _norm_image_size(image_size):
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


def _check_int(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _subset_indices(n_full, train_examples, seed):
    if train_examples is None:
        return np.arange(n_full, dtype=np.int64)
    if train_examples > n_full:
        raise DataError(
            f"train_examples={train_examples} exceeds the {n_full} training "
            "examples available"
        )
    perm = np.random.RandomState(seed).permutation(n_full)
    return np.sort(perm[:train_examples]).astype(np.int64)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _no_autograph(fn):
    return tf.autograph.experimental.do_not_convert(fn)


def _derive(key, value):
    """Mixes integer ``value`` into a [2] int64 stateless seed."""
    return tf.random.fold_in(key, tf.cast(value, tf.int64), alg="philox")


class Data:
    """A loaded dataset: metadata plus deterministic ``tf.data`` pipelines.

    Attributes:
      info: :class:`DatasetInfo`.
      train_indices: int64 array, the indices (into the full training split) of
        the training examples used, sorted.  ``arange(num_train)`` without
        ``train_examples``.
      seed: seed of the epoch order and augmentation (``load``'s ``seed``;
        the subset uses ``subset_seed``, which defaults to it).
      flip: whether "cifar"/"imagenet" augmentation includes a horizontal flip.
      class_names: class folder names for ``folder``, else ``None``.
    """

    #: imagenet2012 streams are shuffled within blocks of this many examples.
    stream_block = 10000

    def __init__(self, info, *, seed, train_indices, flip, source, class_names=None,
                 channels=None):
        self.info = info
        self.seed = int(seed)
        self.train_indices = train_indices
        self.flip = bool(flip)
        self.class_names = class_names
        self._source = source  # dict, see load()
        self._kind = source["kind"]  # "array" | "files" | "stream"
        h, w, c = info.image_shape
        self._size = (h, w)
        self._channels = c if channels is None else channels
        self._pad = 4 if min(h, w) >= 32 else 2
        self._base_key = tf.constant([self.seed, _SALT], tf.int64)
        if self._kind == "array":
            self._x_train = tf.constant(source["x_train"])
            self._y_train = tf.constant(source["y_train"])
            self._x_test = tf.constant(source["x_test"])
            self._y_test = tf.constant(source["y_test"])
        elif self._kind == "files":
            self._p_train = tf.constant(source["p_train"])
            self._y_train = tf.constant(source["y_train"])
            self._p_test = tf.constant(source["p_test"])
            self._y_test = tf.constant(source["y_test"])

    def __repr__(self):
        return f"Data({self.info!r}, seed={self.seed}, flip={self.flip})"

    # ------------------------------------------------------------ public API

    def steps_per_epoch(self, batch_size):
        """Full batches per training epoch (``num_train // batch_size``)."""
        batch_size = _check_int(batch_size, "batch_size", 1)
        if batch_size > self.info.num_train:
            raise DataError(
                f"batch_size={batch_size} exceeds the {self.info.num_train} "
                f"training examples of '{self.info.name}'"
            )
        return self.info.num_train // batch_size

    def train(self, batch_size, *, seed=None, start_epoch=0, skip_batches=0, augment=True,
              shard=None):
        """Infinite, shuffled, augmented training batches (drop_remainder).

        ``Dataset.counter(start_epoch).flat_map(one epoch)``: every epoch holds
        exactly ``steps_per_epoch`` full batches and is fully determined by
        ``(seed, epoch)``.  ``skip_batches`` drops the first batches of
        ``start_epoch`` (values >= steps_per_epoch roll over into later
        epochs), so ``train(b, start_epoch=e, skip_batches=k)`` continues an
        interrupted run exactly. ``seed`` replaces the dataset's seed for this
        pipeline (e.g. one seed per teacher over the same subset).

        ``shard=(count, index)`` gives one of ``count`` workers its share of
        every global batch of ``batch_size`` (which ``count`` must divide):
        batches of ``batch_size // count`` holding the elements at positions
        ``index, index + count, ...`` of the epoch's order. The shards of a
        step together hold exactly that step's unsharded batch, so no example
        is used twice in an epoch; each worker gathers and augments only its
        own examples.
        """
        steps = self.steps_per_epoch(batch_size)
        if shard is not None:
            count, index = (_check_int(value, "shard", 0) for value in shard)
            if not 0 <= index < count or batch_size % count:
                raise DataError(
                    f"shard={tuple(shard)} must be (count, index) with 0 <= index < "
                    f"count and count dividing batch_size={batch_size}"
                )
        start_epoch = _check_int(start_epoch, "start_epoch", 0)
        skip_batches = _check_int(skip_batches, "skip_batches", 0)
        start_epoch += skip_batches // steps
        skip_batches %= steps
        per_epoch = steps * batch_size
        base_key = (
            self._base_key if seed is None else tf.constant([int(seed), _SALT], tf.int64)
        )

        if self._kind in ("array", "files"):
            n = tf.constant(self.info.num_train - 1, tf.int64)

            def one_epoch(epoch):
                epoch_key = _derive(base_key, epoch)
                order_key, aug_key = _derive(epoch_key, 0), _derive(epoch_key, 1)
                pos = tf.range(per_epoch, dtype=tf.int64)
                order = tf.random.experimental.index_shuffle(pos, order_key, n)
                keys = tf.tile(aug_key[None, :], [per_epoch, 1])
                return tf.data.Dataset.from_tensor_slices((keys, pos, order))
        else:
            block = int(self.stream_block)
            stream = self._stream("train")

            def one_epoch(epoch):
                epoch_key = _derive(base_key, epoch)
                order_key, aug_key = _derive(epoch_key, 0), _derive(epoch_key, 1)

                def permute(block_no, elems):
                    contents, labels = elems
                    size = tf.shape(labels, out_type=tf.int64)[0]
                    perm = tf.random.experimental.index_shuffle(
                        tf.range(size), _derive(order_key, block_no), size - 1)
                    return tf.gather(contents, perm), tf.gather(labels, perm)

                ds = stream.batch(block).enumerate().map(permute).unbatch()
                ds = ds.take(per_epoch).enumerate()
                return ds.map(lambda p, el: (aug_key, p, el[0], el[1]))

        ds = tf.data.Dataset.counter(start_epoch).flat_map(_no_autograph(one_epoch))
        if skip_batches:
            ds = ds.skip(skip_batches * batch_size)
        global_batch = batch_size
        if shard is not None:
            ds = ds.shard(count, index)
            batch_size //= count
        do_augment = augment and self.info.augment != "none"
        imagenet = self.info.augment == "imagenet"

        if self._kind == "array":
            # Gather whole batches from the in-memory arrays: no per-element work.
            ds = ds.batch(batch_size, drop_remainder=True)

            def gather(aug_key, pos, idx):
                images = self._ensure_size(tf.gather(self._x_train, idx))
                return aug_key, pos, images, tf.gather(self._y_train, idx)

            ds = ds.map(_no_autograph(gather), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
        else:
            def element(aug_key, pos, *payload):
                image, label = self._fetch("train", *payload)
                if do_augment and imagenet:
                    image = self._imagenet_augment(image, _derive(aug_key, pos))
                else:
                    image = self._eval_transform(image)
                return aug_key, pos, image, label

            ds = ds.map(_no_autograph(element), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
            ds = ds.batch(batch_size, drop_remainder=True)

        def finish(aug_key, pos, images, labels):
            if do_augment and not imagenet:
                # One stateless draw per global batch, keyed by (seed, epoch,
                # position of the global batch's first element in the epoch);
                # each example takes the row of its position in the global
                # batch, so a shard is augmented as in the unsharded batch.
                start = pos[0] - tf.math.floormod(pos[0], global_batch)
                images = self._cifar_augment(
                    images, _derive(aug_key[0], start), positions=pos - start,
                    num_draws=global_batch,
                )
            return images, labels

        ds = ds.map(_no_autograph(finish), num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return ds.prefetch(AUTOTUNE)

    def test(self, batch_size):
        """Finite test batches in file order, unaugmented; keeps the partial batch."""
        return self._finite("test", batch_size)

    def train_eval(self, batch_size):
        """The training subset, finite, in index order, unaugmented."""
        return self._finite("train", batch_size)

    # ------------------------------------------------------------ internals

    def _finite(self, split, batch_size):
        batch_size = _check_int(batch_size, "batch_size", 1)
        if self._kind == "array":
            x = self._x_train if split == "train" else self._x_test
            y = self._y_train if split == "train" else self._y_test
            ds = tf.data.Dataset.range(int(y.shape[0])).batch(batch_size)

            def make_batch(idx):
                images = self._ensure_size(tf.gather(x, idx))
                return images, tf.gather(y, idx)

            ds = ds.map(_no_autograph(make_batch), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
            return ds.prefetch(AUTOTUNE)
        if self._kind == "files":
            y = self._y_train if split == "train" else self._y_test
            ds = tf.data.Dataset.range(int(y.shape[0])).map(lambda i: (i,))
        else:
            ds = self._stream(split)

        def make_example(*payload):
            image, label = self._fetch(split, *payload)
            return self._eval_transform(image), label

        ds = ds.map(_no_autograph(make_example), num_parallel_calls=AUTOTUNE,
                    deterministic=True)
        return ds.batch(batch_size).prefetch(AUTOTUNE)

    def _stream(self, split):
        """imagenet2012: dataset of (encoded image bytes, int32 label)."""
        return self._source["stream_train" if split == "train" else "stream_test"]

    def _fetch(self, split, *payload):
        """files / stream payload -> (uint8 image (h, w, C), int32 label)."""
        if self._kind == "files":
            (idx,) = payload
            p = self._p_train if split == "train" else self._p_test
            y = self._y_train if split == "train" else self._y_test
            return self._decode(tf.io.read_file(tf.gather(p, idx))), tf.gather(y, idx)
        contents, label = payload
        return self._decode(contents), tf.cast(label, tf.int32)

    def _decode(self, contents):
        image = tf.io.decode_image(contents, channels=self._channels, expand_animations=False)
        image.set_shape([None, None, self._channels])
        return image

    def _ensure_size(self, images):
        """float32 image(s) (..., H, W, C) resized to the model size if needed."""
        images = tf.cast(images, tf.float32)
        h, w = self._size
        static = images.shape[-3:-1]
        if static.is_fully_defined() and tuple(static) == (h, w):
            return images
        shape = tf.shape(images)
        same = tf.logical_and(tf.equal(shape[-3], h), tf.equal(shape[-2], w))
        images = tf.cond(
            same,
            lambda: images,
            lambda: tf.image.resize(images, (h, w), method="bilinear", antialias=True),
        )
        images.set_shape(images.shape[:-3].concatenate([h, w, self._channels]))
        return images

    def _cifar_augment(self, images, key, *, positions=None, num_draws=None):
        """Zero-pad P, random crop back to H x W, random flip; batched.

        ``images`` is float32 (B, H, W, C) in [0, 255]; ``key`` a [2] int64
        stateless seed.  Row ``i`` of one ``stateless_uniform`` draw of
        ``num_draws`` rows (default B) gives example ``i`` (or ``positions[i]``)
        its crop offsets and flip bit.
        """
        h, w = self._size
        p = self._pad
        n = tf.shape(images)[0] if num_draws is None else num_draws
        draws = tf.random.stateless_uniform(
            tf.stack([n, 3]), seed=key, minval=None, maxval=None, dtype=tf.int32,
            alg="philox")
        if positions is not None:
            draws = tf.gather(draws, positions)
        offsets = tf.math.floormod(draws[:, :2], 2 * p + 1)
        padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
        rows = offsets[:, :1] + tf.range(h)[None, :]
        cols = offsets[:, 1:2] + tf.range(w)[None, :]
        out = tf.gather(padded, rows, axis=1, batch_dims=1)
        out = tf.gather(out, cols, axis=2, batch_dims=1)
        if self.flip:
            flip = tf.equal(tf.math.floormod(draws[:, 2], 2), 1)
            out = tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)
        return out

    def _imagenet_augment(self, image, key):
        """Random resized crop (scale 0.08-1, ratio 3/4-4/3) + flip; one example."""
        h, w = self._size
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=_derive(key, 0),
            min_object_covered=0.0,
            aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(tf.cast(image, tf.float32), (h, w), method="bilinear")
        image.set_shape([h, w, self._channels])
        if self.flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=_derive(key, 1))
        return image

    def _eval_transform(self, image):
        """Unaugmented float32 (H, W, C) view of one decoded example."""
        if self.info.augment != "imagenet":
            return self._ensure_size(image)
        h, w = self._size
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.maximum((h / 0.875) / shape[0], (w / 0.875) / shape[1])
        new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), [h, w])
        image = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear",
                                antialias=True)
        top = (new[0] - h) // 2
        left = (new[1] - w) // 2
        image = tf.slice(image, [top, left, 0], [h, w, -1])
        image.set_shape([h, w, self._channels])
        return image


# --------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------


def load(name, *, data_dir=None, train_examples=None, seed=0, image_size=None,
         subset_seed=None):
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
      subset_seed: seed of the ``train_examples`` subset; defaults to ``seed``.
    """
    name = _norm_name(name)
    seed = _check_int(seed, "seed", 0)
    if seed >= 2**32:
        raise DataError(f"seed must be < 2**32, got {seed}")
    subset_seed = seed if subset_seed is None else _check_int(subset_seed, "subset_seed", 0)
    if subset_seed >= 2**32:
        raise DataError(f"subset_seed must be < 2**32, got {subset_seed}")
    if train_examples is not None:
        train_examples = _check_int(train_examples, "train_examples", 1)
    size = _norm_image_size(image_size)
    if name != "synthetic":
        if data_dir is not None:
            data_dir = os.path.expanduser(os.fspath(data_dir))
            if not os.path.exists(data_dir):
                raise DataError(f"data_dir does not exist: {data_dir}")
            if not os.path.isdir(data_dir):
                raise DataError(f"data_dir is not a directory: {data_dir}")
        elif name in ("idx", "folder"):
            raise DataError(f"dataset '{name}' needs data_dir (a local folder)")

    flip = name not in _NO_FLIP
    class_names = None
    if name == "imagenet2012":
        return _load_imagenet(data_dir, train_examples, seed, subset_seed, size)

    if name == "folder":
        folder = _load_folder(data_dir, size)
        class_names = folder["class_names"]
        channels = folder["channels"]
        if channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
        if "arrays" in folder:
            x_tr, y_tr, x_te, y_te = folder["arrays"]
            idx = _subset_indices(len(y_tr), train_examples, subset_seed)
            source = {"kind": "array", "x_train": x_tr[idx], "y_train": y_tr[idx],
                      "x_test": x_te, "y_test": y_te}
        else:
            p_tr, y_tr, p_te, y_te = folder["files"]
            idx = _subset_indices(len(y_tr), train_examples, subset_seed)
            encode = lambda paths: np.array([os.fsencode(q) for q in paths], object)  # noqa
            source = {"kind": "files", "p_train": encode(p_tr)[idx], "y_train": y_tr[idx],
                      "p_test": encode(p_te), "y_test": y_te}
        info = DatasetInfo(
            name=name,
            num_classes=folder["num_classes"],
            image_shape=folder["size"] + (channels,),
            num_train=len(idx),
            num_test=len(y_te),
            mean=tuple(mean),
            std=tuple(std),
            augment=folder["augment"],
        )
        return Data(info, seed=seed, train_indices=idx, flip=flip, source=source,
                    class_names=class_names, channels=channels)

    # In-memory array datasets.
    if name == "synthetic":
        n_train = 512 if train_examples is None else train_examples
        x_tr, y_tr, x_te, y_te = _synthetic(n_train, 256, size or (16, 16))
        num_classes = 10
        train_examples = None  # all generated examples are used
    elif name == "idx" or (
        name in ("mnist", "fashion_mnist") and data_dir is not None and _has_idx_files(data_dir)
    ):
        x_tr, y_tr, x_te, y_te, num_classes = _load_idx_dir(data_dir, name)
    else:
        x_tr, y_tr, x_te, y_te, num_classes = _load_tfds_memory(name, data_dir)

    if name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif name == "cifar100":
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        mean, std = _channel_stats(x_tr)
    if len(mean) != x_tr.shape[-1]:  # e.g. grayscale CIFAR-like data
        mean, std = _channel_stats(x_tr)
    idx = _subset_indices(len(y_tr), train_examples, subset_seed)
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
    )
    source = {"kind": "array", "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    return Data(info, seed=seed, train_indices=idx, flip=flip, source=source)


def _load_imagenet(data_dir, train_examples, seed, subset_seed, size):
    tfds = _import_tfds()
    kwargs = {"decoders": {"image": tfds.decode.SkipDecoding()}}
    if data_dir is not None:
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
        }
    train_ds, info = _tfds_load(tfds, "imagenet2012", "train", data_dir, **kwargs)
    test_ds, _ = _tfds_load(tfds, "imagenet2012", "validation", data_dir, **kwargs)
    n_full = _split_size(info, "train", train_ds)
    n_test = _split_size(info, "validation", test_ds)
    if n_full == 0 or n_test == 0:
        raise DataError(f"TFDS dataset 'imagenet2012' in {data_dir} has an empty split")
    idx = _subset_indices(n_full, train_examples, subset_seed)
    if len(idx) != n_full:
        mask = np.zeros(n_full, bool)
        mask[idx] = True
        mask_t = tf.constant(mask)
        train_ds = train_ds.enumerate().filter(lambda i, el: tf.gather(mask_t, i)).map(
            lambda i, el: el)
    cast = lambda x, y: (x, tf.cast(y, tf.int32))  # noqa: E731
    source = {"kind": "stream", "stream_train": train_ds.map(cast),
              "stream_test": test_ds.map(cast)}
    hw = size or (224, 224)
    info_out = DatasetInfo(
        name="imagenet2012",
        num_classes=int(info.features["label"].num_classes),
        image_shape=tuple(hw) + (3,),
        num_train=len(idx),
        num_test=n_test,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment="imagenet",
    )
    return Data(info_out, seed=seed, train_indices=idx, flip=True, source=source,
                channels=3)


def describe_augmentation(info):
    """The training augmentation of a dataset (`DatasetInfo.augment`), in words."""
    h, w = info.image_shape[:2]
    flip = " + horizontal flip" if info.name not in _NO_FLIP else ""
    if info.augment == "imagenet":
        return (f"random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to {h}x{w}{flip}; "
                f"evaluation: shorter side resized to size / 0.875, central {h}x{w} crop")
    if info.augment == "cifar":
        return f"zero-pad {4 if min(h, w) >= 32 else 2} + random {h}x{w} crop{flip}"
    return "none"


#: What the TFDS datasets hold, for describing a run without downloading them.
_TFDS_INFO = {
    "cifar10": (10, (32, 32, 3), 50000, 10000, CIFAR10_MEAN, CIFAR10_STD, "cifar"),
    "cifar100": (100, (32, 32, 3), 50000, 10000, CIFAR100_MEAN, CIFAR100_STD, "cifar"),
    "mnist": (10, (28, 28, 1), 60000, 10000, (0.1307,), (0.3081,), "cifar"),
    "fashion_mnist": (10, (28, 28, 1), 60000, 10000, (0.2860,), (0.3530,), "cifar"),
    "imagenet2012": (1000, (224, 224, 3), 1281167, 50000, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
}


def describe(name, *, data_dir=None, train_examples=None, image_size=None):
    """A dataset's `DatasetInfo` without downloading it (for plans and dry runs).

    TFDS datasets without local files are described from their known sizes;
    local sources (IDX, folder, synthetic) are loaded and validated as `load`
    does. Raises `DataError` like `load`.
    """
    key = _norm_name(name)
    local = data_dir is not None and key in ("mnist", "fashion_mnist") and os.path.isdir(
        os.path.expanduser(os.fspath(data_dir))
    ) and _has_idx_files(os.path.expanduser(os.fspath(data_dir)))
    if key not in _TFDS_INFO or local:
        return load(name, data_dir=data_dir, train_examples=train_examples,
                    image_size=image_size).info
    classes, shape, num_train, num_test, mean, std, augment = _TFDS_INFO[key]
    if train_examples is not None:
        train_examples = _check_int(train_examples, "train_examples", 1)
        if train_examples > num_train:
            raise DataError(
                f"train_examples={train_examples} exceeds the {num_train} training "
                f"examples of '{key}'"
            )
        num_train = train_examples
    size = _norm_image_size(image_size)
    if size is not None:
        shape = tuple(size) + (shape[-1],)
    return DatasetInfo(name=key, num_classes=classes, image_shape=shape, num_train=num_train,
                       num_test=num_test, mean=tuple(mean), std=tuple(std), augment=augment)
