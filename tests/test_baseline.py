"""--baseline: a plain-CE student of the same architecture and seed, reported beside."""

import os

import keras
import numpy as np
import pytest

from keras_feed import data
from keras_feed.run import runner, summary
from keras_feed.run.config import TrainConfig

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)


def test_baseline_is_trained_evaluated_and_reported(tmp_path):
    config = TrainConfig(
        method="pfeed", dataset="synthetic", model="resnet8", train_examples=64, batch_size=32,
        epochs=1, num_teachers=1, baseline=True, verbose=0, model_dir=str(tmp_path / "run"),
    )
    metrics = runner.run(config)
    baseline = metrics["baseline"]
    assert baseline["model"] == "resnet8" and os.path.isfile(baseline["path"])
    assert "baseline" in metrics["stages"]
    # Its accuracy is the saved baseline's, recomputed on the run's test split.
    test = data.load("synthetic", train_examples=64).test(256)
    model = keras.models.load_model(baseline["path"])
    predictions = np.concatenate([np.argmax(model.predict(x, verbose=0), axis=1) for x, _ in test])
    labels = np.concatenate([y.numpy() for _, y in test])
    assert baseline["test_accuracy"] == pytest.approx(float(np.mean(predictions == labels)), abs=1e-9)
    assert metrics["gain"] == pytest.approx(metrics["student"]["test_accuracy"] - baseline["test_accuracy"])
    lines = summary.table(metrics)
    assert any(line.strip().startswith("CE student (resnet8, same seed)") for line in lines)
    assert lines[-1].strip().startswith("gain over the CE student")
    with open(tmp_path / "run" / "summary.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_baseline_with_the_ce_method_is_refused(tmp_path):
    config = TrainConfig(
        method="ce", dataset="synthetic", model="resnet8", baseline=True, dry_run=True,
        model_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="baseline itself"):
        runner.run(config)


def test_a_held_out_validation_split_is_scored_beside_the_test_split(tmp_path):
    config = TrainConfig(
        method="pfeed", dataset="synthetic", model="resnet8", train_examples=64, batch_size=32,
        epochs=1, num_teachers=1, baseline=True, verbose=0, validation_examples=96,
        validation_freq=1, model_dir=str(tmp_path / "run"),
    )
    metrics = runner.run(config)
    assert metrics["num_validation"] == 96 and metrics["config"]["validation_examples"] == 96
    for scores in (metrics["student"], metrics["baseline"], metrics["ensemble"],
                   *metrics["teachers"]):
        assert {"test_accuracy", "validation_accuracy", "validation_top5_accuracy"} <= set(scores)
    assert metrics["validation_gain"] == pytest.approx(
        metrics["student"]["validation_accuracy"] - metrics["baseline"]["validation_accuracy"])
    # The validation accuracy is the saved student's on the held-out examples.
    held_out = data.load("synthetic", train_examples=64, validation_examples=96).validation(256)
    model = keras.models.load_model(str(tmp_path / "run" / "student.keras"))
    predictions = np.concatenate([np.argmax(model.predict(x, verbose=0), axis=1) for x, _ in held_out])
    labels = np.concatenate([y.numpy() for _, y in held_out])
    assert labels.shape == (96,)
    assert metrics["student"]["validation_accuracy"] == pytest.approx(
        float(np.mean(predictions == labels)), abs=1e-9)
    # fit's own evaluation (validation_freq) ran on the validation split.
    assert "val_loss" in metrics["stages"]["student"]["history"]
    assert summary.table(metrics)[0] == "Test accuracy, then validation accuracy:"
