"""keras-feed-export: export a trained student (.keras) for serving.

    keras-feed-export --student=runs/feed/student.keras --export_dir=serving/feed
    keras-feed-export --student=runs/feed/student.keras --format=litert --output=feed.tflite
    keras-feed-export --student=runs/feed/student.keras --format=onnx --output=feed.onnx

`--format` is one of Keras' `model.export` formats (TensorFlow backend):
`tf_saved_model` (default; a folder with a `serving_default` signature, which
reloads with `keras.layers.TFSMLayer(path, call_endpoint="serving_default")` or
`tf.saved_model.load`), `litert` (a `.tflite` file) or `onnx` (an `.onnx` file;
needs the `tf2onnx` and `onnx` packages). Every export holds the student alone
and takes uint8 images `(N, H, W, C)` as the dataset stores them: the
normalisation is the model's own first layer. `--output` (alias
`--export_dir`) is replaced only once the new export is complete, in one
atomic swap.

What is at `--output` is replaced only if it is an earlier export of the same
format (or an empty folder): a folder holding anything but a SavedModel, a
file where the SavedModel folder goes, a `.tflite` that is not a LiteRT model
or an `.onnx` that is not an ONNX model is refused with one line (exit 1),
unless `--overwrite` is given. Files beside `--output` are never touched.

A student written by keras-feed 0.1.0 has no normalisation inside: say what it
expects with `--preprocessing=dataset` (with `--dataset` / `--data_dir`, whose
mean and std are then added as its first layer) before exporting it.
"""

from absl import flags

from keras_feed.cli import common

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command's flags (when it runs, not when it is imported)."""
    common.define_data_flags()
    common.define_unsafe_load_flag()
    common.define_preprocessing_flag()

    flags.DEFINE_string("student", None, "The student's .keras file.", required=True)
    flags.DEFINE_enum("format", "tf_saved_model", ["tf_saved_model", "litert", "onnx"],
                      "Export format: a SavedModel folder, a LiteRT .tflite file or an ONNX .onnx file.")
    flags.DEFINE_string("output", None, "The SavedModel folder, .tflite or .onnx file to write.", required=True)
    flags.DEFINE_alias("export_dir", "output")
    flags.DEFINE_bool("overwrite", False, "Replace what is at --output even if it is not an earlier "
                      "export of this format (a folder or file of other contents).")


def load_student():
    """`--student`, taking raw pixels as `--preprocessing` says.

    The dataset (`--dataset`, `--data_dir`, `--image_size`) is only described,
    for its mean and std, when a student without its own preprocessing layer
    is to be given the dataset's.
    """
    from keras_feed import data as data_lib
    from keras_feed.models import preprocessing
    from keras_feed.run import storage

    def statistics():
        if not common.flags_given("dataset"):
            raise ValueError("--preprocessing=dataset needs --dataset (and --data_dir): its "
                             "training split's mean and std are what the student expects.")
        info = data_lib.describe(FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size)
        return info.mean, info.std

    return preprocessing.raw_pixel_model(
        storage.load_model(FLAGS.student, unsafe=FLAGS.unsafe_load), FLAGS.preprocessing,
        statistics=statistics, what=f"Student file {FLAGS.student}", flag="--preprocessing",
    )


def main():
    from keras_feed.run import files, storage

    try:
        storage.check_export_path(FLAGS.output, FLAGS.format, overwrite=FLAGS.overwrite)  # before the work
        model = load_student()
        storage.export_model(model, FLAGS.output, FLAGS.format, overwrite=FLAGS.overwrite)
    except files.OutputExistsError as error:
        raise error.with_hint("--overwrite") from None
    print(f"Exported {model.name} ({model.count_params():,} parameters) as {FLAGS.format} to "
          f"{FLAGS.output}; it takes uint8 images (N, {', '.join(str(d) for d in model.inputs[0].shape[1:])})")


def run():
    define_flags()
    common.run("keras-feed-export", main)


if __name__ == "__main__":
    run()
