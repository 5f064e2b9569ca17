"""One training run, from a `TrainConfig` to a student on disk.

`run(config)` is what `keras-feed-train` calls, and the Python way to do the
same: it validates everything first (flags, data, teacher files, shapes), so a
bad run fails before it writes anything, then hands the work to the method
named by `config.method` (see `keras_feed.methods`), then evaluates the student,
its teachers and their ensemble, and writes the outputs into `config.model_dir`:

    student.keras             the student alone (Keras format)
    export/                   the student as a TensorFlow SavedModel (`serving_default`
                              takes uint8 images (N, H, W, C), as the dataset stores them)
    translators.weights.h5    the NTLs' weights (for the analysis)
    metrics.json              test accuracy of student, teachers and ensemble, and
                              the input the student takes (`input`: normalisation...)
    teachers/teacher_<i>.keras  teachers trained by the run (reused if present)
    logs/<stage>/             TensorBoard logs of every training stage
    checkpoints/<stage>/      while it trains: what a rerun resumes from (see
                              `keras_feed.checkpointing`); removed when complete
"""

import contextlib
import dataclasses
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from keras_feed import checkpointing
from keras_feed import data as data_lib
from keras_feed import distiller as distiller_lib
from keras_feed import distribute
from keras_feed import frozen
from keras_feed import models
from keras_feed.models import preprocessing
from keras_feed import storage
from keras_feed import summary
from keras_feed import translators as translators_lib


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; the command line's flags map onto it."""

    method: str = "pfeed"
    dataset: str = "cifar100"
    data_dir: str | None = None
    image_size: int | None = None
    model: str = "resnet56"
    teacher_model: str | None = None  # default: the student's architecture
    teachers: tuple = ()  # paths of trained teachers (.keras)
    # What a teacher file without its own preprocessing layer expects: auto
    # (refuse it), dataset (the dataset's mean/std normalisation), none (raw pixels)
    teacher_preprocessing: str = "auto"
    num_teachers: int = 2
    teacher_dir: str | None = None  # default: <model_dir>/teachers
    teacher_seed: int = 100  # teacher i is trained with seed teacher_seed + i
    teacher_epochs: int | None = None  # default: epochs
    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 0.1
    lr_schedule: str = "step"  # step | cosine
    lr_decay_epochs: tuple = ()  # step schedule; default: 50% and 75% of epochs
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    beta: float = 500.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    student_layer: str = "features"
    teacher_layer: str = "features"
    translator_batchnorm: bool = False
    seed: int = 0
    subset_seed: int = 0
    train_examples: int | None = None
    model_dir: str = "runs/feed"
    eval_batch_size: int = 256
    validation_freq: int = 0  # evaluate on the test split every N epochs; 0: never
    jit_compile: bool = False
    mixed_precision: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    strategy: str = "default"  # default | mirrored | multi_worker | tpu (keras_feed.distribute)
    tpu: str | None = None  # --strategy=tpu: TPU name or grpc:// address
    tpu_zone: str | None = None
    gcp_project: str | None = None
    unsafe_load: bool = False
    generations: int = 2  # sfeed: born-again generations after generation 0
    ft_rate: float = 0.5  # ft: paraphrase rate k (factor channels = k * C)
    paraphraser_epochs: int = 10  # ft: epochs of each paraphraser's pre-training
    paraphraser_learning_rate: float = 0.01  # ft: its peak learning rate (same schedule)
    baseline: bool = False  # also train a CE student of the same architecture and seed
    dry_run: bool = False  # validate and print the plan, train nothing
    checkpoint_steps: int = 0  # also checkpoint every N steps; 0: at each epoch's end only
    deterministic: bool = False  # op determinism: resumed runs end bitwise as uninterrupted ones
    verbose: int | None = None  # Keras fit verbosity; default: bar on a tty

    @property
    def teacher_architecture(self):
        return self.teacher_model or self.model

    @property
    def teacher_folder(self):
        return self.teacher_dir or os.path.join(self.model_dir, "teachers")


LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def say(message, *args):
    """A progress line on stderr, for the person watching a run."""
    print("[keras-feed] " + (message % args if args else message), file=sys.stderr, flush=True)


def check_config(config, method):
    """Raises `ValueError` (one line) on flag values that cannot work."""
    for field in dataclasses.fields(config):  # nan and inf pass every comparison below
        value = getattr(config, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"--{field.name} must be a finite number, got {value}.")
    positive = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "eval_batch_size": config.eval_batch_size,
    }
    if config.teacher_epochs is not None:
        positive["teacher_epochs"] = config.teacher_epochs
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}.")
    if config.train_examples is not None and config.train_examples <= 0:
        raise ValueError(f"--train_examples must be > 0, got {config.train_examples}.")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"Unknown --lr_schedule '{config.lr_schedule}'; choose from {', '.join(LR_SCHEDULES)}."
        )
    if config.weight_decay < 0 or config.beta < 0:
        raise ValueError("--weight_decay and --beta must be >= 0.")
    if not 0.0 <= config.kd_weight <= 1.0:
        raise ValueError(f"--kd_weight must lie in [0, 1], got {config.kd_weight}.")
    if config.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {config.temperature}.")
    if config.validation_freq < 0:
        raise ValueError(f"--validation_freq must be >= 0, got {config.validation_freq}.")
    if config.checkpoint_steps < 0:
        raise ValueError(f"--checkpoint_steps must be >= 0, got {config.checkpoint_steps}.")
    if method.uses_teachers and not config.teachers and config.num_teachers < 1:
        raise ValueError(f"--num_teachers must be >= 1, got {config.num_teachers}.")
    if config.teacher_preprocessing not in preprocessing.CONVENTIONS:
        raise ValueError(
            f"Unknown --teacher_preprocessing '{config.teacher_preprocessing}'; choose from "
            f"{', '.join(preprocessing.CONVENTIONS)}."
        )
    for path in config.teachers:
        if not os.path.isfile(path):
            raise ValueError(f"Teacher file not found: {path}")
    method.check(config)


def make_optimizer(config, steps_per_epoch, epochs, peak_learning_rate=None):
    """SGD with momentum and the configured learning-rate schedule."""
    return keras.optimizers.SGD(
        learning_rate_schedule(config, steps_per_epoch, epochs, peak_learning_rate),
        momentum=config.momentum, nesterov=config.nesterov,
    )


def learning_rate_schedule(config, steps_per_epoch, epochs, peak_learning_rate=None):
    """The configured schedule (a float when constant), from `peak_learning_rate`.

    The peak defaults to `config.learning_rate`.
    """
    total_steps = steps_per_epoch * epochs
    peak = config.learning_rate if peak_learning_rate is None else peak_learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            peak, decay_steps=max(1, total_steps)
        )
    else:
        decay_epochs = config.lr_decay_epochs or (
            int(round(0.5 * epochs)),
            int(round(0.75 * epochs)),
        )
        boundaries = sorted({int(e) * steps_per_epoch for e in decay_epochs if 0 < e < epochs})
        values = [
            peak * config.lr_decay_factor**index
            for index in range(len(boundaries) + 1)
        ]
        learning_rate = (
            keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
            if boundaries
            else peak
        )
    return learning_rate


