"""SN-Net v1 over ResNet anchors (ResNet-18/50, 10 configs).

1x1 Conv2d stitching layers (with bias) on feature maps inside stages 1 and 2, stored as
``stitch_layers.<stage - 1>.<pair>.<layer>`` (the public code keeps one group per stitched stage).
The public code saves through timm's checkpoint saver: weights under ``state_dict``.
"""

from __future__ import annotations

import torch

from ..network import StitchableNet
from .keys import anchor_ids, anchor_tensors, anchors_with
from .resnet_anchor import MARKER, resnet_anchor
from .staged import build_staged
from .stitching import conv_stitch

NAME = "snnet_v1_resnet"
STAGES = (1, 2)


def matches(state: dict[str, torch.Tensor]) -> bool:
    ids = anchor_ids(state)
    return len(ids) >= 2 and anchors_with(state, MARKER) == ids


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None) -> StitchableNet:
    nets = [resnet_anchor(a, tensors, where, named, NAME)
            for a, (tensors, where, named) in enumerate(anchor_tensors(state, NAME, anchors))]
    return build_staged(NAME, nets, state, STAGES, conv_stitch)
