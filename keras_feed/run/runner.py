"""The runner: one training run, from a `TrainConfig` to a student on disk.

`run(config)` is what `keras-feed-train` calls, and the Python way to do the
same: it validates everything first (flags, data, teacher files, shapes), so a
bad run fails before it writes anything, then hands the work to the method
named by `config.method` (see `keras_feed.run.methods`), then evaluates the student,
its teachers and their ensemble, and writes the outputs into `config.model_dir`:

    student.keras             the student alone (Keras format)
    export/                   the student as a TensorFlow SavedModel (`serving_default`
                              takes uint8 images (N, H, W, C), as the dataset stores them)
    translators.weights.h5    the NTLs' weights, and translators.json their shapes
                              (for the analysis)
    metrics.json              test accuracy of student, teachers and ensemble, and
                              the input the student takes (`input`: normalisation...)
    summary.png               the accuracy table as a chart
    baseline.keras            with --baseline: the plain CE student
    teachers/teacher_<i>.keras  teachers trained by the run, and teacher_<i>.json the
                              settings each was trained with (reused if they match)
    generations/gen_<g>.keras   sfeed: every born-again generation
    paraphrasers/             ft: each teacher's trained paraphraser
    logs/<stage>/             TensorBoard logs of every training stage
    checkpoints/<stage>/      while it trains: what a rerun resumes from (see
                              `keras_feed.run.checkpointing`); removed when complete
"""

import contextlib
import dataclasses

import keras

from keras_feed import data as data_lib
from keras_feed.core import frozen
from keras_feed.core import translators as translators_lib
from keras_feed.run import checkpointing, distribute, methods, run_folder
from keras_feed.run import config as config_lib
from keras_feed.run.experiment import Experiment
from keras_feed.run.reporting import say


def describe_plan(experiment):
    """The plan of a run (models, parameter counts, steps, devices) as printable lines."""
    config, info = experiment.config, experiment.info
    student = experiment.checked_models["student"]
    teachers = experiment.checked_models["teachers"]
    steps = info.num_train // config.batch_size
    student_shape = frozen.feature_shape(student, config.student_layer, role="Student")
    lines = [
        f"method {config.method} on {info.name}: {info.num_train} training / "
        + (f"{info.num_validation} validation / " if info.num_validation else "")
        + f"{info.num_test} test examples, images {info.image_shape}, {info.num_classes} classes",
        "input: raw pixels {} in [0, 255], normalised inside every model, (x / 255 - mean) / std "
        "with mean {} and std {}; augmentation: {}".format(
            "x".join(str(size) for size in info.image_shape), _rounded(info.mean),
            _rounded(info.std), data_lib.describe_augmentation(info),
        ),
        f"student {config.model}: {student.count_params():,} parameters, features {student_shape}",
    ]
    plan = experiment.method.plan(config)
    if teachers:
        count = plan.teacher_count
        layers = config.teacher_layers(len(teachers))
        shapes = [frozen.feature_shape(teacher, layer, role="Teacher")
                  for teacher, layer in zip(teachers, layers)]
        if config.teachers:
            lines.append(f"teachers: {len(config.teachers)} from files "
                         f"(--teacher_preprocessing={config.teacher_preprocessing})")
            origins = [f"{path}, {teacher.name}" for path, teacher in zip(config.teachers, teachers)]
        else:
            architectures = config_lib.per_teacher(plan.teacher_architecture, count)
            epochs = (config.teacher_epochs_each(count)
                      if getattr(experiment.method, "uses_teacher_folder", True)
                      else (config.epochs,) * count)
            lines.append(f"teachers: {count} trained with CE")
            origins = [f"{architecture}, {each} epochs"
                       for architecture, each in zip(architectures, epochs)]
        for index, (teacher, origin, shape, layer) in enumerate(
                zip(teachers, origins, shapes, layers)):
            lines.append(f"  teacher {index + 1}: {origin}: {teacher.count_params():,} "
                         f"parameters, features {shape} (layer {layer})")
        ntl_counts = []
        for shape in shapes:
            channels = plan.translator_channels and plan.translator_channels(shape[-1])
            if channels:
                ntl = translators_lib.translator_for(student_shape, shape, out_channels=channels)
                ntl_counts.append(ntl.count_params())
        if ntl_counts and len(set(ntl_counts)) == 1:
            lines.append(f"NTLs: {count} x {ntl_counts[0]:,} parameters (dropped after training)")
        elif ntl_counts:
            lines.append(f"NTLs: {' + '.join(f'{n:,}' for n in ntl_counts)} parameters "
                         "(dropped after training)")
    lines += plan.notes
    schedule = config.lr_schedule
    if schedule == "step":
        schedule += f" x{config.lr_decay_factor} at epochs {list(config.lr_decay_epochs) or 'at 50%/75%'}"
    lines.append(
        f"recipe: {config.epochs} epochs x {steps} steps = {config.epochs * steps:,} steps, batch "
        f"{config.batch_size}, SGD lr {config.learning_rate} ({schedule}), momentum "
        f"{config.momentum}, weight decay {config.weight_decay}"
        + (f", beta {config.beta}" if plan.translator_channels is not None else "")
        + (f", kd_weight {config.kd_weight}, T {config.temperature}" if config.kd_weight else "")
        + (f" ({config.kd_form} KD)" if config.kd_weight and config.kd_form != "ensemble" else "")
        + (f", teachers weighted per example: {config.teacher_weighting}"
           if config.teacher_weighting != "equal" else "")
        + (f" (T {config.temperature})"
           if config.teacher_weighting == "agreement" and not config.kd_weight else "")
    )
    lines.append(distribute.describe_devices(experiment.strategy, config.strategy, config.batch_size))
    lines.append(f"outputs: {config.model_dir}")
    return lines


def _rounded(values):
    return "[" + ", ".join(f"{value:.4f}" for value in values) + "]"


def run(config, *, strategy=None):
    """Runs the method named by `config.method`; returns the metrics written.

    With `config.dry_run`, validates everything, prints the plan and returns
    `{"plan": [...lines]}` without training or writing anything.

    `strategy` (default: `distribute.make_strategy(config.strategy, ...)`) is
    where it trains: a `tf.distribute.Strategy` on TensorFlow, whose scope
    `Experiment` enters where it builds; a `distribute.JaxDevices` on JAX, whose
    `keras.distribution` is set for the whole run.
    """
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
    # Before any model is built: the dtype policy, and on JAX the devices.
    with dtype_policy(config.mixed_precision), distribute.run_scope(strategy):
        return _run(config, method, strategy)


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy `name` (one of `PRECISIONS`) inside the block.

    Under `mixed_float16` or `mixed_bfloat16` layers compute in 16 bits and keep
    float32 weights; the loss terms are float32 and, for float16, `compile`
    wraps the optimizer in a `LossScaleOptimizer` (dynamic loss scaling).
    """
    if name not in config_lib.PRECISIONS:
        raise ValueError(
            f"Unknown --mixed_precision '{name}'; choose from {', '.join(config_lib.PRECISIONS)}."
        )
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
    with run_folder.RunDirectory(config) as model_dir:
        if model_dir.finished is not None:
            say("%s holds this run, complete (metrics.json): nothing to train.", config.model_dir)
            return model_dir.finished
        if model_dir.resuming:
            say("Resuming the run in %s", config.model_dir)
        say("%s", distribute.describe_devices(strategy, config.strategy, config.batch_size))
        if config.baseline:
            experiment.train_baseline()
        keras.utils.set_random_seed(config.seed)
        return method.run(experiment)
