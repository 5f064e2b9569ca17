"""keras-feed: feature-level ensemble knowledge distillation (FEED) for Keras 3.

The main entry points:

- `FEEDDistiller`: a `keras.Model` that trains a student from frozen teachers
  through parallel non-linear transformation layers (NTLs).
- `keras_feed.models.build(name, input_shape=..., num_classes=...)`: the model zoo.
- `keras_feed.data.load(name, ...)`: tf.data pipelines.
- `keras_feed.losses`: `feed_loss`, `kd_loss`, `ft_loss`.
"""

from keras_feed.distiller import FEEDDistiller
from keras_feed.losses import feed_loss
from keras_feed.translators import Translator

__version__ = "0.1.0"

__all__ = ["FEEDDistiller", "Translator", "feed_loss", "__version__"]
