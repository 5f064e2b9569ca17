"""Distillation terms as objects: the default terms, CA-MKD's KD form, a user's own term.

Checked against NumPy from the models' own outputs (the references of
`test_logged_terms.py`), and against a transcription of CA-MKD's training loop
(`helper/loops.py`, `ensemble_method == 'CAMKD'`, with `DistillKL(is_ca=True)`):

    attention = (1 - softmax_k(L)) / (K - 1)                     # (K, batch), columns sum to 1
    loss_div  = sum_{k,i} attention_ki * T^2 KL(p_ki || q_i) / (batch * K)

keras-feed's weights are K times CA-MKD's attention (rows sum to K), so its
`per_teacher` KD term is `K * loss_div`.
"""

import re

import keras
import numpy as np
import pytest
from conftest import tiny_net
from test_logged_terms import (
    BATCH,
    BETA,
    CLASSES,
    KD_WEIGHT,
    SHAPE,
    TEMPERATURE,
    WEIGHT_DECAY,
    as_numpy,
    assert_terms_match,
    batch,
    expected_terms,
    log_softmax,
    make_teachers,
    model_outputs,
    sharpen_head,
    softmax,
    student_cross_entropy,
)

import keras_feed as kf
from keras_feed.core import terms as terms_lib


def make_student():
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    sharpen_head(student, 3.0)
    return student


def compiled(distiller):
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return distiller


# -- the default terms ----------------------------------------------------------------


def test_terms_as_objects_log_what_numpy_computes_from_the_models():
    student, teachers = make_student(), make_teachers()
    distiller = compiled(kf.FEEDDistiller(
        student, teachers, weight_decay=WEIGHT_DECAY,
        terms=[kf.terms.FeatureTerm(BETA), kf.terms.KDTerm(KD_WEIGHT, temperature=TEMPERATURE)]))
    images, labels = batch(seed=11)
    logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                              student_loss=student_cross_entropy)
    assert set(logged) == set(expected)
    assert_terms_match(logged, expected)


def test_the_keyword_arguments_build_the_same_terms_and_the_same_numbers():
    images, labels = batch(seed=12)
    logged, configs = [], []
    for use_terms in (False, True):
        keras.utils.set_random_seed(3)  # the same initial NTLs
        student, teachers = make_student(), make_teachers()
        if use_terms:
            distiller = kf.FEEDDistiller(student, teachers, weight_decay=WEIGHT_DECAY, terms=[
                kf.terms.FeatureTerm(BETA), kf.terms.KDTerm(KD_WEIGHT, temperature=TEMPERATURE)])
        else:
            distiller = kf.FEEDDistiller(student, teachers, beta=BETA, kd_weight=KD_WEIGHT,
                                         temperature=TEMPERATURE, weight_decay=WEIGHT_DECAY)
        compiled(distiller)
        logged.append(distiller.evaluate(images, labels, batch_size=BATCH, verbose=0,
                                         return_dict=True))
        configs.append(distiller.get_config())
    assert logged[0] == logged[1]
    assert configs[0] == configs[1]
    described = configs[0]
    assert [term["class"] for term in described["terms"]] == ["FeatureTerm", "KDTerm"]
    assert described["terms"][0]["config"]["weight"] == BETA
    assert described["terms"][1]["config"] == {"weight": KD_WEIGHT, "temperature": TEMPERATURE,
                                               "form": "ensemble", "name": "kd_loss"}
    assert described["teacher_weighting"] == "equal"
    assert described["teachers"] == ["teacher_0", "teacher_1"]


def test_a_term_is_rebuilt_from_its_config():
    term = kf.terms.KDTerm(0.7, temperature=2.0, form="per_teacher")
    again = kf.terms.KDTerm.from_config(term.get_config())
    assert again.get_config() == term.get_config()
    feature = kf.terms.FeatureTerm(250.0, translator_batchnorm=True, name="ft_loss")
    assert kf.terms.FeatureTerm.from_config(feature.get_config()).get_config() == feature.get_config()


# -- CA-MKD's KD form -----------------------------------------------------------------


def camkd_loss_div(teacher_logits, student_logits, labels, temperature, method):
    """CA-MKD's `loss_div` (helper/loops.py) in NumPy, for `CAMKD` and `AVERAGE_LOSS`."""
    log_q = log_softmax(student_logits / temperature)
    kl = np.stack([  # DistillKL(is_ca=True): (batch,) per teacher
        np.sum(softmax(z / temperature) * (np.log(softmax(z / temperature)) - log_q), axis=-1)
        * temperature**2 for z in teacher_logits])
    count, size = kl.shape
    if method == "AVERAGE_LOSS":
        return float(np.mean(kl.mean(axis=1)))
    loss_t = np.stack([-log_softmax(z)[np.arange(size), labels] for z in teacher_logits])
    attention = (1.0 - softmax(loss_t.T).T) / (count - 1)
    return float(np.sum(attention * kl) / (size * count))


@pytest.mark.parametrize("weighting, method, factor", [
    ("equal", "AVERAGE_LOSS", 1.0), ("confidence", "CAMKD", 2.0)])
