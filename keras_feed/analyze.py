"""keras-feed-analyze: how well each student's NTLs reconstruct its teachers' maps.

    keras-feed-analyze --runs=runs/pfeed3,runs/feed1,runs/sfeed \\
        --labels=pFEED-3,FEED-1,sFEED --dataset=fashion_mnist \\
        --data_dir=/usr/share/datasets/fashion-mnist --output_dir=analysis

For every run folder written by `keras-feed-train` (a FEED student with its
saved NTLs and the teachers listed in its `metrics.json`), on a dataset split,
it reports per teacher n:

- the FEED loss, mean |x_Tn/||x_Tn|| - NTL_n(x_S)/||NTL_n(x_S)|| |;
- the relative L2 reconstruction error, ||x_Tn/||x_Tn|| - NTL_n(x_S)/||NTL_n(x_S)|| ||_2
  / ||x_Tn/||x_Tn|| ||_2, averaged over examples (0: a perfect reconstruction of
  the teacher's map direction; sqrt(2): orthogonal).

It writes `analysis.json` and a bar chart `reconstruction_error.png` into
`--output_dir`, side by side for every run.
"""

import json
import os

from keras_feed import cli
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_list("runs", None, "Comma-separated run folders (each with student.keras, translators.weights.h5, metrics.json).", required=True)
flags.DEFINE_list("labels", [], "A label per run for the report; default: the folder names.")
flags.DEFINE_string("dataset", "cifar100", "Dataset name, as for keras-feed-train.")
flags.DEFINE_string("data_dir", None, "tfds data dir, or a folder of IDX files / class sub-folders.")
flags.DEFINE_integer("image_size", None, "Image size for imagenet2012 and folder datasets.")
flags.DEFINE_enum("split", "test", ["test", "train"], "Which split to measure on.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("max_examples", None, "Measure on the first N examples of the split only.")
flags.DEFINE_string("output_dir", "analysis", "Where analysis.json and the chart are written.")
flags.DEFINE_bool("unsafe_load", False, "Allow .keras files that carry code. Only for files you trust.")


class RunParts:
    """A trained FEED run's student, NTLs and teachers, loaded from its folder."""

    def __init__(self, run_dir, *, unsafe=False):
        from keras_feed import distiller as distiller_lib
        from keras_feed import experiment
        from keras_feed import storage

        metrics_path = os.path.join(run_dir, "metrics.json")
        if not os.path.isfile(metrics_path):
            raise ValueError(f"No metrics.json in {run_dir}: not a finished keras-feed run.")
        with open(metrics_path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        if metrics.get("method") in ("ce", "kd", "ft"):
            raise ValueError(
                f"Run {run_dir} was trained with --method={metrics['method']}: it has no "
                "FEED NTLs to analyse."
            )
        self.translators = experiment.load_translators(
            os.path.join(run_dir, "translators.weights.h5")
        )
        teacher_paths = metrics.get("teacher_paths") or []
        if len(teacher_paths) != len(self.translators):
            raise ValueError(
                f"Run {run_dir} has {len(self.translators)} saved NTLs but lists "
                f"{len(teacher_paths)} teachers."
            )
        config = metrics.get("config", {})
        student = storage.load_model(os.path.join(run_dir, "student.keras"), unsafe=unsafe)
        self.student = distiller_lib.feature_extractor(
            student, config.get("student_layer", "features"), name="student"
        )
        self.teachers = [
            distiller_lib.feature_extractor(
                storage.load_model(path, unsafe=unsafe),
                config.get("teacher_layer", "features"),
                name=f"teacher_{index}",
            )
            for index, path in enumerate(teacher_paths)
        ]
        self.teacher_paths = teacher_paths
        self.method = metrics.get("method")
        self.test_accuracy = metrics.get("student", {}).get("test_accuracy")


def measure(parts, dataset):
    """Per-teacher FEED loss and relative L2 reconstruction error over `dataset`."""
    import numpy as np
    import tensorflow as tf

    from keras_feed import losses

    sums = np.zeros((len(parts.teachers), 2))
    count = 0
    for images, _ in dataset:
        _, student_features = parts.student(images, training=False)
        for index, (teacher, translator) in enumerate(zip(parts.teachers, parts.translators)):
            _, teacher_features = teacher(images, training=False)
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
    from keras_feed import storage

    with storage.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")

    def body():
        from keras_feed import data as data_lib
        from keras_feed import storage

        labels = FLAGS.labels or [os.path.basename(os.path.normpath(run)) for run in FLAGS.runs]
        if len(labels) != len(FLAGS.runs):
            raise ValueError(f"--labels names {len(labels)} runs, --runs {len(FLAGS.runs)}.")
        parts = [RunParts(run, unsafe=FLAGS.unsafe_load) for run in FLAGS.runs]
        data = data_lib.load(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
        dataset = data.test(FLAGS.batch_size) if FLAGS.split == "test" else data.train_eval(FLAGS.batch_size)
        if FLAGS.max_examples:
            dataset = dataset.unbatch().take(FLAGS.max_examples).batch(FLAGS.batch_size)
        results = []
        for run, label, run_parts in zip(FLAGS.runs, labels, parts):
            examples, per_teacher = measure(run_parts, dataset)
            results.append({
                "run": os.path.abspath(run), "label": label, "method": run_parts.method,
                "student_test_accuracy": run_parts.test_accuracy, "examples": examples,
                "teachers": [dict(entry, path=path) for entry, path in zip(per_teacher, run_parts.teacher_paths)],
            })
            errors = ", ".join(f"{entry['relative_l2_error']:.4f}" for entry in per_teacher)
            print(f"{label}: relative L2 error per teacher {errors}")
        report = {"dataset": data.info.name, "split": FLAGS.split, "runs": results}
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        storage.write_json(os.path.join(FLAGS.output_dir, "analysis.json"), report)
        plot(results, os.path.join(FLAGS.output_dir, "reconstruction_error.png"))
        print(f"Wrote {FLAGS.output_dir}/analysis.json and reconstruction_error.png")

    cli.main_with_errors("keras-feed-analyze", body)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
