"""Evidence study: does pFEED beat one teacher and plain training on Fashion-MNIST?

    python benchmarks/fashion_mnist_study.py                # run (or resume) the study
    python benchmarks/fashion_mnist_study.py --report_only  # rewrite table and plots
    python benchmarks/fashion_mnist_study.py --smoke        # seconds-long dry rehearsal

The claim under test (Park & Kwak, arXiv:1909.10754): distilling the feature
maps of several teachers through parallel NTLs (pFEED) gives a better student
than one teacher (FEED with one NTL) and than plain training, and approaches
the teachers' ensemble.

Setting: real Fashion-MNIST (IDX files), a seeded 6,000-image training subset
(the same for every run), the full 10,000-image test set; `resnet20` for the
three teachers (cross-entropy, seeds 100, 101, 102) and for every student; SGD
with Nesterov momentum 0.9, lr 0.1 with cosine decay, weight decay 5e-4, batch
128, 30 epochs for teachers and students alike, beta 500.

Every seed distils from the same three teachers (trained once) on the same
6,000-image subset: the seeds vary the students' initialisation, data order
and augmentation only, so the spreads over seeds and the standard errors in
the report exclude the variance of the teachers and of the subset.

The study is resumable. Every finished run is appended at once (atomic write)
to `benchmarks/results/fashion_mnist.json` and skipped on the next start;
the teachers are kept in `benchmarks/results/fashion_mnist_teachers/` and
reused. A run interrupted half-way (the process killed, the machine stopped)
resumes on the next start from the last stage checkpoint in its scratch
folder, which keras_feed writes at the end of every epoch (the recipe sets no
`checkpoint_steps`), so it loses at most the epoch in progress; a run that
finished but was not recorded is recorded from its `metrics.json` without
training again. Only a run that fails with an exception has its scratch folder
removed (the failure is noted in the json) and starts from scratch on the next
start. Runs whose method is not registered in `keras_feed.run.methods` yet are
postponed: the next start picks them up. Scratch folders of the runs go to
`runs/fashion_mnist_study/` (not in git). After every run the table
(`fashion_mnist.md`) and the plots (`fashion_mnist_accuracy.png`,
`fashion_mnist_feed_loss.png`) are rewritten. What this study shares with the
other studies (running, recording, statistics, plots) is in
`benchmarks/study_common.py`.

Each record carries the keras_feed version that produced it (`git`: the
checkout's commit, "+dirty" with uncommitted edits under keras_feed/, and a
hash of the package's sources), both taken when the study process starts. The
committed results span four versions: see README.md, "Evidence:
Fashion-MNIST study".
"""

import dataclasses
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # study_common, run or imported
import study_common as common  # noqa: E402
from study_common import (  # noqa: E402  (the names the tests and older callers use)
    difference,
    git_revision,
    mean_std,
    now,
    percent,
    reset_session,
    say,
    stage_summary,
    summary,
)

RESULTS_NAME = "fashion_mnist"
TEACHER_SEED = 100
NUM_TEACHERS = 3

# The recipe shared by teachers and students (TrainConfig fields).
RECIPE = dict(common.STUDENT_RECIPE, teacher_model="resnet20", teacher_epochs=30, beta=500.0)

# A seconds-long rehearsal of the same plan (never written to benchmarks/results).
SMOKE_RECIPE = dict(RECIPE, **common.SMOKE_SETTINGS, teacher_model="resnet8", teacher_epochs=1)

KD = (("kd_weight", 0.9), ("temperature", 4.0))

# The committed teachers were written by keras-feed 0.1.0 without a
# preprocessing layer; once every run was finished they were re-saved with it
# (`migrate_study_teachers.py`, identical logits on the test split, recorded in
# the json as each teacher's `migration`). The runs recorded before that took
# them with `teacher_preprocessing="dataset"`, which computes the same model.


