"""SN-Net v1 over stage-structured anchors (Swin, ResNet, LeViT): segments, routes, the network.

Each anchor is cut into ``stem:a``, ``down:a:s`` (the layer entering stage s, where the anchor has one
outside its blocks: Swin patch merging, LeViT attention-subsample), ``block:a:s.i`` and ``head:a``;
stitching layers are ``stitch:s:p:l`` (stage, pair = front anchor, layer id). A stitched config
(a, b, stage s, (j, k), l) runs the public ``forward_until(s, j)`` of a (stem, every earlier stage
whole, stage s up to block j inclusive), the stitching layer, then ``forward_from(s, k)`` of b (stage s
from block k, later stages whole, b's head). Since k >= 1 always, b never re-enters stage s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ...errors import StitchError
from ..network import Segment, StitchableNet, StitchingLayer
from ..space import StitchConfig, StitchSpace
from .keys import group
from .stages import enumerate_configs
from .stitching import stitch_segment

StitchBuilder = Callable[[dict[str, torch.Tensor], str, int, int], StitchingLayer]


@dataclass
class StagedAnchor:
    """One anchor as segments, with what stitching needs to know about each stage."""

    index: int
    module: nn.Module
    name: str
    depths: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # per-sample activation shape inside each stage
    channels: tuple[int, ...]  # activation width inside each stage
    segments: dict[str, Segment]
    spec: dict

    def until(self, stage: int, block: int) -> list[str]:
        """The public ``forward_until``: stem, earlier stages whole, then blocks 0..block of ``stage``."""
        keys = [f"stem:{self.index}"]
        for s in range(stage):
            keys += self._stage(s, range(self.depths[s]), enter=True)
        return keys + self._stage(stage, range(block + 1), enter=True)

    def since(self, stage: int, block: int) -> list[str]:
        """The public ``forward_from``: ``stage`` from ``block`` on, later stages whole, then the head."""
        keys = self._stage(stage, range(block, self.depths[stage]), enter=False)
        for s in range(stage + 1, len(self.depths)):
            keys += self._stage(s, range(self.depths[s]), enter=True)
        return keys + [f"head:{self.index}"]

    def whole(self) -> list[str]:
        last = len(self.depths) - 1
        return self.until(last, self.depths[last] - 1) + [f"head:{self.index}"]

    def positions(self, stage: int) -> int:
        """Tokens / pixels per sample inside ``stage``: neighbouring anchors must agree to be stitched."""
        return math.prod(self.shapes[stage]) // self.channels[stage]

    def _stage(self, s: int, blocks: range, enter: bool) -> list[str]:
        down = f"down:{self.index}:{s}"
        return ([down] if enter and down in self.segments else []) + [f"block:{self.index}:{s}.{i}" for i in blocks]


def build_staged(family: str, anchors: Sequence[StagedAnchor], state: dict[str, torch.Tensor],
                 stages: Sequence[int], make_stitch: StitchBuilder,
                 front_downsample_params: bool = True) -> StitchableNet:
    """The network: anchors, the stitching layers of ``stages`` (stored as ``stitch_layers.<index in
    stages>.<pair>.<layer>``), and every config with its route, FLOPs and params.

    Params of a config are the params of the segments it runs; ``front_downsample_params=False`` leaves
    out the front anchor's ``down`` segments, as the public Swin ``get_model_size`` does.
    """
    configs, n_layers = enumerate_configs([a.depths for a in anchors], stages)
    segments = {k: v for a in anchors for k, v in a.segments.items()}
    stitch_layers = nn.ModuleList()
    for idx, s in enumerate(stages):
        stage = nn.ModuleList()
        for p, (front, back) in enumerate(zip(anchors, anchors[1:])):
            if front.positions(s) != back.positions(s):
                raise StitchError(f"{family}: anchors {p} and {p + 1} disagree on the stage-{s} grid "
                                  f"({list(front.shapes[s])} vs {list(back.shapes[s])}); stitching needs equal grids")
            per_layer = group(state, f"stitch_layers.{idx}.{p}.")
            pair = nn.ModuleList()
            for l in range(n_layers[(s, p)]):
                layer = make_stitch(per_layer.pop(l, {}), f"stitch_layers.{idx}.{p}.{l}", front.channels[s], back.channels[s])
                pair.append(layer)
                segments[f"stitch:{s}:{p}:{l}"] = stitch_segment(f"stitch:{s}:{p}:{l}", layer, front.shapes[s])
            if per_layer:
                raise StitchError(f"unexpected tensor stitch_layers.{idx}.{p}.{min(per_layer)}.*: stage {s}, pair {p} "
                                  f"has {n_layers[(s, p)]} stitching layers")
            stage.append(pair)
        _no_extra(group(state, f"stitch_layers.{idx}."), len(anchors) - 1, f"stitch_layers.{idx}", "neighbouring pairs")
        stitch_layers.append(stage)
    _no_extra(group(state, "stitch_layers."), len(stages), "stitch_layers", f"stitched stages {list(stages)}")

    out = []
    for cid, c in enumerate(configs):
        if c.stage is None:
            route = anchors[c.comb[0]].whole()
            extra, positions, layers = {}, (), ()
        else:
            (a, b), (j, k) = c.comb, c.position
            front = anchors[a].until(c.stage, j)
            route = front + [f"stitch:{c.stage}:{a}:{c.layer}"] + anchors[b].since(c.stage, k)
            extra, positions, layers = {"stage_id": c.stage}, (c.position,), (c.layer,)
        params = sum(segments[key].params for key in route)
        if c.stage is not None and not front_downsample_params:
            params -= sum(segments[key].params for key in front if key.startswith("down:"))
        out.append(StitchConfig(cid, tuple(route), sum(segments[key].flops for key in route), params,
                                c.comb, positions, layers, extra=extra))
    for segment in segments.values():  # wrappers start in training mode; a tracer restoring it would flip BatchNorm
        segment.module.eval()
    return StitchableNet(family, nn.ModuleList(a.module for a in anchors), stitch_layers, segments,
                         StitchSpace(out), [a.name for a in anchors], [a.spec for a in anchors])


def _no_extra(groups: dict[int, dict], count: int, where: str, what: str) -> None:
    extra = [i for i in groups if i >= count]
    if extra:
        raise StitchError(f"unexpected tensor {where}.{extra[0]}.*: this checkpoint has {count} {what}")
