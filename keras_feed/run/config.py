"""The settings of a training run: `TrainConfig`, its validation, its schedule.

`TrainConfig` is the one source of truth for a run's settings. Each field
carries, as metadata, what the command line needs to offer it as a flag of the
same name (its help, its choices, its range, whether a rerun may change it:
see `setting`); `keras-feed-train`'s flags are derived from the fields
(`flag_specs`), so a new setting is one new field. The choices come from the
registries that define them (methods, strategies, precisions, preprocessing
conventions); every number has a range (`settings.Bounds`) that `check_config`
checks.

Importing this module imports neither Keras nor the registries (methods,
models, `keras_feed.run.distribute`): they are imported where they are used, so
that a command can define the flags it takes, print its help and refuse an
unsupported Keras backend (`check_backend`) before Keras loads.
"""

import dataclasses
import json
import os
import sys
import typing

import numpy as np

from keras_feed.run.settings import Bounds, check_bounds, setting

LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

#: The Keras backends keras-feed runs on: its data pipelines, distribution
#: strategies and SavedModel exports are TensorFlow's, which JAX runs beside.
BACKENDS = ("tensorflow", "jax")


def _strategy_names():
    from keras_feed.run import distribute

    return distribute.STRATEGIES


def _weighting_names():
    from keras_feed.core import weighting

    return tuple(weighting.WEIGHTINGS)


def _kd_forms():
    from keras_feed.core import terms

    return terms.KD_FORMS


def _method_names():
    from keras_feed.run import methods

    return methods.names()


