"""The validation split held out of the training split: load(..., validation_examples=N)."""


import numpy as np
import pytest
from test_data import make_folder, make_idx_dir, write_tfds_cifar10_download

from keras_feed import data
from keras_feed.data import DataError
from keras_feed.data import folder as folder_source

N_TRAIN, N_TEST, SIDE = 40, 17, 12


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("idx"), n_train=N_TRAIN, n_test=N_TEST, side=SIDE)


def all_of(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def rows(images):
    return {image.tobytes() for image in np.asarray(images, np.float32)}


def one_line(err):
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def test_held_out_examples_are_disjoint_from_training(idx_dir):
    root, (x_tr, y_tr, _, _) = idx_dir
    d = data.load("idx", data_dir=root, seed=3, validation_examples=10)
    assert d.info.num_validation == d.num_validation == 10
    assert d.info.num_train == N_TRAIN - 10 and d.info.num_test == N_TEST
    assert set(d.train_indices.tolist()).isdisjoint(d.validation_indices.tolist())
    assert sorted(d.train_indices.tolist() + d.validation_indices.tolist()) == list(range(N_TRAIN))
    assert list(d.validation_indices) == sorted(d.validation_indices)
    # The last 10 of the subset permutation of the full training split.
    expected = np.sort(np.random.RandomState(3).permutation(N_TRAIN)[-10:])
    np.testing.assert_array_equal(d.validation_indices, expected)
    # validation() is like test(): index order, raw pixels, the partial batch kept.
    assert [int(y.shape[0]) for _, y in d.validation(4)] == [4, 4, 2]
    x_val, y_val = all_of(d.validation(4))
    np.testing.assert_array_equal(y_val, y_tr[d.validation_indices])
    np.testing.assert_array_equal(x_val, x_tr[d.validation_indices, ..., None].astype(np.float32))
    # The training pipelines see the training examples only.
    x_fit, y_fit = all_of(d.train_eval(8))
    np.testing.assert_array_equal(y_fit, y_tr[d.train_indices])
    epoch = np.concatenate([x.numpy() for x, _ in d.train(6, augment=False).take(5)])
    assert rows(epoch) == rows(x_fit) and rows(epoch).isdisjoint(rows(x_val))


def test_the_split_is_deterministic_and_follows_subset_seed(idx_dir):
    root = idx_dir[0]
    a = data.load("idx", data_dir=root, seed=5, validation_examples=8)
    b = data.load("idx", data_dir=root, seed=5, validation_examples=8)
    c = data.load("idx", data_dir=root, seed=6, validation_examples=8)
    d = data.load("idx", data_dir=root, seed=6, subset_seed=5, validation_examples=8)
    np.testing.assert_array_equal(a.validation_indices, b.validation_indices)
    np.testing.assert_array_equal(a.validation_indices, d.validation_indices)
    np.testing.assert_array_equal(a.train_indices, d.train_indices)
    assert not np.array_equal(a.validation_indices, c.validation_indices)
    for xa, xb in zip(all_of(a.validation(3)), all_of(b.validation(3))):
        np.testing.assert_array_equal(xa, xb)


def test_validation_does_not_depend_on_train_examples(idx_dir):
    root = idx_dir[0]
    full = data.load("idx", data_dir=root, seed=2, validation_examples=7)
    for n in (1, 10, N_TRAIN - 7):
        sub = data.load("idx", data_dir=root, seed=2, train_examples=n, validation_examples=7)
        np.testing.assert_array_equal(sub.validation_indices, full.validation_indices)
        assert sub.info.num_train == n and sub.info.num_validation == 7
        assert set(sub.train_indices.tolist()) <= set(full.train_indices.tolist())
        # The training subset is the one drawn without a validation split.
        plain = data.load("idx", data_dir=root, seed=2, train_examples=n)
        np.testing.assert_array_equal(sub.train_indices, plain.train_indices)
        assert sub.info.mean == full.info.mean and sub.info.std == full.info.std


def test_statistics_come_from_the_training_examples_only(idx_dir):
    root, (x_tr, _, _, _) = idx_dir
    d = data.load("idx", data_dir=root, seed=1, validation_examples=15)
    kept = np.setdiff1d(np.arange(N_TRAIN), d.validation_indices)
    pixels = x_tr[kept].astype(np.float64) / 255.0
    assert d.info.mean[0] == pytest.approx(pixels.mean(), rel=1e-9)
    assert d.info.std[0] == pytest.approx(pixels.std(), rel=1e-6)
    everything = data.load("idx", data_dir=root, seed=1)
    assert d.info.mean != everything.info.mean
    assert everything.info.mean[0] == pytest.approx(x_tr.mean() / 255.0, rel=1e-9)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(validation_examples=N_TRAIN), f"smaller than the {N_TRAIN} training examples"),
    (dict(validation_examples=N_TRAIN + 5), "smaller than"),
    (dict(validation_examples=10, train_examples=N_TRAIN - 9), "exceed the"),
    (dict(validation_examples=-1), "non-negative integer"),
    (dict(validation_examples=2.5), "non-negative integer"),
    (dict(validation_examples=True), "non-negative integer"),
])
def test_refusals_name_the_flag(idx_dir, kwargs, needle):
    with pytest.raises(ValueError) as err:
        data.load("idx", data_dir=idx_dir[0], **kwargs)
    assert isinstance(err.value, DataError)
    message = one_line(err)
    assert "--validation_examples" in message and needle in message, message
    with pytest.raises(DataError) as err:
        data.describe("idx", data_dir=idx_dir[0], **kwargs)
    assert one_line(err) == message


