"""The distiller weighs its teachers per example as NumPy computes it from the models.

With `teacher_weighting`, the weights w (batch, K) come from the teachers' logits
and the labels (NumPy transcriptions of CA-MKD's and EBKD's formulas in
`test_weighting.py`), and the logged terms are

    feed_loss_n      = mean_batch( w_n * mean_elements | t_n/||t_n|| - NTL_n(x_S)/||NTL_n(x_S)|| | )
    kd_loss          = T^2 * mean_batch KL( sum_n (w_n / K) softmax(z_n / T) || softmax(s / T) )
    teacher_weight_n = mean_batch w_n

computed here from the models' own outputs by plain Keras calls; `equal` gives the
unweighted terms of `test_logged_terms.py` exactly.
"""

import numpy as np
import pytest
from test_logged_terms import (
    BATCH,
    as_numpy,
    assert_terms_match,
    batch,
    cross_entropy_from_logits,
    log_softmax,
    make_distiller,
    model_outputs,
    softmax,
    weight_decay_reference,
)
from test_weighting import reference_confidence, reference_entropy

REFERENCES = {
    "confidence": reference_confidence,
    "entropy": lambda teacher_logits, labels: reference_entropy(teacher_logits),
}


def weighted_terms(distiller, student, teachers, images, labels, reference, *, training):
    """Every logged term, in NumPy, with the teachers weighted by `reference`."""
    student_map, student_logits, _ = model_outputs(student, images, training=training)
    outputs = [model_outputs(teacher, images, training=False) for teacher in teachers]
    teacher_logits = [logits for _, logits, _ in outputs]
    weights = reference(np.stack(teacher_logits), labels)  # (batch, K), rows sum to K
    count = len(teachers)
    terms = {"student_loss": cross_entropy_from_logits(labels, student_logits)}
    for index, ((teacher_map, _, _), translator) in enumerate(zip(outputs, distiller.translators)):
        translated = as_numpy(translator(student_map.astype("float32"), training=training))
        flat = [m.reshape(len(m), -1) for m in (teacher_map, translated)]
        unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in flat]
        distances = np.mean(np.abs(unit[0] - unit[1]), axis=1)
        terms[f"feed_loss_{index}"] = float(np.mean(weights[:, index] * distances))
        terms[f"teacher_weight_{index}"] = float(np.mean(weights[:, index]))
    temperature = distiller.temperature
    targets = sum(weights[:, [index]] / count * softmax(logits / temperature)
                  for index, logits in enumerate(teacher_logits))
    kl = np.sum(targets * (np.log(targets) - log_softmax(student_logits / temperature)), axis=-1)
    terms["kd_loss"] = float(np.mean(kl) * temperature**2)
    variables = student.trainable_weights + [
        w for translator in distiller.translators for w in translator.trainable_weights]
    terms["weight_decay_loss"] = weight_decay_reference(variables, distiller.weight_decay)
    terms["loss"] = ((1.0 - distiller.kd_weight) * terms["student_loss"]
                     + distiller.beta * sum(terms[f"feed_loss_{i}"] for i in range(count))
                     + distiller.kd_weight * terms["kd_loss"] + terms["weight_decay_loss"])
    return terms, weights


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_evaluate_logs_the_weighted_terms_and_each_teacher_s_mean_weight(name):
    distiller, student, teachers = make_distiller(teacher_weighting=name)
    images, labels = batch(seed=5)
    logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    expected, weights = weighted_terms(distiller, student, teachers, images, labels,
                                       REFERENCES[name], training=False)
    assert set(logged) == set(expected)
    assert_terms_match(logged, expected)
    assert np.ptp(weights[:, 0]) > 0.05, "the weights vary over the batch: a real test"


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_one_training_step_logs_the_weighted_terms(name):
    distiller, student, teachers = make_distiller(teacher_weighting=name)
    images, labels = batch(seed=6)
    expected, _ = weighted_terms(distiller, student, teachers, images, labels,
                                 REFERENCES[name], training=True)
    history = distiller.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert_terms_match({key: values[-1] for key, values in history.history.items()}, expected)


def test_equal_weighting_is_the_unweighted_loss_and_logs_no_weights():
    images, labels = batch(seed=7)
    logged = {}
    for weighting in ("equal", None):
        settings = {} if weighting is None else {"teacher_weighting": weighting}
        distiller, _, _ = make_distiller(**settings)
        logged[weighting] = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0,
                                               return_dict=True)
    assert logged["equal"] == logged[None]
    assert not any(name.startswith("teacher_weight") for name in logged["equal"])


def test_an_unknown_weighting_is_one_line():
    with pytest.raises(ValueError, match="teacher weighting 'nope'"):
        make_distiller(teacher_weighting="nope")
