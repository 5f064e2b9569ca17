"""benchmarks/gpu_step.py on the CPU, with tiny settings: it runs, without TensorFlow, and
writes the JSON it promises.

The script runs in subprocesses on JAX (`KERAS_BACKEND` is read once, at `import
keras`): one in float32 where `import tensorflow` fails, one under mixed_bfloat16,
side by side (XLA's compilation, single-threaded, is most of their time).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import WITHOUT_TENSORFLOW_PRELUDE

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step.py")
TINY = ["--model=resnet8", "--batch_size=8", "--steps=2", "--repeats=1", "--warmup=1"]
VERSIONS = {"python", "keras", "jax", "jaxlib", "numpy", "keras_feed"}

# Runs the script (argv[1:]) as __main__ where `import tensorflow` raises ImportError,
# then says which TensorFlow modules were loaded.
WITHOUT_TENSORFLOW = WITHOUT_TENSORFLOW_PRELUDE + """
import runpy

sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    if exit.code not in (None, 0):
        raise
loaded = sorted(name for name, module in sys.modules.items() if module and name.split(".")[0] == "tensorflow")
print("tensorflow modules:", loaded)
"""


def jax_environment():
    """JAX on CPU; at XLA optimisation level 0 the tiny models compile several times faster."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_results(path, *, precision, teachers, stdout):
    payload = json.loads(path.read_text())
    settings = payload["settings"]
    assert (settings["model"], settings["teacher_model"], settings["batch_size"]) == ("resnet8", "resnet8", 8)
    assert (settings["precision"], settings["teachers"], settings["steps"]) == (precision, teachers, 2)
    assert settings["warmup"] == 1
    assert payload["device"]["platform"] == "cpu" and payload["device"]["device_kind"]
    assert set(payload["versions"]) == VERSIONS and all(payload["versions"].values()), payload["versions"]

    names = {"student", "keras_distillation", *(f"pfeed_k{k}" for k in teachers)}
    assert set(payload["results"]) == names
    for name, entry in payload["results"].items():
        assert "skipped" not in entry, (name, entry)
        assert len(entry["repeats_ms_per_step"]) == len(entry["repeats_fit_s"]) == 1
        for value in (entry["ms_per_step"], entry["images_per_s"], entry["compile_s"], entry["warmup_s"],
                      *entry["repeats_ms_per_step"], *entry["repeats_fit_s"]):
            assert positive(value), (name, entry)
        assert entry["images_per_s"] == pytest.approx(8 / (entry["ms_per_step"] / 1000))
        # The first step compiles the train step, once: nothing is compiled after it.
        assert entry["xla_compiles"]["first_step"] >= 1, entry
        assert entry["xla_compiles"]["warmup"] == entry["xla_compiles"]["timed"] == 0, entry
        assert math.isfinite(entry["last_loss"]), (name, entry)

    expected = {f"pfeed_k{k}/student" for k in teachers} | {"keras_distillation/pfeed_k1"}
    assert set(payload["ratios"]) == expected and all(positive(v) for v in payload["ratios"].values())
    ms = {name: entry["ms_per_step"] for name, entry in payload["results"].items()}
    assert payload["ratios"]["keras_distillation/pfeed_k1"] == pytest.approx(
        ms["keras_distillation"] / ms["pfeed_k1"])
    for name in names:
        assert f"\n{name} " in stdout, stdout
    assert "keras_distillation/pfeed_k1" in stdout and f"written: {path}" in stdout
    assert os.listdir(path.parent) == [path.name]  # written through a temporary file, renamed


def test_gpu_step_runs_on_jax_without_tensorflow_and_writes_its_json(tmp_path):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'keras-feed[test]' installs jax[cpu])")
    float32 = tmp_path / "new" / "folder" / "f32.json"  # folders the script creates
    bfloat16 = tmp_path / "bf16" / "bf16.json"
    runs = {
        "float32": subprocess.Popen(
            [sys.executable, "-c", WITHOUT_TENSORFLOW, SCRIPT, *TINY, "--teachers=1,2",
             "--precision=float32", f"--output={float32}"],
            cwd=ROOT, env=jax_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
        "mixed_bfloat16": subprocess.Popen(
            [sys.executable, SCRIPT, *TINY, "--teachers=1", "--image_size=16",
             "--precision=mixed_bfloat16", f"--output={bfloat16}"],
            cwd=ROOT, env=jax_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    }
    outputs = {}
    try:
        for name, process in runs.items():
            outputs[name] = process.communicate(timeout=600)
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    for name, process in runs.items():
        assert process.returncode == 0, (name, outputs[name][0][-3000:], outputs[name][1][-3000:])

    stdout = outputs["float32"][0]
    assert stdout.strip().splitlines()[-1] == "tensorflow modules: []", stdout[-2000:]
    check_results(float32, precision="float32", teachers=[1, 2], stdout=stdout)
    check_results(bfloat16, precision="mixed_bfloat16", teachers=[1], stdout=outputs["mixed_bfloat16"][0])
    assert json.loads(bfloat16.read_text())["settings"]["image_size"] == 16


def test_gpu_step_refuses_another_backend():
    result = subprocess.run(
        [sys.executable, SCRIPT], cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "gpu_step.py runs on JAX only; KERAS_BACKEND is 'tensorflow' (unset it or set it to jax)."
    ]
