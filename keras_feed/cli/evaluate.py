"""keras-feed-eval: accuracy of a trained or exported model on a dataset split.

    keras-feed-eval --model_path=runs/feed/student.keras --dataset=fashion_mnist \\
        --data_dir=/usr/share/datasets/fashion-mnist

`--model_path` is a `.keras` file, a SavedModel folder (e.g. `<model_dir>/export`),
a LiteRT `.tflite` file or an ONNX `.onnx` file (`keras-feed-export --format=...`).
The model is given the split's raw images: float32 pixels in [0, 255] for a
`.keras` model and for an export that takes float32, uint8 images for an
export that takes them (every export keras-feed writes), since the
normalisation is inside the model. Any model is used as it is: one that
expects normalised images needs its normalisation as its first layer
(`keras_feed.models.preprocessing.add`). Its outputs may be logits or
probabilities (a softmax head: `keras_feed.core.frozen.head_kind` for
`.keras`; for an export, rows that are non-negative and sum to 1 within 1e-3).

Prints one JSON object: the model, its format and head, the split, the number
of examples, the top-1 accuracy and the mean cross-entropy.
"""

import json

from absl import flags

from keras_feed.cli import common

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command's flags (when it runs, not when it is imported)."""
    common.define_data_flags()
    common.define_unsafe_load_flag()
    flags.DEFINE_string("model_path", None, "A .keras file, a SavedModel folder (e.g. "
                        "<model_dir>/export), a .tflite or an .onnx file.", required=True)
    flags.DEFINE_enum("split", "test", ["test", "train"], "Which split to evaluate on.")
    flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")


def main():
    from keras_feed import data as data_lib
    from keras_feed.run.serving import evaluate, load_predictor

    data = data_lib.load(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
    predict = load_predictor(FLAGS.model_path, unsafe=FLAGS.unsafe_load)
    dataset = data.test(FLAGS.batch_size) if FLAGS.split == "test" else data.train_eval(FLAGS.batch_size)
    result = {"model_path": FLAGS.model_path, "dataset": data.info.name, "split": FLAGS.split}
    result.update(evaluate(predict, dataset))
    result.update(format=predict.format, head=predict.head)
    print(json.dumps(result, indent=2))


def run():
    define_flags()
    common.run("keras-feed-eval", main)


if __name__ == "__main__":
    run()
