"""Running a StitchableNet config with each stitching layer fused into the next block's norm1.

Why here and not in the model: the model side never imports kernels (rooms rule), so the fused
path is built from the outside, over the same segment modules and parameters as ``net(x, config)``.
"""

from __future__ import annotations

import weakref

import torch
from timm.models.vision_transformer import Block
from torch import nn

from stitch_compile.errors import StitchError
from stitch_compile.model import StitchableNet, StitchConfig
from stitch_compile.model.network import StitchingLayer

from .ops import stitch_linear_ln


class FusedStitch(nn.Module):
    """A stitching ``Linear`` and the next block's ``LayerNorm``: returns ``(out, LayerNorm(out))``."""

    def __init__(self, linear: nn.Linear, norm: nn.LayerNorm):
        super().__init__()
        if linear.bias is None or norm.weight is None or norm.bias is None:
            raise StitchError("FusedStitch: needs a Linear with bias and a LayerNorm with weight and bias")
        if tuple(norm.normalized_shape) != (linear.out_features,):
            raise StitchError(f"FusedStitch: LayerNorm over {list(norm.normalized_shape)} does not match the Linear's {linear.out_features} outputs")
        self.linear, self.norm = linear, norm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stitch_linear_ln(x, self.linear.weight, self.linear.bias, self.norm.weight, self.norm.bias, self.norm.eps)


class StitchedBlock(nn.Module):
    """A stitching layer then a timm ``Block``, whose norm1 comes out of the fused op.

    Same math as ``block(stitch(x))``: attention reads the normalised stream, the residual adds to ``out``.
    """

    def __init__(self, stitch: FusedStitch, block: Block):
        super().__init__()
        self.stitch, self.block = stitch, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, normed = self.stitch(x)
        b = self.block
        x = out + b.drop_path1(b.ls1(b.attn(normed)))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _fusable(stitch: nn.Module, block: nn.Module) -> bool:
    """A Linear stitching layer followed by a pre-norm timm Block with an affine LayerNorm.

    Exact types: subclasses (e.g. a stitching layer that reshapes to tokens) change forward.
    """
    return (type(stitch) is StitchingLayer and isinstance(stitch.transform, nn.Linear)
            and stitch.transform.bias is not None
            and type(block) is Block
            and isinstance(block.norm1, nn.LayerNorm) and block.norm1.weight is not None
            and block.norm1.bias is not None
            and tuple(block.norm1.normalized_shape) == (stitch.transform.out_features,))


def fuse(net: StitchableNet, config: int | StitchConfig) -> nn.Sequential:
    """The config's route as one module: every fusable ``stitch:*`` + ``block:*`` pair fused.

    Other segments are the net's own modules, so weights are shared, not copied; the result
    traces with torch.export like ``net`` itself.
    """
    route = net.config(config).route
    steps: list[nn.Module] = []
    i = 0
    while i < len(route):
        module = net.segments[route[i]].module
        if route[i].startswith("stitch:") and i + 1 < len(route) and route[i + 1].startswith("block:"):
            block = net.segments[route[i + 1]].module
            if _fusable(module, block):
                steps.append(StitchedBlock(FusedStitch(module.transform, block.norm1), block))
                i += 2
                continue
        steps.append(module)
        i += 1
    return nn.Sequential(*steps)


# net -> {config id: its fused route}. Built once per config (building one costs about as much
# host time as a few op calls); weakly keyed, so a net is freed as usual. A route holds the net's
# own modules, exactly as ``net.segments`` does, so it stays valid as long as they do.
_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_forward(net: StitchableNet, x: torch.Tensor, config: int | StitchConfig) -> torch.Tensor:
    """``net(x, config)`` computed with the fused stitching kernels (``use_kernels=True``)."""
    routes = _ROUTES.setdefault(net, {})
    config_id = net.config(config).id
    route = routes.get(config_id)
    if route is None:
        route = routes[config_id] = fuse(net, config)
    return route(x)
