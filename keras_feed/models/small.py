"""Small, fast CNNs for MNIST-like 28x28x1 inputs (smoke tests, CPU demos).

``small_cnn``: three 3x3 conv blocks with 32, 64 and 128 channels. The first
two blocks downsample with a 2x2 max-pool placed between the convolution and
its BN + ReLU (``Conv -> MaxPool -> BN -> ReLU``), which makes BN/ReLU and
their gradients 4x cheaper than ``Conv -> BN -> ReLU -> MaxPool`` (about 1.5x
faster training on CPU); the third block is ``Conv -> BN -> ReLU`` and its
ReLU is the ``"features"`` layer: ``(7, 7, 128)`` on 28x28 inputs
(28 -> 14 -> 7), ``(8, 8, 128)`` on 32x32. 94k parameters with 10 classes;
about 3000 training images/s (batch 128) on 2 CPU cores.

``small_cnn_slim``: 32, 64 and 64 channels, features ``(7, 7, 64)``, 57k
parameters. FEED's NTLs are three 3x3 convolutions at the feature map's width,
so on ``small_cnn`` two NTLs cost about six times the student's own FLOPs; at
64 channels, a quarter of that. The quickstart's model: FEED trains at about
1,100 images/s on 2 CPU cores instead of 300.

``small_cnn_wide``: the same as ``small_cnn`` with doubled widths (64/128/256, features
``(7, 7, 256)``), 373k parameters; a bigger teacher for ``small_cnn``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers

from keras_feed.models import common
from keras_feed.models.registry import register


def small_cnn_model(
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    *,
    widths: Sequence[int] = (32, 64, 128),
    name: str = "small_cnn",
) -> keras.Model:
    """Plain CNN: ``Conv -> MaxPool -> BN -> ReLU`` blocks, the last one
    without pooling (see the module docstring)."""
    inputs = common.model_input(input_shape)
    x = inputs
    for i, filters in enumerate(widths):
        last = i == len(widths) - 1
        x = common.conv(x, filters, 3, name=f"block{i + 1}_conv")
        if not last:
            x = layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
        x = common.bn(x, name=f"block{i + 1}_bn")
        x = common.relu(
            x, name=common.FEATURES_LAYER if last else f"block{i + 1}_relu"
        )
    return common.classifier(inputs, x, num_classes, name=name)


@register("small_cnn")
def small_cnn(input_shape, num_classes):
    """32/64/128-channel CNN, features (7, 7, 128) on 28x28."""
    return small_cnn_model(input_shape, num_classes, name="small_cnn")


@register("small_cnn_wide")
def small_cnn_wide(input_shape, num_classes):
    """64/128/256-channel CNN, features (7, 7, 256) on 28x28."""
    return small_cnn_model(
        input_shape, num_classes, widths=(64, 128, 256), name="small_cnn_wide"
    )


@register("small_cnn_slim")
def small_cnn_slim(input_shape, num_classes):
    """32/64/64-channel CNN, features (7, 7, 64) on 28x28: NTLs a quarter of small_cnn's."""
    return small_cnn_model(
        input_shape, num_classes, widths=(32, 64, 64), name="small_cnn_slim"
    )