class Experiment:
    """The shared machinery of a run: data, models, fitting, evaluation.

    Methods (`keras_feed.methods`) use it to train what they need; it keeps
    the validated data and the teacher plan, and writes the outputs.
    """

    def __init__(self, config, method, *, strategy=None):
        self.config = config
        self.method = method
        self.strategy = strategy or tf.distribute.get_strategy()
        check_config(config, method)
        distribute.check_batch_size(self.strategy, config.batch_size)
        if config.dry_run:  # describe the data, never download or read it all
            self.data = None
            self.info = data_lib.describe(
                config.dataset,
                data_dir=config.data_dir,
                train_examples=config.train_examples,
                image_size=config.image_size,
            )
            if config.batch_size > self.info.num_train:
                raise ValueError(
                    f"--batch_size={config.batch_size} exceeds the {self.info.num_train} "
                    "training examples."
                )
        else:
            self.data = data_lib.load(
                config.dataset,
                data_dir=config.data_dir,
                train_examples=config.train_examples,
                seed=config.seed,
                subset_seed=config.subset_seed,
                image_size=config.image_size,
            )
            self.info = self.data.info
            self.data.steps_per_epoch(config.batch_size)  # raises if the batch is too large
        self.input_shape = tuple(self.info.image_shape)
        self.num_classes = self.info.num_classes
        self.history = {}
        self.teacher_paths = []
        self.baseline_metrics = None
        self._test_labels = None
        self._check_models()

    # -- validation before anything is written ------------------------------

    def _check_models(self):
        """Builds the student and checks every teacher against it, writing nothing."""
        with self.strategy.scope():
            student = self.build_student()
            frozen.extractor(student, self.config.student_layer, role="Student", name="check")
            self.checked_models = {"student": student, "teachers": []}
            if not self.method.uses_teachers:
                return
            paths = self.config.teachers
            teachers = [storage.load_model(path, unsafe=self.config.unsafe_load) for path in paths]
            if not teachers:
                architecture = self.method.teacher_architecture(self.config)
                teachers = [
                    student  # same architecture: its shapes are the teacher's
                    if architecture == self.config.model
                    else self.build_model(architecture, seed=0)
                ]
            for teacher in teachers:
                self._check_teacher(teacher, student)
            if paths:  # after the shapes: how the files take their inputs
                teachers = [self._raw_pixel_teacher(t, path) for t, path in zip(teachers, paths)]
            self.checked_models["teachers"] = teachers

    def _check_teacher(self, teacher, student):
        student_shape = frozen.feature_shape(student, self.config.student_layer, role="Student")
        extractor = frozen.extractor(
            teacher, self.config.teacher_layer, role="Teacher", name="check"
        )
        classes = extractor.outputs[1].shape[-1]
        if classes != self.num_classes:
            raise ValueError(
                f"Teacher '{teacher.name}' predicts {classes} classes; dataset "
                f"'{self.info.name}' has {self.num_classes}."
            )
        teacher_input = tuple(teacher.inputs[0].shape[1:])
        if teacher_input != self.input_shape:
            raise ValueError(
                f"Teacher '{teacher.name}' takes inputs {teacher_input}; the data "
                f"gives {self.input_shape}."
            )
        self.method.check_shapes(student_shape, tuple(extractor.outputs[2].shape[1:]))

    def _raw_pixel_teacher(self, teacher, path):
        """The teacher read from `path`, taking raw pixels as the data gives them.

        A file that starts with its own preprocessing layer is used as it is;
        one without (every keras-feed 0.1.0 file) is taken as
        `config.teacher_preprocessing` says, or refused.
        """
        return preprocessing.raw_pixel_model(
            teacher, self.config.teacher_preprocessing,
            statistics=lambda: (self.info.mean, self.info.std),
            what=f"Teacher file {path}", flag="--teacher_preprocessing",
        )

    def _load_teacher(self, path):
        """The trained model in `path`, frozen, taking raw pixels (`_raw_pixel_teacher`)."""
        teacher = self._raw_pixel_teacher(
            storage.load_model(path, unsafe=self.config.unsafe_load), path
        )
        teacher.trainable = False
        return teacher

    # -- models ----------------------------------------------------------------

    def build_model(self, name, *, seed):
        """A fresh `name` model, its variables created in the strategy's scope.

        It takes raw pixels and normalises them with the dataset's mean and std
        in its first layer, as every model a run trains (teachers, sFEED
        generations, students), so the files it is saved to need nothing else.
        """
        with self.strategy.scope():
            return models.build(
                name, input_shape=self.input_shape, num_classes=self.num_classes, seed=seed,
                mean=self.info.mean, std=self.info.std,
            )

    def build_student(self, seed=None):
        """A fresh student of `config.model`, seeded with `config.seed` by default."""
        return self.build_model(
            self.config.model, seed=self.config.seed if seed is None else seed
        )

    def teachers(self):
        """The frozen teachers: loaded from `config.teachers`, or trained with CE.

        Trained teachers are saved to `teacher_folder/teacher_<i>.keras`, and a
        teacher file already there is reused rather than trained again. The
        files used are recorded in `teacher_paths` (and in `metrics.json`).
        While it trains or reads the teachers of `teacher_folder` it holds the
        folder's lock: another run sharing the folder waits, then reuses them.
        """
        paths = list(self.config.teachers)
        folder = self.config.teacher_folder
        lock = contextlib.nullcontext() if paths else storage.folder_lock(
            folder, on_wait=lambda: say(
                "Waiting for the lock on %s: another run trains or reads teachers there", folder
            )
        )
        with lock:
            if not paths:
                for index in range(self.config.num_teachers):
                    path = os.path.join(folder, f"teacher_{index}.keras")
                    self.train_with_ce(
                        path,
                        self.config.teacher_architecture,
                        seed=self.config.teacher_seed + index,
                        stage=f"teacher_{index}",
                        epochs=self.config.teacher_epochs or self.config.epochs,
                        what=f"teacher {index + 1}/{self.config.num_teachers}",
                    )
                    paths.append(path)
            self.teacher_paths = paths
            with self.strategy.scope():
                return [self._load_teacher(path) for path in paths]

    def load_frozen(self, path):
        """A trained model from `path`, frozen, inside the strategy's scope."""
        with self.strategy.scope():
            return self._load_teacher(path)

    def train_paraphraser(self, teacher, index):
        """Factor Transfer's paraphraser for `teacher`: trained once, then reused.

        Its weights are kept in `<model_dir>/paraphrasers/paraphraser_<i>.weights.h5`.
        """
        from keras_feed import factor_transfer

        config = self.config
        path = os.path.join(config.model_dir, "paraphrasers", f"paraphraser_{index}.weights.h5")
        with self.strategy.scope():
            paraphraser = factor_transfer.new_paraphraser(
                teacher, teacher_layer=config.teacher_layer, rate=config.ft_rate,
                batchnorm=config.translator_batchnorm, name=f"paraphraser_{index}",
            )
        if os.path.isfile(path):
            say("Reusing paraphraser %d from %s", index, path)
            paraphraser.load_weights(path)
        else:
            say("Training paraphraser %d (rate %.2f, %d epochs, lr %g)", index, config.ft_rate,
                config.paraphraser_epochs, config.paraphraser_learning_rate)
            with self.strategy.scope():
                trainer = factor_transfer.ParaphraserTrainer(
                    teacher, paraphraser, teacher_layer=config.teacher_layer,
                    weight_decay=config.weight_decay,
                )
            self.fit_model(trainer, stage=f"paraphraser_{index}", epochs=config.paraphraser_epochs,
                           learning_rate=config.paraphraser_learning_rate)
            storage.save_weights(paraphraser, path)
        paraphraser.trainable = False
        return paraphraser

    def train_baseline(self):
        """`--baseline`: a CE student of the student's architecture and seed, evaluated.

        Saved as `<model_dir>/baseline.keras` (reused by a rerun); its test
        accuracy goes into `metrics.json` as `baseline`, with the `gain`.
        """
        path = os.path.join(self.config.model_dir, "baseline.keras")
        self.train_with_ce(
            path, self.config.model, seed=self.config.seed, stage="baseline",
            epochs=self.config.epochs, what="the CE baseline student",
        )
        probabilities = self.predict_probabilities(self.load_frozen(path))
        self.baseline_metrics = {"model": self.config.model, "path": os.path.abspath(path),
                                 **self.scores(probabilities)}

    def train_with_ce(self, path, architecture, *, seed, stage, epochs, what):
        """Trains a fresh `architecture` with cross-entropy into `path`, unless it exists."""
        if os.path.isfile(path):
            say("Reusing %s from %s", what, path)
            return
        say("Training %s (%s, seed %d) -> %s", what, architecture, seed, path)
        with self.strategy.scope():
            model = self.build_model(architecture, seed=seed)
        self.fit(model, [], stage=stage, seed=seed, epochs=epochs, kd_weight=0.0)
        storage.save_model(model, path)

    # -- training --------------------------------------------------------------

    def make_distiller(self, student, teachers, **overrides):
        """A compiled-ready `FEEDDistiller` with the config's loss settings."""
        settings = dict(
            beta=self.config.beta,
            kd_weight=self.config.kd_weight,
            temperature=self.config.temperature,
            student_layer=self.config.student_layer,
            teacher_layers=self.config.teacher_layer,
            translator_batchnorm=self.config.translator_batchnorm,
            weight_decay=self.config.weight_decay,
        )
        settings.update(overrides)
        with self.strategy.scope():
            return distiller_lib.FEEDDistiller(student, teachers, **settings)

    def fit(self, student, teachers, *, stage, seed=None, epochs=None, **overrides):
        """Trains `student` from `teachers` (none: plain CE) and returns the distiller.

        Args:
          student: the model to train (updated in place).
          teachers: frozen teachers; [] trains with cross-entropy alone.
          stage: a name for logs (`logs/<stage>`) and messages.
          seed: the data-order and augmentation seed (default `config.seed`).
          epochs: default `config.epochs`.
          **overrides: `FEEDDistiller` arguments that replace the config's.
        """
        # The NTLs' initial weights must not depend on what ran before in this
        # process: a resumed run skips the stages that are done.
        keras.utils.set_random_seed(self.config.seed if seed is None else seed)
        distiller = self.make_distiller(student, teachers, **overrides)
        self.fit_model(distiller, stage=stage, seed=seed, epochs=epochs, validate=True,
                       metrics=["accuracy"])
        return distiller

    def fit_model(self, model, *, stage, seed=None, epochs=None, validate=False,
                  learning_rate=None, metrics=None):
        """Compiles `model` (a trainer such as `FEEDDistiller`) and fits it on the data.

        Args:
          model: a `keras.Model` with its own `train_step`, built in the scope.
          stage: a name for logs (`logs/<stage>`), messages and `metrics.json`.
          seed: the data-order and augmentation seed (default `config.seed`).
          epochs: default `config.epochs`.
          validate: evaluate on the test split every `config.validation_freq`
            epochs (the model needs a `test_step`).
          learning_rate: the schedule's peak; default `config.learning_rate`.
          metrics: compiled metrics, as `model.compile` takes them.
        """
        config = self.config
        seed = config.seed if seed is None else seed
        epochs = epochs or config.epochs
        steps = self.data.steps_per_epoch(config.batch_size)
        with self.strategy.scope():
            model.compile(
                optimizer=make_optimizer(config, steps, epochs, learning_rate),
                metrics=metrics,
                jit_compile=config.jit_compile,
            )
        validation = {}
        if validate and config.validation_freq:
            validation = dict(
                validation_data=distribute.evaluation_dataset(
                    self.strategy, self.data.test(config.eval_batch_size)
                ),
                validation_freq=config.validation_freq,
            )
        verbose = config.verbose
        if verbose is None:
            verbose = 1 if sys.stdout.isatty() else 2

        def report(checkpoint):
            if checkpoint.complete:
                say("Stage %s: trained already (checkpoint in %s); not training it again",
                    stage, checkpoint.folder)
            elif checkpoint.step:
                say("Stage %s: resuming at %s of %d, from %s", stage,
                    checkpoint.describe(checkpoint.step + 1), checkpoint.total_steps,
                    checkpoint.folder)
            else:
                say("Stage %s: %d epochs x %d steps, batch %d", stage, epochs, steps,
                    config.batch_size)

        # A stage resumed mid-epoch is fitted as the rest of that epoch, then
        # the later epochs, each from the pipeline rebuilt at its position.
        checkpoint = checkpointing.fit_resumable(
            model,
            lambda epoch, skip_batches: distribute.train_dataset(
                self.strategy, self.data, config.batch_size, seed=seed,
                start_epoch=epoch, skip_batches=skip_batches,
            ),
            folder=checkpointing.checkpoint_folder(config.model_dir, stage),
            stage=stage, epochs=epochs, steps_per_epoch=steps,
            every_steps=config.checkpoint_steps,
            callbacks=[keras.callbacks.TensorBoard(
                os.path.join(config.model_dir, "logs", stage), update_freq="epoch"
            )],
            report=report,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles, seeded per epoch
            **validation,
        )
        self.history[stage] = checkpoint.summary(config.batch_size)

    # -- evaluation and outputs ---------------------------------------------

    def predict_probabilities(self, model):
        """Class probabilities of `model` on the test split, `(num_test, classes)`.

        A model with a softmax head gives them itself; logits are softmaxed.
        """
        images = self.data.test(self.config.eval_batch_size).map(lambda x, y: x)
        outputs = tf.cast(distribute.predict(self.strategy, model, images), tf.float32)
        if frozen.head_kind(model) == "softmax":
            return outputs.numpy()
        return tf.nn.softmax(outputs).numpy()

    def test_labels(self):
        """The test split's labels, in the order `predict_probabilities` uses."""
        if self._test_labels is None:
            batches = self.data.test(self.config.eval_batch_size).map(lambda x, y: y)
            self._test_labels = np.concatenate([labels.numpy() for labels in batches])
        return self._test_labels

    def accuracy_of(self, model_or_probabilities, k=1):
        """Top-k test accuracy of a model, or of its predicted probabilities."""
        probabilities = model_or_probabilities
        if isinstance(probabilities, keras.Model):
            probabilities = self.predict_probabilities(probabilities)
        return top_k_accuracy(probabilities, self.test_labels(), k)

    def scores(self, probabilities):
        """`{"test_accuracy": top-1, "test_top5_accuracy": top-5}` of probabilities."""
        return {
            "test_accuracy": self.accuracy_of(probabilities),
            "test_top5_accuracy": self.accuracy_of(probabilities, k=5),
        }

    def evaluate(self, student, teachers):
        """Top-1 and top-5 test accuracy of the student, each teacher and their ensemble."""
        labels = self.test_labels()
        results = {
            "student": {
                "model": self.config.model,
                **self.scores(self.predict_probabilities(student)),
                "parameters": int(student.count_params()),
            },
            "num_test": int(labels.shape[0]),
        }
        if teachers:
            probabilities = [self.predict_probabilities(t) for t in teachers]
            results["teachers"] = [
                {"model": teacher.name, **self.scores(p)}
                for teacher, p in zip(teachers, probabilities)
            ]
            results["ensemble"] = {
                "size": len(teachers),
                **self.scores(np.mean(probabilities, axis=0)),
            }
        return results

    def input_description(self):
        """What the saved student and its export take: `metrics.json`'s `input`."""
        info = self.info
        description = {
            "image_shape": list(info.image_shape),
            "dtype": "uint8 or float32 pixels in [0, 255]",
            "normalisation": "(pixels / 255 - mean) / std per channel, inside the model "
                             f"(its first layer, '{preprocessing.LAYER_NAME}')",
            "mean": [float(value) for value in info.mean],
            "std": [float(value) for value in info.std],
            "augmentation": data_lib.describe_augmentation(info),
        }
        if self.method.uses_teachers:  # how teacher files without the layer were taken
            description["teacher_preprocessing"] = self.config.teacher_preprocessing
        return description

    def write_outputs(self, student, distiller, teachers, extra=None, metrics=None):
        """Saves the student, its export, the NTLs and `metrics.json`.

        `metrics`, when given, is `evaluate(student, teachers)` already computed.
        """
        model_dir = self.config.model_dir
        if metrics is None:
            metrics = self.evaluate(student, teachers)
        metrics = dict(metrics)
        # Stages an earlier, interrupted attempt of this run finished count too.
        stages = {**checkpointing.finished_stages(model_dir), **self.history}
        metrics.update(
            method=self.method.name,
            dataset=self.info.name,
            num_train=self.info.num_train,
            config=dataclasses.asdict(self.config),
            stages=stages,
            teacher_paths=[os.path.abspath(path) for path in self.teacher_paths],
            input=self.input_description(),
        )
        metrics.update(extra or {})
        if self.baseline_metrics is not None:
            metrics["baseline"] = self.baseline_metrics
            metrics["gain"] = metrics["student"]["test_accuracy"] - self.baseline_metrics["test_accuracy"]
        storage.save_model(student, os.path.join(model_dir, "student.keras"))
        if distiller is not None and distiller.translators:
            save_translators(distiller, os.path.join(model_dir, "translators.weights.h5"))
        storage.export_saved_model(student, os.path.join(model_dir, "export"))
        summary.plot(metrics, os.path.join(model_dir, "summary.png"))
        storage.write_json(os.path.join(model_dir, "metrics.json"), metrics)  # last: the run is complete
        checkpointing.remove_checkpoints(model_dir)
        return metrics


