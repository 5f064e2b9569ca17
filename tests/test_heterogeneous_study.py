"""The heterogeneous-teacher study: its plan, run keys, records, statistics and report.

Nothing is trained. The records are made up, except in the last test, which
recomputes the committed records' teacher weights in NumPy.
"""

import dataclasses
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOSEN = {"beta": 500.0, "kd_weight": 0.9}
# Made-up test accuracy around a row's mean, per seed 0-4: sample std 1.58 points,
# standard error 0.71, so the SE of a difference between two rows is exactly 1.00 point.
SPREAD = (-0.01, 0.0, 0.01, -0.02, 0.02)
MEANS = {
    "ce": 0.90,
    "pfeed_3_equal": 0.925,       # H2: +2.5 SE: supported
    "pfeed_3_confidence": 0.944,  # H1: +1.9 SE: not supported (+2.1 with the population std)
    "kd_equal": 0.92,
    "kd_confidence": 0.89,        # H3: -3.0 SE: reversed
}


def load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return load("heterogeneous_study")


@pytest.fixture(scope="module")
def common(study):
    return study.common


def record_of(run, test_accuracy, validation_accuracy=None):
    return {
        "key": run.key, "name": run.name, "phase": run.phase, "method": run.method,
        "seed": run.seed, "settings": dict(run.settings), "definition": json.loads(run.definition),
        "test_accuracy": test_accuracy, "validation_accuracy": validation_accuracy,
        "teacher_validation_accuracy": [0.9, 0.85, 0.88], "ensemble_validation_accuracy": 0.91,
        "wall_s": 600.0, "images_per_s": 300.0,
        "history": {f"teacher_weight_{i}": [1.0, w] for i, w in enumerate((1.2, 0.7, 1.1))},
        "last_teacher_weights": [1.2, 0.7, 1.1] if run.settings and
        dict(run.settings).get("teacher_weighting", "equal") != "equal" else None,
    }


def made_up_results(study, leave_out=()):
    """Validation records that choose beta 500 and kd_weight 0.9, then every final run."""
    validation = {500.0: 0.91, 100.0: 0.90, 2000.0: 0.905, 0.9: 0.90, 0.5: 0.89}
    runs = []
    for run in study.validation_runs(study.REAL) + study.combination_runs(study.REAL, CHOSEN):
        settings = dict(run.settings)
        value = settings["beta"] if run.method == "pfeed" and not settings["kd_weight"] \
            else settings["kd_weight"]
        runs.append(record_of(run, 0.9, validation.get(value, 0.9)))
    for run in study.final_runs(study.REAL, CHOSEN):
        if f"{run.name}/seed{run.seed}" in leave_out:
            continue
        runs.append(record_of(run, MEANS.get(run.name, 0.9) + SPREAD[run.seed]))
    teachers = [{"index": i, "architecture": a, "epochs": e, "seed": 100 + i,
                 "test_accuracy": acc, "wall_s": 600.0}
                for i, (a, e, acc) in enumerate(zip(("resnet32", "resnet20", "small_cnn_slim"),
                                                    (30, 3, 30), (0.91, 0.85, 0.88)))]
    ensemble = {"teachers": [0, 1, 2], "rule": "mean of softmax outputs", "test_accuracy": 0.915,
                "pairs": {"0,1": 0.905, "0,2": 0.912, "1,2": 0.89}}
    return {"study": None, "teachers": teachers, "ensemble": ensemble, "runs": runs,
            "failures": {}}


# -- the plan ---------------------------------------------------------------------------


