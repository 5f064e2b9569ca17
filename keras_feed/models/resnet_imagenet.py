"""ImageNet ResNets (He et al., CVPR 2016, table 1), laid out like
torchvision's ``resnet18/34/50/101/152`` ("ResNet v1.5": in bottleneck
blocks the stride sits on the 3x3 convolution).

Stem: 7x7/2 conv (64) + BN + ReLU + 3x3/2 max-pool (explicit symmetric zero
padding, as PyTorch's ``padding=3`` / ``padding=1``). Four stages with
64/128/256/512 base channels (stride 2 at the start of stages 2-4); basic
blocks for resnet18/34, bottleneck blocks with expansion 4 for
resnet50/101/152. Shortcuts: identity, or **projection** (1x1 conv with the
block's stride + BN, torchvision's ``downsample``) where the shape changes.

The ReLU closing the last block is the ``"features"`` layer: ``(7, 7, 512)``
(basic) / ``(7, 7, 2048)`` (bottleneck) on 224x224 inputs, total stride 32.
On small inputs the stem already downsamples by 4 (e.g. 32x32 -> 1x1
features), so these nets are meant for ImageNet-sized images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers

from keras_feed.models import common
from keras_feed.models.registry import register

_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(
    block_type: str,
    blocks_per_stage: Sequence[int],
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    *,
    name: str = "resnet",
) -> keras.Model:
    """ImageNet-style ResNet with ``"basic"`` or ``"bottleneck"`` blocks."""
    if block_type not in ("basic", "bottleneck"):
        raise ValueError(f"block_type must be 'basic' or 'bottleneck', got {block_type!r}")
    inputs = common.model_input(input_shape)
    x = common.conv_bn_relu(inputs, 64, 7, 2, name="stem")
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    num_stages = len(blocks_per_stage)
    for stage, blocks in enumerate(blocks_per_stage):
        filters = 64 * 2**stage
        for block in range(blocks):
            last = stage == num_stages - 1 and block == blocks - 1
            strides = 2 if stage > 0 and block == 0 else 1
            block_name = f"stage{stage + 1}_block{block + 1}"
            out_name = common.FEATURES_LAYER if last else None
            if block_type == "basic":
                x = common.basic_block(
                    x, filters, strides, name=block_name, out_name=out_name
                )
            else:
                x = common.bottleneck_block(
                    x, filters, 4 * filters, strides, name=block_name, out_name=out_name
                )
    return common.classifier(inputs, x, num_classes, name=name)


def _register(name: str, block_type: str, blocks) -> None:
    def builder(input_shape, num_classes):
        return imagenet_resnet(block_type, blocks, input_shape, num_classes, name=name)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"ImageNet {name} ({block_type} blocks {blocks})."
    register(name)(builder)


for _name, (_block_type, _blocks) in _CONFIGS.items():
    _register(_name, _block_type, _blocks)
del _name, _block_type, _blocks
