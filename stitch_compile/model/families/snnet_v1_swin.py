"""SN-Net v1 over Swin anchors (Swin-T/S/B, 41 configs).

Token Linear stitching inside stages 0-2 (``stitch_layers.<stage>.<pair>.<layer>``); unequal stage
depths (Swin-T 6 vs Swin-S 18 blocks in stage 2) use the nearest-interpolation block map of
``stages.pair_positions``. Heads keep the final norm. Params follow the public ``get_model_size``,
which leaves out the front anchor's patch-merging layers of a stitched config.
"""

from __future__ import annotations

import torch

from ..network import StitchableNet
from .keys import anchor_ids, anchor_tensors, anchors_with
from .staged import build_staged
from .stitching import linear_stitch
from .swin_anchor import MARKER, swin_anchor

NAME = "snnet_v1_swin"
STAGES = (0, 1, 2)


def matches(state: dict[str, torch.Tensor]) -> bool:
    ids = anchor_ids(state)
    return len(ids) >= 2 and anchors_with(state, MARKER) == ids


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None) -> StitchableNet:
    swins = [swin_anchor(a, tensors, where, named, NAME)
             for a, (tensors, where, named) in enumerate(anchor_tensors(state, NAME, anchors))]
    return build_staged(NAME, swins, state, STAGES, linear_stitch, front_downsample_params=False)
