"""The Fashion-MNIST study's report: statistics, differences and status, on made-up records."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study_module():
    path = os.path.join(ROOT, "benchmarks", "fashion_mnist_study.py")
    spec = importlib.util.spec_from_file_location("fashion_mnist_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Made-up accuracies per row and seed: row -> (seed 0, ..., seed 4).
ACCURACIES = {"ce": (0.89, 0.90, 0.91, 0.88, 0.92), "feed_1": (0.905, 0.91, 0.915, 0.90, 0.92),
              "pfeed_2": (0.91, 0.915, 0.92, 0.905, 0.925),
              "pfeed_3": (0.91, 0.92, 0.93, 0.90, 0.94)}


def made_up_results(study_module, leave_out=()):
    runs = []
    for run in study_module.plan():
        if run.key in leave_out:
            continue
        accuracy = ACCURACIES.get(run.name, (0.9,) * 5)[run.seed]
        runs.append({
            "key": run.key, "name": run.name, "seed": run.seed, "teachers": len(run.teacher_ids),
            "test_accuracy": accuracy, "wall_s": 600.0, "images_per_s": 300.0,
            "history": {f"feed_loss_{i}": [0.01, 0.005] for i in range(len(run.teacher_ids))},
            "last_feed_loss": [0.005] * len(run.teacher_ids) if run.method != "ce" else None,
        })
        if run.method == "sfeed":
            runs[-1]["generations"] = [{"generation": g, "test_accuracy": a}
                                       for g, a in enumerate((0.9, 0.905, 0.9075))]
    teachers = [{"index": i, "seed": 100 + i, "test_accuracy": 0.90, "wall_s": 600.0,
                 "images_per_s": 300.0} for i in range(3)]
    ensembles = {"2": {"teachers": [0, 1], "test_accuracy": 0.915},
                 "3": {"teachers": [0, 1, 2], "test_accuracy": 0.925}}
    return {"study": None, "teachers": teachers, "ensembles": ensembles, "runs": runs,
            "failures": {}}


def test_report_statistics(tmp_path, study_module):
    study = study_module.Study(tmp_path, tmp_path / "runs", study_module.RECIPE)
    study_module.write_report(study, made_up_results(study_module))
    report = (tmp_path / "fashion_mnist.md").read_text()
    # ce: mean 90.00, sample std sqrt(10 / 4) = 1.58 over 5 seeds.
    assert "| ce | plain training (cross-entropy) | 0 | 5/5 | 90.00 ± 1.58 |" in report
    # pfeed_3 - ce: 2 points; se = 1.58 / sqrt(5) = 0.71 each, SE of the difference 1.00.
    assert "- pfeed_3 − ce: +2.00 points, SE 1.00 → +2.0 standard errors (n=5 vs n=5)" in report
    # The baselines have three seeds, the beta variants one.
    assert "| kd | Hinton KD" in report and "| 3/3 | 90.00 ± 0.00 |" in report
    assert "| 1/1 | 90.00 (n=1) |" in report
    # The teachers pool with ce: 8 runs, mean 90.00 -> pfeed_3 is 2 points above.
    assert "- pfeed_3 − every CE run (ce + the teachers): +2.00 points" in report
    assert "- ensemble_3 − pfeed_3: +0.50 points" in report
    assert "complete: every planned run is recorded" in report
    assert "- sfeed_2/seed0: 90.00 → 90.50 → 90.75" in report
    assert (tmp_path / "fashion_mnist_accuracy.png").stat().st_size > 0
    assert (tmp_path / "fashion_mnist_feed_loss.png").stat().st_size > 0


def test_report_names_missing_runs(tmp_path, study_module):
    study = study_module.Study(tmp_path, tmp_path / "runs", study_module.RECIPE)
    left_out = ("pfeed_3/seed1", "pfeed_3/seed2", "pfeed_3/seed3", "pfeed_3/seed4")
    results = made_up_results(study_module, leave_out=left_out)
    study_module.write_report(study, results)
    report = (tmp_path / "fashion_mnist.md").read_text()
    assert "| 1/5 | 91.00 (n=1) |" in report
    assert "- pfeed_3 − ce: needs n ≥ 2 on both sides (have n=1 and n=5)" in report
    assert "- not run yet: " + ", ".join(left_out) in report
    assert "resume (or finish)" in report


def test_the_study_names_the_code_it_runs(study_module):
    """The study imports the run layer before hashing it: a moved module fails here, not
    hours into a background study."""
    revision = study_module.git_revision()
    assert set(revision) == {"commit", "keras_feed_sha256"}
    assert len(revision["keras_feed_sha256"]) == 16


@pytest.mark.slow  # both studies' report scripts, in subprocesses
def test_one_command_rewrites_both_studies_reports_as_committed():
    """`benchmarks/report_studies.py` regenerates both reports from their records: the
    committed tables are what their records give (restored if not, so the checkout stays)."""
    import subprocess
    import sys

    results = os.path.join(ROOT, "benchmarks", "results")
    names = ("fashion_mnist.md", "heterogeneous.md")
    before = {}
    for name in names:
        with open(os.path.join(results, name), "rb") as handle:
            before[name] = handle.read()
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report_studies.py")],
                                capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        for name in names:
            with open(os.path.join(results, name), "rb") as handle:
                assert handle.read() == before[name], f"{name} is not what its record gives"
    finally:
        for name in names:
            with open(os.path.join(results, name), "wb") as handle:
                handle.write(before[name])
