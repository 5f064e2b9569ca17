"""Resumable runs: the model directory's lock and record, stage checkpoints.

A run owns its `--model_dir`. While it trains, the folder holds

    .lock                            held (flock) by the one process writing the run
    run.json                         the run's settings; a rerun must match them
    checkpoints/<stage>/state.npz    the latest saved state of each training stage

and, once the run is complete, its outputs with `metrics.json` written last (the
checkpoints are then removed). Re-running `keras-feed-train` with the same flags
continues where a killed run stopped: stages whose checkpoint is complete
(teachers, sFEED generations, paraphrasers, the student) are not trained again,
and the stage that was interrupted restarts from its last checkpoint — the
data pipeline is rebuilt at the saved (epoch, batch), so with `--deterministic`
the resumed run ends bitwise where an uninterrupted one would.

A stage's state is every variable of the trainer (student, NTLs or paraphraser,
BatchNorm statistics), of its optimizer (momentum, the step counter the
learning-rate schedule reads) and of its metrics, plus the per-epoch history,
in one `.npz` written atomically. `StageCheckpoint` is also the Keras callback
that writes it (every `--checkpoint_steps` steps and at each epoch's end) and
that stops training when a loss term turns non-finite, keeping the last good
checkpoint.

Why not `keras.callbacks.BackupAndRestore` (Keras 3.15): with an integer
`save_freq` it records the batch but resumes at the start of the interrupted
epoch, replaying batches the restored weights have already seen, and it
writes weights and metadata in place, one after the other; neither is exact
or crash-safe.
"""

import contextlib
import json
import math
import os
import re
import shutil
import time

import keras
import numpy as np

from keras_feed.run import files, interrupts

STATE_FILE = "state.npz"
CHECKPOINTS = "checkpoints"
#: 2: the metrics' variables after the trainer's and optimizer's ("core");
#: 3: the core's layout (`variable_layout`), checked before a restore.
FORMAT = 3

class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss (or weights); the run was stopped."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run."""


def enable_determinism(seed):
    """Seeds Python, NumPy, TensorFlow and Keras and turns op determinism on.

    With it, two runs with the same settings on the same machine and software
    produce bitwise equal weights, interrupted or not.
    """
    import tensorflow as tf  # noqa: PLC0415 (the input pipelines' ops, on either backend)

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def checkpoint_folder(model_dir, stage):
    """Where the checkpoints of training stage `stage` live."""
    return os.path.join(model_dir, CHECKPOINTS, stage)


def remove_checkpoints(model_dir):
    """Deletes every stage checkpoint of a finished run."""
    shutil.rmtree(os.path.join(model_dir, CHECKPOINTS), ignore_errors=True)


# -- stage checkpoints --------------------------------------------------------


def _unique(variables):
    seen, unique = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            unique.append(variable)
    return unique


def _state_variables(model):
    """The trainer's and its optimizer's variables, in a fixed order."""
    return _unique([*model.variables, *model.optimizer.variables])


def _metric_variables(model):
    """The variables of every metric of `model` (compiled ones once Keras built them)."""
    return [variable for metric in model.metrics for variable in metric.variables]


def _first_non_finite(logs):
    """`(name, value)` of the first non-finite logged term, loss terms before the total."""
    names = [name for name in logs if name != "loss"] + (["loss"] if "loss" in logs else [])
    for name in names:
        try:
            value = float(logs[name])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            return name, value
    return None


#: `[the StageCheckpoint of the stage this process trains, or trained last]`.
_TRAINING = []


def interruption_message():
    """Where a run stopped by Ctrl-C or SIGTERM stood, in one line.

    Inside a stage's `fit`, the signal takes effect at the end of the step it
    lands in, after a checkpoint of that step is written: a rerun of the same
    command resumes from there. A second signal before that stops at once; the
    rerun then resumes from the last checkpoint on disk (each epoch's end, every
    `--checkpoint_steps`, and the interruption's own, if it was written).
    """
    checkpoint = _TRAINING[0] if _TRAINING else None
    if checkpoint is None:
        return "interrupted before training began; run the same command again to resume"
    if checkpoint.complete:
        return (f"interrupted after stage {checkpoint.stage}; "
                "run the same command again to resume")
    saved_step = _step_on_disk(checkpoint.path)  # a save may have ended mid-record
    if saved_step is None:
        since = "the stage's start (it had no checkpoint yet)"
    else:
        since = f"its last checkpoint, {checkpoint.describe(saved_step)}"
    return (f"interrupted at step {checkpoint.step} of stage {checkpoint.stage}; "
            f"run the same command again to resume from {since}")


