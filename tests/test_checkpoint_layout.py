"""A stage checkpoint restores only into the variables it was saved from.

Checkpoints restore by position; the layout saved with them (each variable's
name, shape and dtype, without Keras' numbering of layers) must match the
trainer's, so that variables of one shape (BatchNormalization's four) are never
restored into each other's places.
"""

import json

import keras
import numpy as np
import pytest

from keras_feed.run import checkpointing

CHANNELS = 6


def model(order):
    """Dense, then a LayerNormalization and a BatchNormalization in `order`: the same
    four variables of shape (6,) either way (gamma, beta; moving mean and variance)."""
    inputs = keras.Input((CHANNELS,))
    x = keras.layers.Dense(CHANNELS)(inputs)
    layers = {"layer": keras.layers.LayerNormalization(),
              "batch": keras.layers.BatchNormalization(center=False, scale=False)}
    for name in order:
        x = layers[name](x)
    trainer = keras.Model(inputs, keras.layers.Dense(3)(x))
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return trainer


def stage(folder):
    return checkpointing.StageCheckpoint(str(folder), stage="student", steps_per_epoch=4, epochs=2)


def saved(folder, order):
    trainer = model(order)
    checkpoint = stage(folder)
    checkpoint.restore(trainer)
    for index, variable in enumerate(trainer.variables):
        variable.assign(np.full(variable.shape, index, variable.dtype))
    checkpoint.step = 3
    checkpoint.save()
    return trainer


def test_a_checkpoint_restores_into_a_fresh_build_of_the_same_trainer(tmp_path):
    original = saved(tmp_path, ("layer", "batch"))
    again = model(("layer", "batch"))  # Keras numbers its layers anew: dense_2, ...
    assert [v.path for v in again.variables] != [v.path for v in original.variables]
    assert stage(tmp_path).restore(again) == 3
    for ours, theirs in zip(again.variables, original.variables):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_variables_of_one_shape_in_another_order_are_refused(tmp_path):
    saved(tmp_path, ("layer", "batch"))
    other = model(("batch", "layer"))
    shapes = [tuple(v.shape) for v in other.variables]
    assert shapes == [tuple(v.shape) for v in model(("layer", "batch")).variables]
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"variable 2 was saved as 'gamma \(6,\) float32', the trainer's "
                             r"is 'moving_mean \(6,\) float32'"):
        stage(tmp_path).restore(other)


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    saved(tmp_path, ("layer", "batch"))
    meta, values = checkpointing.read_state(str(tmp_path / checkpointing.STATE_FILE), values=True)
    meta["format"] = 2
    del meta["layout"]
    arrays = {f"v{index}": value for index, value in enumerate(values)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(str(tmp_path / checkpointing.STATE_FILE), **arrays)
    with pytest.raises(checkpointing.CheckpointError, match="format 2, expected 3"):
        stage(tmp_path).restore(model(("layer", "batch")))
