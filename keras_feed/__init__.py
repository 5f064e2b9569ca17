"""keras-feed: feature-level ensemble knowledge distillation (FEED) for Keras 3.

The main entry points:

- `FEEDDistiller`: a `keras.Model` that trains a student from frozen teachers
  through parallel non-linear transformation layers (NTLs).
- `keras_feed.models.build(name, input_shape=..., num_classes=...)`: the model zoo.
- `keras_feed.data.load(name, ...)`: tf.data pipelines.
- `keras_feed.losses`: `feed_loss`, `kd_loss`, `ft_loss`.
- `keras_feed.experiment.run(TrainConfig(...))`: a whole run, as the CLI does it.

TensorFlow is imported on first use of these names, so that the command-line
tools can set up logging before it loads.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FEEDDistiller": ("keras_feed.distiller", "FEEDDistiller"),
    "Translator": ("keras_feed.translators", "Translator"),
    "feed_loss": ("keras_feed.losses", "feed_loss"),
    "TrainConfig": ("keras_feed.experiment", "TrainConfig"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'keras_feed' has no attribute '{name}'")
