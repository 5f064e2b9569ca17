"""Factor Transfer's first stage: training a paraphraser on a frozen teacher's map."""

import math

import keras
from keras import ops

from keras_feed.core import frozen, trainer, translators


class ParaphraserTrainer(trainer.Trainer):
    """Trains a `Paraphraser` to reconstruct one frozen teacher's feature map.

    The loss is the paper's reconstruction error, the mean squared difference
    between the teacher's map and its reconstruction (plus the coupled weight
    decay). The teacher runs in inference mode outside the gradient and is not
    tracked. Compile it with an optimizer alone.

    Args:
      teacher: functional teacher model.
      paraphraser: an unbuilt or built `translators.Paraphraser`.
      teacher_layer: the teacher's feature-map layer (name or path).
      weight_decay: coupled L2 decay on the paraphraser's variables.
    """

    def __init__(self, teacher, paraphraser, *, teacher_layer="features", weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        teacher.trainable = False
        extractor = frozen.extractor(teacher, teacher_layer, role="Teacher")
        maps = keras.Model(extractor.inputs[0], extractor.outputs[2], name="paraphrased_teacher")
        self._frozen = frozen.Untracked(frozen.inference_model(maps))
        self.paraphraser = paraphraser
        paraphraser.build((None,) + tuple(maps.outputs[0].shape[1:]))
        self.weight_decay = float(weight_decay)
        self.loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.built = True

    def call(self, images, training=False):
        """`{"features": the teacher's map, "reconstruction": the paraphraser's}`."""
        features = ops.stop_gradient(ops.cast(self._frozen.value(images, training=False), "float32"))
        return {"features": features, "reconstruction": self.paraphraser(features, training=training)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        reconstruction = ops.cast(y_pred["reconstruction"], "float32")
        loss = ops.mean(ops.square(y_pred["features"] - reconstruction))
        self.loss_tracker.update_state(loss, sample_weight=ops.shape(reconstruction)[0])
        total = loss + self.weight_decay_loss() if self.weight_decay else loss
        return trainer.replica_share(total)

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, stopped by a `DivergenceGuard` if the reconstruction diverges."""
        frozen.refold(self._frozen.value)
        self.frozen_weights_read(self._frozen.value.weights)
        guard = DivergenceGuard(self.paraphraser.name)
        return super().fit(*args, callbacks=[guard, *(callbacks or [])], **kwargs)


class ParaphraserDivergedError(ValueError):
    """A paraphraser's reconstruction loss diverged; the message is one line."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops a paraphraser's training as soon as its reconstruction loss diverges.

    The reconstruction of a raw teacher map can explode and yet stay finite
    (1.9e24 with briefly trained teachers); the student, trained next on the
    exploded factors, then fails at its first step and blames the wrong flag.
    This callback raises `ParaphraserDivergedError` at the first batch whose
    logged `reconstruction_loss` (the epoch's running mean) is non-finite or
    more than `factor` times the first one logged in this `fit` (when that is
    positive), naming `--paraphraser_learning_rate`. `ParaphraserTrainer.fit`
    puts it first among the callbacks, so that nothing after it, a checkpoint
    included, sees the diverged step.

    Args:
      name: the paraphraser's name, for the message.
      factor: how many times its first value the loss may reach.
    """

    def __init__(self, name, factor=100.0):
        super().__init__()
        self.name = name
        self.factor = float(factor)
        self.first = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.first = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "reconstruction_loss" not in logs:
            return
        value = float(logs["reconstruction_loss"])
        if self.first is None and math.isfinite(value):
            self.first = value
            return
        if math.isfinite(value) and not (self.first > 0 and value > self.factor * self.first):
            return
        if math.isfinite(value):
            problem = f"{value:.3g}, over {self.factor:g} times its first value {self.first:.3g}"
        else:
            problem = f"{value}"
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        raise ParaphraserDivergedError(
            f"Paraphraser {self.name} diverged at epoch {self._epoch + 1}, batch {batch + 1}: "
            f"its reconstruction loss is {problem}. Lower --paraphraser_learning_rate "
            f"(the learning rate was {rate:g}) and train in a new --model_dir."
        )


def new_paraphraser(teacher, *, teacher_layer, rate, batchnorm=False, name=None):
    """A `Paraphraser` sized for `teacher`'s map, built eagerly."""
    shape = frozen.feature_shape(teacher, teacher_layer, role="Teacher")
    paraphraser = translators.Paraphraser(shape[-1], rate=rate, batchnorm=batchnorm, name=name)
    paraphraser.build((None,) + tuple(shape))
    return paraphraser
