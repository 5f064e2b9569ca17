"""Evidence study: distilling from teachers that differ in architecture and strength.

    python benchmarks/heterogeneous_study.py                # run (or resume) the study
    python benchmarks/heterogeneous_study.py --report_only  # rewrite table and plots
    python benchmarks/heterogeneous_study.py --smoke        # minutes-long dry rehearsal

The questions: does the ensemble effect of pFEED (a student distilled from the
feature maps of several teachers beats plain training) hold when the teachers
are not copies of one recipe but differ in architecture and accuracy; and does
weighting the teachers per example (`--teacher_weighting`: `confidence`, after
CA-MKD; `entropy`, after EBKD; `agreement`, after AE-KD) help there, for
pFEED and for Hinton KD? The hypotheses and the decision rule were written
into `benchmarks/results/heterogeneous.md` before any run existed
(`PREREGISTRATION`); every rewrite keeps them verbatim at the top.

Setting (the committed Fashion-MNIST study's, `fashion_mnist_study.py`, unless
said): real Fashion-MNIST (IDX files), the seeded 6,000-image training subset
(subset seed 0), the full 10,000-image test set; `resnet20` students; SGD with
Nesterov momentum 0.9, lr 0.1 with cosine decay, weight decay 5e-4, batch 128,
30 epochs. Three teachers, trained with cross-entropy by keras-feed itself
(seeds 100, 101, 102) on the same subset and recipe but for their own number of
epochs: `resnet32` (30 epochs, the strongest), `resnet20` (3 epochs, a weak
one) and `small_cnn_slim` (30 epochs, a small network). They are kept in
`benchmarks/results/heterogeneous_teachers/` with keras-feed's record of how
each was trained (`teacher_<i>.json`); keras-feed refuses to reuse a file whose
record differs from the plan.

The plan (`plan`):

1. Validation phase: the settings the committed recipe does not fix are
   chosen on a validation split, never on the test split, with equal teacher
   weights, at student seeds 1000 and 1001: beta of pFEED-3 in {500, 100,
   2000}, kd_weight of KD in {0.9, 0.5} at temperature 4, then pFEED-3 + KD at
   the two chosen values (listed, nothing more to choose). The choice is the
   variant with the highest mean validation accuracy (a tie goes to the first
   listed: the committed study's value). The report lists every variant tried.
2. Main rows, student seeds 0-4: `ce`, KD (equal), KD (confidence), pFEED-3
   (equal), pFEED-3 (confidence), pFEED-3 (entropy); the pre-registered
   hypotheses compare these.
3. Control rows, seeds 0-2: KD in CA-MKD's form (one KD term per teacher,
   `kd_form="per_teacher"`, equal weights), pFEED-3 + KD (equal) and
   (confidence), pFEED-3 (agreement).

The validation split. `validation_examples` holds out examples of the *full*
60,000-image training split (the last N of the subset seed's permutation), not
of the 6,000-image subset: the 6,000 training images are the same with and
without it, and only the normalisation statistics every model computes (over
the full training split, less what is held out) change slightly. The
validation runs hold out 10,000 images; they are separate runs, with student
seeds (1000, 1001) that no final run uses, so that the chosen variant's lucky
initialisation does not carry into the final rows. The final runs hold nothing
out: they normalise as the teachers and the committed study do.

Every run is keyed on everything that defines it (the recipe, the method and
its settings, the teacher set, the student seed, the validation split):
`<row>/seed<s>/<hash>`, the hash taken over the full definition, which is also
stored in its record. A record is used only for the run it was made for; one
made with other settings (an earlier plan, another choice of beta) stays in the
json but is neither reused nor shown.

The study is resumable as the Fashion-MNIST study is: every finished run is
appended at once (atomic write) to `benchmarks/results/heterogeneous.json` and
skipped on the next start; a run interrupted half-way resumes from keras-feed's
stage checkpoints in its scratch folder under `runs/heterogeneous_study/` (not
in git); a run that finished but was not recorded is recorded from its
`metrics.json`; a run that raises is noted and retried on the next start. A run
whose settings the installed keras_feed does not know (a method not
registered, a `TrainConfig` field it lacks, a choice it does not offer) is
postponed, not failed: the next start picks it up. One study process at a time
holds `runs/heterogeneous_study/study.lock`. After every run the report
(`heterogeneous.md`) and its plots (`heterogeneous_accuracy.png`,
`heterogeneous_teacher_weights.png`) are rewritten. What this study shares
with the other studies is in `benchmarks/study_common.py`.
"""

import dataclasses
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # study_common, run or imported
import study_common as common  # noqa: E402
from study_common import say  # noqa: E402

RESULTS_NAME = "heterogeneous"

# The recipe of every student and teacher (TrainConfig fields): the committed study's.
RECIPE = dict(common.STUDENT_RECIPE)

# The teachers (TrainConfig fields): teacher i is `teacher_model[i]`, trained with
# cross-entropy for `teacher_epochs[i]` epochs from seed `teacher_seed + i`, with RECIPE.
TEACHERS = dict(
    teacher_model=("resnet32", "resnet20", "small_cnn_slim"),
    teacher_epochs=(30, 3, 30),
    teacher_seed=100,
)

