"""StitchableNet: the anchors, the stitching layers, and forward(x, config).

The network owns its parameters through ``anchors`` and ``stitch_layers`` (so ``state_dict`` and
``.to()`` behave as usual) and exposes them a second time as *segments*: the unit that a config's
route is made of, that export traces once, and that the latency model times once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StitchError
from .space import StitchConfig, StitchSpace


@dataclass
class Segment:
    """One traceable unit: a module from one tensor to one tensor, and its analytic cost."""

    key: str
    module: nn.Module
    in_shape: tuple[int, ...]  # per-sample input shape (no batch dimension)
    flops: int  # published convention: multiply-adds, + 5 per LayerNorm element
    params: int  # parameters counted for this segment by the published tables


class StitchableNet(nn.Module):
    """A trained SN-Net-family network: every config runs by id through ``forward(x, config)``."""

    def __init__(self, family: str, anchors: nn.ModuleList, stitch_layers: nn.Module,
                 segments: dict[str, Segment], configs: StitchSpace, anchor_names: list[str],
                 anchor_specs: list[dict]):
        super().__init__()
        self.family = family
        self.anchors = anchors
        self.stitch_layers = stitch_layers
        self.segments = segments  # not registered: the same parameters, seen per segment
        for segment in segments.values():
            segment.module.eval()  # tracing restores a wrapper's mode onto the shared modules
        self.configs = configs
        self.anchor_names = anchor_names
        self.anchor_specs = anchor_specs
        self.eval()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample image shape (C, H, W) every config takes."""
        return self.segments[next(iter(self.configs)).route[0]].in_shape

    def config(self, config: int | StitchConfig) -> StitchConfig:
        return config if isinstance(config, StitchConfig) else self.configs[config]

    def forward(self, x: torch.Tensor, config: int | StitchConfig, use_kernels: bool = False) -> torch.Tensor:
        """Run ``config``'s route; ``use_kernels=True`` fuses each ViT stitching layer with the next
        block's LayerNorm (``stitch_compile.kernels.fused_forward``: a Triton kernel on CUDA)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 1 + len(self.input_shape) or x.shape[1:] != self.input_shape:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StitchError(f"input {shape}: this network takes a tensor [batch, {', '.join(map(str, self.input_shape))}]")
        if use_kernels:  # imported on use: the kernels build on this module, and need Triton on a GPU
            from ..kernels import fused_forward

            return fused_forward(self, x, config)
        for key in self.config(config).route:
            x = self.segments[key].module(x)
        return x

    def describe(self) -> dict:
        """The JSON that ``inspect --json`` prints and the bundle manifest embeds."""
        return {
            "family": self.family,
            "anchors": [{"name": n, **s} for n, s in zip(self.anchor_names, self.anchor_specs)],
            "input_shape": list(self.input_shape),
            "configs": [c.to_json() for c in self.configs],
        }


class StitchingLayer(nn.Module):
    """The public code's wrapper: parameters live under ``.transform`` (Linear or 1x1 Conv2d)."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def forward(self, x):
        return self.transform(x)
