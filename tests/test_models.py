"""Tests of the keras-feed model zoo (keras_feed.models)."""

import functools
import random

import keras
import numpy as np
import pytest

from keras_feed import models
from keras_feed.models import registry, resnet_cifar, wide_resnet

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
IMAGENET = (224, 224, 3)

# Emitted by Keras itself (NumPy 2 `__array__` protocol) when saving weights.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
    ":DeprecationWarning"
)


@functools.lru_cache(maxsize=None)
def _built(name, input_shape, num_classes):
    """Build each configuration once per test session (big nets are slow)."""
    return models.build(name, input_shape=input_shape, num_classes=num_classes)


def _trainable_params(model):
    # Published counts (PyTorch ``parameters()``) exclude BN running stats.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _default_shape(name):
    return MNIST if name.startswith("small_cnn") else CIFAR


_IMAGENET_NETS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
_CIFAR100_NETS = {"resnet56", "resnet8x4", "resnet32x4", "wrn_28_10", "resnext29_16x64d"}


def _default_config(name):
    """(input_shape, num_classes) used to build ``name`` in most tests; the
    other tests reuse these builds through the ``_built`` cache."""
    if name in _IMAGENET_NETS:
        return IMAGENET, 1000
    return _default_shape(name), 100 if name in _CIFAR100_NETS else 10


# --------------------------------------------------------------------------
# Registry


def test_names_sorted_and_complete():
    names = models.names()
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
        "resnet110", "resnet18", "resnet34", "resnet50", "small_cnn",
        "wrn_16_2", "wrn_16_4", "wrn_28_10", "wrn_40_2", "wrn_40_4",
        "resnext29_2x64d", "resnext29_4x64d", "resnext29_8x64d",
        "resnext29_16x64d",
    }
    assert expected <= set(names)
    assert models.families() == [
        "wrn_<depth>_<width>", "resnext29_<cardinality>x<width>d"
    ]


def test_unknown_name_raises_listing_known_names():
    with pytest.raises(ValueError) as info:
        models.build("resnet57", input_shape=CIFAR, num_classes=10)
    message = str(info.value)
    assert "resnet57" in message
    assert "resnet56" in message and "wrn_28_10" in message
    assert "wrn_<depth>_<width>" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name", ["wrn_27_10", "wrn_4_2", "wrn_28_0", "resnext29_0x64d", "", "ResNet56"]
)
def test_invalid_names_raise(name):
    with pytest.raises(ValueError):
        models.build(name, input_shape=CIFAR, num_classes=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_shape=(32, 32), num_classes=10),
        dict(input_shape=(32, 32, 0), num_classes=10),
        dict(input_shape=CIFAR, num_classes=0),
        dict(input_shape=CIFAR, num_classes=2.5),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        models.build("resnet8", **kwargs)


def test_numpy_ints_accepted():
    model = models.build(
        "resnet8", input_shape=np.array([16, 16, 3]), num_classes=np.int64(5)
    )
    assert model.output.shape == (None, 5)


def test_register_custom_builder(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))

    @models.register("tiny_test_net")
    def tiny(input_shape, num_classes):
        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.ReLU(name="features")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="tiny")

    assert "tiny_test_net" in models.names()
    model = models.build("tiny_test_net", input_shape=(8, 8, 1), num_classes=3)
    assert model.output.shape == (None, 3)
    # Keras default initialisers become deterministic under `seed` too.
    a = models.build("tiny_test_net", input_shape=(8, 8, 1), num_classes=3, seed=4)
    b = models.build("tiny_test_net", input_shape=(8, 8, 1), num_classes=3, seed=4)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)

    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny_test_net")(tiny)
    models.register("tiny_test_net", overwrite=True)(tiny)


# --------------------------------------------------------------------------
# Every registered model: features layer, logits shape, forward pass


@pytest.mark.parametrize("name", models.names())
def test_every_model_builds(name):
    shape, num_classes = _default_config(name)
    model = _built(name, shape, num_classes)
    assert isinstance(model, keras.Model)
    assert model.name == name
    assert model.input.shape == (None,) + shape
    assert model.output.shape == (None, num_classes)
    features = model.get_layer("features")
    assert isinstance(features, (keras.layers.ReLU, keras.layers.Activation))
    assert len(features.output.shape) == 4
    assert features.output.shape[0] is None
    # "features" feeds the global pooling directly.
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("avg_pool").input is features.output
    assert not any(isinstance(l, keras.layers.Lambda) for l in model.layers)


