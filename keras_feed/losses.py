"""Loss terms of FEED and of the baselines it is compared with.

Every function here is a pure function of tensors: no layers, no state. Each
returns a float32 scalar (inputs are cast to float32 first, so the terms are
safe under mixed precision) averaged over the batch. Under `tf.distribute`
the caller divides by the number of replicas; see `FEEDDistiller`.
"""

import tensorflow as tf

# `tf.math.l2_normalize` divides by max(||x||, sqrt(epsilon)); 1e-12 matches
# the reference code's `F.normalize` and keeps all-zero maps finite.
_L2_EPSILON = 1e-12


def normalize_per_example(features):
    """Flattens each example of `features` and scales it to unit L2 norm.

    Args:
      features: a tensor `(batch, ...)`, e.g. a feature map `(batch, H, W, C)`.

    Returns:
      A float32 tensor `(batch, prod(...))` whose rows have L2 norm 1 (or are
      zero where the example was all zeros).
    """
    features = tf.cast(features, tf.float32)
    flat = tf.reshape(features, [tf.shape(features)[0], -1])
    return tf.math.l2_normalize(flat, axis=1, epsilon=_L2_EPSILON)


def feed_loss(teacher_features, student_features):
    """The FEED loss between one teacher's map and one NTL's output.

    Per example, both maps are flattened and L2-normalised, and the loss is the
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
    return tf.reduce_mean(
        per_example_feed_loss(teacher_features, student_features)
    )


def per_example_feed_loss(teacher_features, student_features):
    """`feed_loss` before the batch mean: a float32 vector `(batch,)`."""
    difference = normalize_per_example(teacher_features) - normalize_per_example(
        student_features
    )
    return tf.reduce_mean(tf.abs(difference), axis=1)


def ft_loss(teacher_factor, student_factor):
    """Factor Transfer's loss: L1 between L2-normalised factors.

    It is the same quantity as `feed_loss`, applied to the paraphraser's factor
    of the teacher map and the translator's factor of the student map.
    """
    return feed_loss(teacher_factor, student_factor)


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits, as float32."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
        )
    )


def ensemble_soft_targets(teacher_logits, temperature):
    """Averages the teachers' softened class probabilities.

    Args:
      teacher_logits: a list of `(batch, classes)` logits, one per teacher.
      temperature: the softmax temperature T > 0.

    Returns:
      float32 `(batch, classes)` probabilities: mean_n softmax(z_n / T).
    """
    probabilities = [
        tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
        for logits in teacher_logits
    ]
    return tf.add_n(probabilities) / float(len(probabilities))


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
    teacher_probabilities = tf.cast(teacher_probabilities, tf.float32)
    student_log_probabilities = tf.nn.log_softmax(
        tf.cast(student_logits, tf.float32) / temperature, axis=-1
    )
    teacher_log_probabilities = tf.math.log(
        tf.maximum(teacher_probabilities, 1e-12)
    )
    kl = tf.reduce_sum(
        teacher_probabilities
        * (teacher_log_probabilities - student_log_probabilities),
        axis=-1,
    )
    return tf.reduce_mean(kl) * (temperature**2)
