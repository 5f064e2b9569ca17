"""The commands' outputs: what they may replace, and model files checked before a runtime reads them.

`keras-feed-export` and `keras-feed-analyze` replace only what they wrote
themselves (an earlier export, an earlier report): anything else at the output
is refused with one line and exit 1 unless `--overwrite`, and files beside the
output are never touched. `keras-feed-eval` gives one line and exit 1 for a
truncated or foreign `.tflite`, `.onnx` or SavedModel, never a crash.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from keras_feed.run import files, runner
from keras_feed.run.config import TrainConfig

pytestmark = [
    pytest.mark.slow,  # end to end, in subprocesses (outside the fast tier)
    pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning"),  # tf2onnx
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("tf2onnx", "onnx", "onnxruntime"))
#: What the foreign files at and beside an output hold.
FOREIGN = b"the user's own notes, not a model\n"
BESIDE = b"a file beside the output\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny pFEED run (one teacher): student.keras, export/, NTLs and metrics.json."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    runner.run(TrainConfig(
        method="pfeed", num_teachers=1, dataset="synthetic", model="resnet8", train_examples=64,
        batch_size=32, epochs=1, teacher_epochs=1, learning_rate=0.05, eval_batch_size=64,
        verbose=0, model_dir=model_dir,
    ))
    return model_dir


def command(module, *arguments):
    """Runs `python -m keras_feed.<module> arguments...`: the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", f"keras_feed.cli.{module}", *arguments],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


_CHATTER = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d\d"  # TensorFlow's C++ log lines
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions:"
    r"|\S+:\d+: \w*Warning: |\s)"  # Python warnings and the source lines they quote
)


def said(stderr):
    """The lines of `stderr` that the command itself wrote (not libraries' start-up chatter)."""
    return [line for line in stderr.splitlines() if line.strip() and not _CHATTER.match(line)]


def assert_refused(result, program, *named):
    """Exit 1 with exactly one error line naming each of `named`, and no crash."""
    lines = said(result.stderr)
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    for text in named:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr


def plant(path, content=FOREIGN):
    with open(path, "wb") as handle:
        handle.write(content)


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


# -- keras-feed-export: its formats, and it never deletes what the user did not name ----


#: The formats this machine can export and run, from their one definition.
FORMATS = [name for name in files.EXPORT_FORMATS if name != "onnx" or HAS_ONNX]
EXPORTS = [(name, {"tf_saved_model": "served", "litert": "served.tflite", "onnx": "served.onnx"}[name])
           for name in FORMATS]


