"""Flag values that cannot work are refused before anything is built or trained."""

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import typing

import pytest

from keras_feed.run import runner
from keras_feed.run.config import TrainConfig

#: Every number of the configuration that is a float: nan and inf pass `x > 0`.
FLOAT_FLAGS = sorted(
    field.name for field in dataclasses.fields(TrainConfig)
    if isinstance(field.default, float)
)


#: The range of every numeric setting, as its flag's help and the flag table (docs/command-line.md) give it.
RANGES = {
    "image_size": ">= 8", "num_teachers": ">= 1", "teacher_seed": ">= 0",
    "teacher_epochs": ">= 1", "train_examples": ">= 1", "subset_seed": ">= 0",
    "validation_examples": ">= 0", "epochs": ">= 1", "batch_size": ">= 1",
    "eval_batch_size": ">= 1", "learning_rate": "> 0", "lr_decay_epochs": ">= 1",
    "lr_decay_factor": "(0, 1]", "momentum": "[0, 1)", "weight_decay": ">= 0", "beta": ">= 0",
    "kd_weight": "[0, 1]", "temperature": "> 0", "seed": ">= 0", "validation_freq": ">= 0",
    "generations": ">= 1", "ft_rate": "(0, 1]", "paraphraser_epochs": ">= 1",
    "paraphraser_learning_rate": "> 0", "checkpoint_steps": ">= 0", "verbose": "{0, 1, 2}",
}

BELOW_ZERO = math.nextafter(0.0, -1.0)
ABOVE_ZERO = math.nextafter(0.0, 1.0)
BELOW_ONE = math.nextafter(1.0, 0.0)
ABOVE_ONE = math.nextafter(1.0, 2.0)

#: (just outside the range, the boundary inside it) at each end of every range; for an
#: open end, the nearest number inside (the next float, or integer).
EDGES = {
    "image_size": [(7, 8)], "num_teachers": [(0, 1)], "teacher_seed": [(-1, 0)],
    "teacher_epochs": [(0, 1)], "train_examples": [(0, 1)], "subset_seed": [(-1, 0)],
    "validation_examples": [(-1, 0)], "epochs": [(0, 1)], "batch_size": [(0, 1)],
    "eval_batch_size": [(0, 1)], "learning_rate": [(0.0, ABOVE_ZERO)],
    "lr_decay_epochs": [((5, 0), (5, 1))],
    "lr_decay_factor": [(0.0, ABOVE_ZERO), (ABOVE_ONE, 1.0)],
    "momentum": [(BELOW_ZERO, 0.0), (1.0, BELOW_ONE)],
    "weight_decay": [(BELOW_ZERO, 0.0)], "beta": [(BELOW_ZERO, 0.0)],
    "kd_weight": [(BELOW_ZERO, 0.0), (ABOVE_ONE, 1.0)], "temperature": [(0.0, ABOVE_ZERO)],
    "seed": [(-1, 0)], "validation_freq": [(-1, 0)], "generations": [(0, 1)],
    "ft_rate": [(0.0, ABOVE_ZERO), (ABOVE_ONE, 1.0)], "paraphraser_epochs": [(0, 1)],
    "paraphraser_learning_rate": [(0.0, ABOVE_ZERO)], "checkpoint_steps": [(-1, 0)],
    "verbose": [(-1, 0), (3, 2)],
}


def numeric_settings():
    """The names of the `TrainConfig` fields that hold numbers (or lists of them)."""
    hints = typing.get_type_hints(TrainConfig)
    names = set()
    for field in dataclasses.fields(TrainConfig):
        types = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        if types & {int, float} or field.metadata["item"] in (int, float):
            names.add(field.name)
    return names


def test_every_numeric_setting_has_its_range():
    assert set(RANGES) == set(EDGES) == numeric_settings()
    for field in dataclasses.fields(TrainConfig):
        bounds = field.metadata["bounds"]
        assert (str(bounds) if bounds else None) == RANGES.get(field.name), field.name


def check(name, value):
    """`check_config` on the defaults with `name` set to `value` (pFEED + KD: every loss
    setting in use)."""
    from keras_feed.run import config, methods

    config.check_config(config.TrainConfig(method="pfeed", **{"kd_weight": 0.5, name: value}),
                        methods.get("pfeed"))


CASES = [(name, outside, inside) for name, edges in EDGES.items() for outside, inside in edges]


@pytest.mark.parametrize("name,outside,inside", CASES,
                         ids=[f"{name}-{inside}" for name, _, inside in CASES])
def test_a_value_just_outside_its_range_is_refused_and_the_boundary_accepted(
        name, outside, inside):
    with pytest.raises(ValueError) as error:
        check(name, outside)
    message = str(error.value)
    shown = ",".join(str(item) for item in outside) if isinstance(outside, tuple) else outside
    assert message.startswith(f"--{name} must ") and message.endswith(f", got {shown}."), message
    assert RANGES[name].strip("{}") in message and "\n" not in message
    check(name, inside)


