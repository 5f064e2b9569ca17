"""Tests for keras_feed.data (tiny data written into tmp_path)."""

import gzip
import io
import json
import os
import struct
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from keras_feed import data
from keras_feed.data import DataError
from keras_feed.data import folder as folder_source

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

N_TRAIN, N_TEST, SIDE, CLASSES = 40, 17, 12, 4


# ----------------------------------------------------------------- helpers


def write_idx(path, arr, magic_type=None):
    """Writes ``arr`` as an IDX file; gzip-compressed if path ends in .gz."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}
    arr = np.asarray(arr)
    code = codes[arr.dtype.type] if magic_type is None else magic_type
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return str(path)


def make_idx_dir(root, *, n_train=N_TRAIN, n_test=N_TEST, side=SIDE, classes=CLASSES,
                 train_labels=None, seed=0):
    """Train files gzip-compressed, test files raw.  Returns the arrays too."""
    os.makedirs(root, exist_ok=True)
    rs = np.random.RandomState(seed)
    x_tr = rs.randint(0, 256, (n_train, side, side)).astype(np.uint8)
    x_te = rs.randint(0, 256, (n_test, side, side)).astype(np.uint8)
    y_tr = (np.arange(n_train) % classes).astype(np.uint8) if train_labels is None else train_labels
    y_te = (np.arange(n_test) % classes).astype(np.uint8)
    write_idx(os.path.join(root, "train-images-idx3-ubyte.gz"), x_tr)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), y_tr)
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), x_te)
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), y_te)
    return str(root), (x_tr, np.asarray(y_tr), x_te, y_te)


def write_png(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(image))


def make_folder(root, *, size=(10, 10), per_class=5, classes=("cat", "dog", "emu"),
                test_name="val", seed=0):
    rs = np.random.RandomState(seed)
    for split, n in (("train", per_class), (test_name, 2)):
        for c in classes:
            for i in range(n):
                h, w = size if not callable(size) else size(rs)
                img = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
                write_png(os.path.join(root, split, c, f"{i}.png"), img)
    return str(root)


def batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def assert_one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def idx_data(idx_dir):
    return data.load("idx", data_dir=idx_dir[0], seed=3)


# ----------------------------------------------------------------- IDX reader


def test_dataset_names():
    assert data.dataset_names() == ["cifar10", "cifar100", "fashion_mnist", "folder",
                                    "idx", "imagenet2012", "mnist", "synthetic"]


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_roundtrip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.abs(arr).astype(np.uint8)
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", arr)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


# ----------------------------------------------------------------- loading


def test_idx_info_shapes_dtypes(idx_data, idx_dir):
    info = idx_data.info
    assert info == data.DatasetInfo(
        name="idx", num_classes=CLASSES, image_shape=(SIDE, SIDE, 1), num_train=N_TRAIN,
        num_test=N_TEST, mean=info.mean, std=info.std, augment="cifar")
    assert len(info.mean) == len(info.std) == 1
    assert idx_data.flip is False
    np.testing.assert_array_equal(idx_data.train_indices, np.arange(N_TRAIN))
    x, y = next(iter(idx_data.train(8)))
    assert x.shape == (8, SIDE, SIDE, 1) and x.dtype == tf.float32
    assert y.shape == (8,) and y.dtype == tf.int32
    assert idx_data.train(8).cardinality() == tf.data.INFINITE_CARDINALITY
    x, y = next(iter(idx_data.test(5)))
    assert x.shape == (5, SIDE, SIDE, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
    # test() is in file order and unaugmented.
    _, (_, _, x_te, y_te) = idx_dir
    np.testing.assert_array_equal(y.numpy(), y_te[:5])
    # Raw pixels, exactly as stored: the models normalise their own inputs.
    np.testing.assert_array_equal(x.numpy(), x_te[:5, ..., None].astype(np.float32))


def test_normalisation_on_train_set(idx_data, idx_dir):
    # The pipeline gives the raw training pixels; the normalisation layer that
    # models built for the data carry (info.mean / info.std) makes them zero
    # mean, unit variance over the training split.
    from keras_feed.models import preprocessing

    _, (x_tr, _, _, _) = idx_dir
    xs = np.concatenate([x.numpy() for x, _ in idx_data.train_eval(16)])
    assert xs.shape == (N_TRAIN, SIDE, SIDE, 1) and xs.dtype == np.float32
    np.testing.assert_array_equal(xs, x_tr[..., None].astype(np.float32))
    normalised = np.asarray(preprocessing.normalization(idx_data.info.mean, idx_data.info.std)(xs))
    assert abs(normalised.mean()) < 1e-4
    assert abs(normalised.std() - 1.0) < 1e-4
    assert idx_data.info.mean[0] == pytest.approx(x_tr.mean() / 255.0, rel=1e-9)
    assert idx_data.info.std[0] == pytest.approx(x_tr.std() / 255.0, rel=1e-6)


def test_mnist_from_idx_dir(tmp_path):
    root, (_, y_tr, _, _) = make_idx_dir(tmp_path, classes=10)
    d = data.load("mnist", data_dir=root)
    assert d.info.name == "mnist" and d.info.num_classes == 10 and d.flip is False
    f = data.load("Fashion-MNIST", data_dir=root)
    assert f.info.name == "fashion_mnist" and f.flip is True
    ys = np.concatenate([y.numpy() for _, y in d.train_eval(64)])
    np.testing.assert_array_equal(ys, y_tr)


def test_steps_per_epoch_and_partial_test_batch(idx_data):
    assert idx_data.steps_per_epoch(8) == 5
    assert idx_data.steps_per_epoch(16) == 2
    assert idx_data.steps_per_epoch(N_TRAIN) == 1
    with pytest.raises(DataError) as err:
        idx_data.steps_per_epoch(N_TRAIN + 1)
    assert_one_line(err)
    with pytest.raises(DataError):
        idx_data.train(N_TRAIN + 1)
    sizes = [int(y.shape[0]) for _, y in idx_data.test(16)]
    assert sizes == [16, 1]
    sizes = [int(y.shape[0]) for _, y in idx_data.train_eval(16)]
    assert sizes == [16, 16, 8]


# ----------------------------------------------------------------- determinism


def test_train_is_deterministic(idx_dir, idx_data):
    bs, steps = 8, idx_data.steps_per_epoch(8)
    run = batches(idx_data.train(bs), 2 * steps + 1)
    again = batches(idx_data.train(bs), 2 * steps + 1)
    other_object = batches(data.load("idx", data_dir=idx_dir[0], seed=3).train(bs), 2 * steps)
    for (xa, ya), (xb, yb) in zip(run, again):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(run, other_object):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # Every epoch is a permutation of the training set (drop_remainder).
    epoch0 = np.concatenate([y for _, y in run[:steps]])
    epoch1 = np.concatenate([y for _, y in run[steps:2 * steps]])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist())
    assert not np.array_equal(run[0][0], run[steps][0])  # epochs differ
    # Resume: start_epoch=1 reproduces epoch 1; skip_batches drops batches.
    resumed = batches(idx_data.train(bs, start_epoch=1), steps)
    for (xa, ya), (xb, yb) in zip(run[steps:2 * steps], resumed):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    skipped = batches(idx_data.train(bs, start_epoch=0, skip_batches=3), steps)
    for (xa, ya), (xb, yb) in zip(run[3:3 + steps], skipped):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    rolled = batches(idx_data.train(bs, skip_batches=steps + 2), 1)
    assert np.array_equal(rolled[0][0], run[steps + 2][0])
    # A different seed gives a different order.
    (x4, y4), = batches(data.load("idx", data_dir=idx_dir[0], seed=4).train(bs), 1)
    assert not (np.array_equal(x4, run[0][0]) and np.array_equal(y4, run[0][1]))


def _matches_shift(aug, orig, pad, pad_value, allow_flip):
    h, w = orig.shape[:2]
    padded = np.pad(orig, [(pad, pad), (pad, pad), (0, 0)], constant_values=0)
    padded[:pad] = padded[-pad:] = pad_value
    padded[:, :pad] = padded[:, -pad:] = pad_value
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[oy:oy + h, ox:ox + w]
            if np.allclose(crop, aug, atol=1e-5):
                return True
            if allow_flip and np.allclose(crop[:, ::-1], aug, atol=1e-5):
                return True
    return False


@pytest.mark.parametrize("kind", ["idx", "folder"])
def test_cifar_augmentation_is_pad_crop_flip(kind, idx_data, tmp_path):
    d = idx_data if kind == "idx" else data.load("folder", data_dir=make_folder(tmp_path))
    plain = batches(d.train(8, augment=False), 2)
    aug = batches(d.train(8), 2)
    pad_value = 0.0  # zero padding of the raw pixels
    shifted = 0
    for (xp, yp), (xa, ya) in zip(plain, aug):
        np.testing.assert_array_equal(yp, ya)  # same order with or without augmentation
        for i in range(len(ya)):
            assert _matches_shift(xa[i], xp[i], 2, pad_value, d.flip)
            shifted += not np.array_equal(xa[i], xp[i])
    assert shifted > 0


def test_image_size_resizes_arrays(idx_dir):
    d = data.load("idx", data_dir=idx_dir[0], image_size=(16, 20))
    assert d.info.image_shape == (16, 20, 1)
    x, _ = next(iter(d.train(8)))
    assert x.shape == (8, 16, 20, 1)
    x, _ = next(iter(d.test(8)))
    assert x.shape == (8, 16, 20, 1)


def test_train_examples_subset(idx_dir):
    root, (x_tr, y_tr, _, _) = idx_dir
    a = data.load("idx", data_dir=root, train_examples=10, seed=5)
    b = data.load("idx", data_dir=root, train_examples=10, seed=5)
    c = data.load("idx", data_dir=root, train_examples=10, seed=6)
    d = data.load("idx", data_dir=root, train_examples=10, seed=6, subset_seed=5)
    assert a.info.num_train == 10 and a.info.num_test == N_TEST
    assert len(a.train_indices) == 10 and len(set(a.train_indices.tolist())) == 10
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.train_indices, d.train_indices)
    assert not np.array_equal(a.train_indices, c.train_indices)
    expected = np.sort(np.random.RandomState(5).permutation(N_TRAIN)[:10])
    np.testing.assert_array_equal(a.train_indices, expected)
    ys = np.concatenate([y.numpy() for _, y in a.train_eval(4)])
    np.testing.assert_array_equal(ys, y_tr[a.train_indices])
    # Normalisation comes from the full training split, not the subset.
    full = data.load("idx", data_dir=root)
    assert a.info.mean == full.info.mean and a.info.std == full.info.std
    assert a.steps_per_epoch(4) == 2
    epoch = np.concatenate([y.numpy() for _, y in a.train(5).take(2)])
    assert sorted(epoch.tolist()) == sorted(y_tr[a.train_indices].tolist())


# ----------------------------------------------------------------- errors


def _corrupt_magic(root):
    path = os.path.join(root, "t10k-images-idx3-ubyte")
    raw = bytearray(open(path, "rb").read())
    raw[0:4] = b"\x12\x34\x08\x03"
    open(path, "wb").write(bytes(raw))


def _truncate_raw(root):
    path = os.path.join(root, "t10k-images-idx3-ubyte")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-7])


def _truncate_gz_payload(root):
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])


def _truncate_gz_stream(root):
    path = os.path.join(root, "train-labels-idx1-ubyte.gz")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def _remove_file(root):
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte"))


def _count_mismatch(root):
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), np.zeros(N_TEST - 1, np.uint8))


def _negative_label(root):
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"),
              np.full(N_TEST, -1, np.int8))


@pytest.mark.parametrize("corrupt, needle", [
    (_corrupt_magic, "magic"),
    (_truncate_raw, "truncated"),
    (_truncate_gz_payload, "truncated"),
    (_truncate_gz_stream, "train-labels-idx1-ubyte.gz"),
    (_remove_file, "t10k-labels-idx1-ubyte"),
    (_count_mismatch, "mismatch"),
    (_negative_label, "out of range"),
])
def test_bad_idx_files(tmp_path, corrupt, needle):
    root, _ = make_idx_dir(tmp_path)
    corrupt(root)
    with pytest.raises(DataError) as err:
        data.load("idx", data_dir=root)
    assert_one_line(err)
    assert needle in str(err.value)


def test_mnist_labels_out_of_range(tmp_path):
    labels = (np.arange(N_TRAIN) % 11).astype(np.uint8)  # contains 10
    root, _ = make_idx_dir(tmp_path, train_labels=labels)
    assert data.load("idx", data_dir=root).info.num_classes == 11
    with pytest.raises(DataError) as err:
        data.load("mnist", data_dir=root)
    assert_one_line(err)
    assert "out of range" in str(err.value) and "0..9" in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="imagenet"), "unknown dataset"),
    (dict(name="idx"), "needs data_dir"),
    (dict(name="idx", data_dir="/nonexistent/keras-feed"), "does not exist"),
    (dict(name="folder", data_dir="/nonexistent/keras-feed"), "does not exist"),
    (dict(name="idx", data_dir=True, train_examples=N_TRAIN + 1), "exceeds"),
    (dict(name="idx", data_dir=True, train_examples=0), "train_examples"),
    (dict(name="idx", data_dir=True, seed=-1), "seed"),
    (dict(name="idx", data_dir=True, image_size="big"), "image_size"),
])
def test_bad_arguments(idx_dir, kwargs, needle):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    if kwargs.get("data_dir") is True:
        kwargs["data_dir"] = idx_dir[0]
    with pytest.raises(DataError) as err:
        data.load(name, **kwargs)
    assert_one_line(err)
    assert needle in str(err.value)


def test_missing_idx_in_empty_dir(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("idx", data_dir=str(tmp_path))
    assert_one_line(err)
    assert "missing IDX file" in str(err.value) and str(tmp_path) in str(err.value)


# ----------------------------------------------------------------- folders


def test_folder_small_images(tmp_path):
    root = make_folder(tmp_path)
    os.makedirs(os.path.join(root, "train", "cat", ".ignored"))
    open(os.path.join(root, "train", "cat", "notes.txt"), "w").write("x")
    d = data.load("folder", data_dir=root)
    assert d.class_names == ["cat", "dog", "emu"]
    assert d.info.num_classes == 3 and d.info.image_shape == (10, 10, 3)
    assert d.info.num_train == 15 and d.info.num_test == 6
    assert d.info.augment == "cifar" and d.info.mean == data.IMAGENET_MEAN and d.flip
    x, y = next(iter(d.train(4)))
    assert x.shape == (4, 10, 10, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    ys = np.concatenate([y.numpy() for _, y in d.test(4)])
    np.testing.assert_array_equal(ys, [0, 0, 1, 1, 2, 2])
    # image_size resizes.
    r = data.load("folder", data_dir=root, image_size=16)
    assert r.info.image_shape == (16, 16, 3)
    assert next(iter(r.test(2)))[0].shape == (2, 16, 16, 3)


def test_folder_large_images_use_imagenet_pipeline(tmp_path):
    root = make_folder(tmp_path, size=lambda rs: (rs.randint(70, 90), rs.randint(70, 90)),
                       per_class=2, classes=("a", "b"), test_name="test")
    d = data.load("folder", data_dir=root, image_size=72)
    assert d.info.augment == "imagenet" and d.info.image_shape == (72, 72, 3)
    first = batches(d.train(2), 3)
    again = batches(d.train(2), 3)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert xa.shape == (2, 72, 72, 3)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    resumed = batches(d.train(2, start_epoch=1), 1)
    assert np.array_equal(resumed[0][0], first[2][0])
    x, _ = next(iter(d.test(3)))
    assert x.shape == (3, 72, 72, 3)


def test_large_folder_streams_from_files(tmp_path, monkeypatch):
    # Pretend the folder is large: only magic bytes are checked at load time.
    monkeypatch.setattr(folder_source, "FOLDER_VERIFY_LIMIT", 4)
    root = make_folder(tmp_path / "ok", size=(12, 12), classes=("cat", "dög", "emu"))
    d = data.load("folder", data_dir=root)
    assert d.info.augment == "cifar" and d.info.image_shape == (12, 12, 3)
    small = data.load("folder", data_dir=root, image_size=12)
    monkeypatch.setattr(folder_source, "FOLDER_VERIFY_LIMIT", 10**6)
    in_memory = data.load("folder", data_dir=root)
    for (xa, ya), (xb, yb) in zip(batches(d.train(4), 4), batches(in_memory.train(4), 4)):
        np.testing.assert_allclose(xa, xb, atol=1e-5)
        np.testing.assert_array_equal(ya, yb)
    assert next(iter(small.test(6)))[0].shape == (6, 12, 12, 3)

    monkeypatch.setattr(folder_source, "FOLDER_VERIFY_LIMIT", 4)
    root = make_folder(tmp_path / "bad", size=(12, 12))
    open(os.path.join(root, "val", "cat", "fake.jpg"), "wb").write(b"GIF89a not a jpeg")
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)
    assert "fake.jpg" in str(err.value)


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path / "empty_class")
    os.makedirs(os.path.join(root, "train", "zebra"))
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)
    assert "zebra" in str(err.value) and "no" in str(err.value)

    root = make_folder(tmp_path / "bad_image")
    bad = os.path.join(root, "train", "dog", "broken.png")
    open(bad, "wb").write(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)
    assert "broken.png" in str(err.value)

    root = make_folder(tmp_path / "no_test")
    os.rename(os.path.join(root, "val"), os.path.join(root, "holdout"))
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)

    root = make_folder(tmp_path / "unknown_test_class")
    os.rename(os.path.join(root, "val", "emu"), os.path.join(root, "val", "owl"))
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)
    assert "owl" in str(err.value)


def test_folder_of_mixed_small_sizes_is_refused(tmp_path, monkeypatch):
    # 28x28 and 32x32 PNGs were once resized to 224x224 with ImageNet augmentation.
    root = make_folder(tmp_path, size=(28, 28), classes=("cat", "dog"))
    for i in range(3):
        write_png(os.path.join(root, "train", "dog", f"big_{i}.png"),
                  np.zeros((32, 32, 3), np.uint8))
    for limit in (10**6, 4):  # decoded in full, or sampled from a large folder
        monkeypatch.setattr(folder_source, "FOLDER_VERIFY_LIMIT", limit)
        with pytest.raises(DataError) as err:
            data.load("folder", data_dir=root)
        assert_one_line(err)
        message = str(err.value)
        assert "28x28" in message and "32x32" in message and "--image_size" in message
        assert os.path.join("train", "cat", "0.png") in message
        assert os.path.join("train", "dog", "big_0.png") in message
    resized = data.load("folder", data_dir=root, image_size=28)
    assert resized.info.image_shape == (28, 28, 3) and resized.info.augment == "cifar"
    assert resized.info.num_train == 13
    assert next(iter(resized.train(4)))[0].shape == (4, 28, 28, 3)


def test_corrupt_png_names_the_decoders_reason(tmp_path):
    root = make_folder(tmp_path)
    bad = os.path.join(root, "train", "dog", "broken.png")
    open(bad, "wb").write(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError) as err:
        data.load("folder", data_dir=root)
    assert_one_line(err)
    message = str(err.value)
    assert message.startswith(f"cannot decode image {bad}: ")
    assert "Invalid PNG" in message and message.endswith("."), message
    assert "Graph execution" not in message and "node" not in message, message


# ----------------------------------------------------------------- synthetic


def test_synthetic_is_learnable_and_seeded():
    d = data.load("synthetic", seed=1)
    assert d.info.num_classes == 10 and d.info.image_shape == (16, 16, 3)
    assert d.info.num_train == 512 and d.info.num_test == 256
    x, y = next(iter(d.train(32)))
    assert x.shape == (32, 16, 16, 3)
    xtr, ytr = map(np.concatenate, zip(*[(a.numpy(), b.numpy()) for a, b in d.train_eval(128)]))
    xte, yte = map(np.concatenate, zip(*[(a.numpy(), b.numpy()) for a, b in d.test(128)]))
    means = np.stack([xtr[ytr == k].reshape(-1, 768).mean(0) for k in range(10)])
    dist = ((xte.reshape(-1, 1, 768) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == yte).mean() > 0.9
    small = data.load("synthetic", train_examples=100, image_size=8)
    assert small.info.num_train == 100 and small.info.image_shape == (8, 8, 3)


# ----------------------------------------------------------------- real data / TFDS


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Fashion-MNIST IDX files not installed")
def test_real_fashion_mnist():
    d = data.load("fashion_mnist", data_dir=FASHION_DIR)
    assert d.info.num_train == 60000 and d.info.num_test == 10000
    assert d.info.num_classes == 10 and d.info.image_shape == (28, 28, 1)
    x, y = next(iter(d.train(256)))
    assert x.shape == (256, 28, 28, 1) and int(tf.reduce_max(y)) < 10


def test_tfds_failure_is_a_data_error(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*args, **kwargs):
        raise ConnectionError("no route to host\nsecond line")

    monkeypatch.setattr(tfds, "load", fail)
    with pytest.raises(DataError) as err:
        data.load("cifar100")
    assert_one_line(err)
    assert "could not download/prepare" in str(err.value) and "cifar100" in str(err.value)


def test_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    try:
        with tfds.testing.mock_data(num_examples=20):
            c = data.load("cifar10", train_examples=12)
            xc, yc = next(iter(c.train(4)))
            im = data.load("imagenet2012", image_size=32, train_examples=10)
            xi, yi = next(iter(im.train(4)))
            xt, _ = next(iter(im.test(8)))
    except DataError as e:
        pytest.skip(f"tfds mock data unavailable offline: {e}")
    assert c.info.num_train == 12 and c.info.num_test == 20 and c.info.num_classes == 10
    assert c.info.image_shape == (32, 32, 3) and c.info.mean == data.CIFAR10_MEAN
    assert xc.shape == (4, 32, 32, 3) and yc.dtype == tf.int32
    assert im.info.num_classes == 1000 and im.info.augment == "imagenet"
    assert im.info.num_train == 10 and im.info.num_test == 20
    assert xi.shape == (4, 32, 32, 3) and xt.shape == (8, 32, 32, 3)


def write_tfds_cifar10_download(data_dir, train_per_batch=4, test=6):
    """Puts a tiny CIFAR-10 archive where TFDS caches its download of the real one.

    The archive has the layout of ``cifar-10-binary.tar.gz`` (one label byte and
    3x32x32 channel-first pixels per record); TFDS trusts a cached download under
    its registered checksum, so ``tfds.load`` builds the dataset without a network.
    Returns the train and test images (channel-last) and labels.
    """
    # pylint: disable-next=import-outside-toplevel
    from tensorflow_datasets.core.download import checksums, resource

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    url_info = checksums.get_all_url_infos().get(url)
    if url_info is None:
        pytest.skip("this TFDS version registers no checksum for the CIFAR-10 archive")
    downloads = os.path.join(data_dir, "downloads")
    os.makedirs(downloads)
    archive = os.path.join(downloads, resource.get_dl_fname(url, url_info.checksum))
    rs = np.random.RandomState(0)
    arrays = {"train": ([], []), "test": ([], [])}

    def records(split, n, first_label):
        labels = (np.arange(n) + first_label) % 10
        images = rs.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        arrays[split][0].append(images.transpose(0, 2, 3, 1))
        arrays[split][1].append(labels)
        return b"".join(bytes([int(label)]) + image.tobytes()
                        for label, image in zip(labels, images))

    files = {f"data_batch_{i}.bin": records("train", train_per_batch, i) for i in range(1, 6)}
    files["test_batch.bin"] = records("test", test, 0)
    files["batches.meta.txt"] = "\n".join(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ).encode()
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            member = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    with open(archive + ".INFO", "w", encoding="utf-8") as f:
        json.dump({"urls": [url], "original_fname": "cifar-10-binary.tar.gz"}, f)
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in arrays.items()}


def test_tfds_builds_cifar10_offline(tmp_path):
    # A fresh install once failed every TFDS download and preparation with
    # "No module named 'importlib_resources'" (imported by TFDS, undeclared).
    pytest.importorskip("tensorflow_datasets")
    expected = write_tfds_cifar10_download(str(tmp_path))
    d = data.load("cifar10", data_dir=str(tmp_path))
    assert d.info.num_train == 20 and d.info.num_test == 6 and d.info.num_classes == 10
    assert d.info.image_shape == (32, 32, 3) and d.info.mean == data.CIFAR10_MEAN
    batch, labels = next(iter(d.test(6)))
    np.testing.assert_array_equal(batch.numpy(), np.rint(batch.numpy()))  # raw pixels
    pixels = batch.numpy().astype(np.uint8)
    x_test, y_test = expected["test"]
    # TFDS may order a split differently from its source files: match images by content.
    by_bytes = {image.tobytes(): label for image, label in zip(x_test, y_test)}
    assert {image.tobytes(): int(label) for image, label in zip(pixels, labels.numpy())} == by_bytes
    x, y = next(iter(d.train(8)))
    assert x.shape == (8, 32, 32, 3) and y.dtype == tf.int32