def _preprocessing_conventions():
    from keras_feed.models import preprocessing

    return preprocessing.CONVENTIONS


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; `keras-feed-train`'s flags are its fields."""

    # What to train.
    method: str = setting("pfeed", "Training method (pfeed with --kd_weight > 0: FEED + KD).",
                          choices=_method_names)
    dataset: str = setting(
        "cifar100",
        "cifar10, cifar100, imagenet2012, fashion_mnist, mnist (tfds or an IDX --data_dir), "
        "idx, folder, synthetic.")
    data_dir: str | None = setting(
        None, "tfds data dir, or a folder of IDX files / class sub-folders.")
    image_size: int | None = setting(None, "Image size for imagenet2012 and folder datasets.",
                                     bounds=">= 8")
    model: str = setting("resnet56", "Student architecture (a keras_feed.models name).")
    teacher_model: str | tuple | None = setting(
        None, "Teacher architecture: one for every teacher, or one per teacher "
        "(comma-separated, --num_teachers of them); default: the student's.",
        item=str, per_teacher=True)
    teachers: tuple = setting(
        (), "Comma-separated .keras files of trained teachers; empty: train --num_teachers of "
        "them.", item=str)
    teacher_preprocessing: str = setting(
        "auto",
        "What a teacher file (--teachers, or one reused from --teacher_dir) without its own "
        "preprocessing layer after its input expects, e.g. a model trained outside keras-feed: "
        "auto: nothing said, such a file is refused; dataset: images normalised with the "
        "dataset's mean and std (the layer is added); none: raw pixels in [0, 255]. A file "
        "with the layer is used as it is.",
        choices=_preprocessing_conventions)
    num_teachers: int = setting(2, "Teachers to train when --teachers is empty.", bounds=">= 1")
    teacher_dir: str | None = setting(
        None, "Where trained teachers are kept and reused; default: <model_dir>/teachers.")
    teacher_seed: int = setting(100, "Teacher i is trained with seed teacher_seed + i.",
                                bounds=">= 0")
    teacher_epochs: int | tuple | None = setting(
        None, "Epochs of each teacher: one for every teacher, or one per teacher "
        "(comma-separated, --num_teachers of them); default: --epochs.",
        item=int, bounds=">= 1", per_teacher=True)
    student_layer: str = setting("features", "Name of the student's feature-map layer.")
    teacher_layer: str | tuple = setting(
        "features", "Name of the teachers' feature-map layer: one for every teacher, or one "
        "per teacher (comma-separated, one per --teachers file, or --num_teachers of them).",
        item=str, per_teacher=True)
    translator_batchnorm: bool = setting(False, "BatchNorm inside the NTLs.")

    # Data.
    train_examples: int | None = setting(
        None, "Train on a seeded subset of this many examples.", bounds=">= 1")
    subset_seed: int = setting(
        0, "Seed choosing the --train_examples subset (the same for teachers and student).",
        bounds=">= 0")
    validation_examples: int = setting(
        0, "Hold out this many training examples (the last of a --subset_seed permutation, "
        "whatever --train_examples is) as a validation split: --validation_freq evaluates on "
        "it, and metrics.json gives every model's validation accuracy beside its test "
        "accuracy. Tune recipes on it, not on the test split. 0: none.", bounds=">= 0")

    # Recipe.
    epochs: int = setting(200, "Training epochs of the student.", bounds=">= 1")
    batch_size: int = setting(128, "Global batch size.", bounds=">= 1")
    eval_batch_size: int = setting(256, "Batch size for evaluation.", bounds=">= 1")
    learning_rate: float = setting(0.1, "Initial learning rate (SGD).", bounds="> 0")
    lr_schedule: str = setting("step", "Learning-rate schedule.", choices=LR_SCHEDULES)
    lr_decay_epochs: tuple = setting(
        (), "Step schedule: epochs at which the rate is multiplied by --lr_decay_factor; "
        "default: 50% and 75% of the epochs.", item=int, bounds=">= 1")
    lr_decay_factor: float = setting(
        0.1, "Step schedule: the decay factor (1: no decay).", bounds="(0, 1]")
    momentum: float = setting(0.9, "SGD momentum.", bounds="[0, 1)")
    nesterov: bool = setting(False, "Nesterov momentum.")
    weight_decay: float = setting(5e-4, "Coupled L2 weight decay (added to the gradients).",
                                  bounds=">= 0")
    beta: float = setting(500.0, "Weight of the FEED terms.", bounds=">= 0")
    kd_weight: float = setting(
        0.0, "Weight of Hinton KD; cross-entropy gets 1 - kd_weight.", bounds="[0, 1]")
    temperature: float = setting(4.0, "KD temperature.", bounds="> 0")
    teacher_weighting: str = setting(
        "equal", "How the teachers are weighted for each example, from their logits and the "
        "label (weights summing to the number of teachers): equal (the paper's loss), "
        "confidence (CA-MKD: by each teacher's cross-entropy on the label), entropy (EBKD: by "
        "the entropy of its prediction), agreement (AE-KD: one set per batch from the "
        "teachers' KD gradients). Logged as teacher_weight_<n>.",
        choices=_weighting_names)
    kd_form: str = setting(
        "ensemble", "The KD term's form: ensemble (Hinton's KD of the teachers' averaged soft "
        "targets, weighted per example) or per_teacher (CA-MKD's: each teacher's KL "
        "divergence, weighted per example, averaged over the teachers).",
        choices=_kd_forms)
    seed: int = setting(
        0, "Seed of the student's initialisation, data order and augmentation.",
        bounds=">= 0")
    validation_freq: int = setting(
        0, "Evaluate every N epochs during training, on the validation split if "
        "--validation_examples holds one out, else on the test split (0: only at the end).",
        bounds=">= 0")
    jit_compile: bool = setting(False, "Compile the train step with XLA.")
    mixed_precision: str = setting(
        "float32", "Keras dtype policy: 16-bit computation with float32 weights and loss terms "
        "(float16 with loss scaling).", choices=PRECISIONS)

    # Devices (keras_feed.run.distribute).
    strategy: str = setting(
        "default", "Where to train: one device (default); this machine's devices (mirrored: "
        "tf.distribute, or keras.distribution.DataParallel on JAX); several machines "
        "(multi_worker, cluster from TF_CONFIG; TensorFlow only); a TPU (tpu; TensorFlow "
        "only).",
        choices=_strategy_names, resumable=True)
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
        2, "sfeed: born-again generations distilled after generation 0.", bounds=">= 1")
    ft_rate: float = setting(
        0.5, "ft: paraphrase rate k; the factor has k * C channels.", bounds="(0, 1]")
    paraphraser_epochs: int = setting(
        10, "ft: epochs of each paraphraser's reconstruction pre-training.", bounds=">= 1")
    paraphraser_learning_rate: float = setting(
        0.01, "ft: the paraphraser's peak learning rate (same schedule as the student's); its "
        "reconstruction loss on raw teacher maps diverges at the student's usual 0.1.",
        bounds="> 0")
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
        "rerunning with the same flags resumes from the last checkpoint.", resumable=True,
        bounds=">= 0")
    deterministic: bool = setting(
        False, "Seeded, deterministic ops: a run killed and resumed ends with the same "
        "weights, bit for bit, as an uninterrupted one (slower on some hardware).")
    verbose: int | None = setting(
        None, "Keras fit verbosity (0, 1: bar, 2: a line an epoch); default: bar on a "
        "terminal.", resumable=True, bounds="{0, 1, 2}")

    def __post_init__(self):
        # A per-teacher setting given as a list is a tuple; a tuple of one, the value itself.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("per_teacher") and isinstance(value, (list, tuple)):
                value = tuple(value)
                setattr(self, field.name, value[0] if len(value) == 1 else value)

    @property
    def teacher_architecture(self):
        """The trained teachers' architecture: a name, or a tuple of one per teacher."""
        return self.teacher_model or self.model

    def teacher_architectures(self, count=None):
        """The architecture of each of `count` teachers (default `--num_teachers`)."""
        return per_teacher(self.teacher_architecture, count or self.num_teachers)

    def teacher_epochs_each(self, count=None):
        """The epochs of each of `count` teachers (default `--num_teachers`)."""
        return per_teacher(self.teacher_epochs or self.epochs, count or self.num_teachers)

    def teacher_layers(self, count):
        """The feature-map layer of each of `count` teachers."""
        return per_teacher(self.teacher_layer, count)

    @property
    def teacher_layer_count(self):
        """The teachers `--teacher_layer` names: one per teacher file, or trained one."""
        return len(self.teachers) or self.num_teachers

    @property
    def teacher_folder(self):
        return self.teacher_dir or os.path.join(self.model_dir, "teachers")