def test_the_plan_has_its_rows_seeds_and_counts(study):
    runs = study.final_runs(study.REAL, CHOSEN)
    seeds = {}
    for run in runs:
        seeds.setdefault(run.name, []).append(run.seed)
    main = ["ce", "kd_equal", "kd_confidence", "pfeed_3_equal", "pfeed_3_confidence",
            "pfeed_3_entropy"]
    control = ["kd_per_teacher_equal", "pfeed_3_kd_equal", "pfeed_3_kd_confidence",
               "pfeed_3_agreement"]
    assert list(seeds) == main + control
    assert all(seeds[name] == [0, 1, 2, 3, 4] for name in main)
    assert all(seeds[name] == [0, 1, 2] for name in control)
    assert len(runs) == 6 * 5 + 4 * 3
    # The main rows come first, seed by seed: the pre-registered verdicts are decided first.
    assert [run.name for run in runs[:6]] == main and runs[29].seed == 4
    settings = {run.name: dict(run.settings) for run in runs}
    assert settings["ce"] == {"validation_examples": 0}
    assert settings["kd_per_teacher_equal"] == {
        "teacher_weighting": "equal", "beta": 0.0, "kd_weight": 0.9, "temperature": 4.0,
        "kd_form": "per_teacher", "validation_examples": 0}
    assert settings["pfeed_3_kd_confidence"]["beta"] == 500.0
    assert settings["pfeed_3_kd_confidence"]["kd_weight"] == 0.9
    assert settings["pfeed_3_entropy"] == {"teacher_weighting": "entropy", "beta": 500.0,
                                           "kd_weight": 0.0, "validation_examples": 0}
    assert settings["pfeed_3_agreement"]["teacher_weighting"] == "agreement"
    assert json.loads(runs[0].definition)["teacher_set"] is None  # ce: no teachers
    assert json.loads(runs[1].definition)["teacher_set"] == {
        "architectures": ["resnet32", "resnet20", "small_cnn_slim"], "epochs": [30, 3, 30],
        "seeds": [100, 101, 102]}


def test_the_validation_phase_comes_first_on_its_own_seeds_and_split(study):
    validation = study.validation_runs(study.REAL)
    assert len(validation) == 2 * (3 + 2)
    assert {run.seed for run in validation} == {1000, 1001}
    assert {dict(run.settings)["beta"] for run in validation if run.method == "pfeed"} == {
        100.0, 500.0, 2000.0}
    assert {dict(run.settings)["kd_weight"] for run in validation if run.method == "kd"} == {
        0.5, 0.9}
    assert all(dict(run.settings)["teacher_weighting"] == "equal" for run in validation)
    assert all(dict(run.settings)["validation_examples"] == 10000 for run in validation)
    final = study.final_runs(study.REAL, CHOSEN)
    assert not {run.seed for run in validation} & {run.seed for run in final}
    assert all(dict(run.settings)["validation_examples"] == 0 for run in final)
    # Until the choices are made, only what needs none is planned.
    assert study.combination_runs(study.REAL, {"beta": None, "kd_weight": None}) == []
    waiting = study.final_runs(study.REAL, {"beta": None, "kd_weight": None})
    assert {run.name for run in waiting} == {"ce"}
    both = study.plan(study.REAL, CHOSEN)
    assert both[:10] == validation and [r.name for r in both[10:12]] == ["val_pfeed_3_kd"] * 2
    assert len(both) == 54


# -- keys --------------------------------------------------------------------------------


def key_of(study, design=None, row="pfeed_3_confidence", seed=0, choices=CHOSEN):
    return study.row_run(design or study.REAL, study.ROWS_BY_NAME[row], seed, choices).key


@pytest.mark.parametrize("change", [
    dict(seed=1),
    dict(row="pfeed_3_entropy"),                             # the weighting
    dict(choices={"beta": 100.0, "kd_weight": 0.9}),         # beta
    dict(design={"recipe": {"epochs": 31}}),                 # the schedule
    dict(design={"recipe": {"learning_rate": 0.05}}),
    dict(design={"recipe": {"train_examples": 5000}}),
    dict(design={"teachers": {"teacher_epochs": (30, 4, 30)}}),
    dict(design={"teachers": {"teacher_model": ("resnet32", "resnet20", "resnet8")}}),
    dict(design={"teachers": {"teacher_seed": 200}}),
])
def test_keys_differ_whenever_a_defining_setting_does(study, change):
    design = change.pop("design", None)
    if design:
        design = dataclasses.replace(
            study.REAL, recipe={**study.REAL.recipe, **design.get("recipe", {})},
            teachers={**study.REAL.teachers, **design.get("teachers", {})})
    assert key_of(study, design=design, **change) != key_of(study)