def top_k_accuracy(probabilities, labels, k=1):
    """The fraction of examples whose label is among the `k` most probable classes.

    Equal probabilities rank by class index, lower first, as `np.argmax` does:
    `k=1` is the usual top-1 accuracy.
    """
    probabilities = np.asarray(probabilities)
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


class TranslatorBank(keras.Model):
    """The NTLs of a distiller, as one model so their weights save together."""

    def __init__(self, translators, **kwargs):
        super().__init__(**kwargs)
        self.translators = list(translators)
        self.built = True


def save_translators(distiller, path):
    """Writes the NTLs' weights and, beside them, the shapes to rebuild them."""
    bank = TranslatorBank(distiller.translators)
    storage.save_weights(bank, path)
    spec = [
        {
            "input_shape": list(distiller.student_feature_shape),
            "config": translator.get_config(),
        }
        for translator in distiller.translators
    ]
    storage.write_json(path.replace(".weights.h5", ".json"), spec)


def load_translators(path):
    """Rebuilds the NTLs saved by `save_translators` and loads their weights."""
    spec_path = path.replace(".weights.h5", ".json")
    if not (os.path.isfile(path) and os.path.isfile(spec_path)):
        raise ValueError(f"No saved NTLs at {path} (and {os.path.basename(spec_path)}).")
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    translators = []
    for entry in spec:
        translator = translators_lib.Translator.from_config(entry["config"])
        translator.build((None,) + tuple(entry["input_shape"]))
        translators.append(translator)
    TranslatorBank(translators).load_weights(path)
    return translators