def per_teacher(value, count):
    """`value` (one for all, or a tuple of one per teacher) as a tuple of `count` values."""
    if isinstance(value, tuple):
        return value
    return (value,) * count


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """What a command line needs to offer one `TrainConfig` field as a flag."""

    name: str
    kind: str  # string | integer | float | bool | enum | list
    default: typing.Any
    help: str
    choices: tuple | None = None
    item: type | None = None
    bounds: Bounds | None = None


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
        elif meta["per_teacher"]:  # one value, or comma-separated ones (`from_values`)
            kind = "string"
        elif base is int:
            kind = "integer"
        elif base is float:
            kind = "float"
        elif base is tuple:
            kind = "list"
        else:
            kind = "string"
        default = list(field.default) if kind == "list" else field.default
        specs.append(FlagSpec(field.name, kind, default, flag_help(field),
                              tuple(choices) if choices else None, meta["item"], meta["bounds"]))
    return specs


def flag_help(field):
    """The help of `field`'s flag: its help, then its range (each item's, for lists)."""
    meta = field.metadata
    bounds = meta["bounds"]
    if bounds is None:
        return meta["help"]
    each = "each " if meta["item"] is not None else ""
    return f"{meta['help']} Range: {each}{bounds}."


def from_values(values):
    """A `TrainConfig` from flag values (`{name: value}`, lists for tuple settings).

    A per-teacher setting (`setting(per_teacher=True)`) takes one value, a
    comma-separated string of them, or a list: one value is the value itself
    (the same for every teacher), several a tuple (one per teacher).
    """
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    settings = {}
    for name, value in values.items():
        item = fields[name].metadata["item"]
        if item is not None and value is not None:
            if fields[name].metadata["per_teacher"]:
                if isinstance(value, str):
                    value = [entry.strip() for entry in value.split(",")] if value.strip() else []
                elif not isinstance(value, (list, tuple)):
                    value = [value]
            try:
                value = tuple(item(entry) for entry in value)
            except ValueError:
                raise ValueError(
                    f"--{name} must be a comma-separated list of {item.__name__} values, got "
                    f"{','.join(str(entry) for entry in value)}."
                ) from None
            if fields[name].metadata["per_teacher"] and not value:  # empty: the default
                value = fields[name].default
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
    """Raises `ValueError` (one line) on flag values that cannot work.

    First the Keras backend (`check_backend`), then every number: finite, and
    in its field's range (`setting(bounds=...)`), then the choices, the
    teacher files and what `method` checks itself (`Method.check`).
    """
    check_backend()
    for field in dataclasses.fields(config):  # nan and inf pass every comparison below
        value = getattr(config, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"--{field.name} must be a finite number, got {value}.")
    for field in dataclasses.fields(config):
        check_bounds(field, getattr(config, field.name))
        check_choice(field, getattr(config, field.name))
    for path in config.teachers:
        if not os.path.isfile(path):
            raise ValueError(f"Teacher file not found: {path}")
    check_per_teacher(config)
    check_unused(config, method)
    method.check(config)