def test_the_per_teacher_kd_form_is_camkd_s(weighting, method, factor):
    student, teachers = make_student(), make_teachers()
    distiller = compiled(kf.FEEDDistiller(
        student, teachers, beta=0.0, kd_weight=KD_WEIGHT, temperature=TEMPERATURE,
        kd_form="per_teacher", teacher_weighting=weighting))
    images, labels = batch(seed=13)
    logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    teacher_logits = [model_outputs(t, images, training=False)[1] for t in teachers]
    student_logits = model_outputs(student, images, training=False)[1]
    expected = factor * camkd_loss_div(teacher_logits, student_logits, labels, TEMPERATURE, method)
    assert logged["kd_loss"] == pytest.approx(expected, rel=2e-4)
    # Not the ensemble form: the two differ on these teachers.
    ensemble = compiled(kf.FEEDDistiller(
        student, teachers, beta=0.0, kd_weight=KD_WEIGHT, temperature=TEMPERATURE,
        teacher_weighting=weighting))
    other = ensemble.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    assert abs(other["kd_loss"] - logged["kd_loss"]) > 0.01 * logged["kd_loss"]


def test_both_kd_forms_agree_for_one_teacher():
    student, (teacher, _) = make_student(), make_teachers()
    images, labels = batch(seed=14)
    values = []
    for form in terms_lib.KD_FORMS:
        distiller = compiled(kf.FEEDDistiller(student, [teacher], beta=0.0, kd_weight=0.5,
                                              kd_form=form))
        values.append(distiller.evaluate(images, labels, batch_size=BATCH, verbose=0,
                                         return_dict=True)["kd_loss"])
    assert values[0] == pytest.approx(values[1], rel=1e-6)


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"terms": [kf.terms.FeatureTerm(1.0)], "beta": 3.0}, "either terms= or"),
    ({"terms": ["feed"]}, "is not a keras_feed.core.terms.Term"),
    ({"terms": [kf.terms.KDTerm(0.6), kf.terms.KDTerm(0.6, form="per_teacher")]},
     "take 1.2 of the student's loss"),
    ({"terms": []}, "terms=\\[\\] uses none"),
    ({"kd_form": "mean"}, "Unknown KD form 'mean'"),
    ({"kd_form": "per_teacher"}, "kd_form='per_teacher' shapes the KD term, and kd_weight=0"),
])
def test_bad_terms_are_one_line(settings, message):
    student, teachers = make_student(), make_teachers()
    with pytest.raises((ValueError, TypeError), match=message) as error:
        kf.FEEDDistiller(student, teachers, **settings)
    assert "\n" not in str(error.value)


def test_a_term_serves_one_distiller():
    """A second distiller would rebuild the term's NTLs under the first one's feet."""
    term = kf.terms.FeatureTerm(1.0)
    kf.FEEDDistiller(make_student(), make_teachers(), terms=[term])
    with pytest.raises(ValueError, match="already belongs to a FEEDDistiller"):
        kf.FEEDDistiller(make_student(), make_teachers(), terms=[term])


def test_a_term_without_teachers_is_refused():
    with pytest.raises(ValueError, match="FeatureTerm needs at least one teacher"):
        kf.FEEDDistiller(make_student(), [], terms=[kf.terms.FeatureTerm(1.0)])


@pytest.mark.parametrize("make, message", [
    (lambda: kf.terms.KDTerm(1.5), r"kd_weight must lie in \[0, 1\], got 1.5"),
    (lambda: kf.terms.KDTerm(0.5, temperature=0), "temperature must be finite and > 0"),
    (lambda: kf.terms.FeatureTerm(float("nan")), "FeatureTerm weight must be finite"),
    (lambda: kf.terms.FeatureTerm(-1.0), "FeatureTerm weight must be finite and >= 0"),
])
def test_a_term_refuses_its_settings_out_of_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- a user's own term, as the README writes it ---------------------------------------


def readme_term():
    """The `AttentionTransfer` class of the README's "Your own distillation term"."""
    with open("README.md", encoding="utf-8") as handle:
        text = handle.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "class AttentionTransfer" in b]
    source = block[:block.index("\ndistiller = ")]  # the class alone: the models are the test's
    namespace = {"kf": kf}
    exec(compile(source, "README.md (AttentionTransfer)", "exec"), namespace)  # noqa: S102
    return namespace["AttentionTransfer"]


def attention_reference(student_map, teacher_map):
    """Zagoruyko & Komodakis' at_loss: mean over batch and positions of the squared
    difference of the normalised attention maps (mean over channels of the squares)."""
    def attention(features):
        flat = np.mean(features**2, axis=-1).reshape(len(features), -1)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    return float(np.mean((attention(student_map) - attention(teacher_map)) ** 2))


def test_a_term_written_in_user_code_logs_its_numpy_value_and_trains_through_fit(monkeypatch):
    import os

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    attention_transfer = readme_term()
    student, teachers = make_student(), make_teachers()
    distiller = kf.FEEDDistiller(
        student, teachers, terms=[kf.terms.FeatureTerm(BETA), attention_transfer(1000.0)])
    distiller.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
    images, labels = batch(seed=15)
    before = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    student_map = model_outputs(student, images, training=False)[0]
    for index, teacher in enumerate(teachers):
        expected = attention_reference(student_map, model_outputs(teacher, images, training=False)[0])
        assert before[f"at_loss_{index}"] == pytest.approx(expected, rel=2e-4)
    history = distiller.fit(images, labels, batch_size=BATCH, epochs=8, shuffle=False, verbose=0)
    assert {"at_loss_0", "at_loss_1", "feed_loss_0", "feed_loss_1", "accuracy"} <= set(history.history)
    after = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    assert after["at_loss_0"] < 0.9 * before["at_loss_0"]  # its gradient reaches the student
    assert [t["class"] for t in distiller.get_config()["terms"]] == ["FeatureTerm",
                                                                     "AttentionTransfer"]
    assert as_numpy(after["loss"]) == pytest.approx(
        after["student_loss"] + BETA * (after["feed_loss_0"] + after["feed_loss_1"])
        + 1000.0 * (after["at_loss_0"] + after["at_loss_1"]), rel=1e-4)
