"""Teachers of different architectures, epochs and layers, and the record of each trained teacher."""

import json
import os

import pytest

from keras_feed.run import config as config_lib
from keras_feed.run import runner
from keras_feed.run.config import TrainConfig

TINY = dict(
    dataset="synthetic", model="resnet8", train_examples=64, batch_size=32, epochs=1,
    learning_rate=0.05, eval_batch_size=64, verbose=0, num_teachers=2,
)
MIXED = dict(teacher_model=("resnet8", "small_cnn_slim"), teacher_epochs=(1, 2))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A pfeed run from two teachers of different architectures and epochs."""
    root = tmp_path_factory.mktemp("mixed")
    teacher_dir = str(root / "teachers")
    metrics = runner.run(TrainConfig(method="pfeed", teacher_dir=teacher_dir,
                                     model_dir=str(root / "run"), **TINY, **MIXED))
    return root, teacher_dir, metrics


@pytest.mark.slow  # end to end: trains teachers and students
def test_two_architectures_with_their_own_epochs_train_and_distil(mixed_run):
    root, _, metrics = mixed_run
    assert [teacher["model"] for teacher in metrics["teachers"]] == ["resnet8", "small_cnn_slim"]
    assert metrics["stages"]["teacher_0"]["epochs"] == 1
    assert metrics["stages"]["teacher_1"]["epochs"] == 2
    assert "test_accuracy" in metrics["student"]
    with open(root / "run" / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["config"]["teacher_model"] == ["resnet8", "small_cnn_slim"]
    # An earlier run's record reads back: lists become tuples.
    again = config_lib.from_record(metrics["config"])
    assert again.teacher_model == MIXED["teacher_model"] and again.teacher_epochs == (1, 2)
    assert again.teacher_layer == "features"


@pytest.mark.slow  # end to end: trains teachers and students
def test_each_trained_teacher_has_its_record(mixed_run):
    _, teacher_dir, _ = mixed_run
    for index, (architecture, epochs) in enumerate(zip(*MIXED.values())):
        with open(os.path.join(teacher_dir, f"teacher_{index}.json"), encoding="utf-8") as handle:
            record = json.load(handle)
        assert record["architecture"] == architecture and record["epochs"] == epochs
        assert record["seed"] == 100 + index and record["dataset"] == "synthetic"
        assert record["train_examples"] == 64 and record["subset_seed"] == 0


@pytest.mark.slow  # end to end: reuses a trained run's teachers
def test_a_changed_architecture_with_the_same_teacher_dir_is_refused(mixed_run, tmp_path):
    _, teacher_dir, _ = mixed_run
    before = sorted(os.listdir(teacher_dir))
    model_dir = tmp_path / "rerun"
    config = TrainConfig(method="pfeed", teacher_dir=teacher_dir, model_dir=str(model_dir),
                         **{**TINY, **MIXED, "teacher_model": ("resnet8", "resnet8")})
    with pytest.raises(ValueError) as error:
        runner.run(config)
    message = str(error.value)
    assert "\n" not in message
    assert os.path.join(teacher_dir, "teacher_1.keras") in message
    assert "architecture (--teacher_model) 'small_cnn_slim' there, 'resnet8' now" in message
    assert not os.path.exists(model_dir)
    assert sorted(os.listdir(teacher_dir)) == before


@pytest.mark.slow  # end to end: reuses a trained run's teachers
def test_a_teacher_file_without_a_record_is_reused_with_a_note(mixed_run, tmp_path, capsys):
    root, teacher_dir, _ = mixed_run
    old = tmp_path / "old_teachers"
    old.mkdir()
    for index in range(2):  # as an earlier version left them: no record
        os.link(os.path.join(teacher_dir, f"teacher_{index}.keras"),
                old / f"teacher_{index}.keras")
    config = TrainConfig(method="pfeed", teacher_dir=str(old), dry_run=True,
                         model_dir=str(tmp_path / "run"), **TINY, **MIXED)
    runner.run(config)
    captured = capsys.readouterr()
    assert "has no record of how it was trained" in captured.out + captured.err


@pytest.mark.parametrize("name,value,count", [
    ("teacher_model", ("resnet8", "small_cnn_slim", "resnet8"), 2),
    ("teacher_epochs", (1, 2, 3), 2),
    ("teacher_layer", ("features", "features", "features"), 2),
])
def test_a_list_of_the_wrong_length_is_one_line(tmp_path, name, value, count):
    config = TrainConfig(method="pfeed", dry_run=True, model_dir=str(tmp_path / "run"),
                         **{**TINY, name: value})
    with pytest.raises(ValueError) as error:
        runner.run(config)
    message = str(error.value)
    assert message.startswith(f"--{name} gives {len(value)} values") and "\n" not in message
    assert f"one per teacher ({count}" in message


def test_each_epochs_entry_is_checked():
    from keras_feed.run import methods

    with pytest.raises(ValueError) as error:
        config_lib.check_config(TrainConfig(teacher_epochs=(2, 0)), methods.get("pfeed"))
    assert str(error.value) == "--teacher_epochs must be comma-separated values >= 1, got 2,0."


def test_the_dry_run_lists_every_teacher(tmp_path):
    config = TrainConfig(method="pfeed", dry_run=True, model_dir=str(tmp_path / "run"),
                         **{**TINY, **MIXED, "teacher_layer": ("features", "features")})
    lines = runner.run(config)["plan"]
    teachers = [line for line in lines if line.startswith("  teacher ")]
    assert len(teachers) == 2, lines
    assert teachers[0].startswith("  teacher 1: resnet8, 1 epochs: ")
    assert teachers[1].startswith("  teacher 2: small_cnn_slim, 2 epochs: ")
    assert all("parameters, features (" in line for line in teachers)
    assert not os.path.exists(tmp_path / "run")


def test_the_dry_run_names_the_kd_form_and_the_weighting(tmp_path):
    config = TrainConfig(method="pfeed", dry_run=True, model_dir=str(tmp_path / "run"),
                         kd_weight=0.5, kd_form="per_teacher", teacher_weighting="confidence",
                         **{**TINY, **MIXED})
    (recipe,) = [line for line in runner.run(config)["plan"] if line.startswith("recipe: ")]
    assert recipe.endswith("kd_weight 0.5, T 4.0 (per_teacher KD), teachers weighted per "
                           "example: confidence"), recipe


@pytest.mark.parametrize("method,settings,shown,hidden", [
    ("ce", {}, "weight decay 0.0005", ("beta", "kd_weight", "T ")),
    ("kd", {"kd_weight": 0.5}, "weight decay 0.0005, kd_weight 0.5, T 4.0", ("beta",)),
    ("pfeed", {"teacher_weighting": "agreement", "temperature": 2.0},
     "beta 500.0, teachers weighted per example: agreement (T 2.0)", ("kd_weight",)),
])
def test_the_dry_run_shows_the_loss_settings_the_method_uses(tmp_path, method, settings,
                                                             shown, hidden):
    config = TrainConfig(method=method, dry_run=True, model_dir=str(tmp_path / "run"),
                         **{**TINY, **MIXED, **settings})
    (recipe,) = [line for line in runner.run(config)["plan"] if line.startswith("recipe: ")]
    assert recipe.endswith(shown) and not any(word in recipe for word in hidden), recipe


def test_flag_values_one_for_all_or_one_each():
    single = config_lib.from_values(
        {"teacher_model": ["resnet20"], "teacher_epochs": ["30"], "teacher_layer": ["features"]})
    assert (single.teacher_model, single.teacher_epochs, single.teacher_layer) == (
        "resnet20", 30, "features")
    assert single.teacher_architectures(3) == ("resnet20",) * 3
    each = config_lib.from_values(
        {"teacher_model": ["resnet8", "small_cnn_slim"], "teacher_epochs": ["1", "2"]})
    assert each.teacher_model == ("resnet8", "small_cnn_slim") and each.teacher_epochs == (1, 2)
    unset = config_lib.from_values({"teacher_model": None, "teacher_epochs": None})
    assert unset.teacher_model is None and unset.teacher_epochs is None
    assert config_lib.from_record({"teacher_model": "resnet20"}).teacher_model == "resnet20"
    with pytest.raises(ValueError, match="--teacher_epochs must be a comma-separated list"):
        config_lib.from_values({"teacher_epochs": ["ten"]})


@pytest.mark.slow  # end to end: trains teachers and students
def test_a_single_value_still_works(tmp_path):
    teacher_dir = str(tmp_path / "teachers")
    metrics = runner.run(TrainConfig(
        method="kd", kd_weight=0.5, teacher_model="small_cnn_slim", teacher_epochs=1,
        teacher_layer="features", teacher_dir=teacher_dir, model_dir=str(tmp_path / "run"),
        **{**TINY, "num_teachers": 1}))
    assert [teacher["model"] for teacher in metrics["teachers"]] == ["small_cnn_slim"]
    assert metrics["config"]["teacher_model"] == "small_cnn_slim"
    with open(os.path.join(teacher_dir, "teacher_0.json"), encoding="utf-8") as handle:
        assert json.load(handle)["architecture"] == "small_cnn_slim"


def test_the_command_line_takes_one_value_or_one_per_teacher():
    from absl import flags

    from keras_feed.cli import common

    def parsed(*argv):
        fresh = flags.FlagValues()
        common.define_config_flags(flag_values=fresh)
        fresh(["keras-feed-train", *argv])
        return config_lib.from_values(
            {spec.name: fresh[spec.name].value for spec in config_lib.flag_specs()})

    default = parsed()
    assert (default.teacher_model, default.teacher_epochs, default.teacher_layer) == (
        None, None, "features")
    single = parsed("--teacher_model=resnet20", "--teacher_epochs=30")
    assert (single.teacher_model, single.teacher_epochs) == ("resnet20", 30)
    each = parsed("--teacher_model=resnet8,small_cnn_slim", "--teacher_epochs=1,2",
                  "--teacher_layer=features,features")
    assert each.teacher_model == ("resnet8", "small_cnn_slim") and each.teacher_epochs == (1, 2)
    assert each.teacher_layer == ("features", "features")


def test_a_list_in_python_is_a_tuple_and_one_entry_the_value():
    assert TrainConfig(teacher_model=["resnet8", "small_cnn_slim"]).teacher_model == (
        "resnet8", "small_cnn_slim")
    assert TrainConfig(teacher_epochs=(3,)).teacher_epochs == 3


@pytest.mark.slow  # end to end: trains teachers and students
def test_ft_reuses_the_recorded_teachers_with_a_layer_each(mixed_run, tmp_path, capsys):
    _, teacher_dir, _ = mixed_run
    metrics = runner.run(TrainConfig(
        method="ft", paraphraser_epochs=1, teacher_dir=teacher_dir, model_dir=str(tmp_path),
        teacher_layer=("features", "features"), **TINY, **MIXED))
    assert [teacher["model"] for teacher in metrics["teachers"]] == ["resnet8", "small_cnn_slim"]
    assert "teacher_0" not in metrics["stages"] and "paraphraser_1" in metrics["stages"]
    captured = capsys.readouterr()
    assert "Reusing teacher 2/2" in captured.out + captured.err


def test_sfeed_takes_one_teacher_layer(tmp_path):
    config = TrainConfig(method="sfeed", dry_run=True, model_dir=str(tmp_path / "run"),
                         **{**TINY, "teacher_layer": ("features", "features")})
    with pytest.raises(ValueError, match="give one --teacher_layer"):
        runner.run(config)