def check_unused(config, method):
    """Raises `ValueError` (one line) on a loss setting that `method` would ignore.

    A KD weight or a teacher weighting for a method without teachers, a
    teacher weighting where one teacher teaches at a time (every weight would be
    1), and KD's form or temperature without a KD term: each would train
    something other than what the flags say, without a word.
    """
    defaults = TrainConfig()
    if not method.uses_teachers:
        for name, off, asks in (("teacher_weighting", "equal", "weighs teachers"),
                                ("kd_weight", 0.0, "asks for KD from teachers")):
            if getattr(config, name) != off:
                raise ValueError(f"--{name}={getattr(config, name)} {asks}, and "
                                 f"--method={config.method} has none.")
    elif config.teacher_weighting != "equal" and method.plan(config).teacher_count == 1:
        raise ValueError(
            f"--teacher_weighting={config.teacher_weighting} weighs teachers against each "
            f"other, and --method={config.method} here distils from one at a time (every "
            "weight would be 1).")
    if config.kd_weight == 0:
        unused = [f"--{name}={getattr(config, name)}" for name in ("kd_form", "temperature")
                  if getattr(config, name) != getattr(defaults, name)
                  and not (name == "temperature" and config.teacher_weighting == "agreement")]
        if unused:
            raise ValueError(f"{' and '.join(unused)} shape{'s' if len(unused) == 1 else ''} "
                             "the KD term, and --kd_weight=0 trains none.")


def check_choice(field, value):
    """Raises `ValueError` (one line) unless `value` is one of `field`'s choices (if any),
    the same choices its flag offers."""
    choices = field.metadata["choices"]
    if choices is None:
        return
    choices = tuple(choices() if callable(choices) else choices)
    if value not in choices:
        raise ValueError(f"Unknown --{field.name} '{value}'; choose from {', '.join(choices)}.")


def check_per_teacher(config):
    """Raises `ValueError` (one line) unless each per-teacher list has one entry per teacher.

    `--teacher_model` and `--teacher_epochs` take `--num_teachers` entries;
    `--teacher_layer`, one per `--teachers` file, else `--num_teachers`.
    """
    counts = {"teacher_model": (config.num_teachers, "--num_teachers"),
              "teacher_epochs": (config.num_teachers, "--num_teachers"),
              "teacher_layer": (config.teacher_layer_count,
                                "--teachers files" if config.teachers else "--num_teachers")}
    for name, (count, source) in counts.items():
        value = getattr(config, name)
        if isinstance(value, tuple) and len(value) != count:
            raise ValueError(
                f"--{name} gives {len(value)} values ({','.join(str(v) for v in value)}); "
                f"give one for all teachers or one per teacher ({count}, from {source}).")


def keras_backend():
    """The Keras backend this process runs on, or will, and where that is set.

    Returns `(name, source)`. Keras reads its backend once, when it is
    imported; this reads it the same way without importing Keras (importing
    it on a backend whose package is missing fails): `KERAS_BACKEND` if set
    and not empty, else the `"backend"` of `keras.json` in `$KERAS_HOME`
    (default: `~/.keras`, or `/tmp/.keras` where the home folder is not
    writable), else `tensorflow`. Once Keras is imported, its own backend is
    the name.
    """
    if "KERAS_HOME" in os.environ:
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    path = os.path.expanduser(os.path.join(folder, "keras.json"))
    name, source = "tensorflow", "Keras' default"
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                settings = json.load(handle)
        except (OSError, ValueError):
            settings = {}
        if isinstance(settings, dict) and "backend" in settings:
            name, source = settings["backend"], path
    if os.environ.get("KERAS_BACKEND"):
        name, source = os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        loaded = keras.backend.backend()
        if loaded != name:
            name, source = loaded, "the backend Keras was imported with"
    return name, source


def check_backend():
    """Raises `ValueError` (one line) unless Keras runs on one of `BACKENDS`."""
    name, source = keras_backend()
    if name not in BACKENDS:
        where = f"set by {source}" if source in ("KERAS_BACKEND",) else f"from {source}"
        raise ValueError(
            f"keras-feed runs on the Keras backends {' and '.join(BACKENDS)}, not {name!r} "
            f"({where}); set KERAS_BACKEND={BACKENDS[0]} or KERAS_BACKEND={BACKENDS[1]}."
        )


def make_optimizer(config, steps_per_epoch, epochs, peak_learning_rate=None):
    """SGD with momentum and the configured learning-rate schedule."""
    import keras

    return keras.optimizers.SGD(
        learning_rate_schedule(config, steps_per_epoch, epochs, peak_learning_rate),
        momentum=config.momentum, nesterov=config.nesterov,
    )


def learning_rate_schedule(config, steps_per_epoch, epochs, peak_learning_rate=None):
    """The configured schedule (a float when constant), from `peak_learning_rate`.

    The peak defaults to `config.learning_rate`.
    """
    import keras

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
