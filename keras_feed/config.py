"""The settings of a training run: `TrainConfig`, its validation, its schedule.

`TrainConfig` is the one source of truth for a run's settings. Each field
carries, as metadata, what the command line needs to offer it as a flag of the
same name (its help, its choices, whether a rerun may change it: see
`setting`); `keras-feed-train`'s flags are derived from the fields
(`flag_specs`), so a new setting is one new field. The choices come from the
registries that define them (methods, strategies, precisions, preprocessing
conventions).
"""

import dataclasses
import os
import typing

import keras
import numpy as np

from keras_feed import distribute
from keras_feed import methods
from keras_feed.models import preprocessing

LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def setting(default, help, *, choices=None, resumable=False, item=None):  # pylint: disable=redefined-builtin
    """A `TrainConfig` field with what its flag needs.

    Args:
      default: the default value (also the flag's).
      help: the flag's help text.
      choices: the allowed values: a tuple, or a function returning them (a
        registry's `names`), read when the flags are defined.
      resumable: whether a rerun may change it and still resume the run
        (`keras_feed.checkpointing.comparable_settings`): where and how it
        runs, not what it trains.
      item: for tuple settings, the type of their comma-separated items.
    """
    metadata = {"help": help, "choices": choices, "resumable": resumable, "item": item}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; `keras-feed-train`'s flags are its fields."""

    # What to train.
    method: str = setting("pfeed", "Training method (pfeed with --kd_weight > 0: FEED + KD).",
                          choices=methods.names)
    dataset: str = setting(
        "cifar100",
        "cifar10, cifar100, imagenet2012, fashion_mnist, mnist (tfds or an IDX --data_dir), "
        "idx, folder, synthetic.")
    data_dir: str | None = setting(
        None, "tfds data dir, or a folder of IDX files / class sub-folders.")
    image_size: int | None = setting(None, "Image size for imagenet2012 and folder datasets.")
    model: str = setting("resnet56", "Student architecture (a keras_feed.models name).")
    teacher_model: str | None = setting(None, "Teacher architecture; default: the student's.")
    teachers: tuple = setting(
        (), "Comma-separated .keras files of trained teachers; empty: train --num_teachers of "
        "them.", item=str)
    teacher_preprocessing: str = setting(
        "auto",
        "What a teacher file (--teachers, or one reused from --teacher_dir) without its own "
        "preprocessing layer after its input expects: auto refuses such a file; dataset: "
        "images normalised with the dataset's mean and std (every keras-feed 0.1.0 file; the "
        "layer is added); none: raw pixels in [0, 255]. A file with the layer is used as it is.",
        choices=preprocessing.CONVENTIONS)
    num_teachers: int = setting(2, "Teachers to train when --teachers is empty.")
    teacher_dir: str | None = setting(
        None, "Where trained teachers are kept and reused; default: <model_dir>/teachers.")
    teacher_seed: int = setting(100, "Teacher i is trained with seed teacher_seed + i.")
    teacher_epochs: int | None = setting(None, "Epochs for each teacher; default: --epochs.")
    student_layer: str = setting("features", "Name of the student's feature-map layer.")
    teacher_layer: str = setting("features", "Name of the teachers' feature-map layer.")
    translator_batchnorm: bool = setting(False, "BatchNorm inside the NTLs.")

    # Data.
    train_examples: int | None = setting(
        None, "Train on a seeded subset of this many examples.")
    subset_seed: int = setting(
        0, "Seed choosing the --train_examples subset (the same for teachers and student).")
    validation_examples: int = setting(
        0, "Hold out this many training examples (the last of a --subset_seed permutation, "
        "whatever --train_examples is) as a validation split: --validation_freq evaluates on "
        "it, and metrics.json gives every model's validation accuracy beside its test "
        "accuracy. Tune recipes on it, not on the test split. 0: none.")

    # Recipe.
    epochs: int = setting(200, "Training epochs of the student.")
    batch_size: int = setting(128, "Global batch size.")
    eval_batch_size: int = setting(256, "Batch size for evaluation.")
    learning_rate: float = setting(0.1, "Initial learning rate (SGD).")
    lr_schedule: str = setting("step", "Learning-rate schedule.", choices=LR_SCHEDULES)
    lr_decay_epochs: tuple = setting(
        (), "Step schedule: epochs at which the rate is multiplied by --lr_decay_factor; "
        "default: 50% and 75% of the epochs.", item=int)
    lr_decay_factor: float = setting(0.1, "Step schedule: the decay factor.")
    momentum: float = setting(0.9, "SGD momentum.")
    nesterov: bool = setting(False, "Nesterov momentum.")
    weight_decay: float = setting(5e-4, "Coupled L2 weight decay (added to the gradients).")
    beta: float = setting(500.0, "Weight of the FEED terms.")
    kd_weight: float = setting(
        0.0, "Weight of Hinton KD in [0, 1]; cross-entropy gets 1 - kd_weight.")
    temperature: float = setting(4.0, "KD temperature.")
    seed: int = setting(
        0, "Seed of the student's initialisation, data order and augmentation.")
    validation_freq: int = setting(
        0, "Evaluate every N epochs during training, on the validation split if "
        "--validation_examples holds one out, else on the test split (0: only at the end).")
    jit_compile: bool = setting(False, "Compile the train step with XLA.")
    mixed_precision: str = setting(
        "float32", "Keras dtype policy: 16-bit computation with float32 weights and loss terms "
        "(float16 with loss scaling).", choices=PRECISIONS)

    # Devices (keras_feed.distribute).
    strategy: str = setting(
        "default", "tf.distribute strategy: one device, this machine's replicas, several "
        "machines (cluster from TF_CONFIG), or a TPU.",
        choices=distribute.STRATEGIES, resumable=True)
    tpu: str | None = setting(
        None, "--strategy=tpu: the TPU's name or grpc:// address; default: from the "
        "environment.", resumable=True)
    tpu_zone: str | None = setting(
        None, "--strategy=tpu: the TPU's Google Cloud zone.", resumable=True)
    gcp_project: str | None = setting(
        None, "--strategy=tpu: the TPU's Google Cloud project.", resumable=True)
    unsafe_load: bool = setting(
        False, "Allow .keras files that carry code (Lambda layers). Only for files you trust.",
        resumable=True)

    # Sequential FEED, Factor Transfer, the baseline.
    generations: int = setting(
        2, "sfeed: born-again generations distilled after generation 0.")
    ft_rate: float = setting(
        0.5, "ft: paraphrase rate k in (0, 1]; the factor has k * C channels.")
    paraphraser_epochs: int = setting(
        10, "ft: epochs of each paraphraser's reconstruction pre-training.")
    paraphraser_learning_rate: float = setting(
        0.01, "ft: the paraphraser's peak learning rate (same schedule as the student's); its "
        "reconstruction loss on raw teacher maps diverges at the student's usual 0.1.")
    baseline: bool = setting(
        False, "Also train a plain cross-entropy student of the same architecture and seed, "
        "and report its test accuracy and the gain (metrics.json: baseline, gain).")
    dry_run: bool = setting(
        False, "Validate the flags, build the models and the data spec, print the plan, train "
        "nothing.", resumable=True)

    # Outputs and resuming.
    model_dir: str = setting(
        "runs/feed", "Where the student, export, metrics and logs are written.", resumable=True)
    checkpoint_steps: int = setting(
        0, "Also checkpoint every N training steps (0: at the end of each epoch only); "
        "rerunning with the same flags resumes from the last checkpoint.", resumable=True)
    deterministic: bool = setting(
        False, "Seeded, deterministic ops: a run killed and resumed ends with the same "
        "weights, bit for bit, as an uninterrupted one (slower on some hardware).")
    verbose: int | None = setting(
        None, "Keras fit verbosity (0, 1: bar, 2: a line an epoch); default: bar on a "
        "terminal.", resumable=True)

    @property
    def teacher_architecture(self):
        return self.teacher_model or self.model

    @property
    def teacher_folder(self):
        return self.teacher_dir or os.path.join(self.model_dir, "teachers")


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """What a command line needs to offer one `TrainConfig` field as a flag."""

    name: str
    kind: str  # string | integer | float | bool | enum | list
    default: typing.Any
    help: str
    choices: tuple | None = None
    item: type | None = None


