"""keras-feed: feature-level ensemble knowledge distillation (FEED) for Keras 3.

    import keras_feed as kf

    data = kf.data.load("cifar100")
    student = kf.models.build("resnet20", input_shape=(32, 32, 3), num_classes=100,
                              mean=data.info.mean, std=data.info.std)
    distiller = kf.FEEDDistiller(student, teachers, beta=500.0)
    distiller.compile(optimizer="sgd", metrics=["accuracy"])

The public API:

- `FEEDDistiller`: a `keras.Model` that trains a student from frozen teachers
  through parallel non-linear transformation layers (NTLs); `Translator`: the NTL.
- `kf.losses`: `feed_loss`, `kd_loss`, `ensemble_soft_targets`.
- `kf.terms`: the distillation terms as objects (`FeatureTerm`, `KDTerm`, and
  `Term`, the base class of your own); `kf.weighting`: per-example teacher
  weights (`equal`, `confidence`, `entropy`, `agreement`).
- `kf.models.build(name, input_shape=..., num_classes=..., mean=..., std=...)`:
  the model zoo; with the dataset's mean and std a model normalises its raw
  pixel input itself (`kf.models.preprocessing`).
- `kf.data.load(name, ...)`: tf.data pipelines of raw pixels
  (`kf.data.arrays`: NumPy batches, without TensorFlow).
- `TrainConfig` and `train(config)`: a whole run, as `keras-feed-train` does it.
- `fit_resumable` and `StageCheckpoint`: crash-safe, exact resume for `fit`.
- `load_predictor`: a trained or exported model (any format) on raw images.

The layers, as folders: `kf.core` (the distiller, its losses and NTLs, frozen
teachers), `kf.data`, `kf.models`, `kf.run` (settings, stages, methods,
checkpoints, files, devices) and `kf.cli` (the four commands). Every module
(and TensorFlow with it) is imported on first use, so that importing keras-feed
loads nothing it does not need.
"""

from keras_feed import lazy

__version__ = "0.2.0"

__getattr__, __dir__, _PUBLIC = lazy.exports(
    __name__,
    ("cli", "core", "data", "models", "run"),
    {
        "FEEDDistiller": ("keras_feed.core.distiller", "FEEDDistiller"),
        "Translator": ("keras_feed.core.translators", "Translator"),
        "losses": ("keras_feed.core", "losses"),
        "terms": ("keras_feed.core", "terms"),
        "weighting": ("keras_feed.core", "weighting"),
        "TrainConfig": ("keras_feed.run.config", "TrainConfig"),
        "train": ("keras_feed.run.runner", "run"),
        "fit_resumable": ("keras_feed.run.checkpointing", "fit_resumable"),
        "StageCheckpoint": ("keras_feed.run.checkpointing", "StageCheckpoint"),
        "load_predictor": ("keras_feed.run.serving", "load_predictor"),
    },
)
__all__ = _PUBLIC + ["__version__"]