@dataclasses.dataclass(frozen=True)
class Run:
    """One student run of the plan: a table row (`name`) at one seed."""

    name: str
    method: str
    seed: int
    teacher_ids: tuple = ()
    settings: tuple = ()  # extra TrainConfig fields, as (field, value) pairs

    @property
    def key(self):
        return f"{self.name}/seed{self.seed}"


# Table rows: name -> what it is.
DESCRIPTIONS = {
    "ce": "plain training (cross-entropy)",
    "feed_1": "FEED, one NTL (teacher 0)",
    "pfeed_2": "pFEED, two NTLs (teachers 0, 1)",
    "pfeed_3": "pFEED, three NTLs (teachers 0, 1, 2)",
    "kd": "Hinton KD from the 3-teacher ensemble (T=4, kd_weight 0.9)",
    "ft": "Factor Transfer from teacher 0 (rate 0.5; paraphraser: 10 epochs from lr 0.01)",
    "sfeed_2": "sFEED, two born-again generations from teacher 0",
    "pfeed_3_kd": "pFEED-3 + KD (T=4, kd_weight 0.9)",
    "pfeed_3_beta100": "pFEED-3, beta 100",
    "pfeed_3_beta2000": "pFEED-3, beta 2000",
}


def plan():
    """Every run of the study, in the order they are run.

    The headline rows have five seeds, the baselines three, the beta variants one.
    The first three headline seeds and the baselines' seed 0 were the study's
    first round; the rest follow, interleaved so that partial results stay
    balanced.
    """

    def headline(seed):
        return [
            Run("ce", "ce", seed),
            Run("feed_1", "pfeed", seed, (0,)),
            Run("pfeed_2", "pfeed", seed, (0, 1)),
            Run("pfeed_3", "pfeed", seed, (0, 1, 2)),
        ]

    def baselines(seed):
        return [
            Run("kd", "kd", seed, (0, 1, 2), KD),
            Run("ft", "ft", seed, (0,), (("ft_rate", 0.5), ("paraphraser_learning_rate", 0.01))),
            Run("sfeed_2", "sfeed", seed, (0,), (("generations", 2),)),
            Run("pfeed_3_kd", "pfeed", seed, (0, 1, 2), KD),
        ]

    runs = headline(0) + headline(1) + headline(2) + baselines(0)
    runs += [  # sensitivity to beta
        Run("pfeed_3_beta100", "pfeed", 0, (0, 1, 2), (("beta", 100.0),)),
        Run("pfeed_3_beta2000", "pfeed", 0, (0, 1, 2), (("beta", 2000.0),)),
    ]
    runs += headline(3) + baselines(1) + headline(4) + baselines(2)
    return runs


class Study(common.StudyFiles):
    """Paths, the results file and the recipe of one study (real or smoke)."""

    def __init__(self, results_dir, runs_dir, recipe):
        super().__init__(results_dir, runs_dir, RESULTS_NAME, {
            "study": None, "teachers": [], "ensembles": {}, "runs": [], "failures": {}})
        self.recipe = dict(recipe)
        self.feed_loss_png = os.path.join(self.results_dir, f"{RESULTS_NAME}_feed_loss.png")


# -- training ------------------------------------------------------------------


def base_config(study, **fields):
    return common.make_config(study.recipe, **fields)


def finished_metrics(config):
    """metrics.json of a run of `config` that finished but was not recorded, or None."""
    return common.finished_metrics(config, ("method", "seed", "epochs", "beta"))


def describe_data(study):
    """The training subset's size, seed and index hash, and the test size."""
    return common.describe_data(study.recipe)


