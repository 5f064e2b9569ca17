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
`--output_dir`, side by side for every run. An `analysis.json` there that is
not such a report, or a `reconstruction_error.png` that is not a PNG image,
is refused with one line (exit 1) before anything is measured, unless
`--overwrite` is given; other files in the folder are never touched.

The models are fed raw pixels of `--dataset`, as in training: teacher files
the run read with `--teacher_preprocessing=dataset` get the normalisation
recorded in its `metrics.json`, as the run gave it to them.
"""

import os

from absl import flags

from keras_feed.cli import common

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command's flags (when it runs, not when it is imported)."""
    common.define_data_flags()
    common.define_unsafe_load_flag()

    flags.DEFINE_list("runs", None, "Comma-separated run folders (each with student.keras, translators.weights.h5, metrics.json).", required=True)
    flags.DEFINE_list("labels", [], "A label per run for the report; default: the folder names.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Which split to measure on.")
    flags.DEFINE_integer("batch_size", 256, "Batch size.")
    flags.DEFINE_integer("max_examples", None, "Measure on the first N examples of the split only.")
    flags.DEFINE_string("output_dir", "analysis", "Where analysis.json and the chart are written.")
    flags.DEFINE_bool("overwrite", False, "Replace an analysis.json in --output_dir that is not an analysis "
                      "report, or a reconstruction_error.png that is not a PNG image.")


REPORT_NAME = "analysis.json"
CHART_NAME = "reconstruction_error.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The keys of every report this command writes.
REPORT_KEYS = ("dataset", "split", "runs")


def foreign_report(path):
    """What is at `path`, if it is not an analysis report this command wrote; else None."""
    import json

    if not os.path.isfile(path) or os.path.islink(path):
        return "not a regular file"
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (ValueError, UnicodeDecodeError):
        return f"a file of {os.path.getsize(path):,} bytes that is not JSON"
    if not isinstance(report, dict) or not all(key in report for key in REPORT_KEYS) or not isinstance(
            report["runs"], list):
        return "a JSON file that is not a keras-feed-analyze report"
    return None


def foreign_chart(path):
    """What is at `path`, if it is not a PNG image; else None."""
    if not os.path.isfile(path) or os.path.islink(path):
        return "not a regular file"
    with open(path, "rb") as handle:
        if handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
            return None
    return f"a file of {os.path.getsize(path):,} bytes that is not a PNG image"


def check_outputs(folder, overwrite):
    """Raises a one-line `ValueError` unless the outputs may be written into `folder`."""
    from keras_feed.run import files

    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_dir {folder} is a file, not a folder: name a folder.")
    if overwrite:
        return
    for name, foreign in ((REPORT_NAME, foreign_report), (CHART_NAME, foreign_chart)):
        path = os.path.join(folder, name)
        if os.path.lexists(path) and foreign(path) is not None:
            raise files.OutputExistsError(path, foreign(path), "--overwrite")


def main():
    from keras_feed import data as data_lib
    from keras_feed.run import analysis, files

    check_outputs(FLAGS.output_dir, FLAGS.overwrite)  # before the work
    labels = FLAGS.labels or [os.path.basename(os.path.normpath(run)) for run in FLAGS.runs]
    if len(labels) != len(FLAGS.runs):
        raise ValueError(f"--labels names {len(labels)} runs, --runs {len(FLAGS.runs)}.")
    data = data_lib.load(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
    parts = [
        analysis.RunParts(run, unsafe=FLAGS.unsafe_load)
        for run in FLAGS.runs
    ]
    dataset = data.test(FLAGS.batch_size) if FLAGS.split == "test" else data.train_eval(FLAGS.batch_size)
    if FLAGS.max_examples:
        dataset = dataset.unbatch().take(FLAGS.max_examples).batch(FLAGS.batch_size)
    results = []
    for run, label, run_parts in zip(FLAGS.runs, labels, parts):
        examples, per_teacher = analysis.measure(run_parts, dataset)
        results.append({
            "run": os.path.abspath(run), "label": label, "method": run_parts.method,
            "student_test_accuracy": run_parts.test_accuracy, "examples": examples,
            "teachers": [dict(entry, path=path) for entry, path in zip(per_teacher, run_parts.teacher_paths)],
        })
        errors = ", ".join(f"{entry['relative_l2_error']:.4f}" for entry in per_teacher)
        print(f"{label}: relative L2 error per teacher {errors}")
    report = {"dataset": data.info.name, "split": FLAGS.split, "runs": results}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    check_outputs(FLAGS.output_dir, FLAGS.overwrite)  # nothing new appeared meanwhile
    try:
        files.write_json(os.path.join(FLAGS.output_dir, REPORT_NAME), report,
                           replaceable=None if FLAGS.overwrite else foreign_report)
    except files.OutputExistsError as error:
        raise error.with_hint("--overwrite") from None
    analysis.plot(results, os.path.join(FLAGS.output_dir, CHART_NAME))
    print(f"Wrote {FLAGS.output_dir}/{REPORT_NAME} and {CHART_NAME}")


def run():
    define_flags()
    common.run("keras-feed-analyze", main)


if __name__ == "__main__":
    run()
