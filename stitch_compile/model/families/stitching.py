"""Linear stitching layers read from a checkpoint, LoRA updates folded into one dense matrix."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import StitchError
from ..network import StitchingLayer


def linear_stitch(tensors: dict[str, torch.Tensor], where: str, in_dim: int, out_dim: int,
                  lora_alpha: float = 1.0) -> StitchingLayer:
    """Build ``Linear(in_dim, out_dim)`` from ``transform.*`` tensors.

    SN-Netv2 saves LoRA stitching layers unmerged: ``W = weight + lora_B @ lora_A * alpha / r``
    with r read from the shapes. Folding here means every later stage sees one dense Linear.
    """
    known = {"transform.weight", "transform.bias", "transform.lora_A", "transform.lora_B"}
    stray = sorted(set(tensors) - known)
    if stray:
        raise StitchError(f"unexpected tensor {where}.{stray[0]}; a stitching layer holds only {', '.join(sorted(known))}")
    for name in ("transform.weight", "transform.bias"):
        if name not in tensors:
            raise StitchError(f"missing tensor {where}.{name}")
    weight, bias = tensors["transform.weight"], tensors["transform.bias"]
    _expect(f"{where}.transform.weight", weight, (out_dim, in_dim))
    _expect(f"{where}.transform.bias", bias, (out_dim,))
    if ("transform.lora_A" in tensors) != ("transform.lora_B" in tensors):
        raise StitchError(f"{where}: has only one of lora_A / lora_B; a LoRA stitching layer needs both")
    if "transform.lora_A" in tensors:
        lora_a, lora_b = tensors["transform.lora_A"], tensors["transform.lora_B"]
        rank = lora_a.shape[0]
        _expect(f"{where}.transform.lora_A", lora_a, (rank, in_dim))
        _expect(f"{where}.transform.lora_B", lora_b, (out_dim, rank))
        weight = weight.double() + (lora_b.double() @ lora_a.double()) * (lora_alpha / rank)
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return StitchingLayer(layer)


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise StitchError(f"{name}: shape mismatch: checkpoint {list(tensor.shape)} vs expected {list(shape)}")
