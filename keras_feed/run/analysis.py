"""Reconstruction-error analysis of trained FEED students (the library behind keras-feed-analyze).

For a run folder written by `keras-feed-train` (a FEED student with its saved
NTLs and the teachers listed in its `metrics.json`), `measure` reports per
teacher n, over a dataset:

- the FEED loss, mean |x_Tn/||x_Tn|| - NTL_n(x_S)/||NTL_n(x_S)|| |;
- the relative L2 reconstruction error, ||x_Tn/||x_Tn|| - NTL_n(x_S)/||NTL_n(x_S)|| ||_2
  / ||x_Tn/||x_Tn|| ||_2, averaged over examples (0: a perfect reconstruction of
  the teacher's map direction; sqrt(2): orthogonal).
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_feed.core import frozen, losses
from keras_feed.models import preprocessing
from keras_feed.run import config as config_lib
from keras_feed.run import files, methods, storage


class RunParts:
    """A trained FEED run's student, NTLs and teachers, loaded from its folder.

    Every model takes raw pixels, as the data pipelines give them: the student
    and the teachers the run trained normalise them in their own first layer,
    and teacher files are taken as the run took them. Those it read with
    `--teacher_preprocessing=dataset` get the normalisation its `metrics.json`
    records (`input`'s mean and std) as their first layer, unless they have
    their own; any other model is used as it is.
    """

    def __init__(self, run_dir, *, unsafe=False):
        metrics_path = os.path.join(run_dir, "metrics.json")
        if not os.path.isfile(metrics_path):
            raise ValueError(f"No metrics.json in {run_dir}: not a finished keras-feed run.")
        with open(metrics_path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        method = methods.get(metrics.get("method", "pfeed"))
        if not method.plan(config_lib.from_record(metrics.get("config", {}))).writes_feed_translators:
            raise ValueError(
                f"Run {run_dir} was trained with --method={metrics['method']}: it has no "
                "FEED NTLs to analyse."
            )
        self.translators = storage.load_translators(
            os.path.join(run_dir, "translators.weights.h5")
        )
        teacher_paths = metrics.get("teacher_paths") or []
        if len(teacher_paths) != len(self.translators):
            raise ValueError(
                f"Run {run_dir} has {len(self.translators)} saved NTLs but lists "
                f"{len(teacher_paths)} teachers."
            )
        config = metrics.get("config", {})
        recorded = metrics.get("input", {})

        def load_teacher(path):
            teacher = storage.load_model(path, unsafe=unsafe)
            if config.get("teacher_preprocessing") != "dataset":
                return teacher
            return preprocessing.raw_pixel_model(
                teacher, "dataset", statistics=lambda: (recorded["mean"], recorded["std"]),
                what=f"Teacher file {path} of run {run_dir}", flag="--teacher_preprocessing",
            )

        student_path = os.path.join(run_dir, "student.keras")
        self.student = frozen.extractor(
            storage.load_model(student_path, unsafe=unsafe),
            config.get("student_layer", "features"), role="Student", name="student",
        )
        layers = config_lib.per_teacher(  # one for all, or one per teacher
            config_lib.from_record(config).teacher_layer, len(teacher_paths))
        self.teachers = [
            frozen.extractor(
                load_teacher(path),
                layers[index],
                role=f"Teacher {index}",
                name=f"teacher_{index}",
            )
            for index, path in enumerate(teacher_paths)
        ]
        self.teacher_paths = teacher_paths
        self.method = metrics.get("method")
        self.test_accuracy = metrics.get("student", {}).get("test_accuracy")


def measure(parts, dataset):
    """Per-teacher FEED loss and relative L2 reconstruction error over `dataset`."""
    sums = np.zeros((len(parts.teachers), 2))
    count = 0
    for images, _ in dataset:
        *_, student_features = parts.student(images, training=False)
        for index, (teacher, translator) in enumerate(zip(parts.teachers, parts.translators)):
            *_, teacher_features = teacher(images, training=False)
            translated = translator(student_features, training=False)
            target = losses.normalize_per_example(teacher_features)
            reconstruction = losses.normalize_per_example(translated)
            feed = losses.per_example_feed_loss(teacher_features, translated)
            relative = tf.norm(target - reconstruction, axis=1) / tf.maximum(
                tf.norm(target, axis=1), 1e-12
            )
            sums[index] += [float(tf.reduce_sum(feed)), float(tf.reduce_sum(relative))]
        count += int(images.shape[0])
    means = sums / max(count, 1)
    return count, [
        {"teacher": index, "feed_loss": float(feed), "relative_l2_error": float(relative)}
        for index, (feed, relative) in enumerate(means)
    ]


def plot(results, path):
    """A grouped bar chart: relative reconstruction error per teacher, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(results), 1)
    for offset, run in enumerate(results):
        errors = [entry["relative_l2_error"] for entry in run["teachers"]]
        positions = [index + offset * width for index in range(len(errors))]
        axis.bar(positions, errors, width=width, label=run["label"])
    most = max(len(run["teachers"]) for run in results)
    axis.set_xticks([index + 0.4 - width / 2 for index in range(most)])
    axis.set_xticklabels([f"teacher {index}" for index in range(most)])
    axis.set_ylabel("relative L2 reconstruction error")
    axis.set_title("How well NTL_n(student) reconstructs teacher n's map")
    axis.legend()
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
