"""Serving what a run writes: raw uint8 images in, the accuracy of metrics.json out.

A tiny real run on an IDX dataset of 16x16 RGB images (3 channels with their own
statistics, a partial last test batch), then its student as `student.keras`,
as the SavedModel `export/`, as LiteRT and as ONNX, fed the test images exactly
as the IDX file holds them (uint8); `keras-feed-eval` on each format; models
without keras-feed's normalisation, which are fed raw pixels as they are; and
teacher files that expect normalised images (`--teacher_preprocessing=dataset`),
in training and in the analysis of the run.
"""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_feed import data
from keras_feed.core import frozen
from keras_feed.models import preprocessing
from keras_feed.run import analysis, runner, serving, storage
from keras_feed.run.config import TrainConfig

pytestmark = [
    pytest.mark.slow,  # end to end, in subprocesses (outside the fast tier)
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning"),  # tf2onnx
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST, SIDE, CLASSES = 256, 100, 16, 4
# Per-channel brightness and spread, far from the [0, 1] defaults.
CHANNEL_MEAN, CHANNEL_SPREAD = np.array([60.0, 128.0, 190.0]), np.array([20.0, 40.0, 15.0])


def write_idx(path, array):
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def make_images(count, rng):
    """Class k: a faintly brighter quadrant k over per-channel noise; uint8 (N, H, W, 3).

    Faint enough that the tiny run gets some of the test images wrong.
    """
    labels = rng.integers(0, CLASSES, size=count)
    images = rng.normal(CHANNEL_MEAN, CHANNEL_SPREAD, size=(count, SIDE, SIDE, 3))
    half = SIDE // 2
    for index, label in enumerate(labels):
        top, left = half * (label // 2), half * (label % 2)
        images[index, top:top + half, left:left + half] += 20.0
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(7)
    arrays = {}
    for prefix, count in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = make_images(count, rng)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    return str(folder), arrays


SETTINGS = dict(
    dataset="idx", model="resnet8", batch_size=16, epochs=2, teacher_epochs=2, learning_rate=0.05,
    eval_batch_size=64, verbose=0,
)


@pytest.fixture(scope="module")
def run(idx_dir, tmp_path_factory):
    """A finished pFEED run (one teacher trained by it): `(model_dir, metrics)`."""
    folder, _ = idx_dir
    model_dir = str(tmp_path_factory.mktemp("run"))
    config = TrainConfig(method="pfeed", num_teachers=1, data_dir=folder,
                                    model_dir=model_dir, **SETTINGS)
    runner.run(config)
    with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as handle:
        return model_dir, json.load(handle)


def stored_test_split(idx_dir):
    """The test split as stored (uint8 (N, H, W, C)) and its labels."""
    images, labels = idx_dir[1]["t10k"]
    return images, labels.astype(np.int64)


def accuracy(outputs, labels):
    return float(np.mean(np.argmax(outputs, axis=1) == labels))


def strip_preprocessing(model):
    """`model` without its preprocessing layer: a network taking normalised images."""
    layer = preprocessing.find(model)
    assert layer is not None

    def call(operation, *args, **kwargs):
        return args[0] if operation is layer else operation(*args, **kwargs)

    stripped = keras.models.clone_model(model, clone_function=lambda op: op, call_function=call)
    assert preprocessing.find(stripped) is None
    return stripped


def run_litert(path, images):
    interpreter = tf.lite.Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]
    assert source["dtype"] == np.uint8 and list(source["shape_signature"]) == [-1, SIDE, SIDE, 3]
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def run_onnx(path, images):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (source,) = session.get_inputs()
    assert source.type == "tensor(uint8)" and source.shape[1:] == [SIDE, SIDE, 3]
    return session.run(None, {source.name: images})[0]


# -- what a run writes -----------------------------------------------------------------


def test_metrics_record_the_input(run, idx_dir):
    _, metrics = run
    train_images = idx_dir[1]["train"][0].astype(np.float64) / 255.0
    recorded = metrics["input"]
    assert recorded["image_shape"] == [SIDE, SIDE, 3]
    assert recorded["dtype"] == "uint8 or float32 pixels in [0, 255]"
    np.testing.assert_allclose(recorded["mean"], train_images.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(recorded["std"], train_images.std(axis=(0, 1, 2)), rtol=1e-6)
    assert recorded["augmentation"] == "zero-pad 2 + random 16x16 crop"  # IDX data: no flip
    assert recorded["teacher_preprocessing"] == "auto"


def test_student_and_export_reproduce_the_metrics_on_uint8_images(run, idx_dir):
    model_dir, metrics = run
    images, labels = stored_test_split(idx_dir)
    expected = metrics["student"]["test_accuracy"]
    assert 0.3 < expected  # it learnt something: the predictions are not one class

    student = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    assert student.layers[1].name == "preprocessing"
    logits = student.predict(images, batch_size=64, verbose=0)
    assert accuracy(logits, labels) == pytest.approx(expected, abs=1e-6)

    export_dir = os.path.join(model_dir, "export")
    signature = tf.saved_model.load(export_dir).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, SIDE, SIDE, 3]
    served = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")(images)
    served = next(iter(served.values())).numpy() if isinstance(served, dict) else served.numpy()
    assert accuracy(served, labels) == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(served, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("export_format", ["litert", "onnx"])
def test_litert_and_onnx_exports_match_keras_on_uint8_images(run, idx_dir, tmp_path, export_format):
    if export_format == "onnx":
        pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install onnx tf2onnx)")
    model_dir, metrics = run
    images, labels = stored_test_split(idx_dir)
    student = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    expected = student.predict(images, batch_size=64, verbose=0)
    path = str(tmp_path / ("student.tflite" if export_format == "litert" else "student.onnx"))
    storage.export_model(student, path, export_format)
    outputs = (run_litert if export_format == "litert" else run_onnx)(path, images)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    assert accuracy(outputs, labels) == pytest.approx(metrics["student"]["test_accuracy"], abs=1e-6)


def test_export_refuses_a_file_name_of_another_format(run, tmp_path):
    student = keras.models.load_model(os.path.join(run[0], "student.keras"))
    with pytest.raises(ValueError, match=r"litert export is a file ending in \.tflite"):
        storage.export_model(student, str(tmp_path / "student.onnx"), "litert")


# -- keras-feed-eval on every format, logits and probabilities ---------------------------


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """The run's student in every format, with logits and behind a softmax head."""
    model_dir, _ = run
    folder = tmp_path_factory.mktemp("exports")
    student = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    softmax = keras.Model(student.input, keras.layers.Softmax(name="probabilities")(student.output))
    paths = {}
    for head, model in (("logits", student), ("probabilities", softmax)):
        paths[head, "keras"] = str(folder / f"{head}.keras")
        storage.save_model(model, paths[head, "keras"])
        paths[head, "tf_saved_model"] = str(folder / f"{head}_export")
        storage.export_model(model, paths[head, "tf_saved_model"])
        paths[head, "litert"] = str(folder / f"{head}.tflite")
        storage.export_model(model, paths[head, "litert"], "litert")
    if importlib_available("tf2onnx") and importlib_available("onnxruntime"):
        for head, model in (("logits", student), ("probabilities", softmax)):
            paths[head, "onnx"] = str(folder / f"{head}.onnx")
            storage.export_model(model, paths[head, "onnx"], "onnx")
    return paths


def importlib_available(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_eval_reads_every_format_with_either_head(run, idx_dir, exports):
    _, metrics = run
    test_split = data.load("idx", data_dir=idx_dir[0]).test(64)
    results = {}
    for (head, model_format), path in sorted(exports.items()):
        predictor = serving.load_predictor(path)
        result = serving.evaluate(predictor, test_split)
        assert (predictor.format, predictor.head) == (model_format, head), path
        assert result["examples"] == N_TEST
        assert result["accuracy"] == pytest.approx(metrics["student"]["test_accuracy"], abs=1e-6), path
        results[head, model_format] = result["loss"]
    # The same cross-entropy from logits and from probabilities, in every format.
    reference = results["logits", "keras"]
    assert 0 < reference < 10
    for key, loss in results.items():
        assert loss == pytest.approx(reference, rel=1e-4), key
    assert {"keras", "tf_saved_model", "litert"} <= {key[1] for key in results}


def test_eval_command_on_a_litert_file(run, idx_dir, exports):
    _, metrics = run
    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.cli.evaluate", f"--model_path={exports['probabilities', 'litert']}",
         "--dataset=idx", f"--data_dir={idx_dir[0]}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["format"], report["head"], report["examples"]) == ("litert", "probabilities", N_TEST)
    assert report["accuracy"] == pytest.approx(metrics["student"]["test_accuracy"], abs=1e-6)


def test_export_command_writes_onnx(run, idx_dir, tmp_path):
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install onnx tf2onnx)")
    model_dir, metrics = run
    output = str(tmp_path / "student.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "keras_feed.cli.export", f"--student={model_dir}/student.keras",
         "--format=onnx", f"--output={output}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "takes uint8 images (N, 16, 16, 3)" in result.stdout
    images, labels = stored_test_split(idx_dir)
    assert accuracy(run_onnx(output, images), labels) == pytest.approx(
        metrics["student"]["test_accuracy"], abs=1e-6)


# -- models without keras-feed's normalisation ------------------------------------------


def test_eval_feeds_raw_pixels_to_any_model(run, idx_dir, tmp_path):
    """A model without the layer, and an export taking float32, get raw pixels as they are."""
    model_dir, metrics = run
    student = keras.models.load_model(os.path.join(model_dir, "student.keras"))
    stripped = strip_preprocessing(student)
    path = str(tmp_path / "stripped.keras")
    stripped.save(path)
    images, _ = stored_test_split(idx_dir)
    predictor = serving.load_predictor(path)
    np.testing.assert_allclose(predictor(images[:8]), stripped.predict(images[:8].astype(np.float32), verbose=0),
                               rtol=1e-5, atol=1e-5)
    # Keras' own export takes float32: raw pixels, which the student normalises itself.
    export_dir = str(tmp_path / "float32_export")
    student.export(export_dir, format="tf_saved_model", verbose=False)
    predictor = serving.load_predictor(export_dir)
    assert predictor.input_dtype == "float32"
    result = serving.evaluate(predictor, data.load("idx", data_dir=idx_dir[0]).test(64))
    assert result["accuracy"] == pytest.approx(metrics["student"]["test_accuracy"], abs=1e-6)


# -- teacher files that expect normalised images: --teacher_preprocessing=dataset --------


@pytest.fixture(scope="module")
def normalised_teacher(run, tmp_path_factory):
    """The run's teacher without its preprocessing layer, as a model trained elsewhere may be."""
    _, metrics = run
    path = str(tmp_path_factory.mktemp("external") / "teacher.keras")
    strip_preprocessing(keras.models.load_model(metrics["teacher_paths"][0])).save(path)
    return path


def test_a_teacher_file_without_the_layer_needs_its_input_convention(run, idx_dir, normalised_teacher, tmp_path):
    _, metrics = run
    settings = dict(SETTINGS, epochs=1, data_dir=idx_dir[0], teachers=(normalised_teacher,))
    refused = tmp_path / "refused"
    with pytest.raises(ValueError) as error:
        runner.run(TrainConfig(method="pfeed", model_dir=str(refused), **settings))
    message = str(error.value)
    assert "\n" not in message and normalised_teacher in message
    assert "--teacher_preprocessing=dataset" in message and "--teacher_preprocessing=none" in message
    assert not refused.exists()

    plan = runner.run(TrainConfig(
        method="pfeed", model_dir=str(tmp_path / "plan"), teacher_preprocessing="dataset",
        dry_run=True, **settings))["plan"]
    assert any(line.startswith("input: raw pixels 16x16x3 in [0, 255]") and
               "augmentation: zero-pad 2 + random 16x16 crop" in line for line in plan), plan
    assert any("from files (--teacher_preprocessing=dataset)" in line for line in plan), plan

    wrapped_dir = tmp_path / "wrapped"
    wrapped = runner.run(TrainConfig(
        method="pfeed", model_dir=str(wrapped_dir), teacher_preprocessing="dataset", **settings))
    # The file with the dataset's normalisation added is the original teacher.
    assert wrapped["teachers"][0]["test_accuracy"] == metrics["teachers"][0]["test_accuracy"]
    assert wrapped["teachers"][0]["test_top5_accuracy"] == metrics["teachers"][0]["test_top5_accuracy"]
    assert wrapped["input"]["teacher_preprocessing"] == "dataset"

    # The analysis of that run gives the file the normalisation its metrics.json records.
    parts = analysis.RunParts(str(wrapped_dir))
    assert parts.teacher_paths == [normalised_teacher]
    images = stored_test_split(idx_dir)[0][:8].astype(np.float32)
    original = frozen.extractor(keras.models.load_model(metrics["teacher_paths"][0]), "features")
    np.testing.assert_allclose(parts.teachers[0](images, training=False)[-1],
                               original(images, training=False)[-1], rtol=1e-4, atol=1e-4)


STUDY_TEACHERS = os.path.join(ROOT, "benchmarks", "results", "fashion_mnist_teachers")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not glob.glob(os.path.join(FASHION_MNIST, "t10k-images*")),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_study_teachers_keep_their_recorded_accuracy():
    """The committed study teachers, migrated: they take raw pixels through their own
    normalisation layer, and give the accuracy the study recorded."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fashion_mnist_study as study

    with open(os.path.join(ROOT, "benchmarks", "results", "fashion_mnist.json"), encoding="utf-8") as handle:
        recorded = json.load(handle)["teachers"][0]
    fashion = data.load("fashion_mnist", data_dir=FASHION_MNIST,
                        train_examples=study.RECIPE["train_examples"],
                        subset_seed=study.RECIPE["subset_seed"])
    teacher = storage.load_model(os.path.join(STUDY_TEACHERS, "teacher_0.keras"))
    assert preprocessing.find(teacher) is not None
    # Its normalisation is the one the study's runs added: the recorded statistics.
    np.testing.assert_allclose([fashion.info.mean, fashion.info.std],
                               [recorded["migration"]["mean"], recorded["migration"]["std"]],
                               rtol=1e-6)
    recorded = recorded["test_accuracy"]
    labels = np.concatenate([y.numpy() for _, y in fashion.test(500)])
    logits = teacher.predict(fashion.test(500).map(lambda x, y: x), verbose=0)
    assert accuracy(logits, labels) == pytest.approx(recorded, abs=1e-6)
