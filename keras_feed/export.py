"""keras-feed-export: export a trained student (.keras) as a TensorFlow SavedModel.

    keras-feed-export --student=runs/feed/student.keras --export_dir=serving/feed

The SavedModel holds the student alone, with a `serving_default` signature;
it reloads with `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`
or `tf.saved_model.load`. An existing folder is replaced only once the new
export is complete.
"""

from keras_feed import cli
from absl import flags

FLAGS = flags.FLAGS
cli.define_unsafe_load_flag()

flags.DEFINE_string("student", None, "The student's .keras file.", required=True)
flags.DEFINE_string("export_dir", None, "The SavedModel folder to write.", required=True)


def main():
    from keras_feed import storage

    model = storage.load_model(FLAGS.student, unsafe=FLAGS.unsafe_load)
    storage.export_saved_model(model, FLAGS.export_dir)
    print(f"Exported {model.name} ({model.count_params():,} parameters) to {FLAGS.export_dir}")


def run():
    cli.run("keras-feed-export", main)


if __name__ == "__main__":
    run()