@pytest.mark.parametrize(
    "name",
    ["resnet8", "resnet8x4", "wrn_10_2", "resnext29_2x4d", "resnet18",
     "resnet50", "small_cnn", "small_cnn_wide"],
)
def test_forward_pass(name):
    shape = (16, 16, 3) if not name.startswith("small") else MNIST
    model = models.build(name, input_shape=shape, num_classes=7, seed=0)
    x = np.random.default_rng(0).normal(size=(2,) + shape).astype("float32")
    logits = model(x, training=False)
    assert tuple(logits.shape) == (2, 7)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))
    model(x, training=True)


# --------------------------------------------------------------------------
# Parameter counts against published values


@pytest.mark.parametrize(
    "name, input_shape, num_classes, published",
    [
        ("resnet20", CIFAR, 10, 0.27e6),          # He et al. 2016, table 6
        ("resnet56", CIFAR, 100, 0.86e6),         # CRD / RepDistiller
        ("resnet110", CIFAR, 10, 1.7e6),          # He et al. 2016, table 6
        ("resnet8x4", CIFAR, 100, 1.23e6),        # RepDistiller
        ("resnet32x4", CIFAR, 100, 7.43e6),       # RepDistiller
        ("wrn_28_10", CIFAR, 100, 36.5e6),        # Zagoruyko & Komodakis
        ("wrn_40_4", CIFAR, 10, 8.9e6),
        ("wrn_16_8", CIFAR, 10, 11.0e6),
        ("resnext29_8x64d", CIFAR, 10, 34.4e6),   # Xie et al. 2017, table 7
        ("resnext29_16x64d", CIFAR, 100, 68.1e6),
        ("resnet18", IMAGENET, 1000, 11_689_512),  # torchvision
        ("resnet34", IMAGENET, 1000, 21_797_672),
        ("resnet50", IMAGENET, 1000, 25_557_032),
    ],
)
def test_parameter_counts(name, input_shape, num_classes, published):
    model = _built(name, input_shape, num_classes)
    assert _trainable_params(model) == pytest.approx(published, rel=0.02)


def test_exact_parameter_counts():
    # Exact values of the PyTorch references (projection shortcuts).
    assert _trainable_params(_built("resnet20", CIFAR, 10)) == 272_474
    assert _trainable_params(_built("resnet56", CIFAR, 100)) == 861_620
    assert _trainable_params(_built("wrn_28_10", CIFAR, 100)) == 36_536_884


def test_zero_pad_shortcut_is_parameter_free():
    model = resnet_cifar.cifar_resnet(20, CIFAR, 10, shortcut="zero_pad")
    assert _trainable_params(model) == 269_722  # He et al. option A
    assert model.get_layer("features").output.shape == (None, 8, 8, 64)


# --------------------------------------------------------------------------
# Feature map shapes


@pytest.mark.parametrize(
    "name, input_shape, features_shape",
    [
        ("resnet56", CIFAR, (8, 8, 64)),
        ("resnet20", (16, 16, 3), (4, 4, 64)),
        ("resnet32x4", CIFAR, (8, 8, 256)),
        ("wrn_28_10", CIFAR, (8, 8, 640)),
        ("wrn_16_2", (28, 28, 1), (7, 7, 128)),
        ("resnext29_16x64d", CIFAR, (8, 8, 1024)),
        ("resnet18", IMAGENET, (7, 7, 512)),
        ("resnet34", IMAGENET, (7, 7, 512)),
        ("resnet50", IMAGENET, (7, 7, 2048)),
        ("resnet18", CIFAR, (1, 1, 512)),
        ("resnet18", (16, 16, 3), (1, 1, 512)),
        ("small_cnn", MNIST, (7, 7, 128)),
        ("small_cnn", CIFAR, (8, 8, 128)),
        ("small_cnn_wide", MNIST, (7, 7, 256)),
        ("small_cnn_slim", MNIST, (7, 7, 64)),
    ],
)
def test_feature_shapes(name, input_shape, features_shape):
    if input_shape == _default_config(name)[0]:
        model = _built(name, *_default_config(name))
    else:
        model = _built(name, input_shape, 10)
    assert model.get_layer("features").output.shape == (None,) + features_shape


