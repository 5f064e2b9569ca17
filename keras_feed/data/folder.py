"""The ``folder`` source: ``data_dir/train/<class>/*.png|jpg|jpeg`` and
``data_dir/test/<class>/...`` (``val`` / ``validation`` accepted for ``test``).

Scans the class sub-folders, verifies the images (decoding all of them in
folders of at most ``FOLDER_VERIFY_LIMIT`` images, else checking their magic
bytes and decoding a sample), refuses small images of mixed sizes, and picks
the CIFAR-like in-memory or the ImageNet-like streamed form. Every problem is
a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf

from keras_feed.data.idx import DataError
from keras_feed.data.idx import one_line as _one_line

#: Folders with at most this many images are fully decoded at load time.
FOLDER_VERIFY_LIMIT = 20000
#: Largest side (pixels) for which a folder is treated like CIFAR.
SMALL_IMAGE_MAX = 64

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_TEST_DIRS = ("test", "val", "validation")


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


def load_folder(data_dir, image_size):
    """Scans and verifies a folder dataset; ``image_size`` is None or (H, W).

    Returns a dict: ``class_names``, ``channels`` (1 or 3), ``size`` (H, W),
    ``augment`` ("cifar" for small images, else "imagenet"), ``num_classes``,
    and either ``arrays`` = (x_train uint8, y_train, x_test, y_test) (small
    images of a fully decoded folder) or ``files`` = (train paths, y_train,
    test paths, y_test).
    """
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
