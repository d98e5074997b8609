"""SN-Net v1 from a ResNet into a Swin (ResNet-18 -> Swin-T, 8 configs).

1x1 Conv2d stitching layers in stages 1 and 2 (``stitch_layers.<stage - 1>.0.<layer>``) whose output
the public code flattens to Swin tokens ``reshape(B, C, -1).permute(0, 2, 1)``; here to the same
tokens as timm's NHWC. The ResNet runs at the Swin's input size (read from the Swin's masks).
"""

from __future__ import annotations

from functools import partial

import torch

from ...errors import StitchError
from ..network import StitchableNet
from . import resnet_anchor, swin_anchor
from .keys import anchor_tensors, anchors_with
from .staged import build_staged
from .stitching import conv_stitch

NAME = "snnet_v1_resnet_swin"
STAGES = (1, 2)


def matches(state: dict[str, torch.Tensor]) -> bool:
    return anchors_with(state, resnet_anchor.MARKER) == [0] and anchors_with(state, swin_anchor.MARKER) == [1]


def build(state: dict[str, torch.Tensor], anchors: list[str] | None = None) -> StitchableNet:
    parts = anchor_tensors(state, NAME, anchors)
    if len(parts) != 2:
        raise StitchError(f"{NAME}: expected anchors.0 (ResNet) and anchors.1 (Swin), found {len(parts)} anchors")
    swin = swin_anchor.swin_anchor(1, *parts[1], NAME)
    resnet = resnet_anchor.resnet_anchor(0, *parts[0], NAME, img_size=swin.spec["img_size"][0])
    return build_staged(NAME, [resnet, swin], state, STAGES, partial(conv_stitch, to_tokens=True))
