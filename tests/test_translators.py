import keras
import numpy as np
import pytest

from keras_feed.core import translators


def test_translator_structure_and_shape():
    layer = translators.translator_for((8, 8, 16), (8, 8, 64))
    convs = [sub for sub in layer._blocks if isinstance(sub, keras.layers.Conv2D)]
    acts = [sub for sub in layer._blocks if isinstance(sub, keras.layers.LeakyReLU)]
    assert [c.filters for c in convs] == [16, 64, 64]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and c.use_bias for c in convs)
    assert len(acts) == 3 and all(abs(a.negative_slope - 0.1) < 1e-9 for a in acts)
    assert isinstance(layer._blocks[-1], keras.layers.LeakyReLU)
    output = layer(np.zeros((2, 8, 8, 16), "float32"))
    assert tuple(output.shape) == (2, 8, 8, 64)
    assert layer.built and len(layer.trainable_weights) == 6  # built eagerly


def test_translator_adapts_integer_ratios():
    down = translators.translator_for((16, 16, 8), (8, 8, 32))
    assert tuple(down(np.zeros((1, 16, 16, 8), "float32")).shape) == (1, 8, 8, 32)
    up = translators.translator_for((4, 4, 8), (8, 8, 32), batchnorm=True)
    assert tuple(up(np.zeros((1, 4, 4, 8), "float32")).shape) == (1, 8, 8, 32)


@pytest.mark.parametrize("student,teacher", [((8, 8, 16), (6, 6, 16)), ((8, 8, 16), (4, 2, 16))])
def test_translator_mismatch_names_both_shapes(student, teacher):
    with pytest.raises(ValueError) as error:
        translators.translator_for(student, teacher)
    assert str(student) in str(error.value) and str(teacher) in str(error.value)


def test_translator_serialises(tmp_path):
    inputs = keras.Input((4, 4, 8))
    outputs = translators.Translator(12, batchnorm=True, name="ntl")(inputs)
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype("float32")
    path = str(tmp_path / "ntl.keras")
    model.save(path)
    restored = keras.models.load_model(path, safe_mode=True)
    assert restored.get_layer("ntl").get_config()["out_channels"] == 12
    np.testing.assert_allclose(restored.predict(data, verbose=0), model.predict(data, verbose=0), atol=1e-6)
