"""CIFAR ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep
Neural Networks", CVPR 2017), following the CIFAR reference code
(facebookresearch/ResNeXt ``models/resnext.lua``, prlz77/ResNeXt.pytorch).

``ResNeXt-29 (C x d)``: 3x3 stem conv with 64 channels + BN + ReLU, then
three stages of ``(depth - 2) / 9 = 3`` bottleneck blocks whose outputs have
``64 w``, ``128 w`` and ``256 w`` channels with ``w = widen_factor = 4``,
i.e. **256, 512 and 1024 channels whatever C and d are**; stride 2 at the
first block of stages 2 and 3. In a block with ``out`` output channels the
grouped 3x3 convolution (``Conv2D(groups=C)``) has
``D = C * d * out / 256`` channels, so ``C * d``, ``2 C d`` and ``4 C d``
channels in the three stages (1024/2048/4096 for 16x64d)::

    y   = Conv1x1(D) -> BN -> ReLU -> Conv3x3(D, groups=C, stride) -> BN
          -> ReLU -> Conv1x1(out) -> BN
    out = ReLU(y + shortcut(x))

The shortcut is the identity, or a projection (1x1 conv with the block's
stride + BN) when the number of channels or the resolution changes. The
ReLU closing the last block is the ``"features"`` layer:
``(8, 8, 1024)`` on 32x32 inputs.

Names: the family ``resnext29_<cardinality>x<width>d`` accepts any positive
cardinality and bottleneck width, e.g. ``resnext29_8x64d`` (34.4M
parameters) or ``resnext29_16x64d`` (68.1M).
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from keras_feed.models import common
from keras_feed.models.registry import register_family


def cifar_resnext(
    cardinality: int,
    base_width: int,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    *,
    depth: int = 29,
    widen_factor: int = 4,
    name: Optional[str] = None,
) -> keras.Model:
    """CIFAR ResNeXt-``depth`` with ``cardinality`` groups of ``base_width``
    channels (see the module docstring)."""
    common.check_positive_int(cardinality, "ResNeXt cardinality")
    common.check_positive_int(base_width, "ResNeXt bottleneck width")
    common.check_positive_int(widen_factor, "ResNeXt widen_factor")
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"ResNeXt depth must be 9n+2 with n >= 1, got {depth}")
    blocks = (depth - 2) // 9
    stage_out = (64 * widen_factor, 128 * widen_factor, 256 * widen_factor)
    inputs = common.model_input(input_shape)
    x = common.conv_bn_relu(inputs, 64, 3, name="stem")
    for stage, out_filters in enumerate(stage_out):
        width_ratio = out_filters / (widen_factor * 64.0)
        group_width = cardinality * int(base_width * width_ratio)
        for block in range(blocks):
            last = stage == len(stage_out) - 1 and block == blocks - 1
            x = common.bottleneck_block(
                x,
                group_width,
                out_filters,
                strides=2 if stage > 0 and block == 0 else 1,
                groups=cardinality,
                name=f"stage{stage + 1}_block{block + 1}",
                out_name=common.FEATURES_LAYER if last else None,
            )
    return common.classifier(
        inputs,
        x,
        num_classes,
        name=name or f"resnext{depth}_{cardinality}x{base_width}d",
    )


def _family(match):
    cardinality, base_width = int(match.group(1)), int(match.group(2))
    name = f"resnext29_{cardinality}x{base_width}d"

    def builder(input_shape, num_classes):
        return cifar_resnext(
            cardinality, base_width, input_shape, num_classes, name=name
        )

    builder.__name__ = builder.__qualname__ = name
    return builder


register_family(
    "resnext29_<cardinality>x<width>d",
    r"resnext29_([1-9]\d*)x([1-9]\d*)d",
    _family,
    ("resnext29_2x64d", "resnext29_4x64d", "resnext29_8x64d", "resnext29_16x64d"),
)
