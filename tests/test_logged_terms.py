"""The distiller's logged terms equal NumPy computations from the models' own outputs.

Each term `FEEDDistiller` logs (`student_loss`, every `feed_loss_<n>`,
`kd_loss`, `weight_decay_loss` and the total `loss`) is recomputed here in
float64 NumPy from the paper's formulas, with inputs read by plain Keras calls:
the teachers' and the student's logits and feature maps, the NTLs' outputs on
the student's map, and the trainable weights of the student and the NTLs.

    feed_loss_n = mean_{batch, elements} | t_n / ||t_n||_2 - NTL_n(x_S) / ||NTL_n(x_S)||_2 |
    kd_loss     = T^2 * mean_batch KL(mean_n softmax(z_n / T) || softmax(s / T))
    weight_decay_loss = weight_decay / 2 * sum_w ||w||^2   (student and NTLs)
    loss = (1 - kd_weight) * student_loss + beta * sum_n feed_loss_n
           + kd_weight * kd_loss + weight_decay_loss

The helpers here are shared with `test_softmax_heads.py`.
"""

import keras
import numpy as np
import pytest
from conftest import tiny_net
from test_teacher_inference import randomise_batchnorm

from keras_feed import FEEDDistiller

CLASSES = 4
SHAPE = (16, 16, 3)
BATCH = 16
BETA = 10.0
KD_WEIGHT = 0.5
TEMPERATURE = 4.0
WEIGHT_DECAY = 1e-2


# -- NumPy references ---------------------------------------------------------------


def as_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def feed_reference(teacher_map, translated_map):
    """Per-example flatten, L2-normalise both maps, L1 as the mean over elements and batch."""
    def normalised(features):
        flat = features.reshape(len(features), -1)
        return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)

    return float(np.mean(np.abs(normalised(teacher_map) - normalised(translated_map))))


def kd_reference(teacher_logits, student_logits, temperature):
    """Hinton's T^2 * KL(ensemble soft targets at T || student softmax at T), batch mean."""
    soft_targets = np.mean([softmax(logits / temperature) for logits in teacher_logits], axis=0)
    student_log_probabilities = log_softmax(student_logits / temperature)
    kl = np.sum(soft_targets * (np.log(soft_targets) - student_log_probabilities), axis=-1)
    return float(np.mean(kl) * temperature**2)


def cross_entropy_from_logits(labels, logits):
    return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def cross_entropy_from_probabilities(labels, probabilities):
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


def weight_decay_reference(variables, weight_decay):
    """The documented coupled decay: weight_decay / 2 * sum of squared weights."""
    return float(0.5 * weight_decay * sum(np.sum(np.square(as_numpy(v))) for v in variables))


def model_outputs(model, images, *, training, logits_layer=None):
    """`(feature map, logits, output)` of `model` by a plain Keras call.

    `logits_layer` names the layer whose output is the pre-softmax logits
    (default: the model's own output, for a head without activation).
    """
    output = model.outputs[0]
    logits = output if logits_layer is None else model.get_layer(logits_layer).output
    reader = keras.Model(model.inputs[0], [model.get_layer("features").output, logits, output])
    return tuple(as_numpy(value) for value in reader(images, training=training))


def expected_terms(distiller, student, teachers, images, labels, *, training, student_loss,
                   logits_layers=None):
    """Every term the distiller logs for one batch, computed in NumPy.

    Args:
      distiller: the `FEEDDistiller` (its settings, and its NTL layers).
      student, teachers: the models it was built from.
      training: the mode the student runs in (True in a training step).
      student_loss: `f(labels, logits, outputs)`: the compiled loss in NumPy.
      logits_layers: `{model name: layer name}` of the pre-softmax logits of
        models ending in a separate softmax layer.
    """
    logits_layers = logits_layers or {}
    student_map, student_logits, student_outputs = model_outputs(
        student, images, training=training, logits_layer=logits_layers.get(student.name)
    )
    terms = {"student_loss": student_loss(labels, student_logits, student_outputs)}
    teacher_logits = []
    for index, teacher in enumerate(teachers):
        teacher_map, logits, _ = model_outputs(
            teacher, images, training=False, logits_layer=logits_layers.get(teacher.name)
        )
        teacher_logits.append(logits)
        if distiller.beta > 0:
            translator = distiller.translators[index]
            translated = as_numpy(translator(student_map.astype("float32"), training=training))
            terms[f"feed_loss_{index}"] = feed_reference(teacher_map, translated)
    if distiller.kd_weight > 0:
        terms["kd_loss"] = kd_reference(teacher_logits, student_logits, distiller.temperature)
    if distiller.weight_decay > 0:
        variables = student.trainable_weights + [
            weight for translator in distiller.translators for weight in translator.trainable_weights
        ]
        terms["weight_decay_loss"] = weight_decay_reference(variables, distiller.weight_decay)
    terms["loss"] = (
        (1.0 - distiller.kd_weight) * terms["student_loss"]
        + distiller.beta * sum(value for name, value in terms.items() if name.startswith("feed_loss_"))
        + distiller.kd_weight * terms.get("kd_loss", 0.0)
        + terms.get("weight_decay_loss", 0.0)
    )
    return terms