def test_export_offers_the_formats_storage_defines():
    """`--format`'s choices and help are `files.EXPORT_FORMATS`; `--help` loads no Keras."""

    result = subprocess.run([sys.executable, "-m", "keras_feed.cli.export", "--help"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # absl wraps the help at 80 columns
    assert f"--format: <{'|'.join(files.EXPORT_FORMATS)}>: Export format: " in text, result.stdout
    for name, what in files.EXPORT_FORMATS.items():
        assert f"{name}, {what}" in text, name
    imported = set(re.findall(r"^import time:.*\|\s+([\w.]+)$", result.stderr, re.MULTILINE))
    assert "keras_feed.cli.common" in imported and not {"keras", "tensorflow"} & imported
    refused = command("export", "--student=student.keras", "--output=served", "--format=pickle")
    assert_refused(refused, "keras-feed-export", "--format", *files.EXPORT_FORMATS)


@pytest.mark.parametrize("export_format,name", EXPORTS)
def test_export_refuses_a_foreign_output_then_overwrites_it(run_dir, tmp_path, export_format, name):
    output, beside = tmp_path / name, tmp_path / "beside.txt"
    plant(beside, BESIDE)
    if export_format == "tf_saved_model":  # a folder of the user's files
        output.mkdir()
        plant(output / "keep.txt")
        foreign = output / "keep.txt"
    else:
        plant(output)
        foreign = output
    arguments = [f"--student={run_dir}/student.keras", f"--format={export_format}", f"--output={output}"]

    refused = command("export", *arguments)
    assert_refused(refused, "keras-feed-export", str(output), "--overwrite")
    assert read(foreign) == FOREIGN and read(beside) == BESIDE
    assert sorted(os.listdir(tmp_path)) == sorted([name, "beside.txt"])

    replaced = command("export", *arguments, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    if export_format == "tf_saved_model":
        assert "saved_model.pb" in os.listdir(output) and not os.path.exists(foreign)
    else:
        assert read(output) != FOREIGN
    assert read(beside) == BESIDE
    assert sorted(os.listdir(tmp_path)) == sorted([name, "beside.txt"])  # nothing left over
    first = _export_signature(output)

    again = command("export", *arguments)  # its own earlier export: replaced without --overwrite
    assert again.returncode == 0, again.stderr
    assert read(beside) == BESIDE
    assert sorted(os.listdir(tmp_path)) == sorted([name, "beside.txt"])
    assert _export_signature(output) != first  # a new export, not the old one left in place


def _export_signature(path):
    """The inode and modification time of an export (its saved_model.pb for a folder)."""
    target = os.path.join(path, "saved_model.pb") if os.path.isdir(path) else path
    info = os.stat(target)
    return info.st_ino, info.st_mtime_ns


def test_export_refuses_a_file_where_the_saved_model_folder_goes(run_dir, tmp_path):
    output = tmp_path / "served"
    plant(output)
    result = command("export", f"--student={run_dir}/student.keras", f"--export_dir={output}")
    assert_refused(result, "keras-feed-export", str(output), "a file")
    assert read(output) == FOREIGN and os.listdir(tmp_path) == ["served"]


# -- keras-feed-analyze: only analysis.json and reconstruction_error.png ------------------


@pytest.mark.parametrize("name,content", [
    ("analysis.json", b'{"my": "settings"}\n'),
    ("reconstruction_error.png", b"GIF89a, not a PNG"),
])
def test_analyze_refuses_a_foreign_output_file_then_overwrites_it(run_dir, tmp_path, name, content):
    output_dir = tmp_path / "analysis"
    output_dir.mkdir()
    plant(output_dir / name, content)
    plant(output_dir / "beside.txt", BESIDE)
    arguments = [f"--runs={run_dir}", "--dataset=synthetic", "--max_examples=32",
                 f"--output_dir={output_dir}"]

    refused = command("analyze", *arguments)
    assert_refused(refused, "keras-feed-analyze", str(output_dir / name), "--overwrite")
    assert read(output_dir / name) == content and read(output_dir / "beside.txt") == BESIDE
    assert sorted(os.listdir(output_dir)) == sorted([name, "beside.txt"])

    replaced = command("analyze", *arguments, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert read(output_dir / name) != content
    assert read(output_dir / "beside.txt") == BESIDE
    assert read(output_dir / "reconstruction_error.png").startswith(b"\x89PNG\r\n\x1a\n")
    report = read(output_dir / "analysis.json")

    again = command("analyze", *arguments)  # its own earlier report: replaced without --overwrite
    assert again.returncode == 0, again.stderr
    assert read(output_dir / "beside.txt") == BESIDE
    assert sorted(os.listdir(output_dir)) == ["analysis.json", "beside.txt", "reconstruction_error.png"]
    assert b'"runs"' in read(output_dir / "analysis.json") and report


# -- keras-feed-eval: damaged model files are one line, never a crash --------------------


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The run's student as a SavedModel (the run's own export/), a .tflite and an .onnx."""
    from keras_feed.run import storage

    folder = tmp_path_factory.mktemp("exports")
    student = storage.load_model(os.path.join(run_dir, "student.keras"))
    paths = {"tf_saved_model": os.path.join(run_dir, "export"), "litert": str(folder / "s.tflite")}
    storage.export_model(student, paths["litert"], "litert")
    if HAS_ONNX:
        paths["onnx"] = str(folder / "s.onnx")
        storage.export_model(student, paths["onnx"], "onnx")
    return paths


def damaged_copy(source, folder, damage):
    """A copy of the export `source` in `folder`, truncated or replaced by a foreign file.

    For a SavedModel folder, its saved_model.pb is damaged: the path returned
    is the folder, and the damaged file is `<folder>/saved_model.pb`.
    """
    target = os.path.join(folder, os.path.basename(source))
    if os.path.isdir(source):
        shutil.copytree(source, target)
        model_file = os.path.join(target, "saved_model.pb")
    else:
        shutil.copyfile(source, target)
        model_file = target
    plant(model_file, read(model_file)[:1000] if damage == "truncated" else FOREIGN)
    return target, model_file


DAMAGES = ["truncated", "foreign"]


@pytest.fixture(scope="module")
def damaged_evals(exports, tmp_path_factory):
    """`keras-feed-eval` on every damaged file, run side by side: {(format, damage): (result, file)}."""
    started = {}
    for model_format in FORMATS:
        for damage in DAMAGES:
            folder = str(tmp_path_factory.mktemp(f"{model_format}_{damage}"))
            path, model_file = damaged_copy(exports[model_format], folder, damage)
            process = subprocess.Popen(
                [sys.executable, "-m", "keras_feed.cli.evaluate", f"--model_path={path}", "--dataset=synthetic",
                 "--batch_size=64"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            started[model_format, damage] = process, model_file
    results = {}
    for key, (process, model_file) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), model_file
    return results


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("model_format", FORMATS)
def test_eval_names_a_damaged_model_file(damaged_evals, model_format, damage):
    result, model_file = damaged_evals[model_format, damage]
    assert_refused(result, "keras-feed-eval", model_file)
    assert result.stdout == ""


LOAD_PREDICTOR = """
import sys
from keras_feed.run import serving
from keras_feed.run import storage
try:
    serving.load_predictor(sys.argv[1])
except storage.ModelFileError as error:
    print(error)
"""


def test_load_predictor_names_a_truncated_litert_file(exports, tmp_path):
    path, _ = damaged_copy(exports["litert"], str(tmp_path), "truncated")
    result = subprocess.run([sys.executable, "-c", LOAD_PREDICTOR, path], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)  # a child: a crash must not end the test session
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert path in line and "truncated" in line
