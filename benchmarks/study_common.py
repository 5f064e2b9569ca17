"""What the evidence studies of `benchmarks/` share: runs, records, statistics, plots.

A study is a script that trains many keras-feed runs (a row of a table at
several seeds), records each finished run at once in a json file, and
rewrites a markdown report and its plots after every run. The pieces here
serve every such script (`fashion_mnist_study.py`, `heterogeneous_study.py`):

- the setting: `STUDENT_RECIPE` (the committed Fashion-MNIST recipe) and
  `SMOKE_SETTINGS` (what a minutes-long rehearsal changes in it); `StudyFiles`
  (where a study writes);
- the command line: `arguments`, `folders` (where a real study or a rehearsal
  writes), `run_or_report` (`--report_only`, or the study under `study_lock`:
  one study process at a time);
- running: `make_config`, `run_in` (a run in its scratch folder, removed if it
  raises), `finished_metrics` (a run that finished but was not recorded),
  `unavailable` (a run the installed keras_feed cannot run yet: postponed),
  `run_pending` (the loop over a plan), `reset_session`;
- records: `load_results` and `save_results` (atomic), `git_revision` (the
  keras_feed version a record was made with), `stage_summary`, `load_data`,
  `describe_data`, `teacher_probabilities`, `accuracy`;
- the report: `summary` (mean, sample std, standard error), `compare` and
  `difference` (a difference in standard errors of the difference),
  `percent`, `mean_std`, `records_by_name`, `run_times`, `write_text`;
- plots: `plot_rows` (mean ± std per row, seeds as dots), `pyplot` and `save_figure`.

Keras, TensorFlow and matplotlib are imported where they are used, so the
report of a study can be rewritten (and tested) without training anything.
"""

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import gc
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the checkout's keras_feed, installed or not


# The student recipe of the committed Fashion-MNIST study (TrainConfig fields): real
# Fashion-MNIST, a seeded 6,000-image training subset, resnet20, SGD with Nesterov
# momentum, cosine decay, 30 epochs.
STUDENT_RECIPE = dict(
    dataset="fashion_mnist",
    data_dir="/usr/share/datasets/fashion-mnist",
    train_examples=6000,
    subset_seed=0,
    model="resnet20",
    epochs=30,
    batch_size=128,
    learning_rate=0.1,
    lr_schedule="cosine",
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
)

# What a rehearsal changes in a recipe: synthetic data, a small network, one epoch.
SMOKE_SETTINGS = dict(
    dataset="synthetic", data_dir=None, train_examples=256, model="resnet8", epochs=1,
    batch_size=64,
)