# Recipe settings that say where a run's inputs are, not what it is: not in its key.
LOCATION_SETTINGS = ("data_dir",)

# The validation phase's candidates, the committed study's value first (ties go to it).
BETAS = (500.0, 100.0, 2000.0)
KD_WEIGHTS = (0.9, 0.5)
TEMPERATURE = 4.0


@dataclasses.dataclass(frozen=True)
class Design:
    """The size of one study: its recipe, teachers, validation split and seeds."""

    recipe: dict
    teachers: dict
    validation_examples: int
    validation_seeds: tuple
    main_seeds: tuple
    control_seeds: tuple


REAL = Design(RECIPE, TEACHERS, validation_examples=10000, validation_seeds=(1000, 1001),
              main_seeds=(0, 1, 2, 3, 4), control_seeds=(0, 1, 2))

# A rehearsal of the same plan in minutes (never written to benchmarks/results).
SMOKE = Design(
    dict(RECIPE, **common.SMOKE_SETTINGS),
    dict(TEACHERS, teacher_model=("resnet8", "resnet8", "small_cnn_slim"), teacher_epochs=(2, 1, 2)),
    validation_examples=128, validation_seeds=(1000,), main_seeds=(0, 1), control_seeds=(0,),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the results table: a method with its teacher weighting.

    `uses` names the settings the validation phase chooses for it (`beta`,
    `kd_weight`); `extra`, fixed `TrainConfig` settings as (field, value) pairs.
    """

    name: str
    what: str
    method: str
    weighting: str
    tier: str  # "main" (seeds `main_seeds`) or "control" (`control_seeds`)
    uses: tuple = ()
    extra: tuple = ()


ROWS = (
    Row("ce", "plain training (cross-entropy)", "ce", "equal", "main"),
    Row("kd_equal", "Hinton KD from the 3 teachers' mean soft targets", "kd", "equal", "main",
        ("kd_weight",)),
    Row("kd_confidence", "Hinton KD, teachers weighted per example by confidence", "kd",
        "confidence", "main", ("kd_weight",)),
    Row("pfeed_3_equal", "pFEED, three NTLs, equal weights (the paper's loss)", "pfeed",
        "equal", "main", ("beta",)),
    Row("pfeed_3_confidence", "pFEED-3, teachers weighted per example by confidence", "pfeed",
        "confidence", "main", ("beta",)),
    Row("pfeed_3_entropy", "pFEED-3, teachers weighted per example by prediction entropy",
        "pfeed", "entropy", "main", ("beta",)),
    Row("kd_per_teacher_equal", "KD in CA-MKD's form: one KD term per teacher, equal weights",
        "kd", "equal", "control", ("kd_weight",), (("kd_form", "per_teacher"),)),
    Row("pfeed_3_kd_equal", "pFEED-3 + KD, equal weights", "pfeed", "equal", "control",
        ("beta", "kd_weight")),
    Row("pfeed_3_kd_confidence", "pFEED-3 + KD, teachers weighted by confidence", "pfeed",
        "confidence", "control", ("beta", "kd_weight")),
    Row("pfeed_3_agreement", "pFEED-3, teachers weighted per batch by agreement", "pfeed",
        "agreement", "control", ("beta",)),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# The pre-registered comparisons: (hypothesis, row compared, row it should beat).
HYPOTHESES = (
    ("H1", "pfeed_3_confidence", "pfeed_3_equal"),
    ("H2", "pfeed_3_equal", "ce"),
    ("H3", "kd_confidence", "kd_equal"),
)
THRESHOLD = 2.0  # standard errors of the difference

PREREGISTRATION = """\
## Pre-registered hypotheses and decision rule

Written before any run of this study existed; every rewrite of this file keeps this section verbatim.

H1: for pFEED-3, confidence weighting beats equal weighting by more than 2 standard errors of the difference (n = 5). H2: pFEED-3 (equal) beats CE by more than 2 SE with heterogeneous teachers. H3: KD (confidence) beats KD (equal) by more than 2 SE.

The setting: Fashion-MNIST, the seeded 6,000-image training subset, the 10,000-image test set; `resnet20` students with the committed study's recipe (30 epochs); three teachers trained with cross-entropy on the same images: `resnet32` (30 epochs), `resnet20` (3 epochs) and `small_cnn_slim` (30 epochs). The rows compared (test accuracy, student seeds 0-4): H1 `pfeed_3_confidence` against `pfeed_3_equal`; H2 `pfeed_3_equal` against `ce`; H3 `kd_confidence` against `kd_equal`. For each, d = mean(first row) − mean(second row) and SE = sqrt(se₁² + se₂²), with se = sample standard deviation / sqrt(n). The verdict: **supported** if d > 2 SE; **reversed** if d < −2 SE; **not supported** otherwise (the difference within 2 SE); **pending** while either row has fewer than its 5 seeds. beta (pFEED) and kd_weight (KD) are chosen before the final runs on a validation split (training-split images outside the 6,000 training images), with equal weights, never on the test split; the weighted rows use the same values."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the plan: a row (or validation variant) at one student seed.

    `settings` are the `TrainConfig` fields it sets beyond the recipe (besides
    `method` and `seed`); `definition` is the canonical JSON of everything that
    defines it, the source of its key.
    """

    name: str
    phase: str  # "validation" or "final"
    method: str
    seed: int
    settings: tuple
    definition: str

    @property
    def digest(self):
        return hashlib.sha256(self.definition.encode()).hexdigest()[:10]

    @property
    def key(self):
        return f"{self.name}/seed{self.seed}/{self.digest}"

    @property
    def folder(self):
        """Its scratch folder's name."""
        return self.key.replace("/", "_")

    @property
    def uses_teachers(self):
        return self.method != "ce"


def teacher_set(design):
    """What defines the teacher set: each teacher's architecture, epochs and seed."""
    teachers = design.teachers
    count = len(teachers["teacher_model"])
    return {"architectures": list(teachers["teacher_model"]),
            "epochs": list(teachers["teacher_epochs"]),
            "seeds": [teachers["teacher_seed"] + index for index in range(count)]}


def make_run(design, name, phase, method, seed, **settings):
    """The `Run` of `method` at `seed` with `settings`, keyed on its whole definition."""
    definition = {
        **{k: v for k, v in design.recipe.items() if k not in LOCATION_SETTINGS},
        "method": method,
        "seed": seed,
        **settings,
        "teacher_set": teacher_set(design) if method != "ce" else None,
    }
    return Run(name, phase, method, seed, tuple(sorted(settings.items())),
               json.dumps(definition, sort_keys=True))


def teacher_settings(weighting, beta, kd_weight, extra=()):
    """The loss settings of a run from teachers: KD's temperature only where KD is on."""
    settings = {"teacher_weighting": weighting, "beta": beta, "kd_weight": kd_weight}
    if kd_weight:
        settings["temperature"] = TEMPERATURE
    settings.update(extra)
    return settings


def validation_runs(design):
    """The validation phase's first step: every candidate beta and kd_weight, per seed."""
    runs = []
    for seed in design.validation_seeds:
        for beta in BETAS:
            runs.append(make_run(design, f"val_pfeed_3_beta{beta:g}", "validation", "pfeed",
                                 seed, validation_examples=design.validation_examples,
                                 **teacher_settings("equal", beta, 0.0)))
        for kd_weight in KD_WEIGHTS:
            runs.append(make_run(design, f"val_kd_weight{kd_weight:g}", "validation", "kd", seed,
                                 validation_examples=design.validation_examples,
                                 **teacher_settings("equal", 0.0, kd_weight)))
    return runs


def combination_runs(design, choices):
    """The validation phase's second step: pFEED-3 + KD at the chosen values."""
    if choices.get("beta") is None or choices.get("kd_weight") is None:
        return []
    return [make_run(design, "val_pfeed_3_kd", "validation", "pfeed", seed,
                     validation_examples=design.validation_examples,
                     **teacher_settings("equal", choices["beta"], choices["kd_weight"]))
            for seed in design.validation_seeds]


def row_seeds(design, row):
    return design.main_seeds if row.tier == "main" else design.control_seeds


def row_run(design, row, seed, choices):
    """The final run of `row` at `seed`, or None while a value it uses is not chosen."""
    if any(choices.get(name) is None for name in row.uses):
        return None
    if row.method == "ce":
        return make_run(design, row.name, "final", "ce", seed, validation_examples=0)
    beta = choices["beta"] if "beta" in row.uses else 0.0
    kd_weight = choices["kd_weight"] if "kd_weight" in row.uses else 0.0
    return make_run(design, row.name, "final", row.method, seed, validation_examples=0,
                    **teacher_settings(row.weighting, beta, kd_weight, row.extra))


def final_runs(design, choices):
    """The main rows seed by seed, then the control rows; those waiting on a choice left out."""
    runs = []
    for tier, seeds in (("main", design.main_seeds), ("control", design.control_seeds)):
        for seed in seeds:
            for row in ROWS:
                if row.tier == tier:
                    runs.append(row_run(design, row, seed, choices))
    return [run for run in runs if run is not None]


def plan(design, choices):
    """Every run of the study that can be named with the `choices` made so far, in order."""
    return validation_runs(design) + combination_runs(design, choices) + final_runs(design, choices)


# -- records ---------------------------------------------------------------------------


def recorded(results, run):
    """The record of `run` in `results`: same key and same definition, or None."""
    definition = json.loads(run.definition)
    for record in results["runs"]:
        if record.get("key") == run.key and record.get("definition") == definition:
            return record
    return None


def choose(results, design):
    """The validation phase's choices and the evidence: `{"beta", "kd_weight", "candidates"}`.

    A value is chosen once every candidate has its runs at every validation
    seed: the highest mean validation accuracy, a tie to the first candidate.
    """
    choices = {"candidates": {}}
    for name, candidates, runs_of in (
        ("beta", BETAS, lambda value: [r for r in validation_runs(design)
                                       if r.method == "pfeed" and dict(r.settings)["beta"] == value]),
        ("kd_weight", KD_WEIGHTS,
         lambda value: [r for r in validation_runs(design)
                        if r.method == "kd" and dict(r.settings)["kd_weight"] == value]),
    ):
        means = {}
        for value in candidates:
            records = [recorded(results, run) for run in runs_of(value)]
            accuracies = [r["validation_accuracy"] for r in records if r]
            means[value] = (sum(accuracies) / len(accuracies)
                            if accuracies and len(accuracies) == len(records) else None)
        choices["candidates"][name] = means
        complete = all(mean is not None for mean in means.values())
        choices[name] = max(candidates, key=lambda value: (means[value], -candidates.index(value))
                            ) if complete else None
    return choices


def verdict(first, second, planned):
    """The decision rule on two rows' test accuracies: (verdict, `common.compare` or None)."""
    a, b = common.summary(first), common.summary(second)
    compared = common.compare(a, b)
    if a["n"] < planned or b["n"] < planned or compared is None:
        return "pending", compared
    if compared["ratio"] > THRESHOLD:
        return "supported", compared
    if compared["ratio"] < -THRESHOLD:
        return "reversed", compared
    return "not supported", compared


# -- training ----------------------------------------------------------------------------


class Study(common.StudyFiles):
    """Paths, the results file and the design of one study (real or smoke)."""

    def __init__(self, results_dir, runs_dir, design):
        super().__init__(results_dir, runs_dir, RESULTS_NAME, {
            "study": None, "teachers": [], "ensemble": {}, "runs": [], "failures": {}})
        self.design = design
        self.recipe = design.recipe
        self.weights_png = os.path.join(self.results_dir, f"{RESULTS_NAME}_teacher_weights.png")

    @property
    def teacher_paths(self):
        return [self.teacher_path(i) for i in range(len(self.design.teachers["teacher_model"]))]


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


def train_teachers(study):
    """Trains the teachers missing from the teacher folder, through keras-feed's own stages.

    keras-feed checks the record beside a file already there (`teacher_<i>.json`)
    and refuses one trained otherwise. Returns `{stage: record}` of the teacher
    stages trained now or by an interrupted earlier attempt.
    """
    from keras_feed.run import checkpointing, methods
    from keras_feed.run.experiment import Experiment

    model_dir = os.path.join(study.runs_dir, "teachers")
    config = common.make_config(
        study.recipe, method="pfeed", num_teachers=len(study.teacher_paths),
        teacher_dir=study.teacher_dir, model_dir=model_dir, **study.design.teachers,
    )
    try:
        experiment = Experiment(config, methods.get("pfeed"))
        experiment.teachers()
    except ValueError as error:  # a teacher file trained otherwise: say so in one line
        raise SystemExit(str(error)) from None
    return {**checkpointing.finished_stages(model_dir), **experiment.history}


def ensure_teachers(study, results, revision):
    """Trains (or reuses) the teachers; records each one's and the ensemble's test accuracy."""
    import numpy as np

    from keras_feed.run import checkpointing

    stages = train_teachers(study)
    common.reset_session()
    recorded_teachers = {teacher["index"]: teacher for teacher in results["teachers"]}
    spec = teacher_set(study.design)
    changed = False
    for index, path in enumerate(study.teacher_paths):
        digest = file_sha256(path)
        if recorded_teachers.get(index, {}).get("file_sha256") == digest:
            continue
        stage = stages.get(f"teacher_{index}", {})
        recorded_teachers[index] = {
            "index": index, "architecture": spec["architectures"][index],
            "epochs": spec["epochs"][index], "seed": spec["seeds"][index],
            "file": study.shown(path), "file_sha256": digest, "test_accuracy": None,
            "wall_s": stage.get("wall_s"), "images_per_s": stage.get("images_per_s"),
            "finished_at": common.now(), "git": revision,
        }
        changed = True
    results["teachers"] = [recorded_teachers[i] for i in sorted(recorded_teachers)]
    if changed or not results["ensemble"]:
        probabilities, labels = common.teacher_probabilities(study.recipe, study.teacher_paths)
        for teacher, p in zip(results["teachers"], probabilities):
            teacher["test_accuracy"] = common.accuracy(p, labels)
        count = len(probabilities)
        results["ensemble"] = {
            "teachers": list(range(count)), "rule": "mean of softmax outputs",
            "test_accuracy": common.accuracy(np.mean(probabilities, axis=0), labels),
            "pairs": {f"{a},{b}": common.accuracy((probabilities[a] + probabilities[b]) / 2,
                                                  labels)
                      for a in range(count) for b in range(a + 1, count)},
        }
        study.save(results)
        common.reset_session()
    checkpointing.remove_checkpoints(os.path.join(study.runs_dir, "teachers"))  # recorded now
    say("teachers: " + ", ".join(f"{t['architecture']} {t['test_accuracy']:.4f}"
                                 for t in results["teachers"])
        + f"; ensemble {results['ensemble']['test_accuracy']:.4f}")


def train_run(study, run, revision):
    """Runs `run` (or takes its finished, unrecorded metrics) and returns its record."""
    model_dir = os.path.join(study.runs_dir, run.folder)
    teachers = {"teachers": tuple(study.teacher_paths)} if run.uses_teachers else {}
    config = common.make_config(study.recipe, method=run.method, seed=run.seed,
                                model_dir=model_dir, **teachers, **dict(run.settings))
    metrics = common.finished_metrics(config) or common.run_in(model_dir, config)
    student = metrics["student"]
    teachers_metrics = metrics.get("teachers", [])
    ensemble = metrics.get("ensemble", {})
    record = {
        "key": run.key,
        "name": run.name,
        "phase": run.phase,
        "method": run.method,
        "seed": run.seed,
        "settings": dict(run.settings),
        "definition": json.loads(run.definition),
        "test_accuracy": student["test_accuracy"],
        "validation_accuracy": student.get("validation_accuracy"),
        "teacher_test_accuracy": [t["test_accuracy"] for t in teachers_metrics],
        "teacher_validation_accuracy": [t.get("validation_accuracy") for t in teachers_metrics],
        "ensemble_test_accuracy": ensemble.get("test_accuracy"),
        "ensemble_validation_accuracy": ensemble.get("validation_accuracy"),
        "finished_at": common.now(),
        "git": revision,
    }
    record.update(common.stage_summary(metrics))
    record["last_teacher_weights"] = last_teacher_weights(record["history"])
    return record


def last_teacher_weights(history):
    """The last epoch's mean weight of each teacher (`teacher_weight_<n>`), or None."""
    keys = sorted((k for k in history if k.startswith("teacher_weight_")),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    return [history[k][-1] for k in keys] or None


def describe_study(study):
    """What the results file was made for: the design and the data it reads."""
    design = study.design
    return {
        "recipe": study.recipe,
        "teacher_set": teacher_set(design),
        "validation_examples": design.validation_examples,
        "seeds": {"validation": list(design.validation_seeds), "main": list(design.main_seeds),
                  "control": list(design.control_seeds)},
    }


def run_study(study):
    """Runs whatever of the plan is not in the results file yet."""
    results = study.load()
    description = json.loads(json.dumps(describe_study(study)))
    data_keys = ("data", "validation_data")
    if {k: v for k, v in (results["study"] or {}).items() if k not in data_keys} != description:
        if results["study"] is not None:
            say("the results file was started with another design (recipe, teachers, "
                "validation split or seeds); records whose definition differs stay in it, "
                "unused")
        description["data"] = common.describe_data(study.recipe)
        description["validation_data"] = common.describe_data(
            study.recipe, study.design.validation_examples)
        results["study"] = description
        study.save(results)
    revision = common.git_revision()
    say(f"results: {study.json_path}; scratch: {study.runs_dir}; keras_feed at {revision}")
    ensure_teachers(study, results, revision)
    write_report(study, results)
    postponed = []
    for runs_now in (lambda: validation_runs(study.design),
                     lambda: combination_runs(study.design, choose(results, study.design)),
                     lambda: final_runs(study.design, choose(results, study.design))):
        runs = runs_now()
        postponed += common.run_pending(
            runs, results, done={run.key for run in runs if recorded(results, run)},
            train=lambda run: train_run(study, run, revision),
            save=lambda: study.save(results), report=lambda: write_report(study, results),
            describe=lambda run: f"{run.phase}, {run.method}, {dict(run.settings)}",
        )
    write_report(study, results)
    left = missing_runs(study.design, results)
    if left:
        say(f"not finished: {len(left)} runs (postponed: {', '.join(postponed) or 'none'}); "
            "run the same command again to continue")
    else:
        say("the study is complete")


def missing_runs(design, results):
    """`[(row or variant, seed, why)]` for every planned run without its record."""
    choices = choose(results, design)
    missing = [(run.name, run.seed, "not run yet")
               for run in plan(design, choices) if not recorded(results, run)]
    if not combination_runs(design, choices):
        missing += [("val_pfeed_3_kd", seed, "waiting for the choice of beta and kd_weight")
                    for seed in design.validation_seeds]
    for row in ROWS:
        waiting = [name for name in row.uses if choices.get(name) is None]
        if waiting:
            missing += [(row.name, seed, f"waiting for the choice of {' and '.join(waiting)}")
                        for seed in row_seeds(design, row)]
    return missing


# -- the report -----------------------------------------------------------------------------


def write_report(study, results):
    """Rewrites `heterogeneous.md` and its two plots from the results."""
    design = study.design
    choices = choose(results, design)
    final = {row.name: [] for row in ROWS}
    for row in ROWS:
        for seed in row_seeds(design, row):
            run = row_run(design, row, seed, choices)
            record = run and recorded(results, run)
            if record:
                final[row.name].append(record)
    lines = [
        "# Heterogeneous teachers: does the ensemble effect hold, and does weighting help?",
        "",
        "Generated by `python benchmarks/heterogeneous_study.py` from `heterogeneous.json`; "
        "do not edit by hand.",
        "",
        PREREGISTRATION,
        "",
    ]
    lines += setting_section(study)
    lines += teacher_section(study, results)
    lines += validation_section(design, results, choices)
    lines += results_section(design, final, results)
    lines += verdict_section(design, final)
    lines += other_differences(final, results)
    lines += weights_section(study, final)
    lines += status_section(study, results)
    common.write_text(study.md_path, "\n".join(lines) + "\n")
    plot_accuracy(study, final, results)
    plot_teacher_weights(study, final)


def setting_section(study):
    design, recipe = study.design, study.recipe
    teachers = teacher_set(design)
    described = ", ".join(f"`{a}` ({e} epochs, seed {s})" for a, e, s in zip(
        teachers["architectures"], teachers["epochs"], teachers["seeds"]))
    return [
        "## Setting",
        "",
        f"{recipe['dataset']}, {recipe['train_examples']} training images (subset seed "
        f"{recipe['subset_seed']}), the full test set. Students: `{recipe['model']}`, SGD "
        f"Nesterov momentum {recipe['momentum']}, lr {recipe['learning_rate']} "
        f"{recipe['lr_schedule']}, weight decay {recipe['weight_decay']}, batch "
        f"{recipe['batch_size']}, {recipe['epochs']} epochs. Teachers, trained with "
        f"cross-entropy on the same images and recipe: {described}. Accuracy in %, mean ± "
        "sample standard deviation over student seeds; every seed distils from the same "
        "teachers, so the spreads exclude the teachers' variance.",
        "",
        f"beta and kd_weight are chosen on {design.validation_examples} images held out of "
        "the rest of the training split (`validation_examples`; the training images stay the "
        "same), in separate runs at student seeds "
        f"{', '.join(map(str, design.validation_seeds))}, which no final run uses. The final "
        "runs hold nothing out. Minutes per run and images/s are as measured on a shared "
        "machine: a record of what happened, not a throughput benchmark.",
        "",
    ]


def teacher_section(study, results):
    lines = ["## Teachers", "",
             "| teacher | architecture | epochs | seed | test accuracy (%) | minutes |",
             "| --- | --- | --- | --- | --- | --- |"]
    if not results["teachers"]:
        lines.append("| – | not trained yet | | | | |")
    for teacher in results["teachers"]:
        minutes = f"{teacher['wall_s'] / 60:.1f}" if teacher.get("wall_s") else "–"
        lines.append(f"| teacher_{teacher['index']} | `{teacher['architecture']}` | "
                     f"{teacher['epochs']} | {teacher['seed']} | "
                     f"{common.percent(teacher.get('test_accuracy'))} | {minutes} |")
    ensemble = results["ensemble"]
    if ensemble:
        lines.append(f"| ensemble | mean softmax of teachers "
                     f"{', '.join(map(str, ensemble['teachers']))} | | | "
                     f"{common.percent(ensemble['test_accuracy'])} | |")
        lines += ["", "Ensembles of two teachers: " + ", ".join(
            f"{pair}: {common.percent(value)}" for pair, value in ensemble["pairs"].items())]
    return lines + [""]


def validation_section(design, results, choices):
    seeds = design.validation_seeds
    lines = [
        "## Validation phase: choosing beta and kd_weight",
        "",
        f"Validation accuracy (%) on the {design.validation_examples} held-out images, equal "
        "teacher weights; the choice is the highest mean (a tie goes to the committed "
        "study's value, listed first). Every variant tried is listed.",
        "",
        "| variant | method | setting | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | chosen |",
        "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |",
    ]
    runs = validation_runs(design) + combination_runs(design, choices)
    names = list(dict.fromkeys(run.name for run in runs))
    for name in names:
        of_name = [run for run in runs if run.name == name]
        settings = dict(of_name[0].settings)
        shown = ", ".join(f"{k} {settings[k]:g}" for k in ("beta", "kd_weight") if settings[k])
        values = {run.seed: (recorded(results, run) or {}).get("validation_accuracy")
                  for run in of_name}
        done = [v for v in values.values() if v is not None]
        mean = sum(done) / len(done) if len(done) == len(seeds) else None
        if of_name[0].method == "pfeed" and not settings["kd_weight"]:
            chosen = "yes" if choices["beta"] == settings["beta"] else ""
        elif of_name[0].method == "kd":
            chosen = "yes" if choices["kd_weight"] == settings["kd_weight"] else ""
        else:
            chosen = "(not a choice)"
        lines.append(f"| {name} | {of_name[0].method} | {shown} | "
                     + " | ".join(common.percent(values.get(s)) for s in seeds)
                     + f" | {common.percent(mean)} | {chosen} |")
    if not combination_runs(design, choices):
        lines.append("| val_pfeed_3_kd | pfeed | the chosen beta and kd_weight | "
                     + " | ".join("–" for _ in seeds) + " | – | (not a choice) |")
    made = [f"{name} = {choices[name]:g}" for name in ("beta", "kd_weight")
            if choices[name] is not None]
    lines += ["", "Chosen: " + ("; ".join(made) if made else "nothing yet") + "."
              + ("" if len(made) == 2 else " The rows that need a value not chosen yet wait.")]
    teacher_runs = [r for r in (recorded(results, run) for run in runs)
                    if r and r["teacher_validation_accuracy"]]
    if teacher_runs:
        first = teacher_runs[0]
        lines += ["", "On the validation split, the teachers: " + ", ".join(
            common.percent(v) for v in first["teacher_validation_accuracy"])
            + f"; their ensemble: {common.percent(first['ensemble_validation_accuracy'])}."]
    return lines + [""]


def results_section(design, final, results):
    lines = [
        "## Results: test accuracy (%)",
        "",
        "| row | what | weighting | n done/planned | test accuracy (%) | per seed | minutes/run "
        "| images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tier, title in (("main", "main rows"), ("control", "control rows")):
        lines.append(f"| **{title}** | | | | | | | |")
        for row in (r for r in ROWS if r.tier == tier):
            records = final[row.name]
            stats = common.summary([r["test_accuracy"] for r in records])
            per_seed = ", ".join(f"s{r['seed']}: {common.percent(r['test_accuracy'])}"
                                 for r in records)
            minutes, speed = common.run_times(records)
            weighting = row.weighting if row.method != "ce" else "–"
            lines.append(
                f"| {row.name} | {row.what} | {weighting} | {len(records)}/"
                f"{len(row_seeds(design, row))} | {common.mean_std(stats)} | "
                f"{per_seed or 'not run yet'} | {minutes} | {speed} |")
    if results["ensemble"]:
        lines.append(f"| ensemble | the teachers' mean softmax | | | "
                     f"{common.percent(results['ensemble']['test_accuracy'])} | | | |")
    return lines + [""]


def verdict_section(design, final):
    lines = ["## Pre-registered verdicts", ""]
    for name, first, second in HYPOTHESES:
        planned = len(row_seeds(design, ROWS_BY_NAME[first]))
        a = [r["test_accuracy"] for r in final[first]]
        b = [r["test_accuracy"] for r in final[second]]
        outcome, _ = verdict(a, b, planned)
        line = common.difference(common.summary(a), common.summary(b), first, second)
        lines.append(f"{line[:2]}{name}: {line[2:]} → **{outcome}**")
    return lines + [""]


def other_differences(final, results):
    """Comparisons the pre-registration does not decide on: for orientation only."""
    pairs = (("pfeed_3_entropy", "pfeed_3_equal"), ("kd_equal", "ce"),
             ("pfeed_3_equal", "kd_equal"), ("pfeed_3_confidence", "kd_confidence"),
             ("kd_per_teacher_equal", "kd_equal"), ("pfeed_3_kd_equal", "pfeed_3_equal"),
             ("pfeed_3_kd_confidence", "pfeed_3_kd_equal"),
             ("pfeed_3_agreement", "pfeed_3_equal"))
    stats = {name: common.summary([r["test_accuracy"] for r in records])
             for name, records in final.items()}
    lines = ["## Other differences (not pre-registered; for orientation)", "",
             "The same arithmetic as above; with n = 3 to 5 per row a rough guide, not a test.",
             ""]
    lines += [common.difference(stats[a], stats[b], a, b) for a, b in pairs]
    ensemble = results["ensemble"].get("test_accuracy")
    teachers = [t["test_accuracy"] for t in results["teachers"] if t.get("test_accuracy")]
    for name in ("pfeed_3_equal", "pfeed_3_confidence"):
        if stats[name]["n"] and ensemble is not None:
            lines.append(f"- ensemble − {name}: "
                         f"{100 * (ensemble - stats[name]['mean']):+.2f} points")
        if stats[name]["n"] and teachers:
            lines.append(f"- {name} − best teacher: "
                         f"{100 * (stats[name]['mean'] - max(teachers)):+.2f} points")
    return lines + [""]


def weights_section(study, final):
    architectures = teacher_set(study.design)["architectures"]
    lines = ["## Teacher weights in the last epoch", "",
             "The mean per-example weight of each teacher (`teacher_weight_<n>`, the weights "
             "of an example sum to 3) over the last epoch, teachers in the order "
             + ", ".join(f"{i} `{a}`" for i, a in enumerate(architectures))
             + f"; per epoch in `{os.path.basename(study.weights_png)}`. `confidence` "
             "and `entropy` weights come from the frozen teachers' logits alone (and the labels, "
             "for `confidence`), so their epoch means move only with the augmentation (flat lines are "
             "what they should draw); `agreement`'s read the student's logits too and may "
             "drift as it learns.", ""]
    weighted = [r for row in ROWS for r in final[row.name] if r.get("last_teacher_weights")]
    if not weighted:
        lines.append("- no weighted run finished yet")
    for record in weighted:
        lines.append(f"- {record['name']}/seed{record['seed']}: "
                     + ", ".join(f"{w:.3f}" for w in record["last_teacher_weights"]))
    return lines + [""]


def status_section(study, results):
    design = study.design
    validation_planned = len(validation_runs(design)) + len(design.validation_seeds)
    final_planned = sum(len(row_seeds(design, row)) for row in ROWS)
    missing = missing_runs(design, results)
    validation_missing = sum(1 for name, _, _ in missing if name.startswith("val_"))
    final_missing = len(missing) - validation_missing
    planned = validation_planned + final_planned
    choices = choose(results, design)
    known = {run.key for run in plan(design, choices)}
    stale = [r for r in results["runs"] if r.get("key") not in known]
    lines = ["## Status", ""]
    teachers = len(results["teachers"])
    count = len(design.teachers["teacher_model"])
    if teachers < count:
        lines.append(f"- teachers trained: {teachers}/{count}")
    lines.append(f"- finished runs: {planned - len(missing)}/{planned} (validation phase "
                 f"{validation_planned - validation_missing}/{validation_planned}, final "
                 f"{final_planned - final_missing}/{final_planned})")
    reasons = {}
    for run in plan(design, choices):
        if not recorded(results, run):
            reasons.setdefault(common.unavailable(run.method, run.settings), []).append(run)
    for reason, runs in reasons.items():
        keys = ", ".join(f"{run.name}/seed{run.seed}" for run in runs)
        lines.append(f"- postponed ({reason}): {keys}" if reason else f"- not run yet: {keys}")
    waiting = {}
    for name, seed, why in missing:
        if why != "not run yet":
            waiting.setdefault(why, []).append(f"{name}/seed{seed}")
    for why, keys in waiting.items():
        lines.append(f"- {why}: {', '.join(keys)}")
    for key, error in results.get("failures", {}).items():
        lines.append(f"- last attempt of {key} failed: {error}")
    if stale:
        lines.append(f"- {len(stale)} recorded runs were made with settings the plan no longer "
                     "has (another design or choice); kept in the json, not used")
    if missing or teachers < count:
        lines.append("- resume (or finish), from the checkout: `nohup nice -n 19 python "
                     "benchmarks/heterogeneous_study.py > heterogeneous.log 2>&1 &`")
    else:
        lines.append("- complete: every planned run is recorded; a rerun skips them all")
    return lines


# -- plots -------------------------------------------------------------------------------------


def plot_accuracy(study, final, results):
    """Test accuracy per row (mean ± std, seeds as dots); the ensemble and best teacher as lines."""
    rows = [(name, [r["test_accuracy"] for r in records])
            for name, records in final.items() if records]
    lines = []
    if results["ensemble"]:
        lines.append((results["ensemble"]["test_accuracy"], "-", "ensemble of the teachers"))
    teachers = [t for t in results["teachers"] if t.get("test_accuracy") is not None]
    if teachers:
        best = max(teachers, key=lambda t: t["test_accuracy"])
        lines.append((best["test_accuracy"], "--", f"best teacher ({best['architecture']})"))
    common.plot_rows(
        study.accuracy_png, rows, lines=lines,
        title=f"{study.recipe['dataset']}, {study.recipe['train_examples']} training images, "
              f"{study.recipe['model']} students from heterogeneous teachers: mean ± std over "
              "seeds (dots: seeds)",
    )


def plot_teacher_weights(study, final):
    """Mean weight of each teacher per epoch, for the first run of each weighted row."""
    shown = [records[0] for records in final.values()
             if records and records[0].get("last_teacher_weights")]
    if not shown:
        return
    plt = common.pyplot()
    architectures = teacher_set(study.design)["architectures"]
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows),
                                squeeze=False, sharey=True)
    for panel in axes.flat[len(shown):]:
        panel.set_visible(False)
    for panel, record in zip(axes.flat, shown):
        for index, architecture in enumerate(architectures):
            values = record["history"].get(f"teacher_weight_{index}", [])
            panel.plot(range(1, len(values) + 1), values, marker=".",
                       label=f"teacher {index} ({architecture})")
        panel.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
        panel.set_title(f"{record['name']}, seed {record['seed']}", fontsize=9)
        panel.set_xlabel("epoch")
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean teacher weight (equal: 1)")
    axes[0][0].legend(fontsize=7)
    common.save_figure(figure, study.weights_png)


def main():
    args = common.arguments(
        __doc__.split("\n\n")[0],
        smoke_help="synthetic data, resnet8, 1 epoch, fewer seeds; results into a temporary "
                   "folder",
        name=RESULTS_NAME,
    )
    study = Study(*common.folders(args, RESULTS_NAME), SMOKE if args.smoke else REAL)
    common.run_or_report(args, study, run=run_study, report=write_report)
    if args.smoke and not args.report_only:  # what a rehearsal is for: the verdicts and the status, as reported
        with open(study.md_path, encoding="utf-8") as handle:
            report = handle.read()
        verdicts = report[report.index("## Pre-registered verdicts"):report.index("## Other")]
        print(verdicts + report[report.index("## Status"):], flush=True)
        say(f"smoke rehearsal done; report: {study.md_path}")


if __name__ == "__main__":
    main()