def describe_plan(experiment):
    """The plan of a run (models, parameter counts, steps) as printable lines."""
    config, info = experiment.config, experiment.info
    student = experiment.checked_models["student"]
    teachers = experiment.checked_models["teachers"]
    steps = info.num_train // config.batch_size
    student_shape = frozen.feature_shape(student, config.student_layer, role="Student")
    lines = [
        f"method {config.method} on {info.name}: {info.num_train} training / {info.num_test} "
        f"test examples, images {info.image_shape}, {info.num_classes} classes",
        "input: raw pixels {} in [0, 255], normalised inside every model, (x / 255 - mean) / std "
        "with mean {} and std {}; augmentation: {}".format(
            "x".join(str(size) for size in info.image_shape), _rounded(info.mean),
            _rounded(info.std), data_lib.describe_augmentation(info),
        ),
        f"student {config.model}: {student.count_params():,} parameters, features {student_shape}",
    ]
    if teachers:
        count = experiment.method.teacher_count(config)
        teacher = teachers[0]
        teacher_shape = frozen.feature_shape(teacher, config.teacher_layer, role="Teacher")
        origin = (
            f"{len(config.teachers)} from files (--teacher_preprocessing={config.teacher_preprocessing})"
            if config.teachers
            else f"{count} x {experiment.method.teacher_architecture(config)} trained with CE"
        )
        lines.append(
            f"teachers: {origin}; {teacher.name}: {teacher.count_params():,} parameters, "
            f"features {teacher_shape}"
        )
        channels = experiment.method.translator_channels(config, teacher_shape[-1])
        if channels:
            ntl = translators_lib.translator_for(student_shape, teacher_shape, out_channels=channels)
            lines.append(f"NTLs: {count} x {ntl.count_params():,} parameters (dropped after training)")
    lines += experiment.method.plan_notes(config)
    schedule = config.lr_schedule
    if schedule == "step":
        schedule += f" x{config.lr_decay_factor} at epochs {list(config.lr_decay_epochs) or 'at 50%/75%'}"
    lines.append(
        f"recipe: {config.epochs} epochs x {steps} steps = {config.epochs * steps:,} steps, batch "
        f"{config.batch_size}, SGD lr {config.learning_rate} ({schedule}), momentum "
        f"{config.momentum}, weight decay {config.weight_decay}, beta {config.beta}"
        + (f", kd_weight {config.kd_weight}, T {config.temperature}" if config.kd_weight else "")
    )
    lines.append(f"outputs: {config.model_dir}")
    return lines


