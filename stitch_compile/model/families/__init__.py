"""Family registry: each family module offers ``NAME``, ``matches(state)`` and ``build(state, anchors)``.

A new family is a new module here and one entry in ``FAMILIES``; nothing else changes.
Order matters: the most specific detector comes first.
"""

from __future__ import annotations

import torch

from ...errors import StitchError
from ..network import StitchableNet
from . import snnet_v1, snnet_v1_levit, snnet_v1_resnet, snnet_v1_resnet_swin, snnet_v1_swin, snnet_v2

# snnet_v1 (ViT) accepts any anchors.0.*, so it comes last; the others recognise their anchors' keys.
FAMILIES = (snnet_v2, snnet_v1_swin, snnet_v1_resnet_swin, snnet_v1_resnet, snnet_v1_levit, snnet_v1)


def build_network(state: dict[str, torch.Tensor], anchors: list[str] | None = None,
                  family: str | None = None) -> StitchableNet:
    """Detect the family of ``state`` (or use ``family``) and build its network."""
    if family is not None:
        chosen = [f for f in FAMILIES if f.NAME == family]
        if not chosen:
            raise StitchError(f"unknown family {family!r}; known: {', '.join(f.NAME for f in FAMILIES)}")
        return chosen[0].build(state, anchors)
    for fam in FAMILIES:
        if fam.matches(state):
            return fam.build(state, anchors)
    sample = ", ".join(sorted(state)[:5])
    raise StitchError(
        "unknown checkpoint layout: expected SN-Net keys 'anchors.<i>.<timm keys>' and "
        f"'stitch_layers.<pair>.<layer>.transform.*'; found {len(state)} tensors such as {sample}")