def assert_terms_match(logged, expected, rtol=2e-4, atol=1e-6):
    """Every expected term is logged, with the NumPy value."""
    missing = set(expected) - set(logged)
    assert not missing, f"terms not logged: {sorted(missing)} (logged: {sorted(logged)})"
    for name, value in expected.items():
        assert float(logged[name]) == pytest.approx(value, rel=rtol, abs=atol), (
            f"logged {name} = {float(logged[name]):.8g}, NumPy from the models' outputs "
            f"gives {value:.8g}"
        )


# -- the models ---------------------------------------------------------------------


def batch(count=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count,) + SHAPE).astype("float32")
    return images, rng.integers(0, CLASSES, size=count).astype("int32")


def sharpen_head(model, factor, layer=None):
    """Scales the last Dense layer's kernel: logits spread far enough that T matters."""
    dense = model.get_layer(layer) if layer else model.layers[-1]
    dense.kernel.assign(as_numpy(dense.kernel) * factor)


def make_teachers():
    """Two teachers of other widths, BatchNorm statistics far from their initial values."""
    teachers = []
    for index in range(2):
        teacher = tiny_net(f"teacher_{index}", width=12 + 4 * index, classes=CLASSES,
                           input_shape=SHAPE, seed=10 + index)
        randomise_batchnorm(teacher, index)
        sharpen_head(teacher, 6.0)
        teachers.append(teacher)
    return teachers


def make_distiller(**settings):
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    sharpen_head(student, 3.0)
    teachers = make_teachers()
    settings = {"beta": BETA, "kd_weight": KD_WEIGHT, "temperature": TEMPERATURE,
                "weight_decay": WEIGHT_DECAY, **settings}
    distiller = FEEDDistiller(student, teachers, **settings)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return distiller, student, teachers


def student_cross_entropy(labels, logits, _):
    return cross_entropy_from_logits(labels, logits)


# -- the tests ----------------------------------------------------------------------


def test_reference_soft_targets_depend_on_the_temperature():
    """The KD reference itself tells T apart from 1 on these teachers."""
    images, _ = batch()
    teachers = make_teachers()
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    logits = [model_outputs(t, images, training=False)[1] for t in teachers]
    student_logits = model_outputs(student, images, training=False)[1]
    at_t = kd_reference(logits, student_logits, TEMPERATURE)
    # softmax(T * z / T) = softmax(z): the teachers' soft targets at temperature 1.
    teachers_at_one = kd_reference([TEMPERATURE * z for z in logits], student_logits, TEMPERATURE)
    assert abs(at_t - teachers_at_one) > 0.5 * at_t


def test_evaluate_logs_every_term_as_numpy_computes_it():
    distiller, student, teachers = make_distiller()
    images, labels = batch()
    logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                              student_loss=student_cross_entropy)
    assert set(logged) == set(expected)
    assert_terms_match(logged, expected)


def test_test_on_batch_logs_every_term_as_numpy_computes_it():
    distiller, student, teachers = make_distiller(temperature=2.5, kd_weight=0.8, beta=3.0)
    images, labels = batch(seed=1)
    logged = distiller.test_on_batch(images, labels, return_dict=True)
    expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                              student_loss=student_cross_entropy)
    assert_terms_match(logged, expected)


def test_one_training_step_logs_the_terms_of_the_weights_it_started_from():
    """`fit` for one step logs the terms of the batch before the update (student in training mode)."""
    distiller, student, teachers = make_distiller()
    images, labels = batch(seed=2)
    expected = expected_terms(distiller, student, teachers, images, labels, training=True,
                              student_loss=student_cross_entropy)
    before = [as_numpy(w) for w in distiller.trainable_weights]
    history = distiller.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    logged = {name: values[-1] for name, values in history.history.items()}
    assert set(logged) == set(expected)
    assert_terms_match(logged, expected)
    after = [as_numpy(w) for w in distiller.trainable_weights]
    assert any(not np.array_equal(old, new) for old, new in zip(before, after))  # it trained


def test_kd_alone_and_feed_alone_log_their_terms_as_numpy_computes_them():
    images, labels = batch(seed=3)
    for settings in ({"beta": 0.0, "weight_decay": 0.0}, {"kd_weight": 0.0, "weight_decay": 0.0}):
        distiller, student, teachers = make_distiller(**settings)
        logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
        expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                                  student_loss=student_cross_entropy)
        assert set(logged) == set(expected), settings
        assert_terms_match(logged, expected)


def test_weight_decay_counts_the_student_and_the_ntls_only():
    distiller, student, teachers = make_distiller()
    images, labels = batch(seed=4)
    logged = distiller.evaluate(images, labels, batch_size=BATCH, verbose=0, return_dict=True)
    student_part = weight_decay_reference(student.trainable_weights, WEIGHT_DECAY)
    ntl_part = weight_decay_reference(
        [w for translator in distiller.translators for w in translator.trainable_weights], WEIGHT_DECAY
    )
    assert ntl_part > 0 and student_part > 0
    assert logged["weight_decay_loss"] == pytest.approx(student_part + ntl_part, rel=1e-5)
    teacher_part = weight_decay_reference([w for t in teachers for w in t.weights], WEIGHT_DECAY)
    assert logged["weight_decay_loss"] != pytest.approx(student_part + ntl_part + teacher_part, rel=1e-3)
