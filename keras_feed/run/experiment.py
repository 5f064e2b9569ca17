"""The stages of a training run: `Experiment`, the machinery every method uses.

An `Experiment` holds a run's validated data and models; it builds models,
trains teachers and students (each a resumable stage, `keras_feed.run.checkpointing`),
evaluates them and writes the outputs. Methods (`keras_feed.run.methods`) call it;
the runner (`keras_feed.run.runner.run`) makes it.
"""

import contextlib
import dataclasses
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from keras_feed import data as data_lib
from keras_feed import models
from keras_feed.core import distiller as distiller_lib
from keras_feed.core import frozen
from keras_feed.models import preprocessing
from keras_feed.run import (
    checkpointing,
    distribute,
    files,
    interrupts,
    storage,
    summary,
)
from keras_feed.run import config as config_lib
from keras_feed.run.reporting import say

#: The settings a trained teacher is made of, besides its architecture and epochs:
#: recorded beside its file (`teacher_<i>.json`) and compared when it is reused.
TEACHER_RECORD_SETTINGS = (
    "dataset", "image_size", "train_examples", "subset_seed", "validation_examples",
    "batch_size", "learning_rate", "lr_schedule", "lr_decay_epochs", "lr_decay_factor",
    "momentum", "nesterov", "weight_decay",
)
#: The flags of a teacher record's entries that are not named as their flag.
TEACHER_RECORD_FLAGS = {"architecture": "teacher_model", "epochs": "teacher_epochs",
                        "seed": "teacher_seed"}


