"""Per-example teacher weights for multi-teacher distillation.

Each function here turns the frozen teachers' logits (and, where it needs
them, the labels or the student's logits) into weights `(batch, K)` for K
teachers: a distillation loss with one term per teacher then becomes
`mean_k(w_k * term_k)` per example. The weights of one example sum to K, so
that a weight of 1 for every teacher is the unweighted loss; with one teacher
every weight is 1.

The weights are computed in float32 (inputs of any float dtype are cast
first, so float16 and bfloat16 logits give finite weights), with `keras.ops`
only (any backend), and returned through `keras.ops.stop_gradient`: no
gradient flows through a weight.

Every function takes the same arguments,
`(teacher_logits, labels=None, student_logits=None, temperature=1.0)`, and
reads only those it needs:

| name | needs | weights |
| --- | --- | --- |
| `equal` | - | all ones |
| `confidence` | labels | CA-MKD: low cross-entropy against the label, high weight |
| `entropy` | - | EBKD: low prediction entropy, high weight |
| `agreement` | student_logits, temperature | AE-KD: one set per batch, from the teachers' KD gradients |

`teacher_logits` is either a list (or tuple) of K tensors `(batch, classes)`
or one stacked tensor `(K, batch, classes)`; K must be known when the step is
traced. `labels` are integer class ids `(batch,)` or one-hot (or soft)
targets `(batch, classes)`.

`weights(name_or_function, teacher_logits, ...)` looks a weighting up in
`WEIGHTINGS` (`get`) and calls it.
"""

import keras

# The sum of the teachers' entropies below which `entropy` treats every teacher
# as certain and gives equal weights (H_k / sum_j H_j is 0 / 0 there).
_ENTROPY_FLOOR = 1e-30

# The size (Frobenius norm) of AE-KD's Gram matrix below which `agreement`
# treats the teachers' gradients as zero and gives equal weights: float32
# rounding of the probabilities alone leaves batch-mean differences of about
# 1e-8, a Gram matrix of about 1e-16, where the weights would be noise.
_GRAM_FLOOR = 1e-10


def stack_teacher_logits(teacher_logits):
    """The teachers' logits as one float32 tensor `(K, batch, classes)`.

    Args:
      teacher_logits: a list or tuple of K tensors `(batch, classes)`, or a
        tensor `(K, batch, classes)`.

    Returns:
      `(stacked, K)`: the float32 stack and the (static) number of teachers.
    """
    if isinstance(teacher_logits, (list, tuple)):
        if not teacher_logits:
            raise ValueError("teacher_logits is empty: give at least one teacher's logits")
        stacked = keras.ops.stack([keras.ops.cast(z, "float32") for z in teacher_logits])
    else:
        stacked = keras.ops.cast(teacher_logits, "float32")
    if len(stacked.shape) != 3:
        raise ValueError(
            "teacher_logits must be K tensors (batch, classes) or one (K, batch, classes);"
            f" got shape {tuple(stacked.shape)}"
        )
    teachers = stacked.shape[0]
    if teachers is None:
        raise ValueError("the number of teachers (axis 0 of teacher_logits) must be static")
    return stacked, int(teachers)


def label_distribution(labels, classes):
    """The labels as float32 class distributions `(batch, classes)`.

    Args:
      labels: integer class ids `(batch,)` (or `(batch, 1)`), or one-hot (or
        soft) targets `(batch, classes)`.
      classes: the number of classes.
    """
    if len(labels.shape) == 2 and labels.shape[-1] == classes and classes != 1:
        return keras.ops.cast(labels, "float32")
    ids = keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,))
    return keras.ops.one_hot(ids, classes, dtype="float32")


def _ones(stacked):
    """Float32 ones `(batch, K)` for the teachers stacked in `stacked`."""
    return keras.ops.ones_like(keras.ops.transpose(stacked[:, :, 0]))


