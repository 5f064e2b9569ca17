import h5py
import keras
import numpy as np
import pytest
from conftest import forward_passes, tiny_net

from keras_feed import FEEDDistiller

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow checkpoints"
)


def make_teachers(count, classes=4):
    return [tiny_net(f"teacher_{i}", width=12 + 4 * i, classes=classes, seed=10 + i) for i in range(count)]


def compiled(distiller, run_eagerly=False):
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"], run_eagerly=run_eagerly
    )
    return distiller


def test_structure_and_logged_terms(learnable_task):
    images, labels = learnable_task
    student = tiny_net("student", classes=4)
    distiller = compiled(FEEDDistiller(student, make_teachers(3), beta=10.0))
    assert distiller.student is student
    assert len(distiller.translators) == 3
    assert all(t.built for t in distiller.translators)
    assert [t.out_channels for t in distiller.translators] == [12, 16, 20]
    history = distiller.fit(images, labels, batch_size=64, epochs=1, verbose=0)
    terms = {"loss", "student_loss", "feed_loss_0", "feed_loss_1", "feed_loss_2", "accuracy"}
    assert set(history.history) == terms
    last = {k: v[-1] for k, v in history.history.items()}
    assert last["loss"] == pytest.approx(
        last["student_loss"] + 10.0 * sum(last[f"feed_loss_{i}"] for i in range(3)), rel=1e-4
    )
    results = distiller.evaluate(images, labels, verbose=0, return_dict=True)
    assert set(results) == terms  # evaluation reports the FEED terms too
    assert results["loss"] == pytest.approx(
        results["student_loss"] + 10.0 * sum(results[f"feed_loss_{i}"] for i in range(3)), rel=1e-4
    )


def test_distiller_learns_and_teachers_stay_frozen(learnable_task):
    images, labels = learnable_task
    teachers = make_teachers(2)
    before = [[w.numpy().copy() for w in t.weights] for t in teachers]
    distiller = compiled(FEEDDistiller(tiny_net("student", classes=4), teachers, beta=50.0, weight_decay=5e-4))
    history = distiller.fit(images, labels, batch_size=32, epochs=6, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    assert history.history["feed_loss_0"][-1] < history.history["feed_loss_0"][0]
    assert history.history["accuracy"][-1] > 0.6
    for teacher, weights in zip(teachers, before):
        assert not teacher.trainable
        for variable, old in zip(teacher.weights, weights):  # BN statistics included
            np.testing.assert_array_equal(variable.numpy(), old)


def test_student_runs_once_per_step(learnable_task):
    images, labels = learnable_task
    student = tiny_net("student", classes=4)
    calls = forward_passes(student.get_layer("features"))
    distiller = compiled(FEEDDistiller(student, make_teachers(2), beta=1.0), run_eagerly=True)
    distiller.fit(images[:96], labels[:96], batch_size=32, epochs=1, verbose=0)
    assert len(calls) == 3  # 3 steps, one student forward pass each


def test_teachers_not_in_checkpoints(tmp_path, learnable_task):
    images, labels = learnable_task
    teachers = make_teachers(2)
    distiller = compiled(FEEDDistiller(tiny_net("student", classes=4), teachers, beta=1.0))
    distiller.fit(images[:64], labels[:64], batch_size=32, epochs=1, verbose=0)
    teacher_ids = {id(v) for t in teachers for v in t.weights}
    assert not teacher_ids & {id(v) for v in distiller.weights}
    path = str(tmp_path / "distiller.weights.h5")
    distiller.save_weights(path)
    with h5py.File(path) as handle:
        stored = []
        handle.visit(stored.append)
    assert not any("teacher" in name for name in stored)


@tensorflow_only
def test_teachers_not_in_tensorflow_checkpoints(tmp_path):
    import tensorflow as tf  # noqa: PLC0415

    distiller = compiled(FEEDDistiller(tiny_net("student", classes=4), make_teachers(2), beta=1.0))
    checkpoint = tf.train.Checkpoint(model=distiller)
    saved = checkpoint.write(str(tmp_path / "ckpt"))
    shapes = [tuple(shape) for _, shape in tf.train.list_variables(saved)]
    assert (3, 3, 3, 8) in shapes  # the student's first kernel is there...
    assert (3, 3, 3, 12) not in shapes and (3, 3, 3, 16) not in shapes  # ...the teachers' are not


def test_kd_only_and_ce_only(learnable_task):
    images, labels = learnable_task
    kd = compiled(FEEDDistiller(tiny_net("s1", classes=4), make_teachers(2), beta=0.0, kd_weight=0.5))
    assert kd.translators == []
    history = kd.fit(images[:64], labels[:64], batch_size=32, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "student_loss", "kd_loss", "accuracy"}
    plain = compiled(FEEDDistiller(tiny_net("s2", classes=4)))
    history = plain.fit(images[:64], labels[:64], batch_size=32, epochs=1, verbose=0)
    assert history.history["loss"] == pytest.approx(history.history["student_loss"])


def test_bad_construction():
    student = tiny_net("student", classes=4)
    with pytest.raises(ValueError, match="predicts 7 classes"):
        FEEDDistiller(student, [tiny_net("t", classes=7)])
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        FEEDDistiller(student, make_teachers(1), teacher_layers="nope")
    with pytest.raises(ValueError, match="cannot map"):
        FEEDDistiller(student, [tiny_net("t", classes=4, strides=3)])  # a 6x6 map for 16x16
    with pytest.raises(ValueError, match="kd_weight"):
        FEEDDistiller(student, make_teachers(1), kd_weight=1.5)

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="not a functional"):
        FEEDDistiller(Subclassed(), make_teachers(1))