def test_the_decay_factor_message():
    with pytest.raises(ValueError) as error:
        check("lr_decay_factor", -0.5)
    assert str(error.value) == "--lr_decay_factor must lie in (0, 1], got -0.5."
    with pytest.raises(ValueError) as error:
        check("verbose", 5)
    assert str(error.value) == "--verbose must be one of 0, 1, 2, got 5."
    with pytest.raises(ValueError) as error:
        check("lr_decay_epochs", (3, 0))
    assert str(error.value) == "--lr_decay_epochs must be comma-separated values >= 1, got 3,0."


def test_optional_numbers_may_be_unset():
    for name in ("image_size", "teacher_epochs", "train_examples", "verbose"):
        check(name, None)


def test_the_float_flags_are_the_expected_ones():
    assert {"learning_rate", "momentum", "weight_decay", "beta", "kd_weight", "temperature",
            "lr_decay_factor", "ft_rate", "paraphraser_learning_rate"} <= set(FLOAT_FLAGS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_non_finite_numbers_are_refused(tmp_path, name, value):
    config = TrainConfig(
        method="ft", dataset="synthetic", model="resnet8", epochs=1, dry_run=True,
        model_dir=str(tmp_path / "run"), **{name: value},
    )
    with pytest.raises(ValueError) as error:
        runner.run(config)
    assert str(error.value) == f"--{name} must be a finite number, got {value}."
    assert not os.path.exists(tmp_path / "run")


def test_a_finite_configuration_dry_runs(tmp_path):
    config = TrainConfig(
        method="ft", dataset="synthetic", model="resnet8", epochs=1, dry_run=True,
        model_dir=str(tmp_path / "run"),
    )
    assert "plan" in runner.run(config)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("flag", ["--beta=nan", "--weight_decay=inf"])
def test_command_line_refuses_non_finite_flags(tmp_path, flag):
    model_dir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.cli.train", "--dataset=synthetic", "--model=resnet8",
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

    from keras_feed.cli import common

    fresh = flags.FlagValues()
    common.define_config_flags(flag_values=fresh)
    return fresh


def test_every_setting_is_a_flag_with_its_default_and_help():
    from keras_feed.run import config

    flags = train_flags()
    for field in dataclasses.fields(config.TrainConfig):
        assert field.name in flags, f"--{field.name} is not a flag"
        flag = flags[field.name]
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        assert flag.default == default, field.name
        assert field.metadata["help"] in flag.help, field.name
        assert flag.help.endswith(config.flag_help(field)), field.name  # enums: "<a|b>: " first
        if field.name in RANGES:
            each = "each " if field.metadata["item"] else ""
            assert flag.help.endswith(f" Range: {each}{RANGES[field.name]}."), field.name


def test_enum_choices_come_from_the_registries():
    from keras_feed.models import preprocessing
    from keras_feed.run import config, distribute, methods

    flags = train_flags()
    assert sorted(flags["method"].parser.enum_values) == methods.names()
    assert tuple(flags["strategy"].parser.enum_values) == distribute.STRATEGIES
    assert tuple(flags["mixed_precision"].parser.enum_values) == config.PRECISIONS
    assert tuple(flags["teacher_preprocessing"].parser.enum_values) == preprocessing.CONVENTIONS
    assert tuple(flags["lr_schedule"].parser.enum_values) == config.LR_SCHEDULES


def test_a_registered_method_becomes_a_choice(monkeypatch):
    from keras_feed.run import config, methods
    from keras_feed.run.methods import base

    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))

    @methods.register
    class Mine(methods.Method):  # pylint: disable=unused-variable
        name = "mine"

    (spec,) = config.flag_specs(["method"])
    assert "mine" in spec.choices and spec.kind == "enum"
    assert methods.get("mine").plan(config.TrainConfig()).teacher_count == 2


def test_flags_parse_into_the_config_and_bad_lists_are_refused():
    from keras_feed.run import config

    parsed = config.from_values({"teachers": ["a.keras", "b.keras"], "lr_decay_epochs": ["3", "6"],
                                 "beta": 2.0})
    assert parsed.teachers == ("a.keras", "b.keras") and parsed.lr_decay_epochs == (3, 6)
    assert parsed.beta == 2.0 and parsed.method == "pfeed"
    with pytest.raises(ValueError, match="--lr_decay_epochs must be a comma-separated list of int"):
        config.from_values({"lr_decay_epochs": ["ten"]})


def test_the_settings_a_rerun_may_change_are_the_resumable_fields():
    from keras_feed.run import config, run_folder

    compared = set(run_folder.comparable_settings(config.TrainConfig()))
    every = {field.name for field in dataclasses.fields(config.TrainConfig)}
    assert every - compared == run_folder.resumable_settings(config.TrainConfig)
    assert {"model_dir", "verbose", "strategy"} <= run_folder.resumable_settings(config.TrainConfig)
    assert {"beta", "seed", "epochs", "method"} <= compared