def say(message):
    """A time-stamped line on stderr."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[study {stamp}] {message}", file=sys.stderr, flush=True)


def now():
    """The current UTC time, ISO 8601 to the second (records' `finished_at`)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def arguments(description, *, smoke_help, name):
    """The command line every study takes: `--report_only`, `--smoke`, and where it writes.

    `name` names the default scratch folder, `runs/<name>_study`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the table and plots from the json; train nothing")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--results_dir", default=None,
                        help="default: benchmarks/results (smoke: a new temporary folder)")
    parser.add_argument("--runs_dir", default=None,
                        help=f"scratch folders of the runs; default: runs/{name}_study")
    return parser.parse_args()


def folders(args, name):
    """`(results_dir, runs_dir)` the command line asks for.

    By default `benchmarks/results` and `runs/<name>_study`; a rehearsal
    (`--smoke`) writes into a new temporary folder instead.
    """
    if args.smoke:
        results_dir = args.results_dir or tempfile.mkdtemp(prefix=f"{name}_smoke_")
        return results_dir, args.runs_dir or os.path.join(results_dir, "runs")
    return (args.results_dir or os.path.join(REPO, "benchmarks", "results"),
            args.runs_dir or os.path.join(REPO, "runs", f"{name}_study"))


def run_or_report(args, study, *, run, report):
    """`--report_only`: `report(study, results)` alone; else `run(study)` under the study lock."""
    if args.report_only:
        report(study, study.load())
        say(f"wrote {study.md_path}")
        return
    with study_lock(study.runs_dir):
        run(study)


# -- the results file -------------------------------------------------------------


class StudyFiles:
    """Where a study named `name` writes: its json, report, accuracy plot and teachers.

    `benchmarks/results/<name>.json`, `<name>.md`, `<name>_accuracy.png` and
    `<name>_teachers/` by default (`results_dir`); the runs' scratch folders
    go to `runs_dir`. `empty` is the json's content before any run.
    """

    def __init__(self, results_dir, runs_dir, name, empty):
        self.results_dir = os.path.abspath(results_dir)
        self.runs_dir = os.path.abspath(runs_dir)
        self.empty = empty
        self.json_path = os.path.join(self.results_dir, f"{name}.json")
        self.md_path = os.path.join(self.results_dir, f"{name}.md")
        self.accuracy_png = os.path.join(self.results_dir, f"{name}_accuracy.png")
        self.teacher_dir = os.path.join(self.results_dir, f"{name}_teachers")

    def teacher_path(self, index):
        return os.path.join(self.teacher_dir, f"teacher_{index}.keras")

    def shown(self, path):
        """`path` relative to the repository when inside it (portable in the json)."""
        relative = os.path.relpath(path, REPO)
        return path if relative.startswith("..") else relative

    def load(self):
        return load_results(self.json_path, self.empty)

    def save(self, results):
        save_results(self.json_path, results)


def load_results(path, empty):
    """The study's json at `path`; `empty` (a dict of defaults) where it or a key is missing."""
    if not os.path.isfile(path):
        return json.loads(json.dumps(empty))  # a fresh copy
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    for key, value in empty.items():
        results.setdefault(key, json.loads(json.dumps(value)))
    return results


def save_results(path, results):
    """Writes the study's json atomically: a crash leaves the old file or the new one."""
    from keras_feed.run import files

    files.write_json(path, results)


def write_text(path, text):
    """Writes `text` to `path` atomically (the report)."""
    from keras_feed.run import files

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


@contextlib.contextmanager
def study_lock(runs_dir):
    """Holds `runs_dir/study.lock`: a second study process on the same folder stops at once."""
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, "study.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"Another study is running on {runs_dir}; not starting twice.")
        yield


# -- the code a record was made with ---------------------------------------------------


def git_revision():
    """The checkout's commit ("+dirty" when keras_feed/ has local edits) and a hash of
    the keras_feed sources this process imported (the checkout is edited meanwhile)."""
    import keras_feed
    from keras_feed.run import experiment, methods, runner  # noqa: F401  (imported before hashing)

    package = os.path.dirname(keras_feed.__file__)
    sources = hashlib.sha256()
    for root, _, names in sorted(os.walk(package)):
        for name in sorted(names):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as handle:
                    sources.update(name.encode() + handle.read())
    return {"commit": _git_commit(), "keras_feed_sha256": sources.hexdigest()[:16]}


def _git_commit():
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "keras_feed"], cwd=REPO, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# -- running --------------------------------------------------------------------------


def make_config(recipe, **fields):
    """A `TrainConfig` of the study's `recipe` with `fields` on top, one line an epoch."""
    from keras_feed.run.config import TrainConfig

    return TrainConfig(**{**recipe, "verbose": 2, **fields})


def reset_session():
    """Frees what the last run left in Keras and Python, before the next one."""
    import keras

    keras.backend.clear_session()
    gc.collect()


def run_in(model_dir, config):
    """`runner.run(config)` in `model_dir`, kept so a killed run can resume there.

    A run that raises has its folder removed, so the next attempt starts afresh.
    """
    from keras_feed.run import runner

    try:
        return runner.run(config)
    except Exception:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise


