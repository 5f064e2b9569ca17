"""Factor Transfer's first stage: training a paraphraser on a frozen teacher's map."""

import keras
import tensorflow as tf

from keras_feed import distiller as distiller_lib
from keras_feed import distribute
from keras_feed import translators


class ParaphraserTrainer(distribute.PrebuiltTrainer, keras.Model):
    """Trains a `Paraphraser` to reconstruct one frozen teacher's feature map.

    The loss is the paper's reconstruction error, the mean squared difference
    between the teacher's map and its reconstruction. The teacher runs in
    inference mode outside the gradient tape and is not tracked.

    Args:
      teacher: functional teacher model.
      paraphraser: an unbuilt or built `translators.Paraphraser`.
      teacher_layer: the teacher's feature-map layer.
      weight_decay: coupled L2 decay on the paraphraser's variables.
    """

    def __init__(self, teacher, paraphraser, *, teacher_layer="features", weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        teacher.trainable = False
        extractor = distiller_lib.feature_extractor(
            teacher, teacher_layer, name="paraphrased_teacher"
        )
        self._frozen = distiller_lib._Untracked(extractor)
        self.paraphraser = paraphraser
        paraphraser.build((None,) + tuple(extractor.outputs[1].shape[1:]))
        self.weight_decay = float(weight_decay)
        self.loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        _, features = self._frozen.value(data[0], training=False)
        features = tf.stop_gradient(tf.cast(features, tf.float32))
        variables = self.paraphraser.trainable_variables
        with tf.GradientTape() as tape:
            reconstruction = tf.cast(self.paraphraser(features, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(features - reconstruction))
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / tf.cast(replicas, tf.float32))
        gradients = tape.gradient(scaled, variables)
        if self.weight_decay:
            gradients = distiller_lib.add_weight_decay(
                self.optimizer, gradients, variables, self.weight_decay
            )
        self.optimizer.apply_gradients(zip(gradients, variables))
        self.loss_tracker.update_state(loss, sample_weight=tf.shape(features)[0])
        return distribute.step_logs({"reconstruction_loss": self.loss_tracker.result()})


def new_paraphraser(teacher, *, teacher_layer, rate, batchnorm=False, name=None):
    """A `Paraphraser` sized for `teacher`'s map, built eagerly."""
    shape = teacher.get_layer(teacher_layer).output.shape[1:]
    paraphraser = translators.Paraphraser(shape[-1], rate=rate, batchnorm=batchnorm, name=name)
    paraphraser.build((None,) + tuple(shape))
    return paraphraser
