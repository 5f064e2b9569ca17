"""keras_feed.data.arrays: IDX folders and augmented NumPy batches, TensorFlow not needed."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import WITHOUT_TENSORFLOW_PRELUDE

from keras_feed.data import arrays, idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array):
    """An IDX file (gzip when `path` ends in .gz) holding `array` (uint8)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 12)):
        write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (count, 16, 16)))
        write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte"), rng.integers(0, 4, count))
    return tmp_path


def test_load_idx_gives_uint8_images_with_a_channel_axis(idx_folder):
    (x_train, y_train), (x_test, y_test) = arrays.load_idx(str(idx_folder))
    assert x_train.shape == (40, 16, 16, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (12, 16, 16, 1) and y_train.dtype == np.int32 and y_test.shape == (12,)
    os.remove(idx_folder / "t10k-labels-idx1-ubyte")
    with pytest.raises(idx.DataError, match=r"missing IDX file\(s\) in .*t10k-labels-idx1-ubyte"):
        arrays.load_idx(str(idx_folder))


def test_augment_crops_the_padded_image_and_flips():
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, size=(64, 8, 8, 3)).astype(np.float32)  # no zeros: padding shows
    out = arrays.augment(images, np.random.default_rng(2), pad=2, flip=True)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets, flips = set(), set()
    for image, result in zip(padded, out):
        matches = [
            (r, c, f)
            for r in range(5) for c in range(5) for f in (False, True)
            if np.array_equal(result, image[r:r + 8, c:c + 8][:, ::-1] if f else image[r:r + 8, c:c + 8])
        ]
        assert matches, "each output is a crop of the padded image, flipped or not"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(offsets) > 10 and flips == {False, True}
    np.testing.assert_array_equal(arrays.augment(images, np.random.default_rng(2), pad=0, flip=False), images)


def test_batches_are_reproducible_reshuffled_each_epoch_and_cover_it():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8)
    labels = np.arange(40)
    batches = arrays.AugmentedBatches(images, labels, 8, pad=0, flip=False, seed=3)
    assert len(batches) == 5
    epoch0 = np.concatenate([batches[i][1] for i in range(5)])
    assert sorted(epoch0) == list(range(40))  # every example once
    again = arrays.AugmentedBatches(images, labels, 8, pad=0, flip=False, seed=3)
    np.testing.assert_array_equal(np.concatenate([again[i][1] for i in range(5)]), epoch0)
    batches.on_epoch_end()
    epoch1 = np.concatenate([batches[i][1] for i in range(5)])
    assert sorted(epoch1) == list(range(40)) and not np.array_equal(epoch1, epoch0)
    first_images, first_labels = batches.batch(0, 0)
    np.testing.assert_array_equal(first_images[:, 0, 0, 0], first_labels)  # images follow labels
    with pytest.raises(ValueError, match="batch_size=50"):
        arrays.AugmentedBatches(images, labels, 50)


WITHOUT_TENSORFLOW = WITHOUT_TENSORFLOW_PRELUDE + """
import keras, numpy as np
import keras_feed as kf
(x_train, y_train), (x_test, y_test) = kf.data.arrays.load_idx(sys.argv[1])
shape = x_train.shape[1:]
mean, std = x_train.mean() / 255, x_train.std() / 255  # models normalise raw pixels themselves
student = kf.models.build("resnet8", input_shape=shape, num_classes=4, seed=0, mean=mean, std=std)
teacher = kf.models.build("resnet8", input_shape=shape, num_classes=4, seed=1, mean=mean, std=std)
distiller = kf.FEEDDistiller(student, [teacher], beta=10.0, weight_decay=5e-4)
distiller.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
batches = kf.data.arrays.AugmentedBatches(x_train, y_train, 8, pad=2, flip=True, seed=0)
history = distiller.fit(batches, epochs=2, verbose=0).history
assert len(history["loss"]) == 2 and np.isfinite(history["loss"][-1])
results = distiller.evaluate(x_test.astype("float32"), y_test, verbose=0, return_dict=True)
assert {"loss", "accuracy", "feed_loss_0"} <= set(results)
print("ok", keras.backend.backend())
"""


@pytest.mark.slow  # a subprocess
def test_an_idx_folder_trains_on_jax_where_tensorflow_cannot_be_imported(idx_folder):
    pytest.importorskip("jax", reason="jax is not installed (the test extra installs jax[cpu])")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, str(idx_folder)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", "jax"]