def test_none_and_zero_mean_no_validation_split(idx_dir):
    for value in (None, 0):
        d = data.load("idx", data_dir=idx_dir[0], validation_examples=value)
        assert d.info.num_validation == 0 and len(d.validation_indices) == 0
        assert d.info.num_train == N_TRAIN
    with pytest.raises(DataError) as err:
        d.validation(4)
    assert "--validation_examples" in one_line(err)


def test_streamed_imagenet_refuses_a_validation_split():
    # Refused before TFDS is asked for anything.
    with pytest.raises(DataError) as err:
        data.load("imagenet2012", validation_examples=100)
    message = one_line(err)
    assert "--validation_examples" in message and "imagenet2012" in message
    with pytest.raises(DataError) as err:
        data.describe("imagenet2012", validation_examples=100)
    assert one_line(err) == message


def test_describe_counts_the_held_out_examples():
    info = data.describe("cifar10", validation_examples=5000)
    assert info.num_train == 45000 and info.num_validation == 5000 and info.num_test == 10000
    info = data.describe("cifar10", train_examples=1000, validation_examples=5000)
    assert info.num_train == 1000 and info.num_validation == 5000
    assert data.describe("cifar10").num_validation == 0
    with pytest.raises(DataError) as err:
        data.describe("cifar10", train_examples=46000, validation_examples=5000)
    assert "--validation_examples" in one_line(err)
    info = data.describe("synthetic", validation_examples=64)
    assert info.num_train == 512 and info.num_validation == 64


@pytest.mark.parametrize("limit", [10**6, 4])  # decoded into memory, or streamed from files
def test_folder_validation_split(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(folder_source, "FOLDER_VERIFY_LIMIT", limit)
    root = make_folder(tmp_path, size=(12, 12), per_class=6)
    plain = data.load("folder", data_dir=root, seed=4)
    d = data.load("folder", data_dir=root, seed=4, validation_examples=5)
    assert d._kind == ("array" if limit > 100 else "files")  # pylint: disable=protected-access
    assert d.info.num_train == 13 and d.info.num_validation == 5 and d.info.num_test == 6
    assert d.info.mean == plain.info.mean  # folders use ImageNet's constants
    assert set(d.train_indices.tolist()).isdisjoint(d.validation_indices.tolist())
    x_all, y_all = all_of(plain.train_eval(18))
    x_val, y_val = all_of(d.validation(2))
    np.testing.assert_array_equal(x_val, x_all[d.validation_indices])
    np.testing.assert_array_equal(y_val, y_all[d.validation_indices])
    x_fit, _ = all_of(d.train_eval(18))
    np.testing.assert_array_equal(x_fit, x_all[d.train_indices])
    assert next(iter(d.train(4)))[0].shape == (4, 12, 12, 3)


def test_synthetic_validation_is_its_own_draw():
    plain = data.load("synthetic", seed=1)
    d = data.load("synthetic", seed=1, validation_examples=64)
    assert d.info.num_train == 512 and d.info.num_validation == 64
    np.testing.assert_array_equal(d.validation_indices, np.arange(64))
    x_val, y_val = all_of(d.validation(50))
    assert x_val.shape == (64, 16, 16, 3) and sorted(set(y_val.tolist())) == list(range(10))
    # The training and test examples (and statistics) are those without validation.
    for a, b in ((d.train_eval(128), plain.train_eval(128)), (d.test(128), plain.test(128))):
        for xa, xb in zip(all_of(a), all_of(b)):
            np.testing.assert_array_equal(xa, xb)
    assert d.info.mean == plain.info.mean
    assert rows(x_val).isdisjoint(rows(all_of(d.train_eval(128))[0]))
    small = data.load("synthetic", seed=1, train_examples=100, validation_examples=64)
    np.testing.assert_array_equal(all_of(small.validation(64))[0], x_val)


def test_tfds_in_memory_validation_split(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    write_tfds_cifar10_download(str(tmp_path))
    full = data.load("cifar10", data_dir=str(tmp_path))
    d = data.load("cifar10", data_dir=str(tmp_path), validation_examples=6)
    assert d.info.num_train == 14 and d.info.num_validation == 6
    assert d.info.mean == data.CIFAR10_MEAN
    x_all, y_all = all_of(full.train_eval(20))
    x_val, y_val = all_of(d.validation(4))
    np.testing.assert_array_equal(x_val, x_all[d.validation_indices])
    np.testing.assert_array_equal(y_val, y_all[d.validation_indices])
    assert rows(x_val).isdisjoint(rows(all_of(d.train_eval(20))[0]))
    with pytest.raises(DataError) as err:
        data.load("cifar10", data_dir=str(tmp_path), train_examples=15, validation_examples=6)
    assert "--validation_examples" in one_line(err)
