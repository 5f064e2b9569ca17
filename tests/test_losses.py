import keras
import numpy as np
from conftest import gradients

from keras_feed.core import losses


def as_numpy(value):
    return keras.ops.convert_to_numpy(value)


def dtype(value):
    return keras.backend.standardize_dtype(value.dtype)


def numpy_feed_loss(teacher, student):
    """Independent reference: per-example flatten, L2-normalise, mean |diff|, batch mean."""
    teacher = teacher.reshape(len(teacher), -1).astype(np.float64)
    student = student.reshape(len(student), -1).astype(np.float64)
    teacher = teacher / np.maximum(np.linalg.norm(teacher, axis=1, keepdims=True), 1e-12)
    student = student / np.maximum(np.linalg.norm(student, axis=1, keepdims=True), 1e-12)
    return np.mean(np.abs(teacher - student))


def test_feed_loss_hand_computed():
    # Example 1: t = (3, 4) -> (0.6, 0.8); s = (1, 0) -> (1, 0): mean |diff| = (0.4 + 0.8) / 2 = 0.6.
    # Example 2: t = (0, 2) -> (0, 1); s = (0, 5) -> (0, 1): 0.
    teacher = np.array([[[[3.0, 4.0]]], [[[0.0, 2.0]]]], dtype="float32")
    student = np.array([[[[1.0, 0.0]]], [[[0.0, 5.0]]]], dtype="float32")
    value = losses.feed_loss(teacher, student)
    assert dtype(value) == "float32"
    np.testing.assert_allclose(float(value), 0.3, atol=1e-7)


def test_feed_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(4, 3, 3, 8)).astype("float32")
    student = rng.normal(size=(4, 3, 3, 8)).astype("float32")
    np.testing.assert_allclose(
        float(losses.feed_loss(teacher, student)), numpy_feed_loss(teacher, student), atol=1e-6
    )
    assert abs(float(losses.feed_loss(teacher, student))) > 1e-3  # a non-trivial value


def test_feed_loss_zero_for_equal_direction_and_scale_free():
    rng = np.random.default_rng(2)
    teacher = np.abs(rng.normal(size=(3, 4, 4, 6))).astype("float32")
    assert float(losses.feed_loss(teacher, 7.5 * teacher)) < 1e-7
    assert float(losses.feed_loss(teacher, -teacher)) > 0.1


def _map_of_norm(rng, shape, norm):
    """A random float32 map `shape` whose every example has L2 norm `norm`."""
    values = rng.normal(size=shape)
    flat = values.reshape(shape[0], -1)
    values = values / np.linalg.norm(flat, axis=1).reshape((-1,) + (1,) * (len(shape) - 1))
    return (values * norm).astype("float32")


def test_feed_loss_on_tiny_norm_maps_matches_numpy_reference():
    # F.normalize divides by max(||x||, 1e-12): a map of norm 1e-7 is scaled
    # to unit norm (tf.math.l2_normalize's floor of sqrt(1e-12) = 1e-6 would
    # leave it at norm 0.1), and a map of norm 1e-13, below the floor, to 0.1.
    rng = np.random.default_rng(5)
    shape = (3, 2, 2, 6)
    normal = _map_of_norm(rng, shape, 3.0)
    for tiny_norm in (1e-7, 3e-7, 1e-13):
        tiny = _map_of_norm(rng, shape, tiny_norm)
        other_tiny = _map_of_norm(rng, shape, tiny_norm)
        for teacher, student in ((tiny, normal), (normal, tiny), (tiny, other_tiny)):
            expected = numpy_feed_loss(teacher, student)
            np.testing.assert_allclose(float(losses.feed_loss(teacher, student)), expected, atol=1e-6)
            np.testing.assert_allclose(
                as_numpy(losses.per_example_feed_loss(teacher, student)),
                [numpy_feed_loss(teacher[i : i + 1], student[i : i + 1]) for i in range(len(teacher))],
                atol=1e-6,
            )
        rows = as_numpy(losses.normalize_per_example(tiny))
        expected_norm = 1.0 if tiny_norm >= 1e-12 else tiny_norm / 1e-12
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), expected_norm, rtol=1e-5)
    # The same direction at norms 1e-7 and 5: loss 0.
    assert float(losses.feed_loss(_map_of_norm(np.random.default_rng(6), shape, 1e-7),
                                  _map_of_norm(np.random.default_rng(6), shape, 5.0))) < 1e-6


def test_feed_loss_values_for_zero_maps():
    zeros = np.zeros((2, 2, 2, 3), dtype="float32")
    student = np.random.default_rng(7).normal(size=(2, 2, 2, 3)).astype("float32")
    # Both zero: both normalise to zero rows, loss exactly 0.
    value = losses.feed_loss(zeros, zeros)
    assert dtype(value) == "float32" and float(value) == 0.0
    # One zero: the loss is mean |s / ||s|| | (ones of 12 elements: 1 / sqrt(12)).
    for teacher, other in ((zeros, student), (student, zeros), (zeros, np.ones_like(zeros))):
        np.testing.assert_allclose(
            float(losses.feed_loss(teacher, other)), numpy_feed_loss(teacher, other), atol=1e-7
        )
    np.testing.assert_allclose(
        float(losses.feed_loss(zeros, np.ones_like(zeros))), 1 / np.sqrt(12), atol=1e-7
    )
    np.testing.assert_array_equal(as_numpy(losses.normalize_per_example(zeros)), np.zeros((2, 12)))


def test_feed_loss_gradient_finite_at_zero_maps():
    zeros = np.zeros((2, 2, 2, 3), "float32")
    student = np.random.default_rng(8).normal(size=(2, 2, 2, 3)).astype("float32")
    for teacher, other in ((zeros, zeros), (zeros, student), (student, zeros)):
        for gradient in gradients(losses.feed_loss, teacher, other):
            assert np.all(np.isfinite(gradient))


def test_feed_loss_float16_inputs_match_numpy_reference():
    rng = np.random.default_rng(9)
    zeros = np.zeros((2, 2, 2, 3), dtype="float16")
    ones = np.ones((2, 2, 2, 3), dtype="float16")
    # Elements ~1e-4: their squares underflow in float16, not in float32.
    small = (rng.normal(size=(2, 2, 2, 3)) * 1e-4).astype("float16")
    large = (rng.normal(size=(2, 2, 2, 3)) * 100).astype("float16")
    for teacher, student in ((zeros, zeros), (zeros, ones), (small, large), (large, small), (small, ones)):
        value = losses.feed_loss(teacher, student)
        assert dtype(value) == "float32"
        np.testing.assert_allclose(float(value), numpy_feed_loss(teacher, student), atol=1e-6)
    assert dtype(losses.normalize_per_example(small)) == "float32"
    np.testing.assert_allclose(
        np.linalg.norm(as_numpy(losses.normalize_per_example(small)), axis=1), 1.0, rtol=1e-5
    )


def test_kd_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 4)).astype("float32")
    temperature = 3.0
    teacher_logits = [rng.normal(size=(5, 4)).astype("float32") for _ in range(2)]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    target = np.mean([softmax(z / temperature) for z in teacher_logits], axis=0)
    student = softmax(logits / temperature)
    expected_kd = temperature**2 * np.mean(np.sum(target * (np.log(target) - np.log(student)), axis=1))
    soft = losses.ensemble_soft_targets(teacher_logits, temperature)
    np.testing.assert_allclose(as_numpy(soft), target, rtol=1e-6)
    np.testing.assert_allclose(float(losses.kd_loss(soft, logits, temperature)), expected_kd, atol=1e-6)
