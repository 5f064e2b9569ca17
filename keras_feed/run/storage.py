"""Model files: loading, saving and exporting models, and checking what is on disk.

`load_model` reads a `.keras` file in Keras' safe mode; `save_model` and
`save_weights` write atomically (`keras_feed.run.files`); `export_model`
writes the student alone for serving (SavedModel, LiteRT, ONNX), replacing
only an earlier export (`foreign_export`, `files.OutputExistsError`); and
`check_litert_file`, `check_onnx_file`, `check_saved_model` find a truncated or
foreign model file before a native runtime reads it.
"""

import functools
import json
import mmap
import os
import re
import zipfile

import keras

from keras_feed.core import translators as translators_lib
from keras_feed.run import files
from keras_feed.run.files import EXPORT_FORMATS, EXPORT_SUFFIXES
from keras_feed.run.files import first_line


class ModelFileError(ValueError):
    """A model file that is missing, not a Keras model, or refused as unsafe."""


def save_model(model, path):
    """Saves a `keras.Model` to a `.keras` file, atomically."""
    with files.atomic_path(path) as temporary:
        model.save(temporary)


def save_weights(layer_or_model, path):
    """Saves weights to a `.weights.h5` file, atomically."""
    with files.atomic_path(path) as temporary:
        layer_or_model.save_weights(temporary)




def serving_signature(model):
    """The export's input: uint8 images `(N, H, W, C)`, as image files and IDX files hold them.

    The model casts them to its input's float dtype; its own first layer
    normalises them (see `keras_feed.models.preprocessing`).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if len(model.inputs) != 1:
        raise ValueError(f"Model '{model.name}' has {len(model.inputs)} inputs; one image input is needed.")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"Model '{model.name}' takes inputs of shape {shape}; images (N, H, W, C) are needed.")
    return [tf.TensorSpec((None,) + shape[1:], tf.uint8, name="images")]


def export_model(model, path, export_format="tf_saved_model", *, overwrite=False):
    """Exports `model` alone with Keras' `model.export`, atomically.

    Every format takes uint8 images `(N, H, W, C)` (`serving_signature`) and
    gives the model's own outputs (logits, or probabilities for a softmax
    head). `tf_saved_model` writes a folder with a `serving_default`
    signature, which reloads with `keras.layers.TFSMLayer(path,
    call_endpoint="serving_default")`; `litert` a `.tflite` file (run it with
    `tf.lite.Interpreter` or `ai_edge_litert`); `onnx` an `.onnx` file (run it
    with onnxruntime). Runs on the TensorFlow backend.

    What is at `path` is replaced only if it is an export of that format (an
    earlier one, even a damaged one) or an empty folder: anything else (a
    folder holding other files, a file where a folder goes, a `.tflite` that
    is no LiteRT model, ...) raises `OutputExistsError` unless `overwrite`.
    Files beside `path` are never touched.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    check_export_path(path, export_format, overwrite=overwrite)
    signature = serving_signature(model)
    replaceable = None if overwrite else functools.partial(foreign_export, export_format=export_format)
    directory = export_format == "tf_saved_model"
    with files.atomic_path(path, directory=directory, replaceable=replaceable) as temporary:
        try:
            model.export(temporary, format=export_format, verbose=False, input_signature=signature)
        except tf.errors.OpError as error:  # TensorFlow's own file system errors
            raise files.WriteError(path, _tensorflow_reason(error.message)) from error


def export_saved_model(model, path, *, overwrite=False):
    """Exports `model` alone as a TensorFlow SavedModel folder, atomically.

    Its `serving_default` signature takes uint8 images `(N, H, W, C)` and
    reloads with `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`
    (see `export_model`, also for what it may replace).
    """
    export_model(model, path, "tf_saved_model", overwrite=overwrite)


def check_export_path(path, export_format="tf_saved_model", *, overwrite=False):
    """Raises `ValueError` (one line) unless `export_model` may write `path` in `export_format`.

    An unknown format, a file name of another format, a missing package for
    ONNX, or (unless `overwrite`) something at `path` that is not an export
    of that format (`OutputExistsError`). Cheap: check before a long job.
    """
    path = os.fspath(path)
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"Unknown export format '{export_format}'; choose from {', '.join(EXPORT_FORMATS)}."
        )
    suffix = EXPORT_SUFFIXES.get(export_format)
    if suffix and not path.endswith(suffix):
        raise ValueError(f"The {export_format} export is a file ending in {suffix}; got {path}.")
    if export_format == "onnx":
        for package in ("tf2onnx", "onnx"):
            try:
                __import__(package)
            except ImportError:
                raise ValueError(
                    f"--format=onnx needs the '{package}' package: pip install onnx tf2onnx "
                    "(and onnxruntime to run the model)."
                ) from None
    if not overwrite:
        files.refuse_unless_replaceable(path, path, functools.partial(foreign_export, export_format=export_format))


