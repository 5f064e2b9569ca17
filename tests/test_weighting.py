"""Teacher weightings: each against a NumPy transcription of its paper's formula.

The references below are written from the formulas (in float64), not from
`keras_feed.core.weighting`, and rescaled to its convention: the K weights of
an example sum to K.
"""

import itertools

import keras
import numpy as np
import pytest
from conftest import gradients

from keras_feed.core import weighting

RNG_SEED = 7
NAMES = ("equal", "confidence", "entropy", "agreement")


def as_numpy(value):
    return keras.ops.convert_to_numpy(value)


def random_case(teachers=3, batch=8, classes=6, seed=RNG_SEED, scale=3.0):
    rng = np.random.default_rng(seed)
    teacher_logits = (rng.normal(size=(teachers, batch, classes)) * scale).astype("float32")
    student_logits = (rng.normal(size=(batch, classes)) * scale).astype("float32")
    labels = rng.integers(0, classes, size=batch).astype("int32")
    return teacher_logits, labels, student_logits


def call(name, teacher_logits, labels, student_logits, temperature=4.0, **options):
    return as_numpy(weighting.weights(
        name, list(teacher_logits), labels=labels, student_logits=student_logits,
        temperature=temperature, **options))


# -- NumPy references -----------------------------------------------------------------


def log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_confidence(teacher_logits, labels):
    """CA-MKD: L_k = CE(softmax(z_k), y); a_k = (1 - softmax_k(-)(L)) / (K - 1); times K."""
    teachers = len(teacher_logits)
    rows = np.arange(len(labels))
    losses = np.stack([-log_softmax(z)[rows, labels] for z in teacher_logits])  # (K, batch)
    shares = np.exp(losses - losses.max(axis=0)) / np.exp(losses - losses.max(axis=0)).sum(axis=0)
    return (teachers * (1.0 - shares) / (teachers - 1)).T


def reference_entropy(teacher_logits):
    """EBKD: H_k = -sum p log p; a_k = 1 - H_k / sum_j H_j (sums to K - 1); times K / (K - 1)."""
    teachers = len(teacher_logits)
    entropies = np.stack([-(np.exp(log_softmax(z)) * log_softmax(z)).sum(axis=-1)
                          for z in teacher_logits])
    return (teachers * (1.0 - entropies / entropies.sum(axis=0)) / (teachers - 1)).T


def agreement_gram(teacher_logits, student_logits, temperature):
    """AE-KD: the per-example gradients T (q - p_k) / batch of the KD terms, averaged over
    the batch (its `find_optimal_svm` takes `vecs.mean(dim=1)`), and their Gram matrix."""
    def softmax(z):
        return np.exp(log_softmax(np.asarray(z, np.float64) / temperature))

    batch = student_logits.shape[0]
    gradients = np.stack([temperature * (softmax(student_logits) - softmax(z)) / batch
                          for z in teacher_logits])
    means = gradients.mean(axis=1)
    return means @ means.T


def agreement_cap(bound, teachers):
    """AE-KD's share cap: nu = 1 / (C K) clipped to [1 / K, 1]; shares = dual / (K nu)."""
    nu = min(max(1.0 / (bound * teachers), 1.0 / teachers), 1.0)
    return 1.0 / (teachers * nu)