def train_teacher(study, index, revision):
    """Trains teacher `index` with CE (seed 100 + index) unless its file exists."""
    from keras_feed.run import files

    path = study.teacher_path(index)
    seed = TEACHER_SEED + index
    model_dir = os.path.join(study.runs_dir, f"teacher_{index}")
    record = {"index": index, "seed": seed, "file": study.shown(path), "method": "ce",
              "model": study.recipe["teacher_model"], "epochs": study.recipe["teacher_epochs"]}
    if os.path.isfile(path):
        say(f"teacher {index}: reusing {path}; measuring its test accuracy")
        record.update(test_accuracy=None, wall_s=None, images_per_s=None, reused=True)
    else:
        config = base_config(
            study, method="ce", seed=seed, model=study.recipe["teacher_model"],
            epochs=study.recipe["teacher_epochs"], model_dir=model_dir,
        )
        metrics = finished_metrics(config)
        if metrics is None:
            say(f"teacher {index}: training {config.model} with CE, seed {seed}")
            metrics = common.run_in(model_dir, config)
        with files.atomic_path(path) as temporary:
            shutil.copyfile(os.path.join(model_dir, "student.keras"), temporary)
        record.update(
            test_accuracy=metrics["student"]["test_accuracy"],
            finished_at=now(), git=revision, **stage_summary(metrics),
        )
    return record


def measure_teachers(study):
    """Test softmax outputs of each teacher file, and the labels."""
    return common.teacher_probabilities(
        study.recipe, [study.teacher_path(index) for index in range(NUM_TEACHERS)],
        flag="teacher_preprocessing",
    )


def ensure_teachers(study, results, revision):
    """Trains (or reuses) the three teachers and records them and their ensembles."""
    import numpy as np

    recorded = {teacher["index"]: teacher for teacher in results["teachers"]}
    for index in range(NUM_TEACHERS):
        if index in recorded and os.path.isfile(study.teacher_path(index)):
            continue
        record = train_teacher(study, index, revision)
        recorded[index] = record
        results["teachers"] = [recorded[i] for i in sorted(recorded)]
        study.save(results)
        reset_session()
        write_report(study, results)
    missing_accuracy = any(t.get("test_accuracy") is None for t in results["teachers"])
    if results["ensembles"] and not missing_accuracy:
        return
    probabilities, labels = measure_teachers(study)

    def accuracy(p):
        return common.accuracy(p, labels)

    for teacher, p in zip(results["teachers"], probabilities):
        if teacher.get("test_accuracy") is None:
            teacher["test_accuracy"] = accuracy(p)
    results["ensembles"] = {
        str(size): {
            "teachers": list(range(size)),
            "rule": "mean of softmax outputs",
            "test_accuracy": accuracy(np.mean(probabilities[:size], axis=0)),
        }
        for size in (2, 3)
    }
    results["ensembles"]["2_all_pairs"] = {
        f"{a},{b}": accuracy((probabilities[a] + probabilities[b]) / 2)
        for a, b in ((0, 1), (0, 2), (1, 2))
    }
    study.save(results)
    reset_session()
    say("teachers: " + ", ".join(f"{t['test_accuracy']:.4f}" for t in results["teachers"])
        + "; ensembles: " + ", ".join(
            f"{size} -> {results['ensembles'][size]['test_accuracy']:.4f}" for size in ("2", "3")))


def unavailable(run):
    """Why `run` cannot run with the installed keras_feed yet, or None."""
    return common.unavailable(run.method, run.settings)