def test_keys_of_kd_settings_and_the_validation_split(study):
    base = study.make_run(study.REAL, "x", "final", "kd", 0,
                          **study.teacher_settings("equal", 0.0, 0.9))
    changed = [
        study.make_run(study.REAL, "x", "final", "kd", 0, **study.teacher_settings(*args, **kw))
        for args, kw in ((("equal", 0.0, 0.5), {}), (("equal", 0.0, 0.9),
                                                     {"extra": (("kd_form", "per_teacher"),)}))
    ]
    changed.append(study.make_run(study.REAL, "x", "final", "kd", 0, validation_examples=100,
                                  **study.teacher_settings("equal", 0.0, 0.9)))
    changed.append(study.make_run(study.REAL, "x", "final", "pfeed", 0,
                                  **study.teacher_settings("equal", 0.0, 0.9)))
    hotter = dict(study.teacher_settings("equal", 0.0, 0.9), temperature=8.0)
    changed.append(study.make_run(study.REAL, "x", "final", "kd", 0, **hotter))
    assert len({run.key for run in changed + [base]}) == len(changed) + 1


def test_keys_are_equal_for_equal_settings(study):
    assert key_of(study) == key_of(study)
    elsewhere = dataclasses.replace(study.REAL, recipe={**study.REAL.recipe, "data_dir": "/x"})
    assert key_of(study, design=elsewhere) == key_of(study)  # where the data lives: not a setting
    ce_other_teachers = dataclasses.replace(
        study.REAL, teachers={**study.REAL.teachers, "teacher_seed": 7})
    assert key_of(study, ce_other_teachers, "ce") == key_of(study, row="ce")  # ce has none


def test_a_record_with_other_settings_is_not_reused(study):
    run = study.row_run(study.REAL, study.ROWS_BY_NAME["pfeed_3_equal"], 0, CHOSEN)
    stale = record_of(run, 0.9)
    stale["definition"] = dict(stale["definition"], epochs=3)  # same key, other settings
    older = record_of(study.row_run(study.REAL, study.ROWS_BY_NAME["pfeed_3_equal"], 0,
                                    {"beta": 100.0, "kd_weight": 0.9}), 0.9)
    results = {"runs": [stale, older]}
    assert study.recorded(results, run) is None
    runs_done = {r.key for r in [run] if study.recorded(results, r)}
    assert run.key not in runs_done
    fresh = record_of(run, 0.91)
    results["runs"].append(fresh)
    assert study.recorded(results, run) is fresh


# -- the validation phase's choice -------------------------------------------------------------


def validation_results(study, accuracies, seeds=(1000, 1001)):
    runs = []
    for run in study.validation_runs(study.REAL):
        if run.seed not in seeds:
            continue
        settings = dict(run.settings)
        value = settings["beta"] if run.method == "pfeed" else settings["kd_weight"]
        runs.append(record_of(run, 0.5, accuracies[value][seeds.index(run.seed)]))
    return {"runs": runs}


def test_the_choice_is_the_best_mean_validation_accuracy(study):
    accuracies = {500.0: (0.90, 0.90), 100.0: (0.89, 0.93), 2000.0: (0.90, 0.905),
                  0.9: (0.90, 0.90), 0.5: (0.91, 0.89)}
    choices = study.choose(validation_results(study, accuracies), study.REAL)
    assert choices["beta"] == 100.0  # mean 0.91, although seed 1000 prefers another
    assert choices["kd_weight"] == 0.9  # a tie: the committed value, listed first
    assert choices["candidates"]["beta"][2000.0] == pytest.approx(0.9025)


def test_no_choice_before_every_candidate_has_every_seed(study):
    accuracies = {value: (0.9,) for value in (500.0, 100.0, 2000.0, 0.9, 0.5)}
    choices = study.choose(validation_results(study, accuracies, seeds=(1000,)), study.REAL)
    assert choices["beta"] is None and choices["kd_weight"] is None


# -- statistics and the verdicts ------------------------------------------------------------------


def test_the_verdicts_follow_the_rule(study):
    def row(mean):
        return [mean + d for d in SPREAD]

    assert study.verdict(row(0.925), row(0.90), 5)[0] == "supported"
    assert study.verdict(row(0.919), row(0.90), 5)[0] == "not supported"
    assert study.verdict(row(0.90), row(0.919), 5)[0] == "not supported"
    assert study.verdict(row(0.87), row(0.90), 5)[0] == "reversed"
    assert study.verdict(row(0.925), row(0.90)[:4], 5)[0] == "pending"
    assert study.verdict([0.9] * 5, [0.9] * 5, 5)[0] == "not supported"  # no spread, no gap
    assert study.verdict([0.91] * 5, [0.9] * 5, 5)[0] == "supported"
    _, compared = study.verdict(row(0.925), row(0.90), 5)
    assert compared["diff"] == pytest.approx(0.025)
    assert compared["se"] == pytest.approx(0.01)  # sample std: sqrt(2.5) points each
    assert compared["ratio"] == pytest.approx(2.5)


