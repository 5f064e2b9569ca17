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


# -- one source of truth: the flags are the TrainConfig fields ---------------------------


def train_flags():
    """keras-feed-train's flags, as the command defines them (in a fresh set: other
    commands imported by other tests define flags of their own in absl's global one)."""
    from absl import flags

    from keras_feed import cli

    fresh = flags.FlagValues()
    cli.define_config_flags(flag_values=fresh)
    return fresh


def test_every_setting_is_a_flag_with_its_default_and_help():
    from keras_feed import config

    flags = train_flags()
    for field in dataclasses.fields(config.TrainConfig):
        assert field.name in flags, f"--{field.name} is not a flag"
        flag = flags[field.name]
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        assert flag.default == default, field.name
        assert flag.help.endswith(field.metadata["help"]), field.name  # enums: "<a|b>: " first


def test_enum_choices_come_from_the_registries():
    from keras_feed import config, distribute, methods
    from keras_feed.models import preprocessing

    flags = train_flags()
    assert sorted(flags["method"].parser.enum_values) == methods.names()
    assert tuple(flags["strategy"].parser.enum_values) == distribute.STRATEGIES
    assert tuple(flags["mixed_precision"].parser.enum_values) == config.PRECISIONS
    assert tuple(flags["teacher_preprocessing"].parser.enum_values) == preprocessing.CONVENTIONS
    assert tuple(flags["lr_schedule"].parser.enum_values) == config.LR_SCHEDULES


def test_a_registered_method_becomes_a_choice(monkeypatch):
    from keras_feed import config, methods
    from keras_feed.methods import base

    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))

    @methods.register
    class Mine(methods.Method):  # pylint: disable=unused-variable
        name = "mine"

    (spec,) = config.flag_specs(["method"])
    assert "mine" in spec.choices and spec.kind == "enum"
    assert methods.get("mine").plan(config.TrainConfig()).teacher_count == 2


def test_flags_parse_into_the_config_and_bad_lists_are_refused():
    from keras_feed import config

    parsed = config.from_values({"teachers": ["a.keras", "b.keras"], "lr_decay_epochs": ["3", "6"],
                                 "beta": 2.0})
    assert parsed.teachers == ("a.keras", "b.keras") and parsed.lr_decay_epochs == (3, 6)
    assert parsed.beta == 2.0 and parsed.method == "pfeed"
    with pytest.raises(ValueError, match="--lr_decay_epochs must be a comma-separated list of int"):
        config.from_values({"lr_decay_epochs": ["ten"]})


def test_the_settings_a_rerun_may_change_are_the_resumable_fields():
    from keras_feed import checkpointing, config

    compared = set(checkpointing.comparable_settings(config.TrainConfig()))
    every = {field.name for field in dataclasses.fields(config.TrainConfig)}
    assert every - compared == checkpointing.resumable_settings(config.TrainConfig)
    assert {"model_dir", "verbose", "strategy"} <= checkpointing.resumable_settings(config.TrainConfig)
    assert {"beta", "seed", "epochs", "method"} <= compared


def test_the_readme_flag_table_names_every_setting():
    import re

    from keras_feed import config

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    table = text[text.index("## Command line"):text.index("## Resuming and failures")]
    named = set(re.findall(r"`--([a-z_0-9]+)`", table))
    missing = {field.name for field in dataclasses.fields(config.TrainConfig)} - named
    assert not missing, f"README's flag table lacks {sorted(missing)}"


def test_keras_feed_train_offers_every_setting():
    from keras_feed import config

    result = subprocess.run([sys.executable, "-m", "keras_feed.train", "--helpfull"],
                            capture_output=True, text=True, timeout=300)
    assert "--method:" in result.stdout, result.stderr[-2000:]  # absl's help exits with 1
    for field in dataclasses.fields(config.TrainConfig):
        assert f"--{field.name}:" in result.stdout or f"--[no]{field.name}:" in result.stdout, field.name
