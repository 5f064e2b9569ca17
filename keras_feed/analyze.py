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

Run folders of keras-feed 0.1.0, whose student and teachers expect images
normalised with the dataset's mean and std, are analysed too: `--dataset`'s
normalisation is added to those models as their first layer.
"""

import os

from keras_feed import cli
from absl import flags

FLAGS = flags.FLAGS
cli.define_data_flags()
cli.define_unsafe_load_flag()

flags.DEFINE_list("runs", None, "Comma-separated run folders (each with student.keras, translators.weights.h5, metrics.json).", required=True)
flags.DEFINE_list("labels", [], "A label per run for the report; default: the folder names.")
flags.DEFINE_enum("split", "test", ["test", "train"], "Which split to measure on.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("max_examples", None, "Measure on the first N examples of the split only.")
flags.DEFINE_string("output_dir", "analysis", "Where analysis.json and the chart are written.")


def main():
    from keras_feed import analysis
    from keras_feed import data as data_lib
    from keras_feed import storage

    labels = FLAGS.labels or [os.path.basename(os.path.normpath(run)) for run in FLAGS.runs]
    if len(labels) != len(FLAGS.runs):
        raise ValueError(f"--labels names {len(labels)} runs, --runs {len(FLAGS.runs)}.")
    data = data_lib.load(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
    parts = [
        analysis.RunParts(run, statistics=lambda: (data.info.mean, data.info.std),
                          unsafe=FLAGS.unsafe_load)
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
    storage.write_json(os.path.join(FLAGS.output_dir, "analysis.json"), report)
    analysis.plot(results, os.path.join(FLAGS.output_dir, "reconstruction_error.png"))
    print(f"Wrote {FLAGS.output_dir}/analysis.json and reconstruction_error.png")


def run():
    cli.run("keras-feed-analyze", main)


if __name__ == "__main__":
    run()