def slsqp_shares(gram, cap):
    optimize = pytest.importorskip("scipy.optimize")
    teachers = len(gram)
    scale = np.trace(gram)
    result = optimize.minimize(
        lambda a: a @ gram @ a / scale, np.full(teachers, 1.0 / teachers),
        jac=lambda a: 2 * gram @ a / scale, method="SLSQP", bounds=[(0.0, cap)] * teachers,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x


def grid_shares(gram, cap, points=2001):
    """Exhaustive search on the capped simplex for K = 2 or 3 (NumPy only)."""
    teachers = len(gram)
    grid = np.linspace(0.0, 1.0, points)
    if teachers == 2:
        candidates = np.stack([grid, 1.0 - grid], axis=1)
    else:
        first, second = np.meshgrid(grid[::4], grid[::4], indexing="ij")
        candidates = np.stack([first.ravel(), second.ravel(), 1.0 - first.ravel() - second.ravel()], 1)
    candidates = candidates[(candidates >= -1e-12).all(1) & (candidates <= cap + 1e-12).all(1)]
    values = np.einsum("nk,kl,nl->n", candidates, gram, candidates)
    return candidates[np.argmin(values)]


def objective(gram, shares):
    return float(shares @ gram @ shares / np.trace(gram))


# -- every weighting --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("teachers", [2, 3, 5])
def test_rows_sum_to_the_number_of_teachers(name, teachers):
    teacher_logits, labels, student_logits = random_case(teachers=teachers)
    weights = call(name, teacher_logits, labels, student_logits)
    assert weights.shape == (8, teachers) and weights.dtype == np.float32
    assert np.all(weights >= 0.0)
    np.testing.assert_allclose(weights.sum(axis=1), teachers, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_one_teacher_gets_weight_one(name):
    teacher_logits, labels, student_logits = random_case(teachers=1)
    np.testing.assert_array_equal(call(name, teacher_logits, labels, student_logits), np.ones((8, 1)))


@pytest.mark.parametrize("name", NAMES)
def test_identical_teachers_get_equal_weights(name):
    teacher_logits, labels, student_logits = random_case(teachers=1)
    same = np.repeat(teacher_logits, 3, axis=0)
    np.testing.assert_allclose(call(name, same, labels, student_logits), np.ones((8, 3)), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_give_finite_weights_close_to_float32(name, dtype):
    teacher_logits, labels, student_logits = random_case()
    half_teachers = [keras.ops.cast(z, dtype) for z in teacher_logits]
    half_student = keras.ops.cast(student_logits, dtype)
    half = as_numpy(weighting.weights(name, half_teachers, labels=labels,
                                      student_logits=half_student, temperature=4.0))
    assert half.dtype == np.float32 and np.all(np.isfinite(half))
    # The weights of the rounded logits are those of the same values in float32 ...
    rounded = [as_numpy(keras.ops.cast(z, "float32")) for z in half_teachers]
    exact = call(name, rounded, labels, as_numpy(keras.ops.cast(half_student, "float32")))
    np.testing.assert_allclose(half, exact, atol=1e-6)
    # ... and close to the float32 logits' weights (bfloat16 keeps 8 bits: logits ~ 3 move 1%).
    tolerance = 0.02 if dtype == "float16" else 0.15
    np.testing.assert_allclose(half, call(name, teacher_logits, labels, student_logits),
                               atol=tolerance)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_extreme_half_precision_logits_give_finite_weights(name, dtype):
    limit = 60000.0 if dtype == "float16" else 1e30
    teacher_logits = np.zeros((3, 4, 5), "float32")
    teacher_logits[0, :, 0] = limit
    teacher_logits[1, :, 1] = -limit
    teacher_logits[2, :, 2] = limit
    teacher_logits[2, :, 3] = -limit
    half = [keras.ops.cast(z, dtype) for z in teacher_logits]
    weights = as_numpy(weighting.weights(name, half, labels=np.array([0, 1, 2, 3]),
                                         student_logits=keras.ops.cast(teacher_logits[1], dtype)))
    assert np.all(np.isfinite(weights))
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_stacked_tensor_gives_the_same_weights_as_a_list(name):
    teacher_logits, labels, student_logits = random_case()
    stacked = as_numpy(weighting.weights(name, keras.ops.convert_to_tensor(teacher_logits),
                                         labels=labels, student_logits=student_logits,
                                         temperature=4.0))
    np.testing.assert_array_equal(stacked, call(name, teacher_logits, labels, student_logits))


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_flows_through_the_weights(name):
    teacher_logits, labels, student_logits = random_case()
    coefficients = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")

    def weighted(teachers, student):
        return keras.ops.sum(coefficients * weighting.weights(
            name, teachers, labels=labels, student_logits=student, temperature=4.0))

    for gradient in gradients(weighted, teacher_logits, student_logits):
        assert gradient is None or not np.any(gradient)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_weights_match_eager_ones(name):
    teacher_logits, labels, student_logits = random_case()

    def compute(teachers, student):
        return weighting.weights(name, teachers, labels=labels, student_logits=student,
                                 temperature=4.0)

    compiled = as_numpy(compile_function(compute)(teacher_logits, student_logits))
    np.testing.assert_allclose(compiled, call(name, teacher_logits, labels, student_logits),
                               atol=1e-5)


def compile_function(function):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(function)
    import tensorflow as tf

    return tf.function(function, jit_compile=False)


# -- confidence (CA-MKD) ---------------------------------------------------------------


@pytest.mark.parametrize("teachers", [2, 3, 5])
def test_confidence_is_ca_mkd_rescaled(teachers):
    teacher_logits, labels, student_logits = random_case(teachers=teachers)
    np.testing.assert_allclose(call("confidence", teacher_logits, labels, student_logits),
                               reference_confidence(teacher_logits, labels), atol=2e-5)


def test_confidence_favours_the_right_teacher_by_e_to_the_margin():
    # Right: margin 2 on the label; wrong: margin 2 on another class. Their cross-entropies
    # differ by 2, so softmax over teachers gives the right one sigma(-2): w = 2 sigma(+-2).
    labels = np.array([0, 1, 2, 3])
    right = np.zeros((4, 5), "float32")
    right[np.arange(4), labels] = 2.0
    wrong = np.zeros((4, 5), "float32")
    wrong[np.arange(4), labels + 1] = 2.0
    weights = call("confidence", [right, wrong], labels, None)
    sigma = 1.0 / (1.0 + np.exp(-2.0))
    np.testing.assert_allclose(weights, np.tile([2 * sigma, 2 * (1 - sigma)], (4, 1)), rtol=1e-6)
    np.testing.assert_allclose(weights[:, 0] / weights[:, 1], np.exp(2.0), rtol=1e-5)


def test_confidence_one_hot_labels_equal_integer_labels():
    teacher_logits, labels, student_logits = random_case()
    one_hot = np.eye(6, dtype="float32")[labels]
    np.testing.assert_array_equal(call("confidence", teacher_logits, one_hot, student_logits),
                                  call("confidence", teacher_logits, labels, student_logits))


def test_confidence_needs_labels():
    teacher_logits, _, _ = random_case()
    with pytest.raises(ValueError, match="labels"):
        weighting.confidence(list(teacher_logits))


# -- entropy (EBKD) ---------------------------------------------------------------------


@pytest.mark.parametrize("teachers", [2, 3, 5])
def test_entropy_is_ebkd_rescaled(teachers):
    teacher_logits, labels, student_logits = random_case(teachers=teachers)
    np.testing.assert_allclose(call("entropy", teacher_logits, labels, student_logits),
                               reference_entropy(teacher_logits), atol=2e-5)


def test_entropy_favours_the_confident_teacher():
    confident = np.zeros((4, 5), "float32")
    confident[:, 1] = 6.0
    uniform = np.zeros((4, 5), "float32")
    weights = call("entropy", [confident, uniform], None, None)
    probabilities = np.exp(log_softmax(confident[0]))
    certain = -(probabilities * np.log(probabilities)).sum()
    expected = 2.0 * (1.0 - certain / (certain + np.log(5.0)))
    np.testing.assert_allclose(weights, np.tile([expected, 2.0 - expected], (4, 1)), rtol=1e-5)
    assert expected > 1.8


def test_entropy_of_certain_teachers_is_equal_weights():
    # Margins of 1e4: every softmax is one-hot in float32, every entropy 0.
    certain = np.zeros((3, 4, 5), "float32")
    certain[0, :, 0] = certain[1, :, 2] = certain[2, :, 4] = 1e4
    weights = call("entropy", certain, None, None)
    np.testing.assert_array_equal(weights, np.ones((4, 3)))


# -- agreement (AE-KD) ------------------------------------------------------------------


@pytest.mark.parametrize("teachers,seed", [(2, 0), (3, 1), (3, 2), (5, 3), (5, 4)])
@pytest.mark.parametrize("bound", [0.6, 1.0])
def test_agreement_matches_an_independent_solver(teachers, seed, bound):
    teacher_logits, labels, student_logits = random_case(teachers=teachers, seed=seed, classes=8)
    weights = call("agreement", teacher_logits, labels, student_logits, bound=bound)
    np.testing.assert_allclose(weights, np.tile(weights[:1], (8, 1)))  # one set per batch
    gram = agreement_gram(teacher_logits, student_logits, 4.0)
    cap = agreement_cap(bound, teachers)
    reference = slsqp_shares(gram, cap)
    shares = weights[0].astype(np.float64) / teachers
    assert np.all(shares <= cap + 1e-6)
    assert objective(gram, shares) <= objective(gram, reference) + 1e-6
    np.testing.assert_allclose(shares, reference, atol=2e-3)


@pytest.mark.parametrize("teachers", [2, 3])
def test_agreement_matches_an_exhaustive_grid(teachers):
    teacher_logits, labels, student_logits = random_case(teachers=teachers, seed=11, classes=4)
    cap = agreement_cap(0.6, teachers)
    gram = agreement_gram(teacher_logits, student_logits, 4.0)
    best = grid_shares(gram, cap)
    shares = call("agreement", teacher_logits, labels, student_logits)[0] / teachers
    assert objective(gram, shares) <= objective(gram, best) + 1e-6
    np.testing.assert_allclose(shares, best, atol=2e-3 if teachers == 2 else 4e-3)


def test_agreement_cap_binds_and_a_cap_below_one_over_k_is_equal_weights():
    # Two teachers agree with each other and disagree with a third: the smallest combined
    # gradient leans on the third, up to the cap.
    teacher_logits, labels, student_logits = random_case(teachers=3, seed=5)
    teacher_logits[1] = teacher_logits[0]
    for bound in (0.5, 0.4):
        weights = call("agreement", teacher_logits, labels, student_logits, bound=bound)[0]
        assert np.max(weights) <= 3 * bound + 1e-5
    np.testing.assert_allclose(
        call("agreement", teacher_logits, labels, student_logits, bound=0.2), np.ones((8, 3)),
        atol=1e-6)


def test_agreement_of_a_student_equal_to_every_teacher_is_equal_weights():
    teacher_logits, labels, _ = random_case(teachers=1)
    same = np.repeat(teacher_logits, 3, axis=0)
    same[1] += 5.0  # softmax is shift-invariant: the same predictions, zero gradients
    np.testing.assert_allclose(call("agreement", same, labels, teacher_logits[0]),
                               np.ones((8, 3)), atol=1e-6)


def test_capped_simplex_projection_against_brute_force():
    rng = np.random.default_rng(3)
    for teachers, cap in itertools.product([2, 3, 5], [0.5, 1.0]):
        cap = max(cap, 1.0 / teachers)
        for _ in range(5):
            point = rng.normal(size=teachers).astype("float32") * 2
            projected = as_numpy(weighting.project_onto_capped_simplex(
                keras.ops.convert_to_tensor(point), cap))
            # tau by bisection on sum(clip(point - tau, 0, cap)) = 1, in float64.
            low, high = point.min() - cap - 1.0, point.max() + 1.0
            for _ in range(200):
                tau = (low + high) / 2
                low, high = (tau, high) if np.clip(point - tau, 0, cap).sum() > 1 else (low, tau)
            np.testing.assert_allclose(projected, np.clip(point - tau, 0, cap), atol=1e-6)


def test_agreement_needs_the_student():
    teacher_logits, labels, _ = random_case()
    with pytest.raises(ValueError, match="student"):
        weighting.agreement(list(teacher_logits), labels)


# -- the registry -----------------------------------------------------------------------


def test_the_registry_names_every_weighting():
    assert set(weighting.WEIGHTINGS) == set(NAMES)
    for name in NAMES:
        assert weighting.get(name) is weighting.WEIGHTINGS[name]
    assert weighting.get(weighting.entropy) is weighting.entropy


def test_an_unknown_name_is_a_one_line_error_naming_the_choices():
    with pytest.raises(ValueError) as error:
        weighting.get("softmax")
    message = str(error.value)
    assert "\n" not in message and "'softmax'" in message
    assert all(name in message for name in NAMES)


def test_equal_is_ones():
    teacher_logits, labels, student_logits = random_case(teachers=4)
    np.testing.assert_array_equal(call("equal", teacher_logits, labels, student_logits),
                                  np.ones((8, 4)))
