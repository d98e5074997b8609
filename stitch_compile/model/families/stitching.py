"""Stitching layers read from a checkpoint (Linear on tokens, 1x1 Conv2d on feature maps) and their cost.

Every public SN-Net variant saves a stitching layer as ``transform.weight`` / ``transform.bias``;
SN-Netv2 adds unmerged LoRA factors, folded here so that every later stage sees one dense layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import StitchError
from ..network import Segment, StitchingLayer


class ConvToTokens(StitchingLayer):
    """1x1 conv from a CNN into a Swin stage (SN-Net v1 ResNet/Swin).

    The public code flattens the conv output to tokens ``reshape(B, C, -1).permute(0, 2, 1)``, row-major
    over (H, W); timm's Swin holds the same tokens as NHWC, so ``permute(0, 2, 3, 1)`` is that layout.
    """

    def forward(self, x):
        return self.transform(x).permute(0, 2, 3, 1)


def linear_stitch(tensors: dict[str, torch.Tensor], where: str, in_dim: int, out_dim: int,
                  lora_alpha: float = 1.0) -> StitchingLayer:
    """Build ``Linear(in_dim, out_dim)`` from ``transform.*`` tensors.

    SN-Netv2 saves LoRA stitching layers unmerged: ``W = weight + lora_B @ lora_A * alpha / r``
    with r read from the shapes.
    """
    weight, bias = _weight_bias(tensors, where, (out_dim, in_dim), lora=True)
    if ("transform.lora_A" in tensors) != ("transform.lora_B" in tensors):
        raise StitchError(f"{where}: has only one of lora_A / lora_B; a LoRA stitching layer needs both")
    if "transform.lora_A" in tensors:
        lora_a, lora_b = tensors["transform.lora_A"], tensors["transform.lora_B"]
        rank = lora_a.shape[0] if lora_a.dim() == 2 else 0  # else _expect names the shape
        _expect(f"{where}.transform.lora_A", lora_a, (rank, in_dim))
        _expect(f"{where}.transform.lora_B", lora_b, (out_dim, rank))
        weight = weight.double() + (lora_b.double() @ lora_a.double()) * (lora_alpha / rank)
    return StitchingLayer(_filled(nn.Linear(in_dim, out_dim), weight, bias))


def conv_stitch(tensors: dict[str, torch.Tensor], where: str, in_ch: int, out_ch: int,
                to_tokens: bool = False) -> StitchingLayer:
    """Build the CNN stitching layer ``Conv2d(in_ch, out_ch, 1)``; ``to_tokens`` when it feeds a Swin."""
    weight, bias = _weight_bias(tensors, where, (out_ch, in_ch, 1, 1), lora=False)
    layer = _filled(nn.Conv2d(in_ch, out_ch, 1), weight, bias)
    return ConvToTokens(layer) if to_tokens else StitchingLayer(layer)


def stitch_segment(key: str, layer: StitchingLayer, in_shape: tuple[int, ...]) -> Segment:
    """A stitching layer as a segment: one multiply-add per input position and output channel."""
    t = layer.transform
    cin, cout = (t.in_features, t.out_features) if isinstance(t, nn.Linear) else (t.in_channels, t.out_channels)
    flops = math.prod(in_shape) // cin * cin * cout
    return Segment(key, layer, tuple(in_shape), flops, sum(p.numel() for p in layer.parameters()))


def _weight_bias(tensors, where, shape, lora):
    known = {"transform.weight", "transform.bias"} | ({"transform.lora_A", "transform.lora_B"} if lora else set())
    stray = sorted(set(tensors) - known)
    if stray:
        raise StitchError(f"unexpected tensor {where}.{stray[0]}; a stitching layer holds only {', '.join(sorted(known))}")
    for name in ("transform.weight", "transform.bias"):
        if name not in tensors:
            raise StitchError(f"missing tensor {where}.{name}")
    _expect(f"{where}.transform.weight", tensors["transform.weight"], shape)
    _expect(f"{where}.transform.bias", tensors["transform.bias"], shape[:1])
    return tensors["transform.weight"], tensors["transform.bias"]


def _filled(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return layer


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise StitchError(f"{name}: shape mismatch: checkpoint {list(tensor.shape)} vs expected {list(shape)}")
    if not tensor.is_floating_point():  # copy_ would cast
        raise StitchError(f"{name}: dtype {tensor.dtype}; a stitching layer's weights are floating point")