def _rounded(values):
    return "[" + ", ".join(f"{value:.4f}" for value in values) + "]"


def run(config, *, strategy=None):
    """Runs the method named by `config.method`; returns the metrics written.

    With `config.dry_run`, validates everything, prints the plan and returns
    `{"plan": [...lines]}` without training or writing anything.
    """
    from keras_feed import methods  # methods build on this module

    method = methods.get(config.method)
    if strategy is None:
        strategy = distribute.make_strategy(
            config.strategy, tpu=config.tpu, tpu_zone=config.tpu_zone,
            gcp_project=config.gcp_project,
        )
    # Every worker runs the same program; only the chief writes into model_dir.
    config = dataclasses.replace(
        config,
        model_dir=distribute.worker_path(strategy, config.model_dir),
        teacher_dir=distribute.worker_path(strategy, config.teacher_dir),
    )
    with dtype_policy(config.mixed_precision):  # before any model is built
        return _run(config, method, strategy)


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy `name` (one of `PRECISIONS`) inside the block.

    Under `mixed_float16` or `mixed_bfloat16` layers compute in 16 bits and keep
    float32 weights; the loss terms are float32 and, for float16, `compile`
    wraps the optimizer in a `LossScaleOptimizer` (dynamic loss scaling).
    """
    if name not in PRECISIONS:
        raise ValueError(f"Unknown --mixed_precision '{name}'; choose from {', '.join(PRECISIONS)}.")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _run(config, method, strategy):
    if config.deterministic:
        checkpointing.enable_determinism(config.seed)
    experiment = Experiment(config, method, strategy=strategy)
    if config.dry_run:
        lines = describe_plan(experiment)
        print("Plan (dry run, nothing trained or written):\n  " + "\n  ".join(lines))
        return {"plan": lines}
    with checkpointing.RunDirectory(config) as model_dir:
        if model_dir.finished is not None:
            say("%s holds this run, complete (metrics.json): nothing to train.", config.model_dir)
            return model_dir.finished
        if model_dir.resuming:
            say("Resuming the run in %s", config.model_dir)
        if config.baseline:
            experiment.train_baseline()
        keras.utils.set_random_seed(config.seed)
        return method.run(experiment)

