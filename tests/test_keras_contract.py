"""The Keras contract: FEEDDistiller driven only through public Keras calls.

A user compiles it with a loss and metrics, fits it on numpy arrays, tf.data
or a `PyDataset` with callbacks, evaluates and predicts, with Sequential,
functional, nested and `keras.applications` models as student and teacher.
"""

import inspect
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import forward_passes, tiny_net

import keras_feed as kf
from keras_feed import FEEDDistiller
from keras_feed.core import frozen, losses
from keras_feed.run import runner
from keras_feed.run.config import TrainConfig

SHAPE = (32, 32, 3)
CLASSES = 4


def images_and_labels(count=16, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count,) + shape).astype("float32")
    return images, rng.integers(0, CLASSES, size=count).astype("int32")


def sequential(name, *, softmax, width=8, shape=SHAPE, seed=0):
    """A Sequential classifier whose feature map is the layer 'features'."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(width, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(name="features"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES, activation="softmax" if softmax else None, name="head"),
        ],
        name=name,
    )


def sgd():
    return keras.optimizers.SGD(0.01, momentum=0.9)


# -- compile, fit, evaluate, predict -----------------------------------------------


def test_compile_with_loss_and_metrics_then_fit_evaluate_predict(tmp_path):
    images, labels = images_and_labels(32)
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    teachers = [tiny_net(f"t{i}", width=10 + 2 * i, classes=CLASSES, input_shape=SHAPE, seed=i + 1) for i in range(2)]
    distiller = FEEDDistiller(student, teachers, beta=20.0, weight_decay=5e-4)
    distiller.compile(
        optimizer=sgd(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")],
    )
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.weights.h5"), save_weights_only=True),
    ]
    history = distiller.fit(
        images, labels, batch_size=8, epochs=2, validation_split=0.25, callbacks=callbacks, verbose=0
    )
    terms = {"loss", "accuracy", "top2", "student_loss", "feed_loss_0", "feed_loss_1", "weight_decay_loss"}
    assert set(history.history) == terms | {f"val_{name}" for name in terms} | {"learning_rate"}
    last = {name: values[-1] for name, values in history.history.items()}
    for prefix in ("", "val_"):  # val_loss is the same total as loss
        total = last[f"{prefix}student_loss"] + 20.0 * (
            last[f"{prefix}feed_loss_0"] + last[f"{prefix}feed_loss_1"]
        ) + last[f"{prefix}weight_decay_loss"]
        assert last[f"{prefix}loss"] == pytest.approx(total, rel=1e-4)
    assert (tmp_path / "log.csv").read_text().count("\n") == 3
    assert os.path.isfile(tmp_path / "ckpt.weights.h5")
    assert os.listdir(tmp_path / "tb")

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    results = distiller.evaluate(dataset, verbose=0, return_dict=True)
    assert set(results) == terms
    predictions = distiller.predict(images, verbose=0)
    np.testing.assert_allclose(predictions, student.predict(images, verbose=0), rtol=1e-5, atol=1e-5)
    expected_accuracy = np.mean(np.argmax(predictions, axis=1) == labels)
    assert results["accuracy"] == pytest.approx(expected_accuracy)


def test_model_checkpoint_of_the_whole_distiller_fails_at_once(tmp_path):
    images, labels = images_and_labels(8)
    distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE),
                              [tiny_net("t", classes=CLASSES, input_shape=SHAPE)])
    distiller.compile(optimizer=sgd())
    before = [w.numpy().copy() for w in distiller.trainable_weights]
    with pytest.raises(ValueError, match="save_weights_only=True"):
        distiller.fit(images, labels, epochs=1, verbose=0,
                      callbacks=[keras.callbacks.ModelCheckpoint(str(tmp_path / "d.keras"))])
    for weight, old in zip(distiller.trainable_weights, before):  # nothing trained
        np.testing.assert_array_equal(weight.numpy(), old)
    with pytest.raises(ValueError, match="distiller.student"):
        distiller.save(str(tmp_path / "d.keras"))


def test_softmax_student_and_teacher_keep_their_heads_and_kd_reads_logits():
    images, labels = images_and_labels(16)
    student = sequential("student", softmax=True)
    teacher = sequential("teacher", softmax=True, width=12, seed=3)
    distiller = FEEDDistiller(student, [teacher], beta=5.0, kd_weight=0.5, temperature=4.0)
    # The default loss matches the head: cross-entropy from probabilities.
    distiller.compile(optimizer=sgd(), metrics=["accuracy"])
    step = distiller.train_on_batch(images, labels, return_dict=True)
    assert np.isfinite(step["loss"])
    passes = distiller(images)
    np.testing.assert_allclose(ops_sum(passes["predictions"]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(passes["predictions"], student(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(passes["predictions"], keras.ops.softmax(passes["logits"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ops_sum(passes["logits"]), 1.0)  # logits, not probabilities
    assert frozen.head_kind(distiller.student) == "softmax"  # the saved student keeps its head
    # The teacher's KD input is its pre-softmax logits: softmax(logits / T) is a
    # real soft target, not the nearly uniform one from probabilities.
    (teacher_logits,), _ = distiller.teacher_outputs(images)
    penultimate = keras.Model(teacher.inputs[0], teacher.layers[-2].output)(images)
    head = teacher.get_layer("head")
    np.testing.assert_allclose(teacher_logits, penultimate @ head.kernel + head.bias, rtol=1e-4, atol=1e-5)
    soft = losses.ensemble_soft_targets([teacher_logits], 4.0)
    from_probabilities = losses.ensemble_soft_targets([teacher(images)], 4.0)
    assert np.max(soft) > np.max(from_probabilities)


def ops_sum(values):
    return np.sum(np.asarray(values), axis=-1)


def test_one_hot_labels_with_label_smoothing_mixup_and_sample_weights():
    images, labels = images_and_labels(16)
    one_hot = keras.ops.one_hot(labels, CLASSES)
    mixup = keras.layers.MixUp(alpha=0.2, seed=0)
    dataset = (
        tf.data.Dataset.from_tensor_slices({"images": images, "labels": one_hot})
        .batch(8)
        .map(lambda batch: mixup(batch))
        .map(lambda batch: (batch["images"], batch["labels"]))
    )
    distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE),
                              [tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=2)], beta=10.0)
    distiller.compile(
        optimizer=sgd(),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics=["categorical_accuracy"],
    )
    history = distiller.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    # sample_weight weights the compiled loss, not the FEED terms.
    weighted = distiller.test_on_batch(images, one_hot, sample_weight=np.zeros(16), return_dict=True)
    assert weighted["student_loss"] == 0.0 and weighted["feed_loss_0"] > 0.0
    assert weighted["loss"] == pytest.approx(10.0 * weighted["feed_loss_0"], rel=1e-5)
    history = distiller.fit(images, one_hot, batch_size=8, epochs=1, verbose=0,
                            class_weight={0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    assert np.isfinite(history.history["loss"][-1])


def test_py_dataset_and_tf_data_give_the_same_steps():
    images, labels = images_and_labels(16)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return images[8 * index: 8 * index + 8], labels[8 * index: 8 * index + 8]

    def fitted(data):
        keras.utils.set_random_seed(0)
        distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE),
                                  [tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=2)], beta=10.0)
        distiller.compile(optimizer=sgd())
        distiller.fit(data, epochs=1, verbose=0, shuffle=False)
        return [w.numpy() for w in distiller.trainable_weights]

    by_py_dataset = fitted(Batches())
    by_tf_data = fitted(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8))
    for a, b in zip(by_py_dataset, by_tf_data):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- other people's models ----------------------------------------------------------

APPLICATIONS = [
    ("ResNet50", "conv5_block3_out"),
    ("MobileNetV2", "out_relu"),
    ("EfficientNetB0", "top_activation"),
    ("DenseNet121", "relu"),
]


@pytest.mark.parametrize("name, layer", APPLICATIONS)
def test_keras_applications_as_student_and_as_teacher(name, layer):
    """Two steps each way, run eagerly: tracing these graphs is what would take time."""
    images, labels = images_and_labels(4)
    application = getattr(keras.applications, name)(weights=None, input_shape=SHAPE, classes=CLASSES)
    small = sequential("small", softmax=False)
    as_teacher = FEEDDistiller(small, [application], beta=10.0, teacher_layers=layer, kd_weight=0.5)
    as_teacher.compile(optimizer=sgd(), metrics=["accuracy"], run_eagerly=True)
    as_student = FEEDDistiller(application, [small], beta=10.0, student_layer=layer)
    # A softmax head: the default loss is cross-entropy from probabilities.
    as_student.compile(optimizer=sgd(), metrics=["accuracy"], run_eagerly=True)
    for distiller in (as_teacher, as_student):
        history = distiller.fit(images, labels, batch_size=2, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1]), name


def test_nested_backbone_named_by_its_name_or_a_path():
    images, labels = images_and_labels(4)
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=SHAPE, alpha=0.35, name="backbone"
    )
    inputs = keras.Input(SHAPE)
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    transfer = keras.Model(inputs, keras.layers.Dense(CLASSES)(pooled), name="transfer")
    reference = keras.Model(backbone.inputs[0], [backbone.output, backbone.get_layer("block_16_project_BN").output])
    expected_output, expected_inner = reference(images, training=False)
    for path, expected in (("backbone", expected_output), ("backbone/block_16_project_BN", expected_inner)):
        distiller = FEEDDistiller(sequential("s", softmax=False), [transfer], beta=10.0, teacher_layers=path)
        _, (target,) = distiller.teacher_outputs(images)
        np.testing.assert_allclose(target, expected, rtol=1e-4, atol=1e-4)
        distiller.compile(optimizer=sgd())
        assert np.isfinite(distiller.fit(images, labels, batch_size=2, verbose=0).history["loss"][-1])
    with pytest.raises(ValueError, match="Teacher 0 'transfer' has no layer named 'nope'.*backbone/nope"):
        FEEDDistiller(sequential("s", softmax=False), [transfer], teacher_layers="backbone/nope")


def test_student_runs_once_per_step_when_loaded_from_a_keras_file(tmp_path):
    images, labels = images_and_labels(24)
    path = str(tmp_path / "student.keras")
    sequential("student", softmax=True).save(path)
    student = keras.models.load_model(path)
    calls = forward_passes(student.get_layer("features"))
    distiller = FEEDDistiller(student, [sequential("t", softmax=True, seed=4)], beta=1.0)
    distiller.compile(optimizer=sgd(), metrics=["accuracy"], run_eagerly=True)
    distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert len(calls) == 3  # 3 steps, one student forward pass each


def test_subclassed_models_are_refused():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="Student 'subclassed' is not a functional"):
        FEEDDistiller(Subclassed(name="subclassed"), [tiny_net("t", classes=CLASSES)])


# -- intake that never guesses --------------------------------------------------------


def test_teachers_that_cannot_take_the_students_images_are_refused():
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    cases = [
        (tiny_net("gray", width=48, classes=CLASSES, input_shape=(32, 32, 1)), r"\(32, 32, 1\)"),
        (tiny_net("big", classes=CLASSES, input_shape=(64, 64, 3)), r"\(64, 64, 3\)"),
        (tiny_net("mnist", classes=CLASSES, input_shape=(28, 28, 1)), r"\(28, 28, 1\)"),
    ]
    for teacher, shape in cases:
        message = rf"Teacher 0 \('{teacher.name}'\) takes images {shape} at its input layer .*takes \(32, 32, 3\)"
        with pytest.raises(ValueError, match=message):
            FEEDDistiller(student, [teacher])
    # Plain Keras refuses 3-channel images for the 1-channel teacher; so does its folded twin.
    gray = cases[0][0]
    twin = frozen.inference_model(frozen.extractor(gray, "features"))
    with pytest.raises(ValueError, match="input channels"):
        twin(np.zeros((1, 32, 32, 3), "float32"))


def test_teachers_no_term_uses_are_refused(tmp_path):
    student = tiny_net("student", classes=CLASSES, input_shape=SHAPE)
    with pytest.raises(ValueError, match="no term uses them"):
        FEEDDistiller(student, [tiny_net("t", classes=CLASSES, input_shape=SHAPE)], beta=0.0)
    config = TrainConfig(
        method="pfeed", dataset="synthetic", model="resnet8", beta=0.0, kd_weight=0.0,
        epochs=1, batch_size=16, train_examples=32, dry_run=True, model_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="--method=ce"):
        runner.run(config)


def test_a_teacher_keeps_its_own_precision_under_a_global_policy():
    images, _ = images_and_labels(4)
    teacher = tiny_net("t", classes=CLASSES, input_shape=SHAPE)  # float32
    with runner.dtype_policy("mixed_float16"):
        student = tiny_net("s", classes=CLASSES, input_shape=SHAPE)
        distiller = FEEDDistiller(student, [teacher], beta=1.0, kd_weight=0.5)
    logits, (target,) = distiller.teacher_outputs(images)
    assert target.dtype == "float32" and logits[0].dtype == "float32"
    expected = frozen.extractor(teacher, "features")(images, training=False)[2]
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)  # not rounded to 16 bits


def test_teacher_weights_loaded_between_fit_calls_are_used(tmp_path):
    """On every backend; on JAX, where the teacher's weights are constants of the
    compiled steps, they are traced again, and only when the weights changed."""
    images, labels = images_and_labels(16)
    teacher = tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=2)
    distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE), [teacher], beta=10.0)
    distiller.compile(optimizer=sgd())
    distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    distiller.evaluate(images, labels, batch_size=16, verbose=0)
    steps = distiller.train_function, distiller.test_function
    distiller.refold_teachers()  # the same weights: the compiled steps are kept
    assert (distiller.train_function, distiller.test_function) == steps
    other = tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=7)
    for layer in other.layers:  # moving statistics far from their initial values
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.5))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 3.0))
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    teacher.load_weights(path)

    def expected_feed_loss(training):
        # A copy of the student: in training mode its BatchNorm would update its statistics.
        student = keras.models.clone_model(distiller.student)
        student.set_weights(distiller.student.get_weights())
        target = frozen.extractor(teacher, "features")(images, training=False)[2]
        student_map = frozen.extractor(student, "features")(images, training=training)[2]
        return float(losses.feed_loss(target, distiller.translators[0](student_map)))

    results = distiller.evaluate(images, labels, batch_size=16, verbose=0, return_dict=True)
    assert results["feed_loss_0"] == pytest.approx(expected_feed_loss(training=False), rel=1e-4)
    expected = expected_feed_loss(training=True)
    history = distiller.fit(images, labels, batch_size=16, epochs=1, verbose=0, shuffle=False)
    # One step on the new teacher (the student's BatchNorm on the batch's statistics).
    assert history.history["feed_loss_0"][0] == pytest.approx(expected, rel=1e-4)
    retraced = distiller.train_function is not steps[0], distiller.test_function is not steps[1]
    assert retraced == ((True, True) if keras.backend.backend() == "jax" else (False, False))


# -- the package and Keras' internals --------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_import_keras_feed_gives_every_module_without_loading_tensorflow_first():
    code = (
        "import sys, keras_feed as kf\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow loaded by import keras_feed'\n"
        "for name in ('models', 'data', 'losses', 'core', 'run', 'cli'):\n"
        "    getattr(kf, name)\n"
        "for name in ('FEEDDistiller', 'Translator', 'TrainConfig', 'train', 'fit_resumable',\n"
        "             'StageCheckpoint', 'load_predictor'):\n"
        "    assert callable(getattr(kf, name)), name\n"
        "for name in ('translators', 'frozen', 'distiller'):\n"
        "    getattr(kf.core, name)\n"
        "for name in ('checkpointing', 'experiment', 'runner', 'config', 'methods', 'storage'):\n"
        "    getattr(kf.run, name)\n"
        "assert kf.models.build('resnet8', input_shape=(16, 16, 3), num_classes=3).output.shape[-1] == 3\n"
        "print(kf.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == kf.__version__


def test_the_one_private_keras_hook_overridden_is_still_what_keras_calls(monkeypatch):
    """`training_backend.Trainer._maybe_symbolic_build` relies on Keras' TF trainer
    calling `_maybe_symbolic_build(iterator=...)` at the start of `fit` and
    `evaluate`, and on `_symbolic_build(data_batch=...)`; on JAX, on Keras'
    trainer never calling it. This fails the day Keras changes either."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from keras.src.trainers.trainer import Trainer

    assert list(inspect.signature(TensorFlowTrainer._maybe_symbolic_build).parameters) == [
        "self", "iterator", "data_batch"
    ]
    assert "data_batch" in inspect.signature(Trainer._symbolic_build).parameters
    on_tensorflow = keras.backend.backend() == "tensorflow"
    if keras.backend.backend() == "jax":
        from keras.src.backend.jax.trainer import JAXTrainer

        assert not hasattr(JAXTrainer, "_maybe_symbolic_build")
    calls = []
    original = kf.core.trainer.Trainer._maybe_symbolic_build
    monkeypatch.setattr(
        kf.core.trainer.Trainer, "_maybe_symbolic_build",
        lambda self, iterator=None, data_batch=None: calls.append(iterator is not None)
        or original(self, iterator=iterator, data_batch=data_batch),
    )
    images, labels = images_and_labels(8)
    distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE))
    distiller.compile(optimizer=sgd(), metrics=["accuracy"])
    distiller.fit(images, labels, epochs=1, verbose=0)
    distiller.evaluate(images, labels, verbose=0)
    assert calls == ([True, True] if on_tensorflow else [])
    # Only that one private name is overridden anywhere in keras_feed's trainers.
    for trainer in (kf.core.trainer.Trainer, FEEDDistiller, kf.core.factor_transfer.ParaphraserTrainer):
        private = {
            name for name in vars(trainer)
            if name.startswith("_") and not name.startswith("__") and hasattr(keras.Model, name)
        }
        assert private <= {"_maybe_symbolic_build"}, (trainer, private)