def train_student(study, run, revision):
    """Runs one student of the plan and returns its record."""
    model_dir = os.path.join(study.runs_dir, run.key.replace("/", "_"))
    settings = dict(run.settings)
    config = base_config(
        study, method=run.method, seed=run.seed, model_dir=model_dir,
        teachers=tuple(study.teacher_path(i) for i in run.teacher_ids),
        **settings,
    )
    metrics = finished_metrics(config) or common.run_in(model_dir, config)
    record = {
        "key": run.key,
        "name": run.name,
        "method": run.method,
        "seed": run.seed,
        "teachers": len(run.teacher_ids),
        "teacher_ids": list(run.teacher_ids),
        "student": config.model,
        "teacher_model": config.teacher_model if run.teacher_ids else None,
        "beta": config.beta,
        "kd_weight": config.kd_weight,
        "temperature": config.temperature,
        "settings": settings,
        "epochs": config.epochs,
        "train_examples": config.train_examples,
        "subset_seed": config.subset_seed,
        "test_accuracy": metrics["student"]["test_accuracy"],
        "ensemble_test_accuracy": metrics.get("ensemble", {}).get("test_accuracy"),
        "teacher_test_accuracy": [t["test_accuracy"] for t in metrics.get("teachers", [])],
        "finished_at": now(),
        "git": revision,
    }
    record.update(stage_summary(metrics))
    if "generations" in metrics:  # sfeed: every generation's test accuracy
        record["generations"] = [
            {"generation": g["generation"], "test_accuracy": g["test_accuracy"]}
            for g in metrics["generations"]
        ]
    return record


def run_study(study):
    """Runs whatever of the plan is not in the results file yet."""
    results = study.load()
    description = {"recipe": study.recipe, "teacher_seeds": [TEACHER_SEED + i for i in range(NUM_TEACHERS)]}
    if results["study"] is None:
        description["data"] = describe_data(study)
        results["study"] = description
        study.save(results)
    elif results["study"]["recipe"] != study.recipe:
        raise SystemExit(
            f"{study.json_path} was made with another recipe; move it away to start over."
        )
    revision = git_revision()
    say(f"results: {study.json_path}; scratch: {study.runs_dir}; keras_feed at {revision}")
    ensure_teachers(study, results, revision)
    write_report(study, results)
    postponed = common.run_pending(
        plan(), results, done={record["key"] for record in results["runs"]},
        train=lambda run: train_student(study, run, revision),
        save=lambda: study.save(results), report=lambda: write_report(study, results),
        describe=lambda run: f"{run.method}, teachers {list(run.teacher_ids)}, "
                             f"{dict(run.settings)}",
    )
    write_report(study, results)
    left = [run.key for run in plan() if run.key not in {r["key"] for r in results["runs"]}]
    if left:
        say(f"not finished: {', '.join(left)} (postponed: {', '.join(postponed) or 'none'}); "
            "run the same command again to continue")
    else:
        say("the study is complete")


# -- the report -----------------------------------------------------------------


def accuracies_by_name(results):
    return common.records_by_name(results["runs"])


