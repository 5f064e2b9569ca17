"""Flag values that cannot work are refused before anything is built or trained."""

import dataclasses
import os
import subprocess
import sys

import pytest

from keras_feed import experiment

#: Every number of the configuration that is a float: nan and inf pass `x > 0`.
FLOAT_FLAGS = sorted(
    field.name for field in dataclasses.fields(experiment.TrainConfig)
    if isinstance(field.default, float)
)


def test_the_float_flags_are_the_expected_ones():
    assert {"learning_rate", "momentum", "weight_decay", "beta", "kd_weight", "temperature",
            "lr_decay_factor", "ft_rate", "paraphraser_learning_rate"} <= set(FLOAT_FLAGS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_non_finite_numbers_are_refused(tmp_path, name, value):
    config = experiment.TrainConfig(
        method="ft", dataset="synthetic", model="resnet8", epochs=1, dry_run=True,
        model_dir=str(tmp_path / "run"), **{name: value},
    )
    with pytest.raises(ValueError) as error:
        experiment.run(config)
    assert str(error.value) == f"--{name} must be a finite number, got {value}."
    assert not os.path.exists(tmp_path / "run")


def test_a_finite_configuration_dry_runs(tmp_path):
    config = experiment.TrainConfig(
        method="ft", dataset="synthetic", model="resnet8", epochs=1, dry_run=True,
        model_dir=str(tmp_path / "run"),
    )
    assert "plan" in experiment.run(config)


@pytest.mark.parametrize("flag", ["--beta=nan", "--weight_decay=inf"])
def test_command_line_refuses_non_finite_flags(tmp_path, flag):
    model_dir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.train", "--dataset=synthetic", "--model=resnet8",
         "--epochs=1", f"--model_dir={model_dir}", flag],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    name, value = flag[2:].split("=")
    assert lines[-1] == f"keras-feed-train: error: --{name} must be a finite number, got {value}.", \
        result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(model_dir)