def read_state(path, *, values=False):
    """`(metadata, arrays)` of the stage checkpoint file `path` (arrays: with `values`).

    The one reader of the format `StageCheckpoint.save` writes; a missing or
    damaged file raises whatever NumPy or JSON raise.
    """
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
        arrays = [archive[f"v{index}"] for index in range(meta["count"])] if values else None
    return meta, arrays


def _step_on_disk(path):
    """The step of the checkpoint at `path` that a rerun resumes from, or None."""
    try:
        return int(read_state(path)[0]["step"])
    except Exception:  # pylint: disable=broad-except  (missing or damaged: none)
        return None


def variable_layout(variables):
    """What restoring by position relies on, one line a variable: its name (without
    Keras' numbering of layers, `dense_3` -> `dense`), shape and dtype.

    A checkpoint restores into the variables it was saved from only if the
    layouts agree: a variable moved, added or swapped (BatchNorm's four of one
    shape) is refused rather than restored into the wrong place.
    """
    return [
        f"{re.sub(r'_[0-9]+(?=_|$)', '', variable.name)} {tuple(variable.shape)} "
        f"{keras.backend.standardize_dtype(variable.dtype)}"
        for variable in variables
    ]


class StageCheckpoint(keras.callbacks.Callback):
    """Saves, restores and guards one training stage of a compiled trainer.

    Use: `restore(model)` before fitting (builds the optimizer and loads the
    latest state, if any), then fit each of `segments()` with this callback.

    Args:
      folder: the stage's checkpoint folder (`checkpoint_folder(...)`).
      stage: the stage's name, for messages.
      steps_per_epoch, epochs: the stage's schedule; a checkpoint written for
        another schedule is refused.
      every_steps: also save every this many steps; 0: at each epoch's end only.
    """

    def __init__(self, folder, *, stage, steps_per_epoch, epochs, every_steps=0):
        super().__init__()
        self.folder = folder
        self.path = os.path.join(folder, STATE_FILE)
        self.stage = stage
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.every_steps = int(every_steps)
        self.step = 0  # optimizer steps done (batches consumed) in this stage
        self.saved_step = None  # step of the checkpoint on disk
        self.history = {}  # logged name -> one value per finished epoch
        self.wall_s = 0.0  # training time of earlier attempts
        self._variables = None
        self._metric_values = None  # restored metric state for a resumed epoch
        self._session_start = time.time()
        self._session_steps = 0
        self._segment_start = 0

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.epochs

    @property
    def complete(self):
        return self.step >= self.total_steps

    def position(self, step=None):
        """`(epoch, batch)` (both from 0) of step `step` (default: the current one)."""
        return divmod(self.step if step is None else step, self.steps_per_epoch)

    def describe(self, step):
        """Step `step` in words: "step 37 (epoch 3, batch 5)", 1-based."""
        epoch, batch = self.position(step - 1)
        return f"step {step} (epoch {epoch + 1}, batch {batch + 1})"

    def segments(self):
        """What is left to fit: `[(initial_epoch, skip_batches, epochs), ...]`.

        A stage resumed mid-epoch is fitted in two calls: the rest of that
        epoch (`steps_per_epoch - skip_batches` steps), then the later epochs.
        """
        if self.complete:
            return []
        epoch, batch = self.position()
        if batch == 0:
            return [(epoch, 0, self.epochs)]
        remaining = [(epoch, batch, epoch + 1)]
        if epoch + 1 < self.epochs:
            remaining.append((epoch + 1, 0, self.epochs))
        return remaining

    # -- saving and loading ------------------------------------------------

    def _bind(self, model):
        self.set_model(model)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        self._variables = _state_variables(model)

    def restore(self, model):
        """Builds `model`'s optimizer and loads the latest checkpoint; returns the step."""
        self._bind(model)
        if not os.path.isfile(self.path):
            return 0
        try:
            meta, values = read_state(self.path, values=True)
        except Exception as error:  # a damaged file fails in many ways
            raise CheckpointError(
                f"Cannot read checkpoint {self.path} ({files.first_line(error)}); "
                f"delete {self.folder} to train stage {self.stage} from its start."
            ) from None
        problem = self._mismatch(meta, values)
        if problem:
            raise CheckpointError(
                f"Checkpoint {self.path} does not fit stage {self.stage} ({problem}); "
                f"delete {self.folder} to train the stage from its start."
            )
        for variable, value in zip(self._variables, values):
            variable.assign(value)
        self.step = self.saved_step = int(meta["step"])
        self.history = meta["history"]
        self.wall_s = float(meta["wall_s"])
        if self.position()[1]:
            # Resumed mid-epoch: the epoch's running metrics are restored once
            # `fit` has built the compiled ones (`on_epoch_begin`).
            self._metric_values = values[meta["core"]:]
        return self.step

    def _mismatch(self, meta, values):
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')}, expected {FORMAT}"
        schedule = (meta["steps_per_epoch"], meta["epochs"])
        if schedule != (self.steps_per_epoch, self.epochs):
            return (
                f"written for {schedule[1]} epochs x {schedule[0]} steps, this stage has "
                f"{self.epochs} x {self.steps_per_epoch}"
            )
        if meta["core"] != len(self._variables):
            return f"{meta['core']} variables saved, the trainer has {len(self._variables)}"
        layout = variable_layout(self._variables)
        for index, (saved, now) in enumerate(zip(meta["layout"], layout)):
            if saved != now:
                return f"variable {index} was saved as '{saved}', the trainer's is '{now}'"
        for variable, value in zip(self._variables, values):
            if tuple(value.shape) != tuple(variable.shape):
                return (
                    f"variable {variable.path} has shape {tuple(variable.shape)}, "
                    f"saved {tuple(value.shape)}"
                )
        return None

    def save(self):
        """Writes the current state atomically, unless a weight is non-finite."""
        variables = self._variables + _metric_variables(self.model)
        values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]
        for variable, value in zip(variables, values):
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                since = "its start" if self.saved_step is None else f"step {self.saved_step}"
                raise NonFiniteLossError(
                    f"Stage {self.stage} stopped at {self.describe(self.step)}: variable "
                    f"{variable.path} became non-finite since {since} while every loss "
                    f"term was finite (the gradients overflowed). {self._kept()}"
                )
        meta = {
            "format": FORMAT,
            "stage": self.stage,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "count": len(values),
            "core": len(self._variables),
            "layout": variable_layout(self._variables),
            "history": self.history,
            "wall_s": self.wall_s + time.time() - self._session_start,
        }
        arrays = {f"v{index}": value for index, value in enumerate(values)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        files.save_arrays(self.path, arrays)
        self.saved_step = self.step

    def _kept(self):
        advice = "lower --learning_rate or check the data and the teachers."
        if self.saved_step is None:
            return f"No checkpoint of this stage had been saved yet; {advice}"
        return (
            f"The last good checkpoint ({self.describe(self.saved_step)}) is kept in "
            f"{self.folder}; {advice}"
        )

    # -- the callback ------------------------------------------------------

    def on_train_begin(self, logs=None):
        _TRAINING[:] = [self]

    def on_epoch_begin(self, epoch, logs=None):
        skipped = self.steps_per_epoch - self.params["steps"]
        self._segment_start = epoch * self.steps_per_epoch + skipped
        if skipped and self._metric_values is not None:
            variables = _metric_variables(self.model)
            shapes = [tuple(v.shape) for v in variables]
            if shapes != [tuple(value.shape) for value in self._metric_values]:
                raise CheckpointError(
                    f"Checkpoint {self.path} holds the running values of other metrics "
                    f"than this stage compiles; delete {self.folder} to train stage "
                    f"{self.stage} from its start."
                )
            for variable, value in zip(variables, self._metric_values):
                variable.assign(value)
        self._metric_values = None

    def on_train_batch_begin(self, batch, logs=None):
        interrupts.signal_point(self.stage, self._segment_start + batch + 1)

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._segment_start + batch + 1
        self._session_steps += 1
        bad = _first_non_finite(logs or {})
        if bad:
            raise NonFiniteLossError(
                f"Stage {self.stage} stopped at {self.describe(self.step)}: the loss "
                f"term '{bad[0]}' is {bad[1]}. {self._kept()}"
            )
        if self.step % self.steps_per_epoch == 0:
            # The epoch's last step: `on_epoch_end` saves it once the epoch's logs
            # (and validation) are in, then takes a pending Ctrl-C or SIGTERM.
            return
        if (self.every_steps and self.step % self.every_steps == 0) or interrupts.pending():
            self.save()  # also when Ctrl-C or SIGTERM came during the step: no step is lost
        interrupts.check()  # ... which then stops the run here

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        self.step = (epoch + 1) * self.steps_per_epoch
        self.save()
        interrupts.check()

    def summary(self, batch_size):
        """The stage's record for `metrics.json`: epochs, time, throughput, history."""
        session = time.time() - self._session_start
        images_per_s = self._session_steps * batch_size / session if self._session_steps else None
        return stage_record(self.epochs, self.wall_s + session, images_per_s, self.history)


def fit_resumable(model, data, *, folder, epochs, steps_per_epoch, every_steps=0,
                  stage="training", callbacks=(), report=None, **fit_kwargs):
    """`model.fit` that a crash or kill does not lose: rerun it to continue exactly.

    The Python API's form of what `keras-feed-train` does for each stage: a
    `StageCheckpoint` in `folder` is restored before fitting and written at
    every epoch's end (and every `every_steps` steps), atomically; a rerun
    continues from the last one, at the batch where it stopped, with the
    optimizer's state, the learning-rate schedule's step and the epoch's
    running metrics, so that (with deterministic ops and data) it ends bitwise
    where an uninterrupted run would. A finished stage is not trained again.
    (`keras.callbacks.BackupAndRestore` instead replays the interrupted epoch.)

        distiller.compile(optimizer=..., metrics=["accuracy"])
        kf.run.checkpointing.fit_resumable(
            distiller, lambda epoch, skip: make_dataset(epoch).skip(skip),
            folder="ckpt/student", epochs=30, steps_per_epoch=steps)

    Args:
      model: a compiled `keras.Model` (e.g. a `FEEDDistiller`).
      data: a function `(epoch, skip_batches) -> dataset` giving that epoch's
        batches from batch `skip_batches` on (needed to resume mid-epoch), or
        anything `fit` takes (numpy arrays as `(x, y)`, a dataset): then
        checkpoints are written at epochs' ends only.
      folder: where the checkpoint lives.
      epochs, steps_per_epoch: the schedule; a checkpoint of another is refused.
      every_steps: also checkpoint every this many steps (with a function `data`).
      stage: the name used in messages.
      callbacks: more Keras callbacks.
      report: called with the restored `StageCheckpoint` before fitting (to
        say whether the stage starts, resumes or is done).
      **fit_kwargs: passed to `fit` (`verbose`, `validation_data`, ...).

    Returns:
      The `StageCheckpoint`, whose `history` holds every finished epoch's logs.
    """
    positioned = callable(data)
    if every_steps and not positioned:
        raise ValueError(
            "every_steps needs `data` as a function (epoch, skip_batches) -> dataset, "
            "to resume in the middle of an epoch."
        )
    checkpoint = StageCheckpoint(
        folder, stage=stage, steps_per_epoch=steps_per_epoch, epochs=epochs,
        every_steps=every_steps,
    )
    # tf.distribute's scope; on JAX, Keras lays restored values out as the
    # variables were created (the `keras.distribution` current then).
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow only
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        checkpoint.restore(model)
    if report is not None:
        report(checkpoint)
    for initial_epoch, skip_batches, end_epoch in checkpoint.segments():
        if positioned:
            epoch_data = {"x": data(initial_epoch, skip_batches)}
        else:
            epoch_data = dict(zip(("x", "y"), data)) if isinstance(data, tuple) else {"x": data}
        with interrupts.deferred():  # signals are taken between steps, not inside one
            model.fit(
                **epoch_data,
                initial_epoch=initial_epoch,
                epochs=end_epoch,
                steps_per_epoch=steps_per_epoch - skip_batches,
                callbacks=[checkpoint, *callbacks],
                **fit_kwargs,
            )
    return checkpoint


def stage_record(epochs, wall_s, images_per_s, history):
    """What `metrics.json` says of a training stage."""
    return {
        "epochs": epochs,
        "wall_s": round(wall_s, 1),
        "images_per_s": None if images_per_s is None else round(images_per_s, 1),
        "last_epoch": {name: values[-1] for name, values in history.items() if values},
        "history": history,
    }


def finished_stages(model_dir):
    """`{stage: record}` of the complete stage checkpoints in `model_dir`.

    A resumed run reuses what an earlier attempt trained (a teacher file, a
    generation); its record still belongs in the run's `metrics.json`.
    """
    records = {}
    folder = os.path.join(model_dir, CHECKPOINTS)
    for stage in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, stage, STATE_FILE)
        try:
            meta = read_state(path)[0]
        except Exception:  # absent or unreadable: nothing to report
            continue
        if meta.get("step", 0) >= meta.get("steps_per_epoch", 0) * meta.get("epochs", 0):
            records[stage] = stage_record(meta["epochs"], meta["wall_s"], None, meta["history"])
    return records
