"""Shared set-up for the benchmarks: a real-architecture DeiT Ti/S/B SN-Net with random weights."""

from __future__ import annotations

import os

import timm
import torch

from stitch_compile.model.checkpoint import save_checkpoint
from stitch_compile.model.families.snnet_v1 import stitch_positions

DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def deit_snnet_checkpoint(path: str, seed: int = 0, anchors: int = 3) -> str:
    """Write (once) an SN-Net v1 checkpoint of DeiT Ti/S/B (71 configs) or Ti/S in the public layout."""
    if os.path.exists(path):
        return path
    torch.manual_seed(seed)
    anchors = [timm.create_model(name, pretrained=False) for name in DEIT[:anchors]]
    state = {f"anchors.{a}.{k}": v for a, m in enumerate(anchors) for k, v in m.state_dict().items()}
    _, _, n_layers = stitch_positions(len(anchors[0].blocks))
    for p in range(len(anchors) - 1):
        cin, cout = anchors[p].embed_dim, anchors[p + 1].embed_dim
        for l in range(n_layers):
            state[f"stitch_layers.{p}.{l}.transform.weight"] = torch.randn(cout, cin) * cin ** -0.5
            state[f"stitch_layers.{p}.{l}.transform.bias"] = torch.zeros(cout)
    save_checkpoint(state, path)
    return path


def folder_bytes(folder: str, suffixes: tuple[str, ...] = ("",)) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder)
               for f in names if f.endswith(suffixes))