def test_report_statistics_and_verdicts(tmp_path, study):
    target = study.Study(tmp_path, tmp_path / "runs", study.REAL)
    study.write_report(target, made_up_results(study))
    report = (tmp_path / "heterogeneous.md").read_text()
    expected = [
        # ce: mean 90.00, sample std sqrt(2.5) = 1.58 over 5 seeds.
        "| ce | plain training (cross-entropy) | – | 5/5 | 90.00 ± 1.58 |",
        "- H1: pfeed_3_confidence − pfeed_3_equal: +1.90 points, SE 1.00 → +1.9 standard "
        "errors (n=5 vs n=5) → **not supported**",
        "- H2: pfeed_3_equal − ce: +2.50 points, SE 1.00 → +2.5 standard errors (n=5 vs n=5) "
        "→ **supported**",
        "- H3: kd_confidence − kd_equal: -3.00 points, SE 1.00 → -3.0 standard errors "
        "(n=5 vs n=5) → **reversed**",
        "| pfeed_3_agreement | ", "| 3/3 | 90.00 ± 1.00 |",  # a control row: seeds 0-2
        "| teacher_0 | `resnet32` | 30 | 100 | 91.00 |",
        "| ensemble | mean softmax of teachers 0, 1, 2 | | | 91.50 |",
        "| val_pfeed_3_beta100 | pfeed | beta 100 | 90.00 | 90.00 | 90.00 |  |",
        "| val_pfeed_3_beta500 | pfeed | beta 500 | 91.00 | 91.00 | 91.00 | yes |",
        "Chosen: beta = 500; kd_weight = 0.9.",
        "- pfeed_3_confidence/seed0: 1.200, 0.700, 1.100",
        "complete: every planned run is recorded",
    ]
    assert [line for line in expected if line not in report] == []
    assert (tmp_path / "heterogeneous_accuracy.png").stat().st_size > 0
    assert (tmp_path / "heterogeneous_teacher_weights.png").stat().st_size > 0


def test_report_is_pending_while_runs_are_missing(tmp_path, study):
    target = study.Study(tmp_path, tmp_path / "runs", study.REAL)
    results = made_up_results(study, leave_out=("pfeed_3_confidence/seed4",))
    results["failures"] = {"pfeed_3_confidence/seed4/x": "RuntimeError: made up"}
    study.write_report(target, results)
    report = (tmp_path / "heterogeneous.md").read_text()
    assert "(n=4 vs n=5) → **pending**" in report
    assert "| pfeed_3_confidence | " in report and "| 4/5 |" in report
    assert "- not run yet: pfeed_3_confidence/seed4" in report
    assert "- finished runs: 53/54 (validation phase 12/12, final 41/42)" in report
    assert "- last attempt of pfeed_3_confidence/seed4/x failed: RuntimeError: made up" in report
    assert "resume (or finish)" in report


def test_the_preregistration_survives_every_rewrite(tmp_path, study):
    target = study.Study(tmp_path, tmp_path / "runs", study.REAL)
    empty = {"study": None, "teachers": [], "ensemble": {}, "runs": [], "failures": {}}
    for results in (empty, made_up_results(study), empty):
        study.write_report(target, results)
        report = (tmp_path / "heterogeneous.md").read_text()
        assert study.PREREGISTRATION in report
        assert report.index(study.PREREGISTRATION) < report.index("## Setting")
    assert "H1: for pFEED-3, confidence weighting beats equal weighting by more than 2 " \
           "standard errors of the difference (n = 5)." in study.PREREGISTRATION


def test_the_committed_report_keeps_the_preregistration(study):
    """The text written before any result existed is the one the script keeps writing."""
    with open(os.path.join(ROOT, "benchmarks", "results", "heterogeneous.md"),
              encoding="utf-8") as handle:
        assert study.PREREGISTRATION in handle.read()


