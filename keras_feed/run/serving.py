"""Loading a trained or exported model to score it, whatever its format.

`load_predictor(path)` reads a `.keras` file, a SavedModel folder, a LiteRT
`.tflite` or an ONNX `.onnx` file (each checked before a native runtime reads
it) and gives a `Predictor`: raw pixels in, the model's outputs (logits or
probabilities) out. `evaluate(predictor, dataset)` scores it. `keras-feed-eval`
is these two on a dataset split.

Every model is fed raw pixels, as the data pipelines give them: a model
keras-feed writes normalises them in its own first layer, and any other model
is used as it is (one that expects normalised images needs that layer:
`keras_feed.models.preprocessing.add`).
"""

import contextlib
import os

#: Rows of an output that are non-negative and sum to 1 within this are probabilities.
PROBABILITY_TOLERANCE = 1e-3


class Predictor:
    """A loaded model: `predictor(images)` gives its outputs for raw pixels.

    `images` are float32 pixels in [0, 255], `(N, H, W, C)`, given to the
    model as they are (rounded to uint8 for an export that takes uint8); the
    outputs are a float32 numpy array `(N, classes)`. `head` is `"logits"`,
    `"probabilities"`, or None until the first outputs of an export tell.
    """

    def __init__(self, run, *, input_dtype, model_format, head=None):
        self._run = run
        self.input_dtype = input_dtype
        self.format = model_format
        self.head = head

    def __call__(self, images):
        import numpy as np

        images = np.asarray(images, np.float32)
        if self.input_dtype == "uint8":
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        outputs = np.asarray(self._run(images), np.float32)
        if self.head is None:
            sums = outputs.sum(axis=1)
            probabilities = np.all(outputs >= 0) and np.all(np.abs(sums - 1) <= PROBABILITY_TOLERANCE)
            self.head = "probabilities" if probabilities else "logits"
        return outputs


def _saved_model(path):
    import tensorflow as tf

    from keras_feed.run import storage

    storage.check_saved_model(path)
    with _loading(path, "SavedModel"):
        loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"SavedModel {path} has no serving_default signature.")
    signature = loaded.signatures["serving_default"]
    (name, spec), = signature.structured_input_signature[1].items()

    def run(images):
        outputs = signature(**{name: tf.constant(images)})
        return next(iter(outputs.values())).numpy()

    run.keep_alive = loaded  # the signature needs its object alive
    return run, spec.dtype.name


def _litert(path):
    import warnings

    from keras_feed.run import storage

    storage.check_litert_file(path)  # the runtime trusts the file: a damaged one crashes it
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings(), _loading(path, "LiteRT model"):
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter warns that it is deprecated
        interpreter = Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    shape = [None]

    def run(images):
        if shape[0] != images.shape:
            interpreter.resize_tensor_input(source["index"], images.shape)
            interpreter.allocate_tensors()
            shape[0] = images.shape
        interpreter.set_tensor(source["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    import numpy as np

    return run, np.dtype(source["dtype"]).name


def _onnx(path):
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(f"Evaluating {path} needs the onnxruntime package: pip install onnxruntime.") from None
    from keras_feed.run import storage

    storage.check_onnx_file(path)
    with _loading(path, "ONNX model"):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    dtypes = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}
    if source.type not in dtypes:
        raise ValueError(f"{path} takes {source.type}; uint8 or float32 images are needed.")

    def run(images):
        return session.run(None, {source.name: images})[0]

    return run, dtypes[source.type]


@contextlib.contextmanager
def _loading(path, what):
    """Turns a runtime's failure to load `path` into a one-line `storage.ModelFileError`."""
    from keras_feed.run import files, storage

    try:
        yield
    except storage.ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 (each runtime fails in its own way)
        raise storage.ModelFileError(
            f"Cannot load {path} as a {what}: {files.first_line(error)}") from None


def load_predictor(path, *, unsafe=False):
    """A `Predictor` for a `.keras` file, a SavedModel folder, a `.tflite` or an `.onnx` file.

    The model is fed raw pixels: float32 for a `.keras` model and for an
    export that takes float32, uint8 for one that takes uint8 (every export
    keras-feed writes).

    Args:
      path: the model.
      unsafe: allow `.keras` files that carry code.

    Raises:
      ValueError: one line naming the problem; `storage.ModelFileError` for a
        missing, truncated or foreign model file, checked before a native
        runtime reads it (a damaged `.tflite` would crash the LiteRT runtime).
    """
    path = os.fspath(path)
    if path.endswith(".keras") and not os.path.isdir(path):
        from keras_feed.core import frozen
        from keras_feed.run import storage

        model = storage.load_model(path, unsafe=unsafe)
        head = "probabilities" if frozen.head_kind(model) == "softmax" else "logits"
        return Predictor(lambda images: model(images, training=False), input_dtype="float32",
                         model_format="keras", head=head)
    if os.path.isdir(path):
        (run, dtype), model_format = _saved_model(path), "tf_saved_model"
    elif path.endswith(".tflite"):
        (run, dtype), model_format = _litert(path), "litert"
    elif path.endswith(".onnx"):
        (run, dtype), model_format = _onnx(path), "onnx"
    elif not os.path.exists(path):
        raise ValueError(f"Model not found: {path}")
    else:
        raise ValueError(f"Not a model keras-feed-eval reads (.keras, SavedModel folder, .tflite, .onnx): {path}")
    return Predictor(run, input_dtype="uint8" if dtype == "uint8" else "float32",
                     model_format=model_format)


def evaluate(predict, dataset):
    """Top-1 accuracy and mean cross-entropy of `predict` over `(images, labels)`.

    `predict` is a `Predictor` (or any `images -> logits` callable).
    """
    import numpy as np
    import tensorflow as tf

    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in dataset:
        outputs = np.asarray(predict(images), np.float32)
        labels = np.asarray(labels)
        if getattr(predict, "head", "logits") == "probabilities":
            log_probabilities = np.log(np.maximum(outputs, 1e-12))
        else:
            log_probabilities = tf.nn.log_softmax(outputs).numpy()
        correct += int(np.sum(np.argmax(outputs, axis=1) == labels))
        loss_sum -= float(np.sum(np.take_along_axis(log_probabilities, labels[:, None], axis=1)))
        total += int(labels.shape[0])
    return {"examples": total, "accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}
