"""ResNet anchors (SN-Net v1 ResNet-18/50 and ResNet/Swin) as timm ``ResNet``.

The public code trains timm 0.6 ResNets; their keys (``conv1``, ``bn1``, ``layer<1-4>.<i>.*``, ``fc``)
are timm 1.x's too, so no remapping. A ResNet checkpoint does not record its input size: it is
224 (the published one) unless a Swin partner fixes it. Only plain ResNets (7x7 stem, BasicBlock or
Bottleneck, no attention, anti-aliasing or average-pool shortcut) are detected; others need
``--anchors`` and are refused if their blocks are not plain.

FLOPs follow fvcore: convs, eval-mode BatchNorm 2 per element, the head's adaptive average pool 1
per input element, fc; ReLU, max-pool and residual adds are free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ...errors import StitchError
from ..network import Segment
from .flops import BATCH_NORM, conv_flops, conv_out, linear_flops
from .staged import StagedAnchor
from .timm_anchor import anchor_model, count_params
from .vit_anchor import load_into

MARKER = "layer1.0.conv1.weight"
DEFAULT_IMG = 224


@dataclass(frozen=True)
class ResNetSpec:
    """What a ResNet checkpoint says about its architecture."""

    bottleneck: bool
    layers: tuple[int, ...]
    channels: tuple[int, ...]  # timm's per-stage "planes"
    in_chans: int
    num_classes: int

    @property
    def name(self) -> str:
        return f"resnet_{'bottleneck' if self.bottleneck else 'basic'}_{'-'.join(map(str, self.layers))}"


def detect_resnet(state: dict[str, torch.Tensor], where: str) -> ResNetSpec:
    """Describe the ResNet whose (prefix-stripped) tensors are ``state``."""
    for key in ("conv1.weight", MARKER):
        if key not in state:
            raise StitchError(f"{where}: not a plain ResNet anchor (7x7 stem): missing {where}.{key}; "
                              "other stems need --anchors <timm name>")
    blocks = {}
    for key in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = range(1, max(blocks) + 1)
    if any(f"layer{s}.0.conv1.weight" not in state for s in stages):
        raise StitchError(f"{where}: ResNet stages must be layer1 .. layer{max(blocks)}, each with a first block")
    fc = state.get("fc.weight")
    return ResNetSpec(
        bottleneck="layer1.0.conv3.weight" in state,
        layers=tuple(len(blocks[s]) for s in stages),
        channels=tuple(state[f"layer{s}.0.conv1.weight"].shape[0] for s in stages),
        in_chans=state["conv1.weight"].shape[1],
        num_classes=fc.shape[0] if fc is not None else 0,
    )


def build_resnet(spec: ResNetSpec) -> ResNet:
    return ResNet(block=Bottleneck if spec.bottleneck else BasicBlock, layers=spec.layers, channels=spec.channels,
                  in_chans=spec.in_chans, num_classes=spec.num_classes)


def resnet_anchor(a: int, state: dict[str, torch.Tensor], where: str, named: str | None, family: str,
                  img_size: int = DEFAULT_IMG) -> StagedAnchor:
    """Build, load and segment anchor ``a`` for ``img_size`` inputs; ``named`` is an ``--anchors`` override."""
    spec = None if named else detect_resnet(state, where)
    model = anchor_model(lambda: build_resnet(spec), named, ResNet, family)
    load_into(model, state, where)
    return resnet_segments(a, model, named or spec.name, img_size, where)


def resnet_segments(a: int, net: ResNet, name: str, img_size: int, where: str) -> StagedAnchor:
    """Stem (conv, bn, relu, max-pool), residual blocks per stage and head (pool, fc) of anchor ``a``."""
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    size = conv_out((img_size, img_size), net.conv1)
    stem_flops = conv_flops(net.conv1, size) + BATCH_NORM * net.conv1.out_channels * size[0] * size[1]
    size = conv_out(size, net.maxpool)
    segs = {f"stem:{a}": Segment(f"stem:{a}", stem, (net.conv1.in_channels, img_size, img_size), stem_flops, count_params(stem))}
    shape, shapes, depths = (net.conv1.out_channels, *size), [], []
    for s in range(4):
        stage = getattr(net, f"layer{s + 1}")
        for i, blk in enumerate(stage):
            flops, out = _block_flops(blk, shape[1:], f"{where}.layer{s + 1}.{i}")
            segs[f"block:{a}:{s}.{i}"] = Segment(f"block:{a}:{s}.{i}", blk, shape, flops, count_params(blk))
            shape = out
        shapes.append(shape)
        depths.append(len(stage))
    head = nn.Sequential(net.global_pool, net.fc)
    segs[f"head:{a}"] = Segment(f"head:{a}", head, shape, shape[0] * shape[1] * shape[2] + linear_flops(net.fc), count_params(head))
    spec = {"kind": "resnet", "depths": depths, "channels": [s[0] for s in shapes], "img_size": [img_size, img_size],
            "num_classes": net.num_classes}
    return StagedAnchor(a, net, name, tuple(depths), tuple(shapes), tuple(s[0] for s in shapes), segs, spec)


def _block_flops(blk: nn.Module, size: tuple[int, int], where: str) -> tuple[int, tuple[int, int, int]]:
    """(FLOPs, output shape) of a plain BasicBlock / Bottleneck: its convs in sequence plus the shortcut conv."""
    shortcut = blk.downsample
    if blk.se is not None or not isinstance(blk.aa, nn.Identity) or (shortcut is not None and not isinstance(shortcut[0], nn.Conv2d)):
        raise StitchError(f"{where}: not a plain ResNet block (attention, anti-aliasing or pooled shortcut); "
                          "stitch-compile counts and stitches plain ResNets only")
    convs = [blk.conv1, blk.conv2] + ([blk.conv3] if isinstance(blk, Bottleneck) else [])
    flops, out = 0, size
    for conv in convs:  # each followed by its BatchNorm
        out = conv_out(out, conv)
        flops += conv_flops(conv, out) + BATCH_NORM * conv.out_channels * out[0] * out[1]
    if shortcut is not None:
        short = conv_out(size, shortcut[0])
        flops += conv_flops(shortcut[0], short) + BATCH_NORM * shortcut[0].out_channels * short[0] * short[1]
    return flops, (convs[-1].out_channels, *out)
