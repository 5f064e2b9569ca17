"""keras-feed: feature-level ensemble knowledge distillation (FEED) for Keras 3.

    import keras_feed as kf

    data = kf.data.load("cifar100")
    student = kf.models.build("resnet20", input_shape=(32, 32, 3), num_classes=100,
                              mean=data.info.mean, std=data.info.std)
    distiller = kf.FEEDDistiller(student, teachers, beta=500.0)
    distiller.compile(optimizer="sgd", metrics=["accuracy"])

The main entry points:

- `FEEDDistiller`: a `keras.Model` that trains a student from frozen teachers
  through parallel non-linear transformation layers (NTLs).
- `kf.models.build(name, input_shape=..., num_classes=..., mean=..., std=...)`:
  the model zoo; with the dataset's mean and std a model normalises its raw
  pixel input itself (`kf.models.preprocessing`).
- `kf.data.load(name, ...)`: tf.data pipelines of raw pixels.
- `kf.losses`: `feed_loss`, `kd_loss`, `ft_loss`.
- `kf.translators`: the NTL (`Translator`) and Factor Transfer's paraphraser.
- `kf.frozen`: features by layer name or path, logits of softmax heads,
  inference twins of frozen networks.
- `kf.checkpointing.StageCheckpoint`: crash-safe, exact resume for `fit`.
- `kf.experiment.run(kf.TrainConfig(...))`: a whole run, as the CLI does it
  (`kf.config`: its settings; `kf.stages`: its stages; `kf.methods`: the methods).

Every submodule (and TensorFlow with it) is imported on first use, so that
the command-line tools can set up logging before TensorFlow loads.
"""

import importlib

__version__ = "0.2.0"

_SUBMODULES = (
    "analysis", "arrays", "checkpointing", "config", "data", "distiller", "distribute",
    "experiment", "factor_transfer", "frozen", "idx", "interrupts", "losses", "methods",
    "models", "reporting", "stages", "storage", "training_backend", "translators",
)

_NAMES = {
    "FEEDDistiller": ("keras_feed.distiller", "FEEDDistiller"),
    "Translator": ("keras_feed.translators", "Translator"),
    "feed_loss": ("keras_feed.losses", "feed_loss"),
    "TrainConfig": ("keras_feed.config", "TrainConfig"),
    "StageCheckpoint": ("keras_feed.checkpointing", "StageCheckpoint"),
}

__all__ = sorted(_NAMES) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_feed.{name}")
    if name in _NAMES:
        module_name, attribute = _NAMES[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'keras_feed' has no attribute '{name}'")


def __dir__():
    return __all__
