"""SN-Netv2 over DeiT-3 anchors: two-way stitching, LoRA stitching layers, 134 configs.

Enumeration follows the public code (anchors ordered so depth d0 <= d1, r = d1 // d0): the two
anchors; small->large at (i, (i+1)r); large->small at (i, nearest(i)+1); then large->small->large
and small->large->small products in position order. The small->large config at the last block
(id 13 for depth-12 anchors) is enumerated but never used by the public code, so it is not a
config here either: ids keep the public numbering and 134 configs remain.
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

NAME = "snnetv2_deit3"


def nearest_map(d0: int, d1: int) -> list[int]:
    """Block id of the small anchor nearest to each of the large anchor's d1 blocks."""
    ids = torch.arange(d0, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(ids, d1).squeeze().long().tolist()


def enumerate_configs(d0: int, d1: int) -> tuple[list[dict], set[int]]:
    """(configs in id order with comb_id, stitch_cfgs, stitch_layer_ids, route; ids never used)."""
    r = d1 // d0
    near = nearest_map(d0, d1)
    sl = [{"comb_id": [0, 1], "stitch_cfgs": [[i, (i + 1) * r]], "stitch_layer_ids": [i]} for i in range(d0)]
    ls = [{"comb_id": [1, 0], "stitch_cfgs": [[i, near[i] + 1]], "stitch_layer_ids": [i // r]}
          for i in range(d1 - 1) if d1 == d0 or i % 2 == 1]
    lsl = [{"comb_id": [1, 0, 1], "stitch_cfgs": [a["stitch_cfgs"][0], b["stitch_cfgs"][0]],
            "stitch_layer_ids": a["stitch_layer_ids"] + b["stitch_layer_ids"]}
           for a in ls for b in sl
           if b["stitch_layer_ids"][0] != d0 - 1 and b["stitch_cfgs"][0][0] >= a["stitch_cfgs"][0][1]]
    sls = [{"comb_id": [0, 1, 0], "stitch_cfgs": [a["stitch_cfgs"][0], b["stitch_cfgs"][0]],
            "stitch_layer_ids": a["stitch_layer_ids"] + b["stitch_layer_ids"]}
           for a in sl for b in ls if b["stitch_cfgs"][0][0] >= a["stitch_cfgs"][0][1]]
    configs = [{"comb_id": [0]}, {"comb_id": [1]}] + sl + ls + lsl + sls
    depths = (d0, d1)
    unused = set()
    for cid, cfg in enumerate(configs):
        comb = cfg["comb_id"]
        if len(comb) == 1:
            continue
        starts = [0] + [back for _, back in cfg["stitch_cfgs"]]
        ends = [front for front, _ in cfg["stitch_cfgs"]] + [depths[comb[-1]]]
        cfg["route"] = [[s, e] for s, e in zip(starts, ends)]
        cfg["stitch_layer_ids"] = cfg["stitch_layer_ids"] + [-1]
        if comb == [0, 1] and cfg["stitch_cfgs"][0][0] == d0 - 1:
            unused.add(cid)
    return configs, unused


def matches(state: dict[str, torch.Tensor]) -> bool:
    """DeiT-3 anchors (LayerScale) or LoRA stitching layers mark an SN-Netv2 checkpoint."""
    return any(k.startswith("anchors.") and k.endswith((".gamma_1", ".ls1.gamma")) for k in state) or any(
        k.startswith("stitch_layers.") and k.endswith(".lora_A") for k in state)


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None, lora_alpha: float = 1.0) -> StitchableNet:
    parts = anchor_tensors(state, NAME, anchors)
    if len(parts) != 2:
        raise StitchError(f"{NAME}: expected exactly anchors.0 and anchors.1, found {len(parts)} anchors")
    vits, names = zip(*(vit_anchor(*p) for p in parts))
    d0, d1 = (len(v.blocks) for v in vits)
    if d0 > d1 or d1 % d0:
        raise StitchError(f"{NAME}: anchor depths {d0}, {d1}: anchor 0 must be the shallower and divide anchor 1's depth")
    if tokens(vits[0]) != tokens(vits[1]):
        raise StitchError(f"{NAME}: anchors disagree on the token count ({tokens(vits[0])} vs {tokens(vits[1])})")
    table, unused = enumerate_configs(d0, d1)

    segments = {}
    for a, vit in enumerate(vits):
        segments.update(vit_segments(a, vit))
    stitch_state = group(state, "stitch_layers.")
    if sorted(stitch_state) != [0, 1]:
        raise StitchError(f"{NAME}: expected stitch_layers.0 (small->large) and stitch_layers.1 (large->small), found {sorted(stitch_state)}")
    counts = (d0, len([c for c in table if c["comb_id"] == [1, 0]]))
    stitch_layers = nn.ModuleList()
    for front, count in enumerate(counts):
        back = 1 - front
        per_layer = group(stitch_state[front], "")
        direction = nn.ModuleList()
        for l in range(count):
            where = f"stitch_layers.{front}.{l}"
            layer = linear_stitch(per_layer.pop(l, {}), where, vits[front].embed_dim, vits[back].embed_dim, lora_alpha)
            direction.append(layer)
            segments[f"stitch:{front}:{l}"] = stitch_segment(f"stitch:{front}:{l}", layer, tokens(vits[front]))
        if per_layer:
            raise StitchError(f"unexpected tensor stitch_layers.{front}.{min(per_layer)}.*: direction {front} has {count} stitching layers")
        direction.append(nn.Identity())  # the public code's trailing identity (layer id -1)
        stitch_layers.append(direction)

    configs = []
    for cid, cfg in enumerate(table):
        if cid in unused:
            continue
        comb = tuple(cfg["comb_id"])
        route = _route(cfg, vits)
        params = sum(segments[k].params for k in route) + (token_params(vits[comb[0]]) if len(comb) == 1 else 0)
        configs.append(StitchConfig(
            cid, route, sum(segments[k].flops for k in route), params, comb,
            tuple(tuple(p) for p in cfg.get("stitch_cfgs", ())), tuple(cfg.get("stitch_layer_ids", ())),
            extra={"ranges": cfg["route"]} if "route" in cfg else {}))
    return StitchableNet(NAME, nn.ModuleList(vits), stitch_layers, segments, StitchSpace(configs),
                         list(names), [spec_dict(v) for v in vits])


def _route(cfg: dict, vits) -> tuple[str, ...]:
    """Stem of the first anchor; per range, blocks begin..end (inclusive, clipped) then its stitch."""
    comb = cfg["comb_id"]
    if len(comb) == 1:
        a = comb[0]
        return (f"stem:{a}", *(f"block:{a}:{i}" for i in range(len(vits[a].blocks))), f"head:{a}")
    route = [f"stem:{comb[0]}"]
    for a, (begin, end), layer in zip(comb, cfg["route"], cfg["stitch_layer_ids"]):
        route += [f"block:{a}:{i}" for i in range(begin, min(end, len(vits[a].blocks) - 1) + 1)]
        if layer != -1:
            route.append(f"stitch:{a}:{layer}")
    route.append(f"head:{comb[-1]}")
    return tuple(route)
