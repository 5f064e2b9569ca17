"""A training run, as `keras-feed-train` does it: settings, stages, files, devices.

- `config`: `TrainConfig`, the one source of a run's settings (the flags derive
  from it), and their checks.
- `runner`: `run(config)`, a whole run from settings to a student on disk.
- `experiment`: `Experiment`, the stages every method uses.
- `methods`: the registry of methods, one module each.
- `checkpointing`: resumable stages (`StageCheckpoint`, `fit_resumable`).
- `run_folder`: the `--model_dir`'s lock and its record of the run's settings.
- `files`: atomic writes and folder locks; `storage`: model files, exports and
  their checks, NTL files.
- `distribute`: devices and strategies (tf.distribute, keras.distribution on JAX).
- `interrupts`: Ctrl-C and SIGTERM taken at a step boundary.
- `serving`: loading a trained or exported model to score it (`load_predictor`).
- `analysis`: the reconstruction-error analysis; `summary`: the result table
  and chart; `reporting`: the run's messages.
"""

from keras_feed import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, (
    "analysis", "checkpointing", "config", "distribute", "experiment", "interrupts",
    "files", "methods", "reporting", "run_folder", "runner", "serving", "storage", "summary",
))