def _base_type(annotation):
    """`int` for `int | None`, and so on."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    return arguments[0] if arguments else annotation


def flag_specs(names=None):
    """The `FlagSpec` of every field of `TrainConfig` (or of those in `names`)."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for field in dataclasses.fields(TrainConfig):
        if names is not None and field.name not in names:
            continue
        meta = field.metadata
        choices = meta["choices"]
        if callable(choices):
            choices = choices()
        base = _base_type(hints[field.name])
        if choices:
            kind = "enum"
        elif base is bool:
            kind = "bool"
        elif base is int:
            kind = "integer"
        elif base is float:
            kind = "float"
        elif base is tuple:
            kind = "list"
        else:
            kind = "string"
        default = list(field.default) if kind == "list" else field.default
        specs.append(FlagSpec(field.name, kind, default, meta["help"],
                              tuple(choices) if choices else None, meta["item"]))
    return specs


def from_values(values):
    """A `TrainConfig` from flag values (`{name: value}`, lists for tuple settings)."""
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    settings = {}
    for name, value in values.items():
        item = fields[name].metadata["item"]
        if item is not None and value is not None:
            try:
                value = tuple(item(entry) for entry in value)
            except ValueError:
                raise ValueError(
                    f"--{name} must be a comma-separated list of {item.__name__} values, got "
                    f"{','.join(str(entry) for entry in value)}."
                ) from None
        settings[name] = value
    return TrainConfig(**settings)


def from_record(record):
    """The `TrainConfig` recorded in a `metrics.json` (`config`), defaults for what is missing.

    Settings the record has that this version does not know are ignored.
    """
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{
        name: tuple(value) if isinstance(value, list) else value
        for name, value in record.items() if name in known
    })


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