#: What `model.export(format="tf_saved_model")` (TensorFlow's SavedModel writer) puts in its folder.
SAVED_MODEL_ENTRIES = ("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables", "assets",
                       "assets.extra")
_VARIABLES_FILE = re.compile(r"variables\.(index|data-\d+-of-\d+)$")
#: The FlatBuffer file identifier of a LiteRT (TensorFlow Lite) model, at bytes 4..8.
LITERT_IDENTIFIER = b"TFL3"


def foreign_export(path, export_format="tf_saved_model"):
    """What is at `path`, if it is not an `export_format` export that `export_model` may replace.

    None when `path` is missing, an empty folder, or an export of that format
    (an earlier one: a SavedModel folder, a file with LiteRT's identifier, a
    file that parses as an ONNX model with a graph); else a few words saying
    what is there, e.g. "a folder holding keep.txt, not a SavedModel".
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        return "a symbolic link"
    if export_format == "tf_saved_model":
        if not os.path.isdir(path):
            return "a file, where a SavedModel folder is to go"
        return _foreign_saved_model(path)
    if os.path.isdir(path):
        return f"a folder, where {EXPORT_FORMATS[export_format]} is to go"
    if not os.path.isfile(path):
        return "not a regular file"
    if export_format == "litert":
        return _foreign_litert(path)
    return _foreign_onnx(path)


def _foreign_saved_model(folder):
    """None for an empty folder or a SavedModel's; else what else the folder holds."""
    names = sorted(os.listdir(folder))
    if not names:
        return None
    foreign = [name for name in names if name not in SAVED_MODEL_ENTRIES]
    variables = os.path.join(folder, "variables")
    if os.path.isdir(variables):
        foreign += [f"variables/{name}" for name in sorted(os.listdir(variables))
                    if not _VARIABLES_FILE.match(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"a folder holding {shown}, not a SavedModel"
    if not os.path.isfile(os.path.join(folder, "saved_model.pb")) and not os.path.isfile(
            os.path.join(folder, "saved_model.pbtxt")):
        return f"a folder holding {', '.join(names)} but no saved_model.pb, not a SavedModel"
    return None


def _foreign_litert(path):
    """None for a file with LiteRT's FlatBuffer identifier; else what the file is."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[4:8] == LITERT_IDENTIFIER:
        return None
    return f"a file of {os.path.getsize(path):,} bytes that is not a LiteRT model (no TFL3 identifier)"


def _foreign_onnx(path):
    """None for a file that parses as an ONNX model with a graph; else what the file is."""
    problem = _onnx_problem(path)
    if problem is None:
        return None
    return f"a file of {os.path.getsize(path):,} bytes that is not an ONNX model ({problem})"


def _onnx_problem(path):
    """None when `path` parses as an ONNX ModelProto with a graph; else what is wrong."""
    import onnx  # pylint: disable=import-outside-toplevel

    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError, or others for odd bytes)
        return "it does not parse as an ONNX ModelProto"
    if not model.HasField("graph") or not model.graph.node or not model.graph.output:
        return "an ONNX ModelProto without a graph"
    return None


def _tensorflow_reason(message):
    """`File too large` from `{{function_node ...}} <file>; File too large [Op:SaveV2]`."""
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", " ", first_line(message))
    return message.rsplit("; ", 1)[-1].strip()


def load_model(path, *, unsafe=False):
    """Loads a `.keras` model in Keras' safe mode, without compiling it.

    Args:
      path: a `.keras` file.
      unsafe: allow files that carry code (Lambda layers); only for files you
        trust.

    Raises:
      ModelFileError: one line naming the problem (missing file, not a Keras
        model file, or refused because it carries code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ModelFileError(f"Not a Keras model file (.keras archive): {path}")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except ValueError as error:
        if "safe_mode" in str(error) or "lambda" in str(error).lower():
            raise ModelFileError(
                f"Refusing to load {path}: it carries code (e.g. a Lambda layer); "
                "pass --unsafe_load only if you trust it."
            ) from None
        raise ModelFileError(f"Cannot load {path} as a Keras model: {first_line(error)}") from None
    except Exception as error:  # corrupt archives fail in many ways
        raise ModelFileError(f"Cannot load {path} as a Keras model: {first_line(error)}") from None
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not a keras.Model.")
    return model


def check_litert_file(path):
    """Raises `ModelFileError` (one line) unless `path` is a whole LiteRT (.tflite) model.

    The LiteRT runtime trusts the file: a truncated or foreign one can crash
    the process (SIGSEGV). Here it is read in Python first, through the
    generated FlatBuffer schema (every table, vector and buffer, bounds
    checked), mapped rather than copied: a few milliseconds per megabyte.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if handle.read(8)[4:8] != LITERT_IDENTIFIER:
            raise ModelFileError(f"Not a LiteRT model (no TFL3 identifier at bytes 4-8): {path}")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as content:
            problem = _litert_problem(content, size)
    if problem:
        raise ModelFileError(f"Damaged or truncated LiteRT model {path} ({size:,} bytes): {problem}")


def _litert_problem(content, size):
    """What is wrong with a LiteRT FlatBuffer's structure, or None."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel

    try:
        model = schema.ModelT.InitFromPackedBuf(content, 0)
    except Exception:  # noqa: BLE001 (struct.error, ValueError, IndexError past the end)
        return "its tables point past its end"
    try:
        for buffer in model.buffers or []:
            if (buffer.offset or 0) > 1 and buffer.offset + buffer.size > size:
                return f"a weight buffer lies at bytes {buffer.offset:,}-{buffer.offset + buffer.size:,}"
        graph = model.subgraphs[0] if model.subgraphs else None
        if graph is None or _empty(graph.inputs) or _empty(graph.outputs):
            return "it has no graph with inputs and outputs"
    finally:
        del model  # release the views into `content` before it is closed
    return None


def _empty(vector):
    """Whether a FlatBuffer vector (None, a list or a numpy array) has no entries."""
    return vector is None or len(vector) == 0


def check_onnx_file(path):
    """Raises `ModelFileError` (one line) unless `path` parses as an ONNX model with a graph.

    Needs the `onnx` package; without it nothing is checked here (onnxruntime
    then reports a damaged file with an exception of its own).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: {path}")
    try:
        import onnx  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return
    problem = _onnx_problem(path)
    if problem:
        raise ModelFileError(f"Damaged or not an ONNX model: {path} ({problem})")


def check_saved_model(path):
    """Raises `ModelFileError` (one line) unless `path` is a folder with a readable saved_model.pb.

    Its `saved_model.pb` must parse as a SavedModel protocol buffer holding a
    MetaGraph, and its variables index must be there when it has variables.
    """
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    graph_file = os.path.join(path, "saved_model.pb")
    if not os.path.isfile(graph_file):
        if os.path.isfile(os.path.join(path, "saved_model.pbtxt")):
            return
        raise ModelFileError(f"Not a SavedModel folder (no saved_model.pb): {path}")
    with open(graph_file, "rb") as handle:
        content = handle.read()
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(content)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError)
        raise ModelFileError(f"Damaged or not a SavedModel: {graph_file} ({len(content):,} bytes) does "
                             "not parse as a SavedModel protocol buffer") from None
    if not saved_model.meta_graphs:
        raise ModelFileError(f"Damaged or not a SavedModel: {graph_file} ({len(content):,} bytes) "
                             "holds no MetaGraph")
    variables = os.path.join(path, "variables")
    if os.path.isdir(variables) and os.listdir(variables) and not os.path.isfile(
            os.path.join(variables, "variables.index")):
        raise ModelFileError(f"Damaged SavedModel {path}: variables/variables.index is missing")


# -- persistence: the NTLs of a run, beside their shapes -----------------------


class TranslatorBank(keras.Model):
    """The NTLs of a distiller, as one model so their weights save together."""

    def __init__(self, translators, **kwargs):
        super().__init__(**kwargs)
        self.translators = list(translators)
        self.built = True


def save_translators(distiller, path):
    """Writes the NTLs' weights and, beside them, the shapes to rebuild them."""
    bank = TranslatorBank(distiller.translators)
    save_weights(bank, path)
    spec = [
        {
            "input_shape": list(distiller.student_feature_shape),
            "config": translator.get_config(),
        }
        for translator in distiller.translators
    ]
    files.write_json(path.replace(".weights.h5", ".json"), spec)


def load_translators(path):
    """Rebuilds the NTLs saved by `save_translators` and loads their weights."""
    spec_path = path.replace(".weights.h5", ".json")
    if not (os.path.isfile(path) and os.path.isfile(spec_path)):
        raise ValueError(f"No saved NTLs at {path} (and {os.path.basename(spec_path)}).")
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    translators = []
    for entry in spec:
        translator = translators_lib.Translator.from_config(entry["config"])
        translator.build((None,) + tuple(entry["input_shape"]))
        translators.append(translator)
    TranslatorBank(translators).load_weights(path)
    return translators
