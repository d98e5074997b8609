"""fvcore's counting rules (the convention of the published SN-Net tables) as functions of layer shapes.

One multiply-add is one FLOP; convolutions and linears count their multiply-adds only (no bias);
LayerNorm counts 5 per element; BatchNorm in eval mode 2 per element (fvcore's batch_norm handle
with affine parameters, not training); adaptive average pooling 1 per input element; activations,
softmax, residual adds, max-pooling, mean and indexing count nothing.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.utils import _pair

LAYER_NORM = 5  # per element
BATCH_NORM = 2  # per element, eval mode


def conv_out(size: tuple[int, int], layer: nn.Module) -> tuple[int, int]:
    """Output (H, W) of a Conv2d or pooling layer for input (H, W)."""
    k, s, p, d = (_pair(getattr(layer, name, 1)) for name in ("kernel_size", "stride", "padding", "dilation"))
    return tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def conv_flops(conv: nn.Conv2d, out: tuple[int, int]) -> int:
    return math.prod(out) * conv.in_channels // conv.groups * math.prod(conv.kernel_size) * conv.out_channels


def linear_flops(lin: nn.Module, positions: int = 1) -> int:
    """``positions`` tokens through a Linear (or Identity, which costs nothing)."""
    return positions * lin.in_features * lin.out_features if isinstance(lin, nn.Linear) else 0