def test_variable_spatial_size():
    model = models.build("resnet8", input_shape=(None, None, 3), num_classes=4)
    assert model.get_layer("features").output.shape == (None, None, None, 64)
    extractor = keras.Model(model.input, model.get_layer("features").output)
    for size in (16, 20):
        out = extractor(np.zeros((1, size, size, 3), "float32"))
        assert tuple(out.shape) == (1, size // 4, size // 4, 64)


def test_wrn_dropout():
    model = wide_resnet.wide_resnet(10, 1, (16, 16, 3), 3, dropout_rate=0.3)
    assert any(isinstance(l, keras.layers.Dropout) for l in model.layers)
    assert _trainable_params(model) == _trainable_params(
        wide_resnet.wide_resnet(10, 1, (16, 16, 3), 3)
    )


# --------------------------------------------------------------------------
# Seeding


def _weights(name, seed):
    return models.build(
        name, input_shape=_default_shape(name), num_classes=10, seed=seed
    ).get_weights()


@pytest.mark.parametrize("name", ["resnet8", "small_cnn", "wrn_10_1"])
def test_same_seed_same_weights(name):
    for wa, wb in zip(_weights(name, 123), _weights(name, 123)):
        np.testing.assert_array_equal(wa, wb)


def test_different_seeds_different_weights():
    a, b = _weights("resnet8", 1), _weights("resnet8", 2)
    kernels = [(wa, wb) for wa, wb in zip(a, b) if wa.ndim >= 2]
    assert kernels
    assert all(not np.array_equal(wa, wb) for wa, wb in kernels)


def test_layers_get_distinct_initial_weights():
    weights = models.build(
        "resnet8", input_shape=CIFAR, num_classes=10, seed=0
    ).get_weights()
    kernels = [w for w in weights if w.shape == (3, 3, 16, 16)]
    assert len(kernels) >= 2
    assert not np.array_equal(kernels[0], kernels[1])


def test_no_seed_gives_fresh_weights():
    a, b = _weights("resnet8", None), _weights("resnet8", None)
    assert not np.array_equal(a[0], b[0])


def test_seed_restores_python_random_state():
    random.seed(99)
    expected = random.random()
    random.seed(99)
    models.build("resnet8", input_shape=CIFAR, num_classes=10, seed=5)
    assert random.random() == expected


# --------------------------------------------------------------------------
# Mixed precision


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", ["resnet8", "wrn_10_1", "resnext29_2x4d", "small_cnn"])
def test_mixed_precision_logits_are_float32(mixed_precision, name):
    shape = _default_shape(name)
    model = models.build(name, input_shape=shape, num_classes=5, seed=0)
    assert model.output.dtype == "float32"
    assert model.get_layer("features").output.dtype == "float16"
    logits = model(np.ones((2,) + shape, "float32"), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


# --------------------------------------------------------------------------
# Serialisation


@pytest.mark.parametrize(
    "name, input_shape",
    [("resnet8", CIFAR), ("wrn_10_2", (16, 16, 3)),
     ("resnext29_2x4d", (16, 16, 3)), ("resnet18", (32, 32, 3)),
     ("small_cnn", MNIST), ("resnet8_zero_pad", (16, 16, 3))],
)
def test_save_and_reload_safe_mode(tmp_path, name, input_shape):
    if name == "resnet8_zero_pad":
        model = resnet_cifar.cifar_resnet(8, input_shape, 4, shortcut="zero_pad")
    else:
        model = models.build(name, input_shape=input_shape, num_classes=4, seed=0)
    x = np.random.default_rng(1).normal(size=(2,) + input_shape).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    assert reloaded.name == model.name
    assert reloaded.get_layer("features").output.shape == (
        model.get_layer("features").output.shape
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x, training=False)), expected,
        rtol=1e-5, atol=1e-5,
    )


# --------------------------------------------------------------------------
# Input normalisation (keras_feed.models.preprocessing)


def test_mean_and_std_add_a_normalising_first_layer(tmp_path):
    from keras_feed.models import preprocessing

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=3)
    model = models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=3,
                         mean=mean, std=std)
    assert preprocessing.find(plain) is None
    assert preprocessing.find(model) is model.layers[1] and model.layers[1].name == "preprocessing"
    assert model.name == plain.name and model.count_params() == plain.count_params()
    assert model.get_layer("features").output.shape == plain.get_layer("features").output.shape
    for with_layer, without in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(with_layer, without)  # the layer draws no seed
    images = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3)).astype("uint8")
    normalised = ((images / 255.0 - np.array(mean)) / np.array(std)).astype("float32")
    expected = plain.predict(normalised, verbose=0)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)
    # The same network wrapped afterwards, its layers shared: a file taking normalised images
    # made raw-pixel.
    wrapped = preprocessing.add(plain, mean, std)
    assert wrapped.get_layer("features") is plain.get_layer("features")
    np.testing.assert_allclose(wrapped.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mean=(0.5,) * 3), "mean and std go together"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "2 values; the input has 3 channels"),
        (dict(mean=(0.5,) * 3, std=(0.2, 0.0, 0.2)), "std > 0"),
    ],
)
def test_bad_mean_or_std_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, **kwargs)


