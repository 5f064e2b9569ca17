"""Factor Transfer's paraphraser stage stops itself when its reconstruction diverges."""

import os

import keras
import numpy as np
import pytest
from conftest import tiny_net

from keras_feed.core import factor_transfer
from keras_feed.run import runner
from keras_feed.run.config import TrainConfig


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))


def paraphraser_trainer():
    teacher = tiny_net("teacher", width=8)
    paraphraser = factor_transfer.new_paraphraser(
        teacher, teacher_layer="features", rate=0.5, name="paraphraser_0"
    )
    return factor_transfer.ParaphraserTrainer(teacher, paraphraser, teacher_layer="features")


@pytest.mark.parametrize("logged,stops_at", [
    ([0.5, 0.4, 0.3, 40.0, 51.0], 5),  # finite, but over 100 times the first value
    ([0.5, 0.4, float("inf")], 3),
    ([float("nan")], 1),
    ([0.5, 0.4, 49.0, 0.3], None),  # under the limit
])
def test_guard_stops_at_the_first_diverged_batch(logged, stops_at):
    guard = factor_transfer.DivergenceGuard("paraphraser_0")
    guard.set_model(paraphraser_trainer())
    guard.model.compile(optimizer=keras.optimizers.SGD(0.25))
    guard.on_train_begin()
    guard.on_epoch_begin(0)
    stopped = None
    for batch, value in enumerate(logged):
        try:
            guard.on_train_batch_end(batch, {"loss": value, "reconstruction_loss": value})
        except factor_transfer.ParaphraserDivergedError as error:
            stopped = batch + 1
            message = str(error)
            break
    assert stopped == stops_at
    if stops_at is not None:
        assert "\n" not in message and "--paraphraser_learning_rate" in message
        assert f"Paraphraser paraphraser_0 diverged at epoch 1, batch {stops_at}" in message
        assert "the learning rate was 0.25" in message


def test_a_huge_learning_rate_stops_the_paraphraser_before_a_checkpoint_or_callback_sees_it():
    trainer = paraphraser_trainer()
    trainer.compile(optimizer=keras.optimizers.SGD(1e4, momentum=0.9))
    images = np.random.default_rng(0).normal(size=(128, 16, 16, 3)).astype("float32")
    recorder = Recorder()
    with pytest.raises(factor_transfer.ParaphraserDivergedError) as error:
        trainer.fit(images, epochs=2, batch_size=16, verbose=0, callbacks=[recorder])
    assert "--paraphraser_learning_rate" in str(error.value)
    first = recorder.batches[0]["reconstruction_loss"]
    assert all(np.isfinite(logs["reconstruction_loss"]) and logs["reconstruction_loss"] <= 100 * first
               for logs in recorder.batches)
    assert len(recorder.batches) < 16  # stopped in the first epoch


@pytest.mark.slow  # a subprocess
def test_ft_run_with_a_diverging_paraphraser_names_its_learning_rate(tmp_path):
    config = TrainConfig(
        method="ft", dataset="synthetic", model="resnet8", num_teachers=1,
        train_examples=128, batch_size=32, epochs=1, teacher_epochs=1,
        learning_rate=0.05, paraphraser_epochs=2, paraphraser_learning_rate=1e4,
        eval_batch_size=128, verbose=0, model_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError) as error:
        runner.run(config)
    message = str(error.value)
    assert "\n" not in message
    assert "Paraphraser paraphraser_0 diverged" in message, message
    assert "--paraphraser_learning_rate" in message and "--learning_rate" not in message
    # The student was never trained on the diverged paraphraser.
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "student")
    assert not os.path.exists(tmp_path / "run" / "metrics.json")
