"""SN-Net v1 over ViT anchors (DeiT Ti/S/B, 71 configs) and Learngene-Pool-style pools.

Enumeration follows the public code: a window of ``kernel`` blocks slides with ``stride`` over
the block ids; each unseen (front, back) pair in the window is a stitching position and the window
that first produced it is its stitching layer id. Only neighbouring anchors are stitched
("nearest stitching"). The public code hard-codes three anchors; with any other number we keep its
rule (single anchors, then each neighbouring pair in order), which reproduces its ids for three.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import StitchError
from ..network import StitchableNet
from ..space import StitchConfig, StitchSpace
from .keys import anchor_tensors, group
from .stitching import linear_stitch
from .vit_anchor import spec_dict, stitch_segment, token_params, tokens, vit_anchor, vit_segments

NAME = "snnet_v1_vit"


def stitch_positions(depth: int, kernel: int = 2, stride: int = 1,
                     forward_only: bool = False) -> tuple[list[tuple[int, int]], list[int], int]:
    """(positions, stitching layer id of each position, number of stitching layers).

    ``forward_only`` keeps only j < k, as the public Swin/ResNet/LeViT code does inside a stage.
    """
    positions: list[tuple[int, int]] = []
    layer_of: list[int] = []
    layer = -1
    for start in range(0, depth, stride):
        window = range(start, min(start + kernel, depth))
        new = [(j, k) for j in window for k in window if (j, k) not in positions and (j < k or not forward_only)]
        if new:
            layer += 1
            positions += new
            layer_of += [layer] * len(new)
    return positions, layer_of, layer + 1


def enumerate_configs(depth: int, n_anchors: int) -> list[tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]]:
    """(comb_id, stitch_cfgs, stitch_layers) per config id, in the public code's order."""
    positions, layer_of, _ = stitch_positions(depth)
    out = [((a,), (), ()) for a in range(n_anchors)]
    for a in range(n_anchors - 1):
        out += [((a, a + 1), (pos,), (layer,)) for pos, layer in zip(positions, layer_of)]
    return out


def matches(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("anchors.0.") for k in state)


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None) -> StitchableNet:
    vits, names = zip(*(vit_anchor(*parts) for parts in anchor_tensors(state, NAME, anchors)))
    n = len(vits)
    depths = {len(v.blocks) for v in vits}
    if len(depths) != 1:
        raise StitchError(f"{NAME}: anchors must have equal depth, found {[len(v.blocks) for v in vits]} blocks")
    depth = depths.pop()
    n_tokens = {tokens(v) for v in vits}
    if len(n_tokens) != 1:
        raise StitchError(f"{NAME}: anchors disagree on the token count {sorted(n_tokens)}; stitching needs equal token grids")

    _, _, n_layers = stitch_positions(depth)
    stitch_state = group(state, "stitch_layers.")
    stitch_layers = nn.ModuleList()
    segments = {}
    for a, vit in enumerate(vits):
        segments.update(vit_segments(a, vit))
    for p in range(n - 1):
        per_layer = group(stitch_state.pop(p, {}), "")
        in_dim, out_dim = vits[p].embed_dim, vits[p + 1].embed_dim
        pair = nn.ModuleList()
        if not per_layer and in_dim == out_dim:  # learngene pools: equal widths stitch by identity
            stitch_layers.append(pair)
            continue
        for l in range(n_layers):
            layer = linear_stitch(per_layer.pop(l, {}), f"stitch_layers.{p}.{l}", in_dim, out_dim)
            pair.append(layer)
            segments[f"stitch:{p}:{l}"] = stitch_segment(f"stitch:{p}:{l}", layer, tokens(vits[p]))
        if per_layer:
            raise StitchError(f"unexpected tensor stitch_layers.{p}.{min(per_layer)}.*: pair {p} has {n_layers} stitching layers for depth {depth}")
        stitch_layers.append(pair)
    if stitch_state:
        raise StitchError(f"unexpected tensor stitch_layers.{min(stitch_state)}.*: {n} anchors have {n - 1} neighbouring pairs")

    configs = []
    for cid, (comb, cfgs, layers) in enumerate(enumerate_configs(depth, n)):
        route = _route(comb, cfgs, layers, depth, segments)
        params = sum(segments[k].params for k in route) + (token_params(vits[comb[0]]) if len(comb) == 1 else 0)
        configs.append(StitchConfig(cid, route, sum(segments[k].flops for k in route), params, comb, cfgs, layers))
    return StitchableNet(NAME, nn.ModuleList(vits), stitch_layers, segments, StitchSpace(configs),
                         list(names), [spec_dict(v) for v in vits])


def _route(comb, cfgs, layers, depth, segments) -> tuple[str, ...]:
    """Anchors run whole (with the final norm); stitched configs end with the head minus its norm."""
    if len(comb) == 1:
        a = comb[0]
        return (f"stem:{a}", *(f"block:{a}:{i}" for i in range(depth)), f"head:{a}")
    (a, b), ((j, k),), (layer,) = comb, cfgs, layers
    stitch = f"stitch:{a}:{layer}"
    return (f"stem:{a}", *(f"block:{a}:{i}" for i in range(j + 1)),
            *((stitch,) if stitch in segments else ()),
            *(f"block:{b}:{i}" for i in range(k, depth)), f"head-skipnorm:{b}")
