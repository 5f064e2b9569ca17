"""Loss terms of FEED and of the baselines it is compared with.

Every function here is a pure function of tensors: no layers, no state, and
only `keras.ops`, so the terms run on any Keras backend. Each returns a float32
scalar (inputs are cast to float32 first, so the terms are safe under mixed
precision) averaged over the batch. Under `tf.distribute` the caller divides
by the number of replicas; see `FEEDDistiller`.
"""

import functools
import operator

import keras

# The floor on the per-example L2 norm: x / max(||x||_2, 1e-12), the reference
# code's `F.normalize` (eps=1e-12), which keeps all-zero maps finite. (Unlike
# `tf.math.l2_normalize(x, epsilon=1e-12)`, whose floor is sqrt(1e-12) = 1e-6.)
_L2_EPSILON = 1e-12


def normalize_per_example(features):
    """Flattens each example of `features` and divides it by its L2 norm.

    Each row becomes x / max(||x||_2, 1e-12), as PyTorch's
    `F.normalize(x, dim=1)` computes it. The floor is applied to the sum of
    squares (max(sum x^2, 1e-24), the same value) so that the gradient at an
    all-zero example is finite.

    Args:
      features: a tensor `(batch, ...)`, e.g. a feature map `(batch, H, W, C)`.

    Returns:
      A float32 tensor `(batch, prod(...))` whose rows have L2 norm 1 where the
      example's norm is at least 1e-12 (and are zero where it was all zeros).
    """
    features = keras.ops.cast(features, "float32")
    flat = keras.ops.reshape(features, (keras.ops.shape(features)[0], -1))
    squared_norm = keras.ops.sum(keras.ops.square(flat), axis=1, keepdims=True)
    norm = keras.ops.sqrt(keras.ops.maximum(squared_norm, _L2_EPSILON**2))
    return flat / norm


def feed_loss(teacher_features, student_features):
    """The FEED loss between one teacher's map and one NTL's output.

    Per example, both maps are flattened and L2-normalised
    (`normalize_per_example`: x / max(||x||_2, 1e-12)), and the loss is the
    mean absolute difference over their elements; the result is the mean over
    the batch. This is Factor Transfer's reduction (a mean over elements), the
    one for which the paper's beta = 500 holds.

    Args:
      teacher_features: `(batch, H, W, C)` map of the (frozen) teacher.
      student_features: `(batch, H, W, C)` output of the NTL on the student's
        map; must have the same number of elements per example.

    Returns:
      A float32 scalar: 0 for maps of equal direction, finite for zero maps.
    """
    return keras.ops.mean(per_example_feed_loss(teacher_features, student_features))


def per_example_feed_loss(teacher_features, student_features):
    """`feed_loss` before the batch mean: a float32 vector `(batch,)`."""
    difference = normalize_per_example(teacher_features) - normalize_per_example(
        student_features
    )
    return keras.ops.mean(keras.ops.abs(difference), axis=1)


def ensemble_soft_targets(teacher_logits, temperature, weights=None):
    """Averages the teachers' softened class probabilities, per example weighted.

    Args:
      teacher_logits: a list of `(batch, classes)` logits, one per teacher.
      temperature: the softmax temperature T > 0.
      weights: optional `(batch, K)` teacher weights whose rows sum to K
        (`keras_feed.core.weighting`); None: all ones.

    Returns:
      float32 `(batch, classes)` probabilities: sum_n (w_n / K) softmax(z_n / T);
      without weights (w_n = 1), mean_n softmax(z_n / T).
    """
    probabilities = [
        keras.ops.softmax(keras.ops.cast(logits, "float32") / temperature, axis=-1)
        for logits in teacher_logits
    ]
    if weights is not None:
        probabilities = [
            probability * weights[:, index:index + 1]
            for index, probability in enumerate(probabilities)
        ]
    return functools.reduce(operator.add, probabilities) / float(len(probabilities))


def kd_loss(teacher_probabilities, student_logits, temperature):
    """Hinton's knowledge-distillation term, T^2 * KL(p_teacher || p_student).

    Args:
      teacher_probabilities: `(batch, classes)` soft targets at temperature T,
        e.g. from `ensemble_soft_targets`.
      student_logits: `(batch, classes)` logits of the student.
      temperature: the temperature T used for both distributions.

    Returns:
      A float32 scalar: the KL divergence summed over classes, averaged over
      the batch, times T^2 (so that its gradients keep their scale as T grows).
    """
    return keras.ops.mean(_kl(teacher_probabilities, student_logits, temperature)) * (
        temperature**2)


def per_example_kd_loss(teacher_probabilities, student_logits, temperature):
    """`kd_loss` before the batch mean: a float32 vector `(batch,)`."""
    return _kl(teacher_probabilities, student_logits, temperature) * (temperature**2)


def _kl(teacher_probabilities, student_logits, temperature):
    """Per example, KL(p_teacher || softmax(student_logits / T)), summed over classes."""
    teacher_probabilities = keras.ops.cast(teacher_probabilities, "float32")
    student_log_probabilities = keras.ops.log_softmax(
        keras.ops.cast(student_logits, "float32") / temperature, axis=-1
    )
    teacher_log_probabilities = keras.ops.log(
        keras.ops.maximum(teacher_probabilities, 1e-12)
    )
    return keras.ops.sum(
        teacher_probabilities
        * (teacher_log_probabilities - student_log_probabilities),
        axis=-1,
    )
