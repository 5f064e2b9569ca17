"""TensorFlow only where it is used: the settings, the checkpoint format and the IDX /
NumPy data path import where TensorFlow cannot be (on JAX), and the settings and the
IDX reader import no Keras at all."""

import os
import subprocess
import sys

from conftest import WITHOUT_TENSORFLOW_PRELUDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, **environment):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={**os.environ, **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_settings_checkpoints_and_numpy_data_import_where_tensorflow_cannot():
    code = WITHOUT_TENSORFLOW_PRELUDE + """
from keras_feed.run import checkpointing, config, run_folder
from keras_feed.data import arrays, idx
settings = run_folder.comparable_settings(config.TrainConfig(dataset="synthetic"))
assert settings["dataset"] == "synthetic" and checkpointing.FORMAT
print(sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow"))
"""
    assert run(code, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu") == "[]"


def test_settings_and_the_idx_reader_import_no_keras():
    code = """
import sys
from keras_feed.run import config
from keras_feed.data import idx, idx_source
config.TrainConfig(method="ce", epochs=3)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("keras", "tensorflow")))
"""
    assert run(code) == "[]"