def test_raw_pixel_model_follows_the_stated_convention():
    from keras_feed.models import preprocessing

    inputs = keras.Input((8, 8, 1))
    features = keras.layers.ReLU(name="features")(keras.layers.Conv2D(2, 3)(inputs))
    plain = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(features)))
    statistics = lambda: ((0.5,), (0.25,))  # noqa: E731
    kwargs = dict(statistics=statistics, what="Model m", flag="--flag")
    with pytest.raises(ValueError, match="Model m has no preprocessing layer.*--flag=dataset"):
        preprocessing.raw_pixel_model(plain, "auto", **kwargs)
    assert preprocessing.raw_pixel_model(plain, "none", **kwargs) is plain
    wrapped = preprocessing.raw_pixel_model(plain, "dataset", **kwargs)
    assert preprocessing.find(wrapped).name == "preprocessing"
    # A model with its own layer is used as it is, whatever the convention says.
    for convention in preprocessing.CONVENTIONS:
        assert preprocessing.raw_pixel_model(wrapped, convention, **kwargs) is wrapped
    sequential = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255.0),
                                   keras.layers.Flatten(), keras.layers.Dense(3)])
    assert isinstance(preprocessing.find(sequential), keras.layers.Rescaling)


def test_find_reads_the_graph_as_saved(tmp_path):
    """The layer is found through a nested backbone and in a reloaded file, and only as the
    input's one consumer (the input also feeding another branch: no preprocessing layer)."""
    from keras_feed.models import preprocessing

    backbone = models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=0,
                            mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    inputs = keras.Input((16, 16, 3))
    nested = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)))
    assert preprocessing.find(nested) is backbone.get_layer("preprocessing")
    inputs = keras.Input((8, 8, 1))
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    branches = [keras.layers.Flatten()(scaled), keras.layers.Flatten()(inputs)]
    assert preprocessing.find(keras.Model(inputs, keras.layers.Concatenate()(branches))) is None
    plain = models.build("resnet8", input_shape=(16, 16, 3), num_classes=4, seed=0)
    shared = preprocessing.add(plain, (0.5,) * 3, (0.2,) * 3)  # plain's layers, called twice
    assert preprocessing.find(shared).name == "preprocessing" and preprocessing.find(plain) is None
    shared.save(tmp_path / "shared.keras")
    reloaded = keras.models.load_model(tmp_path / "shared.keras", safe_mode=True)
    assert preprocessing.find(reloaded) is reloaded.layers[1]


def test_teacher_preprocessing_offers_the_conventions():
    """`--teacher_preprocessing`'s choices, checks and help all follow `CONVENTIONS`."""
    import dataclasses

    from keras_feed.models import preprocessing
    from keras_feed.run import config

    (spec,) = config.flag_specs(("teacher_preprocessing",))
    assert spec.choices == preprocessing.CONVENTIONS and spec.default in preprocessing.CONVENTIONS
    for convention in preprocessing.CONVENTIONS:
        assert f" {convention}: " in spec.help, convention
    bad = dataclasses.replace(config.TrainConfig(), teacher_preprocessing="normalised")
    with pytest.raises(ValueError, match="choose from " + ", ".join(preprocessing.CONVENTIONS)):
        config.check_config(bad, None)


def test_a_model_with_its_preprocessing_gives_its_features_the_keras_way():
    """`keras.Model(model.inputs, model.get_layer("features").output)`, the usual way to
    read a layer (and what keras.distillation does), works on a model that normalises its
    own input, and gives the features of the whole model, normalisation included."""
    from keras_feed.core import frozen

    model = models.build("resnet8", input_shape=(16, 16, 3), num_classes=10, seed=0,
                         mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    features = keras.Model(model.inputs, model.get_layer("features").output)
    images = np.random.RandomState(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected = frozen.extractor(model, "features")(images)[2]
    np.testing.assert_allclose(features([images]), expected, rtol=1e-5, atol=1e-5)
    unnormalised = models.build("resnet8", input_shape=(16, 16, 3), num_classes=10, seed=0)
    # The same initial weights as the model without the layer (a Rescaling has none).
    assert len(unnormalised.get_weights()) == len(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(unnormalised.get_weights(),
                                                    model.get_weights()))
