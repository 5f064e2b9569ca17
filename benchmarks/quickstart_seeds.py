"""The quickstart, seed by seed: is the FEED student's gain over the CE student real?

    python benchmarks/quickstart_seeds.py                 # seeds 0, 1, 2 (resumes)
    python benchmarks/quickstart_seeds.py --seeds=0,1,2,3,4
    python benchmarks/quickstart_seeds.py --report_only   # rewrite the table

Runs `keras-feed-train --flagfile=flags/quickstart.cfg` once per seed, in a
subprocess, with `--seed=S` (the students' initialisation, data order and
augmentation) and `--teacher_seed=100 + 10 * S` (fresh teachers for each
seed), each in `runs/quickstart_seeds/seed_<S>/`. Each finished run is read
from its `metrics.json` and recorded at once in
`benchmarks/results/quickstart_seeds.json`; a seed already recorded is not run
again, and an interrupted one resumes from its checkpoints. The report
(`benchmarks/results/quickstart_seeds.md`, also printed) gives every model's
test and validation accuracy per seed, the mean and standard deviation over
seeds, the wall time of each run, and says plainly whether the gain is larger
than its spread over seeds.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
flags.DEFINE_string("flagfile_path", os.path.join(REPO, "flags", "quickstart.cfg"),
                    "The recipe: a keras-feed-train flagfile.")
flags.DEFINE_string("runs_dir", os.path.join(REPO, "runs", "quickstart_seeds"),
                    "Where the runs' folders go.")
flags.DEFINE_string("output", os.path.join(RESULTS, "quickstart_seeds.json"), "The record.")
flags.DEFINE_bool("report_only", False, "Only rewrite the report from the record.")
FLAGS = flags.FLAGS


def load_record(path):
    if not os.path.isfile(path):
        return {"runs": {}}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_atomically(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.partial-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def run_seed(seed):
    """Trains the quickstart with `seed`; returns what the record keeps of it."""
    model_dir = os.path.join(FLAGS.runs_dir, f"seed_{seed}")
    command = [
        sys.executable, "-m", "keras_feed.cli.train", f"--flagfile={FLAGS.flagfile_path}",
        f"--seed={seed}", f"--teacher_seed={100 + 10 * seed}", f"--model_dir={model_dir}",
        "--verbose=0",
    ]
    print(f"seed {seed}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO, check=False)
    if result.returncode != 0:
        raise SystemExit(f"quickstart_seeds: seed {seed} failed (exit {result.returncode}); "
                         "run the same command again to resume it")
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    keep = ("test_accuracy", "validation_accuracy")

    def scores(entry):
        return {name: entry[name] for name in keep if name in entry}

    return {
        "seed": seed,
        "teacher_seeds": [100 + 10 * seed + index for index in range(len(metrics["teachers"]))],
        "teachers": [scores(teacher) for teacher in metrics["teachers"]],
        "ensemble": scores(metrics["ensemble"]),
        "ce": scores(metrics["baseline"]),
        "feed": scores(metrics["student"]),
        "gain": metrics["gain"],
        "validation_gain": metrics.get("validation_gain"),
        "wall_s": round(time.time() - started, 1),
        "stages_wall_s": {name: stage["wall_s"] for name, stage in metrics["stages"].items()},
    }


def mean_and_spread(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(record):
    """The report as markdown lines."""
    runs = [record["runs"][key] for key in sorted(record["runs"], key=int)]
    lines = [
        "# The quickstart over seeds",
        "",
        f"Recipe: `{os.path.relpath(FLAGS.flagfile_path, REPO)}` with `--seed=S "
        "--teacher_seed=100+10*S`. Accuracies in %, test (validation).",
        "",
        "| seed | teacher 0 | teacher 1 | ensemble | CE student | FEED student | gain (points) "
        "| wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(entry):
        text = f"{100 * entry['test_accuracy']:.2f}"
        if "validation_accuracy" in entry:
            text += f" ({100 * entry['validation_accuracy']:.2f})"
        return text

    for run in runs:
        gain = f"{100 * run['gain']:+.2f}"
        if run.get("validation_gain") is not None:
            gain += f" ({100 * run['validation_gain']:+.2f})"
        teachers = " | ".join(cell(teacher) for teacher in run["teachers"][:2])
        lines.append(f"| {run['seed']} | {teachers} | {cell(run['ensemble'])} | "
                     f"{cell(run['ce'])} | {cell(run['feed'])} | {gain} | {run['wall_s']:.0f} s |")
    if len(runs) >= 2:
        lines.append("")
        for label, key in (("CE student", "ce"), ("FEED student", "feed")):
            mean, spread = mean_and_spread([run[key]["test_accuracy"] for run in runs])
            lines.append(f"- {label}: {100 * mean:.2f} ± {100 * spread:.2f} % test accuracy "
                         f"(mean ± standard deviation over {len(runs)} seeds)")
        gain, spread = mean_and_spread([run["gain"] for run in runs])
        positive = sum(run["gain"] > 0 for run in runs)
        lines.append(f"- gain: {100 * gain:+.2f} ± {100 * spread:.2f} points; FEED above CE in "
                     f"{positive} of {len(runs)} seeds")
        standard_error = spread / len(runs) ** 0.5
        if abs(gain) > 2 * standard_error and positive in (0, len(runs)):
            verdict = ("the gain is larger than twice its standard error over seeds and has the "
                       "same sign in every seed")
        else:
            verdict = ("the gain is within the spread over seeds: these seeds do not show that "
                       "FEED beats plain training at this recipe")
        lines.append(f"- verdict: {verdict}.")
    return lines


def main(argv):
    del argv
    record = load_record(FLAGS.output)
    if not FLAGS.report_only:
        for seed in (int(seed) for seed in FLAGS.seeds):
            if str(seed) in record["runs"]:
                print(f"seed {seed}: recorded already", flush=True)
                continue
            record["runs"][str(seed)] = run_seed(seed)
            write_atomically(FLAGS.output, json.dumps(record, indent=2) + "\n")
    lines = report(record)
    write_atomically(os.path.splitext(FLAGS.output)[0] + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
