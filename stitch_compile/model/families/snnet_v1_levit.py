"""SN-Net v1 over LeViT anchors (LeViT-192/256, 8 configs).

Token Linear stitching layers inside stages 0 and 1 (``stitch_layers.<stage>.<pair>.<layer>``);
stitched configs end with the back anchor's head (mean over tokens, the two heads averaged).
"""

from __future__ import annotations

import torch

from ..network import StitchableNet
from .keys import anchor_ids, anchor_tensors, anchors_with
from .levit_anchor import MARKER, levit_anchor
from .staged import build_staged
from .stitching import linear_stitch

NAME = "snnet_v1_levit"
STAGES = (0, 1)


def matches(state: dict[str, torch.Tensor]) -> bool:
    ids = anchor_ids(state)
    return len(ids) >= 2 and anchors_with(state, MARKER) == ids


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None) -> StitchableNet:
    levits = [levit_anchor(a, tensors, where, named, NAME)
              for a, (tensors, where, named) in enumerate(anchor_tensors(state, NAME, anchors))]
    return build_staged(NAME, levits, state, STAGES, linear_stitch)
