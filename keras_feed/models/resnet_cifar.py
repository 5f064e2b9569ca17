"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2).

A 3x3 stem convolution (16 channels) followed by three stages of ``n``
basic blocks with 16, 32 and 64 channels, ``depth = 6 n + 2``; the first
block of stages 2 and 3 has stride 2. On 32x32 inputs the ``"features"``
layer (the ReLU closing the last block) is ``(8, 8, 64)``.

Shortcuts: the registered models use **projection shortcuts** (1x1 conv with
the block's stride + BN) where the shape changes and identity elsewhere, as
in the widely used knowledge-distillation code bases (e.g. RepDistiller's
``resnet.py``). The paper's parameter-free "option A" (subsample + zero
channels) is available through ``cifar_resnet(..., shortcut="zero_pad")``;
it saves 2.7k parameters on the 16/32/64 nets.

Registered names: ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``,
``resnet44``, ``resnet56``, ``resnet110`` and the 4x wider ``resnet8x4``,
``resnet32x4`` (stem 32, stages 64/128/256 channels; the usual
teacher/student pair in CRD/RepDistiller).
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from keras_feed.models import common
from keras_feed.models.registry import register


def cifar_resnet(
    depth: int,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    *,
    widths: Sequence[int] = (16, 32, 64),
    stem_width: Optional[int] = None,
    shortcut: str = "projection",
    name: Optional[str] = None,
) -> keras.Model:
    """CIFAR ResNet of depth ``6 n + 2`` built from basic blocks.

    Args:
      depth: total depth; ``(depth - 2) % 6 == 0``.
      input_shape: ``(H, W, C)``.
      num_classes: number of logits.
      widths: channels of the three stages.
      stem_width: channels of the stem conv (default ``widths[0]``).
      shortcut: ``"projection"`` (1x1 conv + BN) or ``"zero_pad"``
        (parameter-free option A) where a block changes shape.
      name: model name (default ``f"resnet{depth}"``).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    if shortcut not in ("projection", "zero_pad"):
        raise ValueError(
            f"shortcut must be 'projection' or 'zero_pad', got {shortcut!r}"
        )
    blocks = (depth - 2) // 6
    inputs = common.model_input(input_shape)
    x = common.conv_bn_relu(inputs, stem_width or widths[0], 3, name="stem")
    for stage, filters in enumerate(widths):
        for block in range(blocks):
            last = stage == len(widths) - 1 and block == blocks - 1
            x = common.basic_block(
                x,
                filters,
                strides=2 if stage > 0 and block == 0 else 1,
                shortcut_type=shortcut,
                name=f"stage{stage + 1}_block{block + 1}",
                out_name=common.FEATURES_LAYER if last else None,
            )
    return common.classifier(
        inputs, x, num_classes, name=name or f"resnet{depth}"
    )


def _register(name: str, depth: int, **kwargs) -> None:
    def builder(input_shape, num_classes):
        return cifar_resnet(depth, input_shape, num_classes, name=name, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"CIFAR ResNet-{depth} ({name}), see ``cifar_resnet``."
    register(name)(builder)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth)
for _depth in (8, 32):
    _register(f"resnet{_depth}x4", _depth, widths=(64, 128, 256), stem_width=32)
del _depth