#: The page with the flag table of keras-feed-train.
COMMAND_LINE_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "docs", "command-line.md")


def flag_table_rows():
    """The rows of the flag table (docs/command-line.md): `{first cell: (range cell, row)}`."""
    with open(COMMAND_LINE_PAGE, encoding="utf-8") as handle:
        text = handle.read()
    table = text[text.index("| flag | default | range | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = (cells[2], line)
    return rows


def test_the_flag_table_gives_every_range():
    """Each numeric flag's row says its range: the whole range cell, or `--name RANGE` in it."""
    rows = flag_table_rows()
    for name, expected in RANGES.items():
        found = [(cell, line) for first, (cell, line) in rows.items() if f"`--{name}`" in first]
        assert len(found) == 1, f"no flag-table row starts with --{name}"
        cell, line = found[0]
        stated = cell if "`--" not in cell else None
        for part in re.split(r", (?=`--)", cell):
            if part.startswith(f"`--{name}` "):
                stated = part.split("` ", 1)[1]
        assert stated is not None, f"the flag-table row of --{name} does not give its range: {line}"
        assert stated.removeprefix("each ") == expected, (name, stated, line)


def test_the_flag_table_names_every_setting():
    import re

    from keras_feed.run import config

    with open(COMMAND_LINE_PAGE, encoding="utf-8") as handle:
        named = set(re.findall(r"`--([a-z_0-9]+)`", handle.read()))
    missing = {field.name for field in dataclasses.fields(config.TrainConfig)} - named
    assert not missing, f"docs/command-line.md's flag table lacks {sorted(missing)}"


@pytest.mark.slow  # a subprocess
def test_keras_feed_train_offers_every_setting():
    from keras_feed.run import config

    result = subprocess.run([sys.executable, "-m", "keras_feed.cli.train", "--helpfull"],
                            capture_output=True, text=True, timeout=300)
    assert "--method:" in result.stdout, result.stderr[-2000:]  # absl's help exits with 1
    for field in dataclasses.fields(config.TrainConfig):
        assert f"--{field.name}:" in result.stdout or f"--[no]{field.name}:" in result.stdout, field.name


# -- ranges and backends on the command line ---------------------------------------------

#: What TensorFlow's C++ runtime writes on stderr before its logging is set up.
RUNTIME_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")


def own_lines(stderr):
    """stderr's lines without TensorFlow's runtime log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not RUNTIME_LOG.match(line)]


@pytest.mark.slow  # a subprocess
def test_keras_feed_train_refuses_a_decay_factor_of_zero(tmp_path):
    command = shutil.which("keras-feed-train")
    assert command, "keras-feed-train is not installed"
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [command, "--lr_decay_factor=0", "--dataset=synthetic", "--dry_run",
         f"--model_dir={model_dir}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert own_lines(result.stderr) == [
        "keras-feed-train: error: --lr_decay_factor must lie in (0, 1], got 0.0."], result.stderr
    assert not model_dir.exists()


@pytest.mark.slow  # a subprocess
def test_experiment_run_refuses_an_unsupported_backend(tmp_path):
    program = (
        "from keras_feed.run import runner\n"
        "from keras_feed.run.config import TrainConfig\n"
        "try:\n"
        f"    runner.run(TrainConfig(dataset='synthetic', model='resnet8', "
        f"dry_run=True, model_dir={str(tmp_path / 'run')!r}))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, KERAS_BACKEND="numpy"))
    assert result.returncode == 0, result.stderr
    expected = (
        "keras-feed runs on the Keras backends tensorflow and jax, not 'numpy' (set by "
        "KERAS_BACKEND); set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax.")
    assert result.stdout.splitlines() == [expected], result.stdout
    assert not (tmp_path / "run").exists()


def test_the_backend_is_read_as_keras_reads_it(tmp_path, monkeypatch):
    from keras_feed.run import config

    monkeypatch.setitem(sys.modules, "keras", None)  # as before Keras is imported
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert config.keras_backend() == ("tensorflow", "Keras' default")
    (tmp_path / "keras.json").write_text('{"backend": "numpy"}')
    assert config.keras_backend() == ("numpy", str(tmp_path / "keras.json"))
    with pytest.raises(ValueError, match=r"not 'numpy' \(from .*keras.json\)"):
        config.check_backend()
    monkeypatch.setenv("KERAS_BACKEND", "")  # empty: Keras ignores it
    assert config.keras_backend()[0] == "numpy"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert config.keras_backend() == ("jax", "KERAS_BACKEND")
    config.check_backend()
    (tmp_path / "keras.json").write_text("not json")  # Keras falls back to its default
    monkeypatch.delenv("KERAS_BACKEND")
    assert config.keras_backend()[0] == "tensorflow"
