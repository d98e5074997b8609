"""timm anchors that receive a checkpoint's weights: built without random init, or named by ``--anchors``.

Random init of the anchors is wasted work (a strict load overwrites every persistent tensor) and
dominates load time for large anchors (Swin-B: ~10 s on two cores). So the module is built on the
meta device, allocated empty, and only the buffers timm computes from the architecture (relative
position indices, shifted-window masks, attention-bias indices) are filled in before the load.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...errors import StitchError
from .vit_anchor import build_named


def empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` allocated on the CPU with uninitialised parameters and computed buffers filled."""
    with torch.device("meta"):
        model = factory()
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return model.eval()


def anchor_model(factory: Callable[[], nn.Module], named: str | None, expected: type, family: str) -> nn.Module:
    """The detected architecture, or the ``--anchors`` override, which must be a timm ``expected``."""
    model = empty(lambda: build_named(named)) if named else empty(factory)
    if not isinstance(model, expected):
        raise StitchError(f"--anchors {named!r}: not a timm {expected.__name__}; this anchor of a {family} checkpoint is one")
    return model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