def write_report(study, results):
    """Rewrites the markdown table and the two plots from the results."""
    by_name = accuracies_by_name(results)
    names = list(DESCRIPTIONS)
    planned = {}
    for run in plan():
        planned.setdefault(run.name, []).append(run.seed)
    recipe = study.recipe
    data = (results.get("study") or {}).get("data", {})
    lines = [
        "# Fashion-MNIST study: pFEED vs one teacher vs plain training",
        "",
        "Generated by `python benchmarks/fashion_mnist_study.py` from `fashion_mnist.json`; "
        "do not edit by hand.",
        "",
        f"Setting: {recipe['dataset']}, {recipe['train_examples']} training images "
        f"(subset seed {recipe['subset_seed']}, index sha256 "
        f"`{data.get('subset_indices_sha256', '?')[:16]}…`), the full test set "
        f"({data.get('num_test', '?')} images). Teachers and students: `{recipe['model']}`; "
        f"SGD Nesterov momentum {recipe['momentum']}, lr {recipe['learning_rate']} "
        f"{recipe['lr_schedule']}, weight decay {recipe['weight_decay']}, batch "
        f"{recipe['batch_size']}, {recipe['epochs']} epochs, beta {recipe['beta']:g} "
        "unless the row says otherwise. Accuracy in %, mean ± sample std over seeds. "
        "Minutes per run and images/s are as measured on a shared 2-core machine (other "
        "jobs, pauses): a record of what happened, not a throughput benchmark.",
        "",
        "| row | what | teachers | n done/planned | test accuracy (%) | per seed | minutes/run "
        "| images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    stats = {}
    for name in names:
        records = by_name.get(name, [])
        values = [record["test_accuracy"] for record in records]
        stats[name] = summary(values)
        teachers = len(next((run.teacher_ids for run in plan() if run.name == name), ()))
        per_seed = ", ".join(f"s{r['seed']}: {percent(r['test_accuracy'])}" for r in records)
        minutes, speed = common.run_times(records)
        planned_n = len(planned.get(name, []))
        lines.append(
            f"| {name} | {DESCRIPTIONS[name]} | {teachers} | {len(records)}/{planned_n} | "
            f"{mean_std(stats[name])} | {per_seed or 'not run yet'} | {minutes} | {speed} |"
        )
    teachers = results["teachers"]
    teacher_values = [t["test_accuracy"] for t in teachers if t.get("test_accuracy") is not None]
    for teacher in teachers:
        minutes = f"{teacher['wall_s'] / 60:.1f}" if teacher.get("wall_s") else "–"
        speed = f"{teacher['images_per_s']:.0f}" if teacher.get("images_per_s") else "–"
        lines.append(
            f"| teacher_{teacher['index']} | teacher, CE, seed {teacher['seed']} | – | 1 | "
            f"{percent(teacher.get('test_accuracy'))} | | {minutes} | {speed} |"
        )
    if teacher_values:
        lines.append(
            f"| teachers | the {len(teacher_values)} teachers as a group | – | "
            f"{len(teacher_values)} | {mean_std(summary(teacher_values))} | | | |"
        )
    for size in ("2", "3"):
        ensemble = results["ensembles"].get(size)
        if ensemble:
            lines.append(
                f"| ensemble_{size} | mean softmax of teachers "
                f"{', '.join(map(str, ensemble['teachers']))} | {size} | 1 | "
                f"{percent(ensemble['test_accuracy'])} | | | |"
            )
    pairs = results["ensembles"].get("2_all_pairs")
    if pairs:
        lines += ["", "Ensembles of two teachers, every pair: " + ", ".join(
            f"{pair}: {percent(value)}" for pair, value in pairs.items())]
    ce_all = summary([r["test_accuracy"] for r in by_name.get("ce", [])] + teacher_values)
    lines += [
        "",
        "## Differences",
        "",
        "In standard errors of the difference: (mean₁ − mean₂) / sqrt(se₁² + se₂²), "
        "se = std / sqrt(n). With n = 3 to 5 per row this is a rough guide, not a test.",
        "",
        difference(stats["pfeed_3"], stats["ce"], "pfeed_3", "ce"),
        difference(stats["pfeed_3"], stats["feed_1"], "pfeed_3", "feed_1"),
        difference(stats["pfeed_2"], stats["feed_1"], "pfeed_2", "feed_1"),
        difference(stats["feed_1"], stats["ce"], "feed_1", "ce"),
        difference(stats["pfeed_3"], ce_all, "pfeed_3", "every CE run (ce + the teachers)"),
    ]
    ensemble_3 = results["ensembles"].get("3", {}).get("test_accuracy")
    if ensemble_3 is not None and stats["pfeed_3"]["n"]:
        lines.append(
            f"- ensemble_3 − pfeed_3: {100 * (ensemble_3 - stats['pfeed_3']['mean']):+.2f} points"
        )
    lines += ["", "The teachers are trained with exactly the `ce` recipe (seeds 100-102), so "
              "they are also three more samples of plain training; the last line pools them "
              "with the `ce` rows."]
    feed_rows = [r for r in results["runs"] if r.get("last_feed_loss")]
    if feed_rows:
        lines += ["", "## Last epoch's mean FEED loss per teacher (before beta)", ""]
        for record in feed_rows:
            losses = ", ".join(f"{value:.4f}" for value in record["last_feed_loss"])
            lines.append(f"- {record['key']}: {losses}")
    chains = [r for r in results["runs"] if r.get("generations")]
    if chains:
        lines += ["", "## Test accuracy per sFEED generation (generation 0: the CE teacher)", ""]
        for record in chains:
            steps = " → ".join(percent(g["test_accuracy"]) for g in record["generations"])
            lines.append(f"- {record['key']}: {steps}")
    missing = [run.key for run in plan() if run.key not in {r["key"] for r in results["runs"]}]
    lines += ["", "## Status", ""]
    if len(teachers) < NUM_TEACHERS:
        lines.append(f"- teachers trained: {len(teachers)}/{NUM_TEACHERS}")
    lines.append(f"- finished student runs: {len(results['runs'])}/{len(plan())}")
    if missing:
        lines.append(f"- not run yet: {', '.join(missing)}")
    for key, error in results.get("failures", {}).items():
        lines.append(f"- last attempt of {key} failed: {error}")
    if missing or len(teachers) < NUM_TEACHERS:
        lines.append("- resume (or finish), from the checkout: `nohup nice -n 19 python "
                     "benchmarks/fashion_mnist_study.py > study.log 2>&1 &`")
    else:
        lines.append("- complete: every planned run is recorded; a rerun skips them all")
    lines.append("")
    common.write_text(study.md_path, "\n".join(lines))
    plot_accuracy(study, results, by_name, teacher_values)
    plot_feed_loss(study, by_name)


def plot_accuracy(study, results, by_name, teacher_values):
    """Accuracy per row (mean ± std, seeds as dots); the ensembles as lines."""
    rows = [(name, [r["test_accuracy"] for r in by_name[name]])
            for name in DESCRIPTIONS if name in by_name]
    if teacher_values:
        rows.append(("teachers", teacher_values))
    lines = [(results["ensembles"][size]["test_accuracy"], style, f"ensemble of {size} teachers")
             for size, style in (("3", "-"), ("2", "--")) if results["ensembles"].get(size)]
    common.plot_rows(
        study.accuracy_png, rows, lines=lines,
        title=f"Fashion-MNIST, {study.recipe['train_examples']} training images, "
              f"{study.recipe['model']}: mean ± std over seeds (dots: seeds)",
    )


def plot_feed_loss(study, by_name):
    """Per-teacher FEED loss per epoch of the first pFEED-3 run (feed_1 for contrast)."""
    if "pfeed_3" not in by_name:
        return
    pyplot = common.pyplot()
    record = by_name["pfeed_3"][0]
    history = record["history"]
    figure, axes = pyplot.subplots(figsize=(6.5, 4))
    for index in range(record["teachers"]):
        values = history.get(f"feed_loss_{index}", [])
        axes.plot(range(1, len(values) + 1), values, marker=".",
                  label=f"pfeed_3 NTL {index} (teacher {index})")
    if "feed_1" in by_name:
        same_seed = [r for r in by_name["feed_1"] if r["seed"] == record["seed"]]
        values = (same_seed or by_name["feed_1"])[0]["history"].get("feed_loss_0", [])
        axes.plot(range(1, len(values) + 1), values, "k--", linewidth=1,
                  label="feed_1 NTL 0 (teacher 0)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean FEED loss (before beta)")
    axes.set_yscale("log")
    axes.set_title(f"FEED loss per teacher, pfeed_3 seed {record['seed']}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    common.save_figure(figure, study.feed_loss_png)


def main():
    args = common.arguments(
        __doc__.split("\n\n")[0],
        smoke_help="synthetic data, resnet8, 1 epoch; results into a temporary folder",
        name=RESULTS_NAME,
    )
    study = Study(*common.folders(args, RESULTS_NAME), SMOKE_RECIPE if args.smoke else RECIPE)
    common.run_or_report(args, study, run=run_study, report=write_report)


if __name__ == "__main__":
    main()
