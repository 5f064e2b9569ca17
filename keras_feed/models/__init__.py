"""Model zoo of keras-feed: teachers and students for FEED distillation.

Usage::

    from keras_feed import models
    model = models.build("resnet56", input_shape=(32, 32, 3), num_classes=100,
                         seed=0)
    features = model.get_layer("features").output   # (None, 8, 8, 64)

API:

* :func:`build` ``(name, *, input_shape, num_classes, seed=None, mean=None,
  std=None)`` returns a functional ``keras.Model`` named after the
  architecture, mapping channels-last images to float32 logits
  ``(batch, num_classes)`` (no
  softmax; float32 also under a ``mixed_float16`` policy). Every model has a
  layer named ``"features"`` (a ``ReLU`` layer) whose output is the final
  feature map ``(batch, H, W, C)`` before global average pooling; it is
  followed by ``GlobalAveragePooling2D`` and ``Dense(num_classes)``. Under
  a mixed-precision policy the features are float16. ``seed`` makes the
  initial weights reproducible (see :func:`build`). Unknown names raise
  ``ValueError`` listing the known names. With ``mean`` and ``std`` (the
  dataset's, in [0, 1] units) the model takes raw pixels in [0, 255] and
  normalises them in its first layer, ``"preprocessing"``
  (:mod:`.preprocessing`); every model keras-feed trains is built so.
* :func:`names` sorted list of the registered names and the common members
  of the parametric families; :func:`families` the family patterns.
* :func:`register` ``(name)`` decorator adding a builder
  ``fn(input_shape, num_classes) -> keras.Model``.

Architectures (``features`` shape on 32x32 / 224x224 inputs):

* CIFAR ResNets ``resnet8/14/20/32/44/56/110`` (16/32/64 channels, 8x8x64),
  ``resnet8x4``, ``resnet32x4`` (8x8x256); projection shortcuts
  (:mod:`.resnet_cifar`).
* Wide ResNets ``wrn_<depth>_<width>``, any ``(depth - 4) % 6 == 0``
  (8x8x(64 width)) (:mod:`.wide_resnet`).
* CIFAR ResNeXt ``resnext29_<cardinality>x<width>d`` (8x8x1024)
  (:mod:`.resnext`).
* ImageNet ResNets ``resnet18/34`` (7x7x512), ``resnet50/101/152``
  (7x7x2048) (:mod:`.resnet_imagenet`).
* ``small_cnn`` / ``small_cnn_slim`` / ``small_cnn_wide`` for 28x28x1 (7x7x128 /
  7x7x64 / 7x7x256)
  (:mod:`.small`).

All models use only built-in Keras layers: they save to ``.keras`` and load
back with ``keras.models.load_model(path, safe_mode=True)`` without
importing keras-feed. Conventions (BN momentum/epsilon, initialisers,
padding) are described in :mod:`keras_feed.models.common`.
"""

from keras_feed.models import preprocessing
from keras_feed.models.common import FEATURES_LAYER
from keras_feed.models.registry import (
    build,
    families,
    get_builder,
    names,
    register,
    register_family,
)

# Importing the architecture modules registers their builders, in this order.
from keras_feed.models import resnet_cifar  # noqa: E402,F401,I001
from keras_feed.models import wide_resnet  # noqa: E402,F401,I001
from keras_feed.models import resnext  # noqa: E402,F401,I001
from keras_feed.models import resnet_imagenet  # noqa: E402,F401,I001
from keras_feed.models import small  # noqa: E402,F401,I001

__all__ = [
    "FEATURES_LAYER",
    "build",
    "families",
    "get_builder",
    "names",
    "preprocessing",
    "register",
    "register_family",
]
