"""The teachers' inference twins: BatchNormalization folded into the convolutions."""

import keras
import numpy as np
from conftest import tiny_net

from keras_feed import FEEDDistiller, models
from keras_feed.core import factor_transfer
from keras_feed.core.frozen import extractor as feature_extractor
from keras_feed.core.frozen import folded_layers, inference_model, refold


def randomise_batchnorm(model, seed):
    """Moving statistics and affine terms far from their initial values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, size))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size))
            layer.beta.assign(rng.normal(0.0, 0.2, size))


def test_folded_twin_matches_the_model_and_refolds_on_demand():
    teacher = models.build("resnet8", input_shape=(16, 16, 3), num_classes=5, seed=3)
    randomise_batchnorm(teacher, 0)
    extractor = feature_extractor(teacher, "features", name="extractor")
    twin = inference_model(extractor)
    assert twin is not extractor
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in twin.layers)
    folded = {id(w) for layer in folded_layers(twin) for w in layer.weights}
    pairs = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in teacher.layers)
    assert pairs == 9 and len(folded) == 2 * pairs  # a kernel and a bias for each Conv+BN pair
    assert {id(w) for w in twin.weights} - folded <= {id(w) for w in teacher.weights}
    images = np.random.default_rng(1).normal(size=(6, 16, 16, 3)).astype("float32")
    for expected, got in zip(extractor(images, training=False), twin(images, training=False)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Weights loaded after the twin is built are used once it is refolded.
    randomise_batchnorm(teacher, 1)
    expected = extractor(images, training=False)[2]
    assert np.max(np.abs(twin(images, training=False)[2] - expected)) > 1e-2  # stale until refolded
    refold(twin)
    np.testing.assert_allclose(twin(images, training=False)[2], expected, rtol=1e-4, atol=1e-4)


def test_a_convolution_whose_output_is_needed_is_not_folded():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    normalised = keras.layers.BatchNormalization(name="bn")(conv)
    model = keras.Model(inputs, [normalised, conv])
    assert inference_model(model) is model


def test_distiller_targets_are_the_teachers_features():
    teachers = [tiny_net(f"t{i}", width=6 + 2 * i, classes=4, seed=i) for i in range(2)]
    for index, teacher in enumerate(teachers):
        randomise_batchnorm(teacher, index)
    images = np.random.default_rng(2).normal(size=(5, 16, 16, 3)).astype("float32")
    for kd_weight, logits_expected in ((0.0, 0), (0.5, 2)):
        distiller = FEEDDistiller(tiny_net("s", classes=4), teachers, kd_weight=kd_weight)
        logits, targets = distiller.teacher_outputs(images)
        assert len(logits) == logits_expected
        for index, (teacher, target) in enumerate(zip(teachers, targets)):
            reference = feature_extractor(teacher, "features", name="reference")
            _, reference_logits, features = reference(images, training=False)
            np.testing.assert_allclose(target, features, rtol=1e-4, atol=1e-4)
            if logits:
                np.testing.assert_allclose(logits[index], reference_logits, rtol=1e-4, atol=1e-4)


def test_the_paraphraser_stage_reads_the_teachers_current_weights():
    """On JAX the teacher's weights are constants of the compiled step: changed, it is traced again."""
    teacher = tiny_net("teacher", width=8)
    paraphraser = factor_transfer.new_paraphraser(teacher, teacher_layer="features", rate=0.5)
    trainer = factor_transfer.ParaphraserTrainer(teacher, paraphraser, teacher_layer="features")
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # the paraphraser stays as it is
    images = np.random.default_rng(3).normal(size=(8, 16, 16, 3)).astype("float32")
    for seed in (None, 4):  # the weights it was built with, then others
        if seed is not None:
            randomise_batchnorm(teacher, seed)
        history = trainer.fit(images, batch_size=8, epochs=1, verbose=0)
        features = feature_extractor(teacher, "features")(images, training=False)[2]
        expected = np.mean(np.square(features - paraphraser(features)))
        np.testing.assert_allclose(history.history["reconstruction_loss"][0], expected, rtol=1e-4)