def _from_shares(shares, teachers):
    """`(batch, K)` weights summing to K from `(K, batch)` shares summing to K - 1.

    Both CA-MKD's `1 - softmax` and EBKD's `1 - H_k / sum_j H_j` give shares
    that sum to K - 1 over the teachers; scaled by K / (K - 1) they sum to K.
    """
    return keras.ops.stop_gradient(keras.ops.transpose(shares) * (teachers / (teachers - 1.0)))


def equal(teacher_logits, labels=None, student_logits=None, temperature=1.0):
    """Weight 1 for every teacher and example: the unweighted loss.

    Needs only `teacher_logits` (for the batch size and K).

    Returns:
      float32 ones `(batch, K)`.
    """
    del labels, student_logits, temperature  # the uniform signature
    stacked, _ = stack_teacher_logits(teacher_logits)
    return keras.ops.stop_gradient(_ones(stacked))


def confidence(teacher_logits, labels=None, student_logits=None, temperature=1.0):
    """CA-MKD's confidence-aware weights (Zhang, Chen & Wang, ICASSP 2022).

    Per example, L_k is the cross-entropy of teacher k's prediction
    (softmax of its raw logits: no temperature) against the label, and

        w_k = K * (1 - softmax_k(L)) / (K - 1),

    the softmax taken over the K teachers: a teacher whose prediction is
    closer to the label weighs more. CA-MKD's own weights are
    (1 - softmax_k(L)) / (K - 1), summing to 1; here they are scaled by K.
    With K = 1 every weight is 1 (the formula is 0 / 0 there).

    Needs `teacher_logits` and `labels`; `temperature` and `student_logits`
    are not used.

    Returns:
      float32 `(batch, K)` weights in [0, K / (K - 1)], each row summing to K.
    """
    del student_logits, temperature  # the uniform signature
    if labels is None:
        raise ValueError("the 'confidence' weighting needs the labels")
    stacked, teachers = stack_teacher_logits(teacher_logits)
    if teachers == 1:
        return keras.ops.stop_gradient(_ones(stacked))
    targets = label_distribution(labels, stacked.shape[-1])
    cross_entropy = -keras.ops.sum(targets * keras.ops.log_softmax(stacked, axis=-1), axis=-1)
    return _from_shares(1.0 - keras.ops.softmax(cross_entropy, axis=0), teachers)


def entropy(teacher_logits, labels=None, student_logits=None, temperature=1.0):
    """Entropy-based weights (EBKD, as CA-MKD's code runs it as a baseline).

    A more certain teacher weighs more.

    Per example, H_k = -sum_c p_kc log p_kc is the entropy of teacher k's
    prediction (softmax of its raw logits: no temperature; the logarithm is a
    log-softmax, so classes of probability 0 add 0), and

        w_k = K * (1 - H_k / sum_j H_j) / (K - 1).

    EBKD's own weights are 1 - H_k / sum_j H_j, summing to K - 1; here they
    are scaled by K / (K - 1). Where sum_j H_j < 1e-30 (every teacher certain
    to float32 precision) the ratio is 0 / 0: the weights are then all 1.
    With K = 1 every weight is 1.

    Needs only `teacher_logits`; `labels`, `student_logits` and
    `temperature` are not used.

    Returns:
      float32 `(batch, K)` weights in [0, K / (K - 1)], each row summing to K.
    """
    del labels, student_logits, temperature  # the uniform signature
    stacked, teachers = stack_teacher_logits(teacher_logits)
    if teachers == 1:
        return keras.ops.stop_gradient(_ones(stacked))
    log_probabilities = keras.ops.log_softmax(stacked, axis=-1)
    entropies = -keras.ops.sum(keras.ops.exp(log_probabilities) * log_probabilities, axis=-1)
    entropies = keras.ops.maximum(entropies, 0.0)  # rounding can leave -1e-8
    total = keras.ops.sum(entropies, axis=0, keepdims=True)
    certain = total < _ENTROPY_FLOOR
    shares = 1.0 - entropies / keras.ops.where(certain, 1.0, total)
    shares = keras.ops.where(certain, (teachers - 1.0) / teachers, shares)
    return _from_shares(shares, teachers)


