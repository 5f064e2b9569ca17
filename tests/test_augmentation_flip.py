"""The horizontal flip of the training augmentation happens, on both input paths.

Over batches of asymmetric images (pixel values 1..255, so that zero padding
shows), each augmented example is traced back to the unique
`(example, crop offset, mirrored or not)` it was made from. With the flip on,
some examples, and not all, come out mirrored; with it off (`flip=False`,
`augment=False`, and the datasets without a flip: `mnist`, `idx`,
`synthetic`) none does.

- `keras_feed.data.arrays` (NumPy, no TensorFlow): `augment` and `AugmentedBatches`.
- `keras_feed.data` (tf.data): `Data.train(...)`, "cifar" augmentation of
  in-memory IDX data and small-image folders (shards included), and the
  "imagenet" augmentation of large-image folders.
"""

import os

import numpy as np
import pytest
from test_data import write_idx, write_png

from keras_feed import data
from keras_feed.data import arrays

SIDE = 12
PAD = 2  # zero padding of images under 32 pixels


def asymmetric_images(count, side=SIDE, channels=1, seed=0):
    """uint8 images of values 1..255: no image is its own mirror or a shift of another."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(count, side, side, channels)).astype(np.uint8)


def provenance(output, originals, pad):
    """Every `(example, row, col, mirrored)` such that `output` is that crop of the padded example.

    `mirrored`: `output` is the crop flipped left-right.
    """
    height, width = originals.shape[1:3]
    padded = np.pad(np.asarray(originals, np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    found = []
    for row in range(2 * pad + 1):
        for col in range(2 * pad + 1):
            crops = padded[:, row:row + height, col:col + width]
            for mirrored, candidate in ((False, output), (True, output[:, ::-1])):
                for example in np.flatnonzero(np.all(crops == candidate, axis=(1, 2, 3))):
                    found.append((int(example), row, col, mirrored))
    return found


def traced(images, originals, pad, labels=None, original_labels=None):
    """The one `(example, row, col, mirrored)` of each augmented image; checks the labels follow."""
    origins = []
    for index, image in enumerate(images):
        matches = provenance(image, originals, pad)
        assert len(matches) == 1, (
            f"augmented image {index} should be one crop of one training image, mirrored or "
            f"not; found {matches}"
        )
        origins.append(matches[0])
        if labels is not None:
            assert labels[index] == original_labels[matches[0][0]]
    return origins


def mirrored_count(origins):
    return sum(mirrored for *_, mirrored in origins)


def assert_some_mirrored(origins):
    count = mirrored_count(origins)
    assert 0 < count < len(origins), (
        f"{count} of {len(origins)} augmented images are mirrored: with the flip on, "
        "some (about half) must be, and not all"
    )


def assert_none_mirrored(origins):
    assert mirrored_count(origins) == 0, f"{mirrored_count(origins)} mirrored images with the flip off"


def test_the_tracing_recognises_a_plain_flip_and_a_flipped_crop_exactly():
    originals = asymmetric_images(6)
    assert provenance(originals[3][:, ::-1], originals, 0) == [(3, 0, 0, True)]
    assert provenance(originals[3], originals, 0) == [(3, 0, 0, False)]
    shifted = np.pad(originals[4], ((PAD, PAD), (PAD, PAD), (0, 0)))[1:1 + SIDE, 3:3 + SIDE]
    assert provenance(shifted[:, ::-1], originals, PAD) == [(4, 1, 3, True)]
    assert provenance(shifted, originals, PAD) == [(4, 1, 3, False)]
    assert provenance(np.zeros_like(originals[0]), originals, PAD) == []


# -- keras_feed.data.arrays: NumPy batches -------------------------------------------------


@pytest.mark.parametrize("pad", [0, PAD])
def test_arrays_augment_flips_some_images_when_the_flip_is_on(pad):
    originals = asymmetric_images(32, channels=3)
    out = arrays.augment(originals, np.random.default_rng(7), pad=pad, flip=True)
    origins = traced(out, originals, pad)
    assert [example for example, *_ in origins] == list(range(32))  # each from its own input
    assert_some_mirrored(origins)
    if pad == 0:  # a plain flip: exactly the input, or exactly its mirror
        for image, original, (*_, mirrored) in zip(out, originals, origins):
            np.testing.assert_array_equal(image, original[:, ::-1] if mirrored else original)


@pytest.mark.parametrize("pad", [0, PAD])
def test_arrays_augment_never_flips_when_the_flip_is_off(pad):
    originals = asymmetric_images(32, channels=3)
    out = arrays.augment(originals, np.random.default_rng(7), pad=pad, flip=False)
    assert_none_mirrored(traced(out, originals, pad))


def test_augmented_batches_flip_some_images_only_when_the_flip_is_on():
    images = asymmetric_images(40, channels=1, seed=1)
    labels = np.arange(40) % 4
    on = arrays.AugmentedBatches(images, labels, 8, pad=PAD, flip=True, seed=3)
    origins = []
    for index in range(len(on)):
        batch_images, batch_labels = on[index]
        origins += traced(batch_images, images, PAD, batch_labels, labels)
    assert_some_mirrored(origins)
    on.on_epoch_end()  # and in a later epoch too
    assert_some_mirrored(traced(on[0][0], images, PAD) + traced(on[1][0], images, PAD))

    off = arrays.AugmentedBatches(images, labels, 8, pad=PAD, flip=False, seed=3)
    origins = [o for index in range(len(off)) for o in traced(off[index][0], images, PAD)]
    assert_none_mirrored(origins)
    assert len({(row, col) for _, row, col, _ in origins}) > 5  # the crop still happens

    plain = arrays.AugmentedBatches(images, labels, 8, pad=PAD, flip=True, augment=False, seed=3)
    for index in range(len(plain)):
        assert {(row, col, mirrored) for _, row, col, mirrored in traced(plain[index][0], images, PAD)} == {
            (PAD, PAD, False)
        }


# -- keras_feed.data: tf.data pipelines -----------------------------------------------


def write_idx_dir(root, images, labels):
    """The four IDX files of a dataset whose test split repeats its first images."""
    os.makedirs(root, exist_ok=True)
    write_idx(os.path.join(root, "train-images-idx3-ubyte"), images[..., 0])
    write_idx(os.path.join(root, "train-labels-idx1-ubyte"), labels.astype(np.uint8))
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), images[:8, ..., 0])
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), labels[:8].astype(np.uint8))
    return str(root)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    images = asymmetric_images(40, seed=2)
    labels = np.arange(40) % 10
    return write_idx_dir(tmp_path_factory.mktemp("idx"), images, labels), images, labels


def training_images(dataset):
    """The training split, unaugmented, in index order: the images augmentation starts from."""
    pairs = [(x.numpy(), y.numpy()) for x, y in dataset.train_eval(64)]
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


def traced_batches(pipeline, count, originals, original_labels, pad):
    origins = []
    for images, labels in pipeline.take(count):
        origins += traced(images.numpy(), originals, pad, labels.numpy(), original_labels)
    return origins


def test_data_train_flips_fashion_mnist_and_its_shards(idx_dir):
    root, images, labels = idx_dir
    dataset = data.load("fashion_mnist", data_dir=root, seed=5)
    assert dataset.flip and "horizontal flip" in data.describe_augmentation(dataset.info)
    originals, original_labels = training_images(dataset)
    np.testing.assert_array_equal(originals, images.astype(np.float32))
    np.testing.assert_array_equal(original_labels, labels)
    origins = traced_batches(dataset.train(8), 5, originals, original_labels, PAD)
    assert_some_mirrored(origins)
    assert len({(row, col) for _, row, col, _ in origins}) > 5
    for index in range(2):  # each worker's share of the global batches is flipped too
        shard = traced_batches(dataset.train(8, shard=(2, index)), 5, originals, original_labels, PAD)
        assert_some_mirrored(shard)
    # Without augmentation: the images as they are.
    plain = traced_batches(dataset.train(8, augment=False), 5, originals, original_labels, PAD)
    assert {(row, col, mirrored) for _, row, col, mirrored in plain} == {(PAD, PAD, False)}


@pytest.mark.parametrize("name", ["mnist", "idx"])
def test_data_train_never_flips_digits_or_unknown_idx_data(idx_dir, name):
    root, _, _ = idx_dir
    dataset = data.load(name, data_dir=root, seed=5)
    assert not dataset.flip and "flip" not in data.describe_augmentation(dataset.info)
    originals, original_labels = training_images(dataset)
    origins = traced_batches(dataset.train(8), 5, originals, original_labels, PAD)
    assert_none_mirrored(origins)
    assert len({(row, col) for _, row, col, _ in origins}) > 5  # the crop still happens


def test_data_train_never_flips_synthetic_data():
    dataset = data.load("synthetic", train_examples=48, image_size=SIDE, seed=1)
    assert not dataset.flip
    originals, original_labels = training_images(dataset)
    assert_none_mirrored(traced_batches(dataset.train(16), 3, originals, original_labels, PAD))


@pytest.mark.parametrize("side, pad", [(10, 2), (32, 4)])
def test_data_train_flips_small_image_folders(tmp_path, side, pad):
    rng = np.random.default_rng(side)
    for class_name in ("ant", "bee", "cow"):
        for split, count in (("train", 6), ("test", 1)):
            for index in range(count):
                image = rng.integers(1, 256, size=(side, side, 3)).astype(np.uint8)
                write_png(str(tmp_path / split / class_name / f"{index}.png"), image)
    dataset = data.load("folder", data_dir=str(tmp_path), seed=2)
    assert dataset.info.augment == "cifar" and dataset.flip
    originals, original_labels = training_images(dataset)
    assert_some_mirrored(traced_batches(dataset.train(6), 4, originals, original_labels, pad))


def test_data_train_flips_large_image_folders(tmp_path):
    """"imagenet" augmentation: a left-to-right ramp stays increasing unless mirrored."""
    ramp = np.tile(np.arange(80, dtype=np.float64)[None, :, None] * 3.0, (80, 1, 3))
    for class_name in ("ant", "bee"):
        for split, count in (("train", 4), ("test", 1)):
            for index in range(count):
                image = np.clip(ramp + 4 * index, 0, 255).astype(np.uint8)
                write_png(str(tmp_path / split / class_name / f"{index}.png"), image)
    dataset = data.load("folder", data_dir=str(tmp_path), image_size=72, seed=3)
    assert dataset.info.augment == "imagenet" and dataset.flip

    def directions(pipeline, count):
        found = []
        for images, _ in pipeline.take(count):
            for image in images.numpy():
                columns = image.mean(axis=(0, 2))
                steps = np.diff(columns)
                assert columns[-1] != columns[0], "a crop of a ramp must not be flat"
                assert np.all(steps >= -1e-3) or np.all(steps <= 1e-3), "a crop of a ramp stays monotone"
                found.append(bool(columns[-1] < columns[0]))  # mirrored: decreasing
        return found

    mirrored = directions(dataset.train(4), 6)
    assert 0 < sum(mirrored) < len(mirrored), f"{sum(mirrored)} of {len(mirrored)} mirrored"
    assert not any(directions(dataset.train(4, augment=False), 2))
