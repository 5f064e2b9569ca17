"""keras-feed-eval: accuracy of a trained model (.keras or SavedModel) on a dataset split.

    keras-feed-eval --model_path=runs/feed/student.keras --dataset=fashion_mnist \\
        --data_dir=/usr/share/datasets/fashion-mnist

Prints one JSON object: the model, the split, the number of examples, the
top-1 accuracy and the mean cross-entropy.
"""

import json
import os

from keras_feed import cli
from absl import flags

FLAGS = flags.FLAGS
cli.define_data_flags()
cli.define_unsafe_load_flag()

flags.DEFINE_string("model_path", None, "A .keras file or a SavedModel folder (e.g. <model_dir>/export).", required=True)
flags.DEFINE_enum("split", "test", ["test", "train"], "Which split to evaluate on.")
flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")


def load_predictor(path, *, unsafe=False):
    """A callable `images -> logits` for a `.keras` file or a SavedModel folder."""
    import keras

    from keras_feed import storage

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"Not a SavedModel folder (no saved_model.pb): {path}")
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")

        def predict(images):
            outputs = layer(images)
            return next(iter(outputs.values())) if isinstance(outputs, dict) else outputs

        return predict
    model = storage.load_model(path, unsafe=unsafe)
    return lambda images: model(images, training=False)


def evaluate(predict, dataset):
    """Top-1 accuracy and mean cross-entropy of `predict` over `(images, labels)`."""
    import tensorflow as tf

    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in dataset:
        logits = tf.cast(predict(images), tf.float32)
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, axis=1, output_type=tf.int32) == labels, tf.int32)))
        loss_sum += float(
            tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        )
        total += int(labels.shape[0])
    return {"examples": total, "accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def main():
    from keras_feed import data as data_lib

    data = data_lib.load(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
    predict = load_predictor(FLAGS.model_path, unsafe=FLAGS.unsafe_load)
    dataset = data.test(FLAGS.batch_size) if FLAGS.split == "test" else data.train_eval(FLAGS.batch_size)
    result = {"model_path": FLAGS.model_path, "dataset": data.info.name, "split": FLAGS.split}
    result.update(evaluate(predict, dataset))
    print(json.dumps(result, indent=2))


def run():
    cli.run("keras-feed-eval", main)


if __name__ == "__main__":
    run()