def project_onto_capped_simplex(point, cap):
    """The Euclidean projection of `point` `(K,)` onto {x : 0 <= x_k <= cap, sum x = 1}.

    The projection is clip(point - tau, 0, cap) for the tau where its sum is
    1. That sum is piecewise linear and non-increasing in tau, with breaks at
    point_k - cap and point_k: tau is found exactly, by linear interpolation
    between the two breaks around the crossing. `cap` must be at least 1 / K.
    """
    breaks = keras.ops.sort(keras.ops.concatenate([point - cap, point]))
    sums = keras.ops.sum(keras.ops.clip(point[None, :] - breaks[:, None], 0.0, cap), axis=1)
    count = breaks.shape[0]
    # The last break whose sum is at least 1 (the first one's sum is K * cap >= 1).
    low = keras.ops.clip(keras.ops.sum(keras.ops.cast(sums >= 1.0, "int32")) - 1, 0, count - 2)
    tau_low, tau_high = keras.ops.take(breaks, low), keras.ops.take(breaks, low + 1)
    sum_low, sum_high = keras.ops.take(sums, low), keras.ops.take(sums, low + 1)
    drop = sum_low - sum_high
    tau = keras.ops.where(
        drop > 0.0,
        tau_low + (sum_low - 1.0) * (tau_high - tau_low) / keras.ops.where(drop > 0.0, drop, 1.0),
        tau_low,
    )
    return keras.ops.clip(point - tau, 0.0, cap)


