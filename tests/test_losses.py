import numpy as np
import tensorflow as tf

from keras_feed import losses


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
    assert value.dtype == tf.float32
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


def test_feed_loss_finite_for_zero_maps_and_float16():
    zeros = np.zeros((2, 2, 2, 3), dtype="float16")
    ones = np.ones((2, 2, 2, 3), dtype="float16")
    for teacher, student in ((zeros, zeros), (zeros, ones)):
        value = losses.feed_loss(teacher, student)
        assert value.dtype == tf.float32 and np.isfinite(float(value))


def test_cross_entropy_and_kd_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 4)).astype("float32")
    labels = rng.integers(0, 4, size=5)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    expected_ce = -np.mean(np.log(probabilities[np.arange(5), labels]))
    np.testing.assert_allclose(float(losses.cross_entropy(labels, logits)), expected_ce, atol=1e-6)

    temperature = 3.0
    teacher_logits = [rng.normal(size=(5, 4)).astype("float32") for _ in range(2)]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    target = np.mean([softmax(z / temperature) for z in teacher_logits], axis=0)
    student = softmax(logits / temperature)
    expected_kd = temperature**2 * np.mean(np.sum(target * (np.log(target) - np.log(student)), axis=1))
    soft = losses.ensemble_soft_targets(teacher_logits, temperature)
    np.testing.assert_allclose(soft.numpy(), target, rtol=1e-6)
    np.testing.assert_allclose(float(losses.kd_loss(soft, logits, temperature)), expected_kd, atol=1e-6)


def test_ft_loss_matches_numpy_reference():
    rng = np.random.default_rng(4)
    teacher_factor = rng.normal(size=(3, 4, 4, 5)).astype("float32")
    student_factor = rng.normal(size=(3, 4, 4, 5)).astype("float32")
    np.testing.assert_allclose(
        float(losses.ft_loss(teacher_factor, student_factor)),
        numpy_feed_loss(teacher_factor, student_factor),
        atol=1e-6,
    )
