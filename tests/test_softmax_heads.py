"""Heads made of a separate `Softmax()` or `Activation("softmax")` layer after a linear Dense.

The FEED and KD terms read the pre-softmax logits (the Dense layer's output);
`predict`, the compiled loss and the compiled metrics get the probabilities the
model outputs, exactly as `student.compile` would. Every logged value is
checked against NumPy computed from the models' own outputs.
"""

import keras
import numpy as np
import pytest
from test_logged_terms import (
    CLASSES,
    SHAPE,
    as_numpy,
    assert_terms_match,
    batch,
    cross_entropy_from_logits,
    cross_entropy_from_probabilities,
    expected_terms,
    model_outputs,
    sharpen_head,
    softmax,
)
from test_teacher_inference import randomise_batchnorm

from keras_feed import FEEDDistiller

HEADS = {
    "Softmax": lambda: keras.layers.Softmax(name="probabilities"),
    "Activation": lambda: keras.layers.Activation("softmax", name="probabilities"),
    "logits": None,
}


def classifier(name, head, *, width=8, seed=0, sequential=False):
    """Conv-BN-ReLU("features") -> pool -> Dense("logits") [-> a separate softmax layer]."""
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Conv2D(width, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(name="features"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES, name="logits"),
    ]
    if HEADS[head] is not None:
        layers.append(HEADS[head]())
    if sequential:
        return keras.Sequential([keras.Input(SHAPE), *layers], name=name)
    outputs = inputs = keras.Input(SHAPE)
    for layer in layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=name)


def softmax_head_case(student_head, teacher_heads, *, sequential=False, loss="auto"):
    """A distiller with FEED, KD (T=4) and weight decay on the given heads, compiled.

    `loss="auto"`: "sparse_categorical_crossentropy" (from probabilities) for a
    softmax student, the default loss for a logits one; None: the default loss.
    """
    student = classifier("student", student_head, sequential=sequential)
    sharpen_head(student, 3.0, "logits")
    teachers = []
    for index, head in enumerate(teacher_heads):
        teacher = classifier(f"teacher_{index}", head, width=12 + 4 * index, seed=10 + index)
        randomise_batchnorm(teacher, index)
        sharpen_head(teacher, 6.0, "logits")
        teachers.append(teacher)
    distiller = FEEDDistiller(student, teachers, beta=10.0, kd_weight=0.5, temperature=4.0,
                              weight_decay=1e-3)
    softmax_student = HEADS[student_head] is not None
    if loss == "auto":
        loss = "sparse_categorical_crossentropy" if softmax_student else None
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.02, momentum=0.9),
        loss=loss,
        metrics=["accuracy",
                 keras.metrics.SparseCategoricalCrossentropy(from_logits=not softmax_student, name="ce")],
    )
    return distiller, student, teachers


def logits_layers(student, teachers):
    """Every model's pre-softmax logits are its Dense layer "logits"."""
    return {model.name: "logits" for model in (student, *teachers)}


def probability_loss(labels, logits, outputs):
    """The compiled loss of a softmax student: cross-entropy of the probabilities it outputs."""
    np.testing.assert_allclose(outputs, softmax(logits), rtol=1e-4, atol=1e-6)
    return cross_entropy_from_probabilities(labels, outputs)


def logits_loss(labels, logits, outputs):
    np.testing.assert_array_equal(outputs, logits)
    return cross_entropy_from_logits(labels, logits)


CASES = [
    pytest.param("Softmax", ("Activation", "logits"), False, id="softmax_student-activation_and_logits_teachers"),
    pytest.param("Activation", ("Softmax", "Softmax"), True, id="sequential_activation_student-softmax_teachers"),
    pytest.param("logits", ("Softmax", "Activation"), False, id="logits_student-softmax_teachers"),
]


@pytest.mark.parametrize("student_head, teacher_heads, sequential", CASES)
def test_training_and_evaluation_read_logits_for_feed_and_kd_and_probabilities_elsewhere(
    student_head, teacher_heads, sequential
):
    distiller, student, teachers = softmax_head_case(student_head, teacher_heads, sequential=sequential)
    compiled_loss = probability_loss if HEADS[student_head] is not None else logits_loss
    images, labels = batch(24, seed=5)
    first, rest = (images[:8], labels[:8]), (images[8:], labels[8:])

    # One training step logs the terms of the weights it started from.
    expected = expected_terms(distiller, student, teachers, *first, training=True,
                              student_loss=compiled_loss, logits_layers=logits_layers(student, teachers))
    history = distiller.fit(*first, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_terms_match({name: values[-1] for name, values in history.history.items()}, expected)

    # A few more steps, then evaluation on what was learnt.
    history = distiller.fit(*rest, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert all(np.isfinite(values).all() for values in history.history.values())
    logged = distiller.evaluate(images, labels, batch_size=24, verbose=0, return_dict=True)
    expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                              student_loss=compiled_loss, logits_layers=logits_layers(student, teachers))
    assert_terms_match(logged, expected)

    # The compiled metrics get the student's own outputs.
    _, student_logits, outputs = model_outputs(student, images, training=False, logits_layer="logits")
    assert logged["ce"] == pytest.approx(cross_entropy_from_logits(labels, student_logits), rel=2e-4)
    assert logged["accuracy"] == pytest.approx(np.mean(np.argmax(student_logits, axis=1) == labels))

    # `predict` gives what the student outputs: probabilities for a softmax head.
    predictions = as_numpy(distiller.predict(images, batch_size=24, verbose=0))
    np.testing.assert_allclose(predictions, outputs, rtol=1e-5, atol=1e-6)
    if HEADS[student_head] is not None:
        np.testing.assert_allclose(predictions, softmax(student_logits), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("student_head", ["Softmax", "Activation"])
def test_the_default_loss_of_a_separate_softmax_head_is_cross_entropy_of_its_probabilities(student_head):
    distiller, student, teachers = softmax_head_case(student_head, ("logits",), loss=None)
    images, labels = batch(12, seed=6)
    logged = distiller.evaluate(images, labels, batch_size=12, verbose=0, return_dict=True)
    expected = expected_terms(distiller, student, teachers, images, labels, training=False,
                              student_loss=probability_loss, logits_layers=logits_layers(student, teachers))
    assert_terms_match(logged, expected)