# -- postponement -------------------------------------------------------------------------------


def test_a_setting_keras_feed_does_not_know_is_postponed(common):
    assert "no field no_such_field" in common.unavailable("kd", (("no_such_field", 1),))
    assert "does not offer teacher_weighting='no_such'" in common.unavailable(
        "kd", (("teacher_weighting", "no_such"),))
    assert "not registered" in common.unavailable("no_such_method", ())
    assert common.unavailable("kd", (("teacher_weighting", "confidence"), ("beta", 0.0))) is None


def test_run_pending_postpones_rather_than_fails(study, common):
    ready = study.make_run(study.SMOKE, "ready", "final", "kd", 0,
                           **study.teacher_settings("equal", 0.0, 0.9))
    later = study.make_run(study.SMOKE, "later", "final", "kd", 0,
                           **study.teacher_settings("equal", 0.0, 0.9,
                                                    (("no_such_field", "x"),)))
    results = {"runs": [], "failures": {}}
    trained, saved, reports = [], [], []

    def train(run):
        trained.append(run.key)
        return record_of(run, 0.9)

    postponed = common.run_pending(
        [later, ready], results, done=set(), train=train, save=lambda: saved.append(1),
        report=lambda: reports.append(1), describe=lambda run: run.name)
    assert postponed == [later.key] and trained == [ready.key]
    assert results["failures"] == {} and [r["key"] for r in results["runs"]] == [ready.key]
    assert saved and reports
    # Done runs are skipped; a run that raises is noted as a failure and the loop goes on.
    again = common.run_pending(
        [ready], results, done={ready.key}, train=train, save=lambda: None,
        report=lambda: None, describe=lambda run: run.name)
    assert again == [] and trained == [ready.key]

    def broken(run):
        raise RuntimeError("made up")

    common.run_pending([ready], results, done=set(), train=broken, save=lambda: None,
                       report=lambda: None, describe=lambda run: run.name)
    assert results["failures"] == {ready.key: "RuntimeError: made up"}


def test_the_study_lock_refuses_a_second_study(tmp_path, common):
    with common.study_lock(str(tmp_path)):
        with pytest.raises(SystemExit, match="Another study is running"):
            with common.study_lock(str(tmp_path)):
                pass


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_the_recorded_teacher_weights_are_numpy_s_on_the_run_s_own_batches(study):
    """The committed records' first-epoch mean weights, recomputed in NumPy from the
    committed teachers on the same augmented batches: CA-MKD's confidence weights
    and EBKD's entropy weights (each scaled to sum to K)."""
    import keras
    import numpy as np
    from test_weighting import reference_confidence, reference_entropy

    import keras_feed as kf

    results = json.load(open(os.path.join(ROOT, "benchmarks", "results", "heterogeneous.json")))
    firsts = {}
    for record in results["runs"]:
        if record["phase"] == "final" and record["seed"] == 0 and record["name"] in (
                "pfeed_3_confidence", "pfeed_3_entropy"):
            firsts[record["name"]] = record
    if not firsts:
        pytest.skip("no weighted run of seed 0 recorded yet")
    teachers = [keras.models.load_model(os.path.join(
        ROOT, "benchmarks", "results", "heterogeneous_teachers", f"teacher_{index}.keras"))
        for index in range(3)]
    recipe = study.RECIPE
    data = kf.data.load(recipe["dataset"], data_dir=FASHION_MNIST, seed=0,
                        train_examples=recipe["train_examples"], subset_seed=recipe["subset_seed"])
    sums = {"confidence": np.zeros(3), "entropy": np.zeros(3)}
    steps = data.steps_per_epoch(recipe["batch_size"])
    for step, (images, labels) in enumerate(data.train(recipe["batch_size"])):
        if step == steps:
            break
        logits = [teacher(images, training=False).numpy() for teacher in teachers]
        sums["confidence"] += reference_confidence(
            logits, np.asarray(labels).astype(int)).mean(axis=0)
        sums["entropy"] += reference_entropy(logits).mean(axis=0)
    for name, record in firsts.items():
        logged = [record["history"][f"teacher_weight_{index}"][0] for index in range(3)]
        expected = sums[name.rsplit("_", 1)[1]] / steps
        np.testing.assert_allclose(logged, expected, atol=2e-4, err_msg=name)
