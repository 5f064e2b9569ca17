"""Factor Transfer's first stage: training a paraphraser on a frozen teacher's map."""

import keras
from keras import ops

from keras_feed import frozen
from keras_feed import training_backend
from keras_feed import translators


class ParaphraserTrainer(training_backend.Trainer):
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
        return training_backend.replica_share(total)

    def fit(self, *args, **kwargs):
        frozen.refold(self._frozen.value)
        return super().fit(*args, **kwargs)


def new_paraphraser(teacher, *, teacher_layer, rate, batchnorm=False, name=None):
    """A `Paraphraser` sized for `teacher`'s map, built eagerly."""
    shape = teacher.get_layer(teacher_layer).output.shape[1:]
    paraphraser = translators.Paraphraser(shape[-1], rate=rate, batchnorm=batchnorm, name=name)
    paraphraser.build((None,) + tuple(shape))
    return paraphraser
