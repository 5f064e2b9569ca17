"""The numbers the README and docs/evidence.md quote match the committed study records.

The documents are written by hand; these tests recompute every quoted mean,
standard deviation and difference from the records (`benchmarks/results/*.json`)
with NumPy, so a typo or a table left behind by a new run fails here.
"""

import functools
import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@functools.lru_cache(maxsize=None)
def records(study):
    """The committed records of `study` (`fashion_mnist` or `heterogeneous`)."""
    return json.loads((RESULTS / f"{study}.json").read_text())


def accuracies(study, name):
    """Test accuracies (%) of the final runs named `name`, in seed order."""
    runs = sorted((r["seed"], 100.0 * r["test_accuracy"]) for r in records(study)["runs"]
                  if r["name"] == name and r.get("phase", "final") == "final")
    return np.array([accuracy for _, accuracy in runs])


def summary(study, name):
    values = accuracies(study, name)
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def difference(study, first, second):
    """`+d points, +k SE` of two rows, the studies' rule: d / sqrt(se1² + se2²)."""
    a, b = accuracies(study, first), accuracies(study, second)
    d = a.mean() - b.mean()
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return f"{d:+.2f}", f"{d / se:+.1f} SE"


def flat(text):
    """The text with every run of whitespace made one space (lines are wrapped)."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def readme():
    return flat((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def evidence():
    return flat((ROOT / "docs" / "evidence.md").read_text())


def missing(text, expected):
    return [line for line in expected if flat(line) not in text]


def table_lines(study, rows, bold):
    """The evidence table's line of each `(row, label, column)`: `| label | column | n |
    mean ± std | per seed |`, the mean of row `bold` in bold."""
    lines = []
    for row, label, column in rows:
        values = accuracies(study, row)
        cell = summary(study, row)
        cell = f"**{cell}**" if row == bold else cell
        seeds = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {label} | {column} | {values.size} | {cell} | {seeds} |")
    return lines


def test_readme_quotes_the_same_architecture_study(readme):
    study = "fashion_mnist"
    ensemble = 100 * records(study)["ensembles"]["3"]["test_accuracy"]
    means = " / ".join(f"{accuracies(study, n).mean():.2f}"
                       for n in ("kd", "ft", "sfeed_2", "pfeed_3_kd"))
    d_ce, k_ce = difference(study, "pfeed_3", "ce")
    d_one, k_one = difference(study, "pfeed_3", "feed_1")
    expected = [
        f"| plain training (CE) | {summary(study, 'ce')} | 5 |",
        f"| FEED, one teacher | {summary(study, 'feed_1')} | 5 |",
        f"| pFEED, three teachers | **{summary(study, 'pfeed_3')}** | 5 |",
        f"| ensemble of the three teachers | {ensemble:.2f} | 1 |",
        f"| Hinton KD / Factor Transfer / sFEED / pFEED + KD | {means} | 3 |",
        f"plain training by {d_ce} points ({k_ce[:-3]} standard errors",
        f"one-teacher FEED by {d_one} ({k_one})",
    ]
    assert missing(readme, expected) == []


def test_readme_quotes_the_heterogeneous_study(readme):
    study = "heterogeneous"
    teachers = " / ".join(f"{100 * t['test_accuracy']:.2f}" for t in records(study)["teachers"])
    ensemble = 100 * records(study)["ensemble"]["test_accuracy"]
    d, k = difference(study, "pfeed_3_equal", "ce")
    expected = [
        f"| teachers `resnet32` / `resnet20` (3 epochs) / `small_cnn_slim`: {teachers}, "
        f"ensemble {ensemble:.2f} | equal | confidence | entropy |",
        f"| plain training (CE) | {summary(study, 'ce')} | | |",
        f"| Hinton KD | {summary(study, 'kd_equal')} | {summary(study, 'kd_confidence')} | |",
        f"| pFEED, three teachers | {summary(study, 'pfeed_3_equal')} | "
        f"{summary(study, 'pfeed_3_confidence')} | **{summary(study, 'pfeed_3_entropy')}** |",
        f"pFEED-3 beats CE: {d}, {k})",
    ]
    assert missing(readme, expected) == []


HETEROGENEOUS_ROWS = [  # (row, how evidence.md names it, weighting)
    ("ce", "`ce` (plain training)", "–"),
    ("kd_equal", "`kd_equal` (Hinton KD from the mean of the 3 teachers' soft targets)", "equal"),
    ("kd_confidence", "`kd_confidence`", "confidence"),
    ("pfeed_3_equal", "`pfeed_3_equal` (the paper's loss)", "equal"),
    ("pfeed_3_confidence", "`pfeed_3_confidence`", "confidence"),
    ("pfeed_3_entropy", "`pfeed_3_entropy`", "entropy"),
    ("kd_per_teacher_equal", "`kd_per_teacher_equal` (KD in CA-MKD's form, one term per "
     "teacher)", "equal"),
    ("pfeed_3_kd_equal", "`pfeed_3_kd_equal` (pFEED-3 + KD)", "equal"),
    ("pfeed_3_kd_confidence", "`pfeed_3_kd_confidence`", "confidence"),
    ("pfeed_3_agreement", "`pfeed_3_agreement`", "agreement"),
]


def test_evidence_quotes_the_heterogeneous_study(evidence):
    study = "heterogeneous"
    differences = []
    for name, first, second in (("H1", "pfeed_3_confidence", "pfeed_3_equal"),
                                ("H2", "pfeed_3_equal", "ce"),
                                ("H3", "kd_confidence", "kd_equal")):
        d, k = difference(study, first, second)
        differences.append(f"{name}, `{first} − {second}`: {d} points, {k}")
    for first, second, unit in (("kd_equal", "ce", " points"),
                                ("pfeed_3_equal", "kd_equal", ""),
                                ("pfeed_3_kd_equal", "pfeed_3_equal", " points"),
                                ("pfeed_3_kd_confidence", "pfeed_3_kd_equal", "")):
        d, k = difference(study, first, second)
        differences.append(f"`{first} − {second}` {d}{unit}, {k}")
    for first, second in (("kd_per_teacher_equal", "kd_equal"),
                          ("pfeed_3_agreement", "pfeed_3_equal")):
        d, k = difference(study, first, second)
        differences.append(f"({d}, {k})")
    # evidence.md writes a negative difference with the minus sign, −.
    expected = (table_lines(study, HETEROGENEOUS_ROWS, bold="pfeed_3_entropy")
                + [line.replace("-", "−") for line in differences])
    assert missing(evidence, expected) == []


SAME_ARCHITECTURE_ROWS = [  # (row, how evidence.md names it, teachers)
    ("ce", "`ce` (plain training)", 0),
    ("feed_1", "`feed_1` (FEED, one NTL, teacher 0)", 1),
    ("pfeed_2", "`pfeed_2` (pFEED, teachers 0, 1)", 2),
    ("pfeed_3", "`pfeed_3` (pFEED, teachers 0, 1, 2)", 3),
    ("kd", "`kd` (Hinton KD from the 3-teacher ensemble, T = 4, weight 0.9)", 3),
    ("ft", "`ft` (Factor Transfer from teacher 0, rate 0.5)", 1),
    ("sfeed_2", "`sfeed_2` (sFEED, generations 1 and 2 from teacher 0)", 1),
    ("pfeed_3_kd", "`pfeed_3_kd` (pFEED-3 + KD, weight 0.9)", 3),
]


def test_evidence_quotes_the_same_architecture_study(evidence):
    study = "fashion_mnist"
    expected = table_lines(study, SAME_ARCHITECTURE_ROWS, bold="pfeed_3")
    for first, second in (("pfeed_3", "ce"), ("pfeed_3", "feed_1")):
        d, k = difference(study, first, second)
        expected.append(f"`{first} − {second}`: **{d} points, {k}**")
    for first, second in (("pfeed_2", "feed_1"), ("feed_1", "ce")):
        d, k = difference(study, first, second)
        expected.append(f"`{first} − {second}`: {d}, {k}")
    assert missing(evidence, expected) == []


def test_the_methods_page_quotes_the_weighting_gains():
    text = flat((ROOT / "docs" / "methods.md").read_text())
    gains = [difference("heterogeneous", f"pfeed_3_{w}", "pfeed_3_equal")[0]
             for w in ("confidence", "entropy")]
    kd = difference("heterogeneous", "kd_confidence", "kd_equal")[0]
    assert f"gained {gains[0]} and {gains[1]} points over `equal` for pFEED-3 and " \
           f"`confidence` {kd} for KD" in text