class Experiment:
    """The shared machinery of a run: data, models, fitting, evaluation.

    Methods (`keras_feed.run.methods`) use it to train what they need; it keeps
    the validated data and the teacher plan, and writes the outputs.
    """

    def __init__(self, config, method, *, strategy=None):
        self.config = config
        self.method = method
        self.strategy = strategy or distribute.make_strategy("default")
        config_lib.check_config(config, method)
        distribute.check_batch_size(self.strategy, config.batch_size)
        which = dict(  # what describe and load both take
            data_dir=config.data_dir, train_examples=config.train_examples,
            image_size=config.image_size, validation_examples=config.validation_examples,
        )
        if config.dry_run:  # describe the data, never download or read it all
            self.data = None
            self.info = data_lib.describe(config.dataset, **which)
            if config.batch_size > self.info.num_train:
                raise ValueError(
                    f"--batch_size={config.batch_size} exceeds the {self.info.num_train} "
                    "training examples."
                )
        else:
            self.data = data_lib.load(
                config.dataset, seed=config.seed, subset_seed=config.subset_seed, **which
            )
            self.info = self.data.info
            self.data.steps_per_epoch(config.batch_size)  # raises if the batch is too large
        if config.validation_freq:  # on the split `splits()` gives last
            split = "validation" if self.info.num_validation else "test"
            distribute.check_evaluation_split(
                self.strategy, split, getattr(self.info, f"num_{split}"))
        self.input_shape = tuple(self.info.image_shape)
        self.num_classes = self.info.num_classes
        self.history = {}
        self.baseline_metrics = None
        self._labels = {}  # split -> labels, in prediction order
        self._noted = set()  # teacher files without a record, noted once
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
            if not teachers:  # one model per teacher; each architecture built once
                plan = self.method.plan(self.config)
                built = {self.config.model: student}  # its shapes are the teacher's
                for architecture in config_lib.per_teacher(plan.teacher_architecture,
                                                           plan.teacher_count):
                    if architecture not in built:
                        built[architecture] = self.build_model(architecture, seed=0)
                    teachers.append(built[architecture])
            # The core's one check of student, teachers and terms, as the method
            # will build its distiller (`FEEDDistiller` runs the same).
            plan = self.method.plan(self.config)
            settings = self.distiller_settings()
            if plan.translator_channels is None:
                settings["beta"] = 0.0  # no NTLs (KD alone)
            else:
                settings["translator_channels"] = plan.translator_channels
            distiller_lib.validate(student, teachers, **settings)
            if paths:  # after the shapes: how the files take their inputs
                teachers = [self._raw_pixel_teacher(t, path) for t, path in zip(teachers, paths)]
            else:
                self._check_teacher_records()
            self.checked_models["teachers"] = teachers

    def _check_teacher_records(self):
        """Refuses a teacher file of `teacher_folder` trained otherwise than this run asks."""
        if getattr(self.method, "uses_teacher_folder", True):  # sfeed trains its own
            for index in range(self.config.num_teachers):
                self.check_teacher_record(index)

    def _raw_pixel_teacher(self, teacher, path):
        """The teacher read from `path`, taking raw pixels as the data gives them.

        A file that starts with its own preprocessing layer is used as it is;
        one without (a model trained outside keras-feed) is taken as
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
        """`(teachers, paths)`: the frozen teachers, loaded from `config.teachers` or trained
        with CE, and their files (for `write_outputs`' `teacher_paths`).

        Trained teachers are saved to `teacher_folder/teacher_<i>.keras`, and a
        teacher file already there is reused rather than trained again.
        While it trains or reads the teachers of `teacher_folder` it holds the
        folder's lock: another run sharing the folder waits, then reuses them.
        """
        paths = list(self.config.teachers)
        folder = self.config.teacher_folder
        lock = contextlib.nullcontext() if paths else files.folder_lock(
            folder, on_wait=lambda: say(
                "Waiting for the lock on %s: another run trains or reads teachers there", folder
            )
        )
        with lock:
            if not paths:
                for index in range(self.config.num_teachers):
                    path = self.check_teacher_record(index)
                    record = self.teacher_record(index)
                    self.train_with_ce(
                        path,
                        record["architecture"],
                        seed=record["seed"],
                        stage=f"teacher_{index}",
                        epochs=record["epochs"],
                        what=f"teacher {index + 1}/{self.config.num_teachers}",
                        record=record,
                    )
                    paths.append(path)
            with self.strategy.scope():
                return [self._load_teacher(path) for path in paths], paths

    def teacher_record(self, index):
        """What teacher `index` of the run is trained with: written as `teacher_<i>.json`."""
        config = self.config
        record = {
            "architecture": config.teacher_architectures()[index],
            "epochs": config.teacher_epochs_each()[index],
            "seed": config.teacher_seed + index,
            **{name: getattr(config, name) for name in TEACHER_RECORD_SETTINGS},
        }
        return json.loads(json.dumps(record))  # as it reads back: lists, not tuples

    def check_teacher_record(self, index):
        """The path of teacher `index` in `teacher_folder`, after checking a file there.

        A file there is reused only if the record beside it (`teacher_<i>.json`)
        gives the settings this run would train it with; one without a record
        (written by an earlier version) is reused as it is, with a note.
        """
        path = os.path.join(self.config.teacher_folder, f"teacher_{index}.keras")
        if not os.path.isfile(path):
            return path
        record_path = os.path.splitext(path)[0] + ".json"
        if not os.path.isfile(record_path):
            if path not in self._noted:  # once: checked before the run, and when it reuses it
                self._noted.add(path)
                say("Note: %s has no record of how it was trained (no %s: an earlier "
                    "version's); reusing it as it is", path, os.path.basename(record_path))
            return path
        with open(record_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        wanted = self.teacher_record(index)
        differing = [
            f"{name} (--{TEACHER_RECORD_FLAGS.get(name, name)}) {recorded.get(name)!r} there, "
            f"{value!r} now" for name, value in wanted.items() if recorded.get(name) != value]
        if differing:
            raise ValueError(
                f"Teacher file {path} was trained with other settings: {'; '.join(differing)}; "
                "use another --teacher_dir, or remove the file to train it again.")
        return path

    def load_frozen(self, path):
        """A trained model from `path`, frozen, inside the strategy's scope."""
        with self.strategy.scope():
            return self._load_teacher(path)

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
        probabilities = self.all_probabilities(self.load_frozen(path))
        self.baseline_metrics = {"model": self.config.model, "path": os.path.abspath(path),
                                 **self.scores(probabilities)}

    def train_with_ce(self, path, architecture, *, seed, stage, epochs, what, record=None):
        """Trains a fresh `architecture` with cross-entropy into `path`, unless it exists.

        `record`, when given, is written beside the file (`.json` for `.keras`) first.
        """
        if os.path.isfile(path):
            say("Reusing %s from %s", what, path)
            return
        say("Training %s (%s, %d epochs, seed %d) -> %s", what, architecture, epochs, seed,
            path)
        with self.strategy.scope():
            model = self.build_model(architecture, seed=seed)
        self.fit(model, [], stage=stage, seed=seed, epochs=epochs, kd_weight=0.0)
        if record is not None:  # before the model: a file is never there without its record
            files.write_json(os.path.splitext(path)[0] + ".json", record)
        storage.save_model(model, path)

    # -- training --------------------------------------------------------------

    def distiller_settings(self):
        """The config's `FEEDDistiller` arguments (its loss settings and layers)."""
        return dict(
            beta=self.config.beta,
            kd_weight=self.config.kd_weight,
            temperature=self.config.temperature,
            student_layer=self.config.student_layer,
            teacher_layers=self.config.teacher_layer,  # one for all, or a tuple of one each
            translator_batchnorm=self.config.translator_batchnorm,
            weight_decay=self.config.weight_decay,
            teacher_weighting=self.config.teacher_weighting,
            kd_form=self.config.kd_form,
        )

    def make_distiller(self, student, teachers, **overrides):
        """A compiled-ready `FEEDDistiller` with the config's loss settings."""
        settings = self.distiller_settings()
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
                optimizer=config_lib.make_optimizer(config, steps, epochs, learning_rate),
                metrics=metrics,
                jit_compile=config.jit_compile or distribute.compiles_steps(self.strategy),
            )
        validation = {}
        if validate and config.validation_freq:
            validation = dict(
                validation_data=distribute.evaluation_dataset(self.strategy, self._batches(
                    self.splits()[-1],
                    distribute.evaluation_batch_size(self.strategy, config.eval_batch_size),
                )),
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

    def splits(self):
        """The splits models are scored on: the test split, and the validation split if held out."""
        return ("test", "validation") if self.data.num_validation else ("test",)

    def _batches(self, split, batch_size=None):
        batch_size = batch_size or self.config.eval_batch_size
        return self.data.validation(batch_size) if split == "validation" else self.data.test(batch_size)

    def predict_probabilities(self, model, split="test"):
        """Class probabilities of `model` on `split`, `(examples, classes)`.

        A model with a softmax head gives them itself; logits are softmaxed.
        """
        images = self._batches(split).map(lambda x, y: x)
        outputs = tf.cast(distribute.predict(self.strategy, model, images), tf.float32)
        if frozen.head_kind(model) == "softmax":
            return outputs.numpy()
        return tf.nn.softmax(outputs).numpy()

    def labels(self, split="test"):
        """The labels of `split`, in the order `predict_probabilities` uses."""
        if split not in self._labels:
            batches = self._batches(split).map(lambda x, y: y)
            self._labels[split] = np.concatenate([labels.numpy() for labels in batches])
        return self._labels[split]

    def accuracy_of(self, model_or_probabilities, k=1):
        """Top-k test accuracy of a model, or of its predicted test probabilities."""
        probabilities = model_or_probabilities
        if isinstance(probabilities, keras.Model):
            probabilities = self.predict_probabilities(probabilities)
        return top_k_accuracy(probabilities, self.labels("test"), k)

    def all_probabilities(self, model):
        """`{split: probabilities}` of `model` on each of `splits()`."""
        return {split: self.predict_probabilities(model, split) for split in self.splits()}

    def scores(self, probabilities):
        """Top-1 and top-5 accuracy: `{"test_accuracy", "test_top5_accuracy"}`.

        `probabilities` are the test split's, or `{split: probabilities}`
        (`all_probabilities`): then each split's `<split>_accuracy` and
        `<split>_top5_accuracy`.
        """
        if not isinstance(probabilities, dict):
            probabilities = {"test": probabilities}
        results = {}
        for split, values in probabilities.items():
            results[f"{split}_accuracy"] = top_k_accuracy(values, self.labels(split))
            results[f"{split}_top5_accuracy"] = top_k_accuracy(values, self.labels(split), k=5)
        return results

    def evaluate(self, student, teachers):
        """Top-1 and top-5 accuracy of the student, each teacher and their ensemble.

        On the test split, and on the validation split when one is held out.
        """
        results = {
            "student": {
                "model": self.config.model,
                **self.scores(self.all_probabilities(student)),
                "parameters": int(student.count_params()),
            },
            "num_test": int(self.labels("test").shape[0]),
        }
        if self.data.num_validation:
            results["num_validation"] = int(self.data.num_validation)
        if teachers:
            probabilities = [self.all_probabilities(t) for t in teachers]
            results["teachers"] = [
                {"model": teacher.name, **self.scores(p)}
                for teacher, p in zip(teachers, probabilities)
            ]
            ensemble = {split: np.mean([p[split] for p in probabilities], axis=0)
                        for split in self.splits()}
            results["ensemble"] = {"size": len(teachers), **self.scores(ensemble)}
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

    def write_outputs(self, student, distiller, teachers, *, teacher_paths=(), extra=None,
                      metrics=None):
        """Saves the student, its export, the NTLs and `metrics.json`.

        `teacher_paths` are the teachers' files, recorded in `metrics.json`;
        `extra`, more entries for it; `metrics`, when given, is
        `evaluate(student, teachers)` already computed.
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
            teacher_paths=[os.path.abspath(path) for path in teacher_paths],
            input=self.input_description(),
        )
        metrics.update(extra or {})
        if self.baseline_metrics is not None:
            metrics["baseline"] = self.baseline_metrics
            for split in self.splits():  # gain (test), validation_gain
                prefix = "" if split == "test" else f"{split}_"
                metrics[f"{prefix}gain"] = (metrics["student"][f"{split}_accuracy"]
                                            - self.baseline_metrics[f"{split}_accuracy"])
        storage.save_model(student, os.path.join(model_dir, "student.keras"))
        interrupts.signal_point("outputs", "student.keras")
        if distiller is not None and distiller.translators:
            storage.save_translators(
                distiller, os.path.join(model_dir, "translators.weights.h5"))
        storage.export_saved_model(student, os.path.join(model_dir, "export"))
        summary.plot(metrics, os.path.join(model_dir, "summary.png"))
        files.write_json(os.path.join(model_dir, "metrics.json"), metrics)  # last: the run is complete
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
