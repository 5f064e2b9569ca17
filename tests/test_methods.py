"""Every method end to end on tiny data, the analysis command, and every flagfile's dry run."""

import glob
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_feed.run import methods, runner
from keras_feed.run.config import TrainConfig, learning_rate_schedule

pytestmark = pytest.mark.slow  # end to end, in-process runs and subprocesses (outside the fast tier)

TINY = dict(
    dataset="synthetic", model="resnet8", train_examples=128, batch_size=32, epochs=1,
    teacher_epochs=1, paraphraser_epochs=1, learning_rate=0.05, eval_batch_size=64, verbose=0,
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Two tiny teachers, trained once for the whole module."""
    folder = str(tmp_path_factory.mktemp("teachers"))
    config = TrainConfig(method="pfeed", num_teachers=2, teacher_dir=folder,
                                    model_dir=str(tmp_path_factory.mktemp("first")), **TINY)
    runner.run(config)
    return folder


def train(method, model_dir, teacher_dir, **settings):
    config = TrainConfig(method=method, teacher_dir=teacher_dir, model_dir=str(model_dir),
                         **{"num_teachers": 2, **TINY, **settings})
    return runner.run(config)


def test_registry_has_every_method():
    assert methods.names() == ["ce", "ft", "kd", "pfeed", "sfeed"]
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        methods.get("nope")


def test_kd(tmp_path, teacher_dir):
    metrics = train("kd", tmp_path, teacher_dir, kd_weight=0.9, temperature=4.0)
    logged = metrics["stages"]["student"]["last_epoch"]
    assert {"kd_loss", "student_loss", "loss"} <= set(logged) and not any("feed" in k for k in logged)
    assert logged["loss"] == pytest.approx(
        0.1 * logged["student_loss"] + 0.9 * logged["kd_loss"] + logged["weight_decay_loss"], rel=1e-3
    )
    assert metrics["ensemble"]["size"] == 2
    assert not os.path.exists(tmp_path / "translators.weights.h5")


def test_pfeed_with_confidence_weighting_logs_each_teacher_s_weight(tmp_path, teacher_dir):
    metrics = train("pfeed", tmp_path, teacher_dir, teacher_weighting="confidence",
                    kd_weight=0.5)
    history = metrics["stages"]["student"]["history"]
    logged = metrics["stages"]["student"]["last_epoch"]
    assert metrics["config"]["teacher_weighting"] == "confidence"
    assert len(history["teacher_weight_0"]) == TINY["epochs"]
    # Each example's weights sum to the number of teachers, and so do their means.
    assert logged["teacher_weight_0"] + logged["teacher_weight_1"] == pytest.approx(2.0, abs=1e-5)
    assert 0.0 <= logged["teacher_weight_0"] <= 2.0
    assert (tmp_path / "logs" / "student").is_dir()


def test_ft(tmp_path, teacher_dir):
    metrics = train("ft", tmp_path, teacher_dir, ft_rate=0.5)
    assert {"paraphraser_0", "paraphraser_1", "student"} <= set(metrics["stages"])
    assert "reconstruction_loss" in metrics["stages"]["paraphraser_0"]["last_epoch"]
    assert {"ft_loss_0", "ft_loss_1"} <= set(metrics["stages"]["student"]["last_epoch"])
    assert os.path.isfile(tmp_path / "paraphrasers" / "paraphraser_1.weights.h5")
    spec = json.loads((tmp_path / "translators.json").read_text())
    assert [entry["config"]["out_channels"] for entry in spec] == [32, 32]  # rate 0.5 of 64


@pytest.fixture(scope="module")
def pfeed_kd_run(tmp_path_factory, teacher_dir):
    model_dir = tmp_path_factory.mktemp("pfeed_kd")
    return model_dir, train("pfeed", model_dir, teacher_dir, kd_weight=0.5, beta=100.0)


def test_pfeed_with_kd(pfeed_kd_run):
    _, metrics = pfeed_kd_run
    logged = metrics["stages"]["student"]["last_epoch"]
    assert {"feed_loss_0", "feed_loss_1", "kd_loss"} <= set(logged)
    assert logged["loss"] == pytest.approx(
        0.5 * logged["student_loss"] + 0.5 * logged["kd_loss"]
        + 100.0 * (logged["feed_loss_0"] + logged["feed_loss_1"]) + logged["weight_decay_loss"], rel=1e-3
    )


def numpy_reconstruction(run_dir):
    """Per teacher, (FEED loss, relative L2 error) over the synthetic test split, in NumPy.

    The models come from the run folder; the normalisation, the norms and the
    means over examples are computed here, independently of keras_feed.run.analysis.
    """
    from keras_feed import data
    from keras_feed.run import analysis

    parts = analysis.RunParts(str(run_dir))
    targets = [[] for _ in parts.teachers]
    outputs = [[] for _ in parts.teachers]
    for images, _ in data.load("synthetic").test(256):
        *_, student_map = parts.student(images, training=False)
        for index, (teacher, translator) in enumerate(zip(parts.teachers, parts.translators)):
            *_, teacher_map = teacher(images, training=False)
            targets[index].append(teacher_map.numpy().reshape(len(images), -1))
            outputs[index].append(translator(student_map, training=False).numpy().reshape(len(images), -1))
    result = []
    for target, output in zip(targets, outputs):
        target = np.concatenate(target).astype(np.float64)
        output = np.concatenate(output).astype(np.float64)
        target /= np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
        output /= np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        relative = np.linalg.norm(target - output, axis=1) / np.maximum(
            np.linalg.norm(target, axis=1), 1e-12)
        result.append((np.mean(np.abs(target - output)), np.mean(relative)))
    assert all(relative > 1e-3 for _, relative in result)  # not trivially zero
    return result


def test_sfeed_and_analysis(tmp_path, teacher_dir, pfeed_kd_run):
    sfeed_dir = tmp_path / "sfeed"
    metrics = train("sfeed", sfeed_dir, teacher_dir, generations=2)
    assert [g["generation"] for g in metrics["generations"]] == [0, 1, 2]
    for generation in range(3):
        assert os.path.isfile(sfeed_dir / "generations" / f"gen_{generation}.keras")
    assert metrics["student"]["test_accuracy"] == metrics["generations"][-1]["test_accuracy"]
    # The last generation on disk is the student: same outputs, bit for bit.
    saved = [keras.saving.load_model(sfeed_dir / name)
             for name in ("generations/gen_2.keras", "student.keras")]
    images = np.random.default_rng(0).uniform(size=(4,) + saved[0].input_shape[1:]).astype("float32")
    np.testing.assert_array_equal(*[model.predict(images, verbose=0) for model in saved])
    assert metrics["teacher_paths"] == [str(sfeed_dir / "generations" / "gen_1.keras")]

    pfeed_dir, _ = pfeed_kd_run
    out = tmp_path / "analysis"
    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.cli.analyze", f"--runs={pfeed_dir},{sfeed_dir}",
         "--labels=pFEED-2,sFEED", "--dataset=synthetic", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "analysis.json").read_text())
    assert [len(run["teachers"]) for run in report["runs"]] == [2, 1]
    for run, run_dir in zip(report["runs"], (pfeed_dir, sfeed_dir)):
        assert run["examples"] == 256  # the whole synthetic test split
        expected = numpy_reconstruction(run_dir)
        assert [entry["teacher"] for entry in run["teachers"]] == list(range(len(expected)))
        for entry, (feed, relative) in zip(run["teachers"], expected):
            assert entry["relative_l2_error"] == pytest.approx(relative, rel=1e-5)
            assert entry["feed_loss"] == pytest.approx(feed, rel=1e-5)
    assert (out / "reconstruction_error.png").stat().st_size > 1000


def test_analysis_measures_against_numpy(pfeed_kd_run):
    import numpy as np

    from keras_feed import data
    from keras_feed.run import analysis

    pfeed_dir, _ = pfeed_kd_run
    parts = analysis.RunParts(str(pfeed_dir))
    images = data.load("synthetic").test(16).take(1)
    count, per_teacher = analysis.measure(parts, images)
    batch = next(iter(images))[0]
    *_, student_map = parts.student(batch)
    *_, teacher_map = parts.teachers[1](batch)
    target = teacher_map.numpy().reshape(count, -1)
    output = parts.translators[1](student_map).numpy().reshape(count, -1)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    output /= np.linalg.norm(output, axis=1, keepdims=True)
    expected = np.mean(np.linalg.norm(target - output, axis=1))
    assert per_teacher[1]["relative_l2_error"] == pytest.approx(expected, rel=1e-5)
    assert per_teacher[1]["feed_loss"] == pytest.approx(np.mean(np.abs(target - output)), rel=1e-5)


def test_analysis_refuses_runs_it_cannot_measure(tmp_path, pfeed_kd_run):
    from keras_feed.run import analysis

    pfeed_dir, _ = pfeed_kd_run
    broken = tmp_path / "broken"
    shutil.copytree(pfeed_dir, broken)
    metrics_path = broken / "metrics.json"
    data = json.loads(metrics_path.read_text())
    data["teacher_paths"] = data["teacher_paths"][:1]
    metrics_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="2 saved NTLs but lists 1 teachers"):
        analysis.RunParts(str(broken))
    os.remove(broken / "translators.weights.h5")
    with pytest.raises(ValueError, match="No saved NTLs"):
        analysis.RunParts(str(broken))
    data["method"] = "kd"
    metrics_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no FEED NTLs"):
        analysis.RunParts(str(broken))


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_optimizer_schedule_starts_at_the_given_peak(schedule):
    config = TrainConfig(lr_schedule=schedule, learning_rate=0.1)
    rates = {}
    for peak in (None, 0.01):
        rate = learning_rate_schedule(config, steps_per_epoch=10, epochs=4,
                                                 peak_learning_rate=peak)
        rates[peak] = [float(rate(step)) for step in (0, 25, 39)]
    assert rates[None][0] == pytest.approx(0.1)
    # The paraphraser's schedule is the student's, scaled to its own peak.
    assert rates[0.01] == pytest.approx([r / 10 for r in rates[None]], rel=1e-5)
    assert rates[None][2] < rates[None][1] < rates[None][0]


@pytest.mark.parametrize(
    "method,settings,message",
    [
        ("sfeed", dict(generations=0), "--generations must be >= 1"),
        ("kd", dict(kd_weight=0.9, temperature=0.0), "--temperature must be > 0"),
        ("ft", dict(ft_rate=1.5), "--ft_rate must lie in (0, 1]"),
        ("ft", dict(ft_rate=0.0), "--ft_rate must lie in (0, 1]"),
        ("ft", dict(paraphraser_learning_rate=0.0), "--paraphraser_learning_rate must be > 0"),
        ("pfeed", dict(kd_weight=1.5), "--kd_weight must lie in [0, 1]"),
        ("kd", dict(kd_weight=0.0), "--method=kd needs --kd_weight"),
        ("ce", dict(teacher_weighting="confidence"),
         "--teacher_weighting=confidence weighs teachers, and --method=ce has none"),
        ("ce", dict(kd_weight=0.5), "--kd_weight=0.5 asks for KD from teachers, and "
                                    "--method=ce has none."),
        ("pfeed", dict(kd_form="per_teacher"),
         "--kd_form=per_teacher shapes the KD term, and --kd_weight=0 trains none."),
        ("ft", dict(kd_form="per_teacher", temperature=2.0),
         "--kd_form=per_teacher and --temperature=2.0 shape the KD term, and --kd_weight=0"),
        ("pfeed", dict(temperature=2.0, teacher_weighting="entropy"),
         "--temperature=2.0 shapes the KD term, and --kd_weight=0 trains none."),
        ("pfeed", dict(num_teachers=1, teacher_weighting="confidence"),
         "--teacher_weighting=confidence weighs teachers against each other, and "
         "--method=pfeed here distils from one at a time (every weight would be 1)."),
        ("sfeed", dict(teacher_weighting="entropy"), "--method=sfeed here distils from one "
                                                     "at a time"),
        ("pfeed", dict(teacher_weighting="nope"), "Unknown --teacher_weighting 'nope'"),
        ("pfeed", dict(kd_form="mean"), "Unknown --kd_form 'mean'; choose from ensemble, "
                                        "per_teacher."),
        ("pfeed", dict(lr_schedule="linear"), "Unknown --lr_schedule 'linear'"),
    ],
)
def test_bad_method_settings_fail_before_writing(tmp_path, method, settings, message):
    (tmp_path / "keep.txt").write_text("earlier run")
    with pytest.raises(ValueError) as error:
        train(method, tmp_path, str(tmp_path / "teachers"), **settings)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_every_flagfile_dry_runs():
    flagfiles = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))
    assert len(flagfiles) >= 8
    script = (
        "import sys\n"
        "from keras_feed.cli import train\n"
        "from keras_feed.run import runner\n"
        "train.define_flags()\n"
        "for path in sys.argv[1:]:\n"
        "    train.FLAGS.unparse_flags()\n"
        "    train.FLAGS(['keras-feed-train', '--flagfile=' + path, '--dry_run'])\n"
        "    plan = runner.run(train.config_from_flags())['plan']\n"
        "    print('OK', path, len(plan))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *flagfiles], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("OK ") == len(flagfiles)
    assert "recipe: 200 epochs x 390 steps" in result.stdout
    assert not os.path.exists(os.path.join(ROOT, "runs", "cifar100_resnet56_sfeed"))