def finished_metrics(config, fields=None):
    """metrics.json of a run of `config` that finished but was not recorded, or None.

    The run in `config.model_dir` counts if its recorded settings agree with
    `config` on `fields`, or on every setting that defines a run (all but where
    and how it is reported: `run_folder.setting_differences`) when `fields` is None.
    """
    from keras_feed.run import run_folder

    path = os.path.join(config.model_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        metrics = json.load(handle)
    written = metrics.get("config", {})
    if fields is None:
        same = not run_folder.setting_differences(written, config)
    else:
        same = all(written.get(k) == getattr(config, k) for k in fields)
    return metrics if same else None


def unavailable(method, settings):
    """Why a run of `method` with `settings` ((field, value) pairs of `TrainConfig`)
    cannot run with the installed keras_feed yet, or None.

    A method that is not registered, a field `TrainConfig` does not have, or a
    value its field does not offer (one of `choices`) postpones the run: the
    next start of the study, with a newer keras_feed, runs it.
    """
    from keras_feed.run import config as config_lib
    from keras_feed.run import methods

    if method not in methods.names():
        return f"method '{method}' is not registered yet"
    fields = {field.name for field in dataclasses.fields(config_lib.TrainConfig)}
    missing = [name for name, _ in settings if name not in fields]
    if missing:
        return f"TrainConfig has no field {', '.join(missing)} yet"
    choices = {spec.name: spec.choices
               for spec in config_lib.flag_specs([name for name, _ in settings])}
    refused = [f"{name}={value!r}" for name, value in settings
               if choices.get(name) and value not in choices[name]]
    if refused:
        return f"TrainConfig does not offer {', '.join(refused)} yet"
    return None


def run_pending(runs, results, *, done, train, save, report, describe):
    """Runs each of `runs` whose key is not in `done`, recording each at once.

    Args:
      runs: objects with `key`, `method` and `settings` ((field, value) pairs).
      results: the study's results (`runs`, `failures`), updated in place.
      done: the keys of the runs recorded already (skipped).
      train: `(run) -> record`, the run's record for `results["runs"]`.
      save: `() -> None`, writes `results` (atomically).
      report: `() -> None`, rewrites the report.
      describe: `(run) -> str`, what the run is, for the log.

    A run `unavailable` names a reason for is postponed; one that raises is
    noted in `results["failures"]` and retried on the next start.

    Returns:
      The keys of the postponed runs.
    """
    postponed = []
    for run in runs:
        if run.key in done:
            continue
        reason = unavailable(run.method, run.settings)
        if reason:
            say(f"{run.key}: postponed, {reason}")
            postponed.append(run.key)
            continue
        say(f"{run.key}: starting ({describe(run)})")
        try:
            record = train(run)
        except Exception as error:  # keep going; the run is retried on the next start
            traceback.print_exc()
            results["failures"][run.key] = f"{type(error).__name__}: {error}"[:500]
            save()
            reset_session()
            continue
        results["runs"].append(record)
        results["failures"].pop(run.key, None)
        save()
        reset_session()
        say(f"{run.key}: test accuracy {record['test_accuracy']:.4f}, "
            f"{record['wall_s'] / 60:.1f} min, {record['images_per_s']} images/s")
        report()
    return postponed


# -- what a run recorded ------------------------------------------------------------


def stage_summary(metrics):
    """Wall time over every stage; throughput and history of the final stage."""
    stages = metrics.get("stages", {})
    final = stages.get("student") or (list(stages.values())[-1] if stages else {})
    history = final.get("history", {})
    feed_keys = sorted(
        (key for key in history if key.startswith("feed_loss_")),
        key=lambda key: int(key.rsplit("_", 1)[1]),
    )
    return {
        "wall_s": round(sum(stage.get("wall_s", 0.0) for stage in stages.values()), 1),
        "stages_wall_s": {name: stage.get("wall_s") for name, stage in stages.items()},
        "images_per_s": final.get("images_per_s"),
        "last_feed_loss": [history[key][-1] for key in feed_keys] or None,
        "history": history,
    }


def load_data(recipe, **overrides):
    """The study's data (`keras_feed.data.load`) as its `recipe` defines it."""
    from keras_feed import data as data_lib

    return data_lib.load(
        recipe["dataset"], data_dir=recipe["data_dir"],
        train_examples=recipe["train_examples"], subset_seed=recipe["subset_seed"], **overrides,
    )


def describe_data(recipe, validation_examples=0):
    """The training subset's size, seed and index hash, and the test size.

    With `validation_examples`, also the held-out validation split's size and index hash.
    """
    data = load_data(recipe, validation_examples=validation_examples or None)
    indices = data.train_indices.astype("<i8")
    description = {
        "dataset": data.info.name,
        "num_train": int(data.info.num_train),
        "num_test": int(data.info.num_test),
        "subset_seed": recipe["subset_seed"],
        "subset_rule": "sorted(numpy.random.RandomState(subset_seed)"
                       ".permutation(num_full_train)[:train_examples])",
        "subset_indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(),
        "subset_first_indices": [int(i) for i in indices[:10]],
    }
    if validation_examples:
        held_out = getattr(data, "validation_indices", None)
        description.update(
            num_validation=int(data.info.num_validation),
            validation_rule="the last validation_examples of numpy.random.RandomState("
                            "subset_seed).permutation(num_full_train), sorted",
        )
        if held_out is not None:
            description["validation_indices_sha256"] = hashlib.sha256(
                held_out.astype("<i8").tobytes()).hexdigest()
    return description


def teacher_probabilities(recipe, paths, *, convention="auto", flag="teacher_preprocessing"):
    """Test softmax outputs of each teacher file in `paths`, and the test labels.

    A file without its own preprocessing layer is taken as `convention` says
    (`keras_feed.models.preprocessing.raw_pixel_model`).
    """
    import keras
    import numpy as np

    from keras_feed.models import preprocessing

    data = load_data(recipe)
    test = data.test(256)
    labels = np.concatenate([y.numpy() for _, y in test])
    probabilities = []
    for path in paths:
        model = preprocessing.raw_pixel_model(
            keras.models.load_model(path, compile=False), convention,
            statistics=lambda: (data.info.mean, data.info.std), what=f"Teacher file {path}",
            flag=flag,
        )
        logits = model.predict(test.map(lambda x, y: x), verbose=0)
        probabilities.append(np.asarray(keras.ops.softmax(logits.astype("float32"))))
    return probabilities, labels


def accuracy(probabilities, labels):
    """Top-1 accuracy of `(examples, classes)` probabilities against `labels`."""
    import numpy as np

    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


# -- statistics -------------------------------------------------------------------------


def summary(values):
    """n, mean, sample std (ddof 1) and standard error of `values`."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else float("nan")}


def compare(a, b):
    """mean(a) - mean(b), its standard error and their ratio, from two `summary`s.

    The standard error of the difference is sqrt(se_a^2 + se_b^2) (the rows as
    independent samples); None when a side has fewer than two values.
    """
    if a["n"] < 2 or b["n"] < 2:
        return None
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    if se > 0:
        ratio = diff / se
    else:
        ratio = math.copysign(float("inf"), diff) if diff else 0.0
    return {"diff": diff, "se": se, "ratio": ratio}


def difference(a, b, label_a, label_b):
    """A line: mean(a) - mean(b) in points and in standard errors of the difference."""
    compared = compare(a, b)
    if compared is None:
        return (f"- {label_a} − {label_b}: needs n ≥ 2 on both sides "
                f"(have n={a['n']} and n={b['n']})")
    return (f"- {label_a} − {label_b}: {100 * compared['diff']:+.2f} points, "
            f"SE {100 * compared['se']:.2f} → {compared['ratio']:+.1f} standard errors "
            f"(n={a['n']} vs n={b['n']})")


def percent(value):
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def mean_std(stats):
    if stats["n"] == 0:
        return "–"
    if stats["n"] == 1:
        return f"{percent(stats['mean'])} (n=1)"
    return f"{percent(stats['mean'])} ± {percent(stats['std'])}"


def records_by_name(records):
    """`{name: [record, ...]}`, each list sorted by seed."""
    by_name = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    for group in by_name.values():
        group.sort(key=lambda record: record["seed"])
    return by_name


def run_times(records):
    """(minutes per run, images/s) as table cells: means over `records`, or dashes."""
    if not records:
        return "–", "–"
    minutes = summary([r["wall_s"] / 60 for r in records])["mean"]
    speed = summary([r["images_per_s"] for r in records])["mean"]
    return f"{minutes:.1f}", f"{speed:.0f}"


# -- plots -----------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(figure, path):
    """Writes `figure` to the PNG file `path` atomically and closes it."""
    from keras_feed.run import files

    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    pyplot().close(figure)


def plot_rows(path, rows, *, lines=(), title, ylabel="test accuracy (%)"):
    """Accuracy per row: mean ± std over seeds, each seed a dot; `lines` as references.

    Args:
      path: the PNG file.
      rows: `[(name, [accuracy, ...]), ...]` in [0, 1], in the order shown.
      lines: `[(accuracy, linestyle, label), ...]`: horizontal reference lines.
      title: the plot's title.
    """
    if not rows:
        return
    plt = pyplot()
    width = max(6, 1.1 * len(rows) + 2)
    figure, axes = plt.subplots(figsize=(width, 4.5))
    for position, (_, values) in enumerate(rows):
        stats = summary(values)
        mean = 100 * stats["mean"]
        std = 0 if stats["n"] < 2 else 100 * stats["std"]
        axes.errorbar(position, mean, yerr=std, fmt="o", color="C0", capsize=5, markersize=8)
        axes.scatter([position + 0.12] * len(values), [100 * v for v in values],
                     s=12, color="C7", zorder=3)
        axes.annotate(f"n={stats['n']}", (position, mean), textcoords="offset points",
                      xytext=(8, -14), fontsize=7)
    for value, style, label in lines:
        axes.axhline(100 * value, color="C3", linestyle=style, label=label)
    axes.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(textwrap.fill(title, int(11 * width)), fontsize=9)  # ~11 characters an inch
    axes.grid(axis="y", alpha=0.3)
    if lines:
        axes.legend(fontsize=8, loc="lower right")
    save_figure(figure, path)
