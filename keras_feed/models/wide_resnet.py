"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks",
BMVC 2016), CIFAR variant, following the reference implementation
(szagoruyko/wide-residual-networks, xternalz/WideResNet-pytorch).

``WRN-d-k``: 3x3 stem conv with 16 channels, then three stages of
``n = (d - 4) / 6`` pre-activation basic blocks with ``16k``, ``32k`` and
``64k`` channels (stride 2 at the start of stages 2 and 3), a final
BN + ReLU and global average pooling. Block::

    pre = ReLU(BN(x))
    y   = Conv3x3(stride)(pre) -> BN -> ReLU -> Dropout(p) -> Conv3x3
    out = y + (x if the shape is unchanged else Conv1x1(stride)(pre))

i.e. the projection shortcut (1x1 conv, no BN) reads the pre-activated
input, as in the reference code. The final ReLU is the ``"features"`` layer:
``(8, 8, 64k)`` on 32x32 inputs.

Names: the family ``wrn_<depth>_<width>`` accepts any depth with
``(depth - 4) % 6 == 0`` (depth >= 10) and any integer width >= 1, e.g.
``wrn_16_2``, ``wrn_28_10``, ``wrn_40_4``. Registered builds have no
dropout; use :func:`wide_resnet` directly for ``dropout_rate > 0``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers

from keras_feed.models import common
from keras_feed.models.registry import register_family


def _wrn_block(x, filters: int, strides: int, dropout_rate: float, *, name: str):
    pre = common.bn(x, name=f"{name}_pre_bn")
    pre = common.relu(pre, name=f"{name}_pre_relu")
    y = common.conv_bn_relu(pre, filters, 3, strides, name=f"{name}_1")
    if dropout_rate > 0:
        y = layers.Dropout(dropout_rate, seed=common.next_seed(), name=f"{name}_drop")(y)
    y = common.conv(y, filters, 3, 1, name=f"{name}_2_conv")
    if strides == 1 and x.shape[-1] == filters:
        s = x
    else:
        s = common.conv(pre, filters, 1, strides, name=f"{name}_proj_conv")
    return layers.Add(name=f"{name}_add")([s, y])


def wide_resnet(
    depth: int,
    width: int,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    *,
    dropout_rate: float = 0.0,
    name: Optional[str] = None,
) -> keras.Model:
    """WRN-``depth``-``width`` (pre-activation). See the module docstring."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"WRN depth must satisfy (depth - 4) % 6 == 0 and depth >= 10, got {depth}"
        )
    common.check_positive_int(width, "WRN width")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    blocks = (depth - 4) // 6
    inputs = common.model_input(input_shape)
    x = common.conv(inputs, 16, 3, name="stem_conv")
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            x = _wrn_block(
                x,
                filters,
                2 if stage > 0 and block == 0 else 1,
                dropout_rate,
                name=f"stage{stage + 1}_block{block + 1}",
            )
    x = common.bn(x, name="final_bn")
    x = common.relu(x, name=common.FEATURES_LAYER)
    return common.classifier(
        inputs, x, num_classes, name=name or f"wrn_{depth}_{width}"
    )


def _family(match):
    depth, width = int(match.group(1)), int(match.group(2))
    # Validate now so that build() fails before entering the builder.
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"Invalid model 'wrn_{match.group(1)}_{match.group(2)}': WRN depth "
            f"must satisfy (depth - 4) % 6 == 0 and depth >= 10, got {depth}"
        )
    if width < 1:
        raise ValueError(f"Invalid model {match.group(0)!r}: WRN width must be >= 1")
    name = f"wrn_{depth}_{width}"

    def builder(input_shape, num_classes):
        return wide_resnet(depth, width, input_shape, num_classes, name=name)

    builder.__name__ = builder.__qualname__ = name
    return builder


register_family(
    "wrn_<depth>_<width>",
    r"wrn_([1-9]\d*)_([1-9]\d*)",
    _family,
    ("wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_40_2", "wrn_40_4"),
)