def minimise_on_capped_simplex(gram, cap, iterations=200):
    """argmin of x^T G x over {0 <= x_k <= cap, sum x = 1}, approximately.

    Accelerated projected gradient descent (FISTA) from the uniform point,
    with step 1 / (2 ||G||_F) (the Frobenius norm bounds G's largest
    eigenvalue), for a fixed number of iterations: deterministic, and cheap
    for the small K x K matrices of `agreement`. Where the minimiser is not
    unique (teachers with identical or collinear gradients) the one reached
    depends on G alone; identical gradients give exactly uniform weights, as
    does a G of Frobenius norm below 1e-10 (gradients that are float32
    rounding, not signal). Over random AE-KD problems (K = 2 to 8) 200 steps
    came within 2e-4 of an SLSQP solution, with the same objective to 1e-8.

    Args:
      gram: a float32 positive semi-definite `(K, K)` matrix.
      cap: the upper bound on each x_k, in [1 / K, 1].
      iterations: the number of projected gradient steps.

    Returns:
      float32 `(K,)`: the approximate minimiser (uniform where G is zero).
    """
    teachers = gram.shape[0]
    size = keras.ops.sqrt(keras.ops.sum(keras.ops.square(gram)))  # >= the largest eigenvalue
    scaled = gram / keras.ops.where(size > _GRAM_FLOOR, size, 1.0)
    scaled = keras.ops.where(size > _GRAM_FLOOR, scaled, 0.0)
    uniform = keras.ops.full((teachers,), 1.0 / teachers, dtype="float32")

    def step(index, state):
        point, previous, momentum = state
        following = project_onto_capped_simplex(point - keras.ops.matmul(scaled, point), cap)
        next_momentum = (1.0 + keras.ops.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        next_point = following + ((momentum - 1.0) / next_momentum) * (following - previous)
        return next_point, following, next_momentum

    one = keras.ops.convert_to_tensor(1.0, dtype="float32")
    _, solution, _ = keras.ops.fori_loop(0, iterations, step, (uniform, uniform, one))
    return solution


def agreement(
    teacher_logits, labels=None, student_logits=None, temperature=1.0, bound=0.6, iterations=200
):
    """AE-KD's weights (Du et al., NeurIPS 2020): one set per batch, in gradient space.

    Teacher k's KD term T^2 * KL(p_k || q) / batch has the gradient
    g_k = T (q - p_k) / batch with respect to the student's logits, q and p_k
    the student's and the teacher's softmax at temperature T. As AE-KD does,
    each g_k is averaged over the batch (a vector over the classes), and the
    weights a minimise ||sum_k a_k mean_b(g_k)||^2 over the simplex capped at
    C = `bound` (0 <= a_k <= C, sum_k a_k = 1): the teachers' gradients are
    combined into the smallest step they agree on, and no teacher takes more
    than C of it. AE-KD's one-class SVM with nu = 1 / (C K) solves the same
    problem; its nu is clipped to [1 / K, 1], so the cap in effect is C
    clipped to [1 / K, 1] (a C below 1 / K gives equal weights). The constant
    factor T / batch of the gradients leaves the minimiser unchanged.

    Here the weights are scaled by K (each at most K * C) and broadcast to
    every example. The problem is solved within the step by
    `minimise_on_capped_simplex`, `iterations` accelerated projected gradient
    steps on the K x K Gram matrix. Where the batch-mean differences q - p_k
    are all about 1e-5 or smaller (the Gram matrix's norm below 1e-10: the
    student agrees with every teacher) the weights are all 1. With K = 1
    every weight is 1.

    Needs `teacher_logits`, `student_logits` and `temperature`; `labels` are
    not used.

    Args:
      bound: AE-KD's tolerance C, the cap on each teacher's share (AE-KD's
        default is 0.6).
      iterations: the number of solver steps.

    Returns:
      float32 `(batch, K)` weights, the same in every row, each row summing
      to K.
    """
    del labels  # the uniform signature
    if student_logits is None:
        raise ValueError("the 'agreement' weighting needs the student's logits")
    stacked, teachers = stack_teacher_logits(teacher_logits)
    ones = _ones(stacked)
    if teachers == 1:
        return keras.ops.stop_gradient(ones)
    student = keras.ops.softmax(keras.ops.cast(student_logits, "float32") / temperature, axis=-1)
    soft_targets = keras.ops.softmax(stacked / temperature, axis=-1)
    mean_gradients = keras.ops.mean(student[None] - soft_targets, axis=1)  # (K, classes)
    gram = keras.ops.matmul(mean_gradients, keras.ops.transpose(mean_gradients))
    cap = min(max(float(bound), 1.0 / teachers), 1.0)
    shares = minimise_on_capped_simplex(keras.ops.stop_gradient(gram), cap, iterations)
    shares = shares / keras.ops.sum(shares)
    return keras.ops.stop_gradient(ones * (teachers * shares)[None, :])


WEIGHTINGS = {
    "equal": equal,
    "confidence": confidence,
    "entropy": entropy,
    "agreement": agreement,
}


def get(weighting):
    """The weighting function named `weighting` (a function is returned as it is)."""
    if callable(weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"unknown teacher weighting {weighting!r}: choose one of {', '.join(sorted(WEIGHTINGS))}"
        )
    return WEIGHTINGS[weighting]


def weights(weighting, teacher_logits, labels=None, student_logits=None, temperature=1.0, **options):
    """The teachers' weights `(batch, K)` by the weighting `weighting`.

    Args:
      weighting: a name in `WEIGHTINGS` or a function of the same signature.
      teacher_logits: K tensors `(batch, classes)`, or one `(K, batch, classes)`.
      labels: class ids `(batch,)` or one-hot `(batch, classes)` (for `confidence`).
      student_logits: `(batch, classes)` (for `agreement`).
      temperature: the KD temperature T (for `agreement`).
      **options: further arguments of the function (`bound`, `iterations` of
        `agreement`).

    Returns:
      float32 `(batch, K)` weights, each row summing to K, outside the gradient.
    """
    return get(weighting)(
        teacher_logits, labels=labels, student_logits=student_logits, temperature=temperature,
        **options,
    )
