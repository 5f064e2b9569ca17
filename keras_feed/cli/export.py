"""keras-feed-export: export a trained student (.keras) for serving.

    keras-feed-export --student=runs/feed/student.keras --export_dir=serving/feed
    keras-feed-export --student=runs/feed/student.keras --format=litert --output=feed.tflite
    keras-feed-export --student=runs/feed/student.keras --format=onnx --output=feed.onnx

`--format` is one of Keras' `model.export` formats (TensorFlow backend), as
listed under the flag below (`keras_feed.run.files.EXPORT_FORMATS`): a
SavedModel folder has a `serving_default` signature, which reloads with
`keras.layers.TFSMLayer(path, call_endpoint="serving_default")` or
`tf.saved_model.load`. Every export holds the student alone and takes uint8
images `(N, H, W, C)` as the dataset stores them: the normalisation is the
model's own first layer (a model without it is exported as it is, and is
given the raw pixels). `--output` (alias `--export_dir`) is replaced only once
the new export is complete, in one atomic swap.

What is at `--output` is replaced only if it is an earlier export of the same
format (or an empty folder): a folder holding anything but a SavedModel, a
file where the SavedModel folder goes, a `.tflite` that is not a LiteRT model
or an `.onnx` that is not an ONNX model is refused with one line (exit 1),
unless `--overwrite` is given. Files beside `--output` are never touched.
"""

from absl import flags

from keras_feed.cli import common
from keras_feed.run import files

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command's flags (when it runs, not when it is imported)."""
    common.define_unsafe_load_flag()
    formats = files.EXPORT_FORMATS
    flags.DEFINE_string("student", None, "The student's .keras file.", required=True)
    flags.DEFINE_enum("format", "tf_saved_model", list(formats), "Export format: " + "; ".join(
        f"{name}, {what}" for name, what in formats.items()) + ".")
    flags.DEFINE_string("output", None, "The folder or file to write, as --format says.", required=True)
    flags.DEFINE_alias("export_dir", "output")
    flags.DEFINE_bool("overwrite", False, "Replace what is at --output even if it is not an earlier "
                      "export of this format (a folder or file of other contents).")


def main():
    from keras_feed.run import storage

    try:
        storage.check_export_path(FLAGS.output, FLAGS.format, overwrite=FLAGS.overwrite)  # before the work
        model = storage.load_model(FLAGS.student, unsafe=FLAGS.unsafe_load)
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