def test_fit_resumable_continues_where_a_stopped_fit_left_off(tmp_path):
    images, labels = images_and_labels(32)

    def trained(epochs_first, folder):
        keras.utils.set_random_seed(0)
        distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE),
                                  [tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=2)], beta=10.0)
        distiller.compile(optimizer=sgd(), metrics=["accuracy"])
        data = lambda epoch, skip: tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).skip(skip)  # noqa: E731
        return distiller, kf.run.checkpointing.fit_resumable(
            distiller, data, folder=folder, epochs=epochs_first, steps_per_epoch=4, every_steps=1, verbose=0
        )

    whole, _ = trained(3, str(tmp_path / "whole"))

    class StopAfter(keras.callbacks.Callback):  # a crash in the middle of epoch 2
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 6:
                raise KeyboardInterrupt

    folder = str(tmp_path / "resumed")
    keras.utils.set_random_seed(0)
    distiller = FEEDDistiller(tiny_net("s", classes=CLASSES, input_shape=SHAPE),
                              [tiny_net("t", classes=CLASSES, input_shape=SHAPE, seed=2)], beta=10.0)
    distiller.compile(optimizer=sgd(), metrics=["accuracy"])
    data = lambda epoch, skip: tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).skip(skip)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        kf.run.checkpointing.fit_resumable(distiller, data, folder=folder, epochs=3, steps_per_epoch=4,
                                       every_steps=1, callbacks=[StopAfter()], verbose=0)
    resumed, checkpoint = trained(3, folder)
    assert checkpoint.step == 12
    for a, b in zip(whole.trainable_weights, resumed.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
