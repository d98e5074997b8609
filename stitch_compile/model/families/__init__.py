"""Family registry: each family module offers ``NAME``, ``matches(state)`` and ``build(state, anchors)``.

A new family is a new module here and one entry in ``FAMILIES``; nothing else changes.
Order matters: the most specific detector comes first.
"""

from __future__ import annotations

import torch

from ...errors import StitchError, first_line
from ..network import StitchableNet
from . import snnet_v1, snnet_v1_levit, snnet_v1_resnet, snnet_v1_resnet_swin, snnet_v1_swin, snnet_v2

# snnet_v1 (ViT) accepts any anchors.0.*, so it comes last; the others recognise their anchors' keys.
FAMILIES = (snnet_v2, snnet_v1_swin, snnet_v1_resnet_swin, snnet_v1_resnet, snnet_v1_levit, snnet_v1)


def _build(fam, state: dict[str, torch.Tensor], anchors: list[str] | None) -> StitchableNet:
    """``fam.build``, with the errors that shape arithmetic on tensors of impossible shapes raises
    (a 1-D tensor where a 4-D one belongs, a zero head count) as one StitchError: detection reads
    sizes from the checkpoint's tensors before anything can check them against a model."""
    try:
        net = fam.build(state, anchors)
    except (IndexError, ZeroDivisionError, ValueError, TypeError, RuntimeError) as exc:
        raise StitchError(f"tensors of impossible shapes for a {fam.NAME} checkpoint ({type(exc).__name__}: {first_line(exc)}); "
                          "was it edited or written by other code?") from exc  # --debug shows where
    _check_interface(net)
    return net


def _check_interface(net: StitchableNet) -> None:
    """Every config must take one input shape and give logits of one size. Anchors that differ
    (an edited checkpoint) still build, and would then fail or mislead at export."""
    classes = sorted({spec["num_classes"] for spec in net.anchor_specs})
    if len(classes) != 1 or classes[0] < 1:
        raise StitchError(f"{net.family}: the anchors' classifier heads have {classes} classes (0: no head); "
                          "an SN-Net's anchors share one head size")
    inputs = sorted({net.segments[c.route[0]].in_shape for c in net.configs})
    if len(inputs) != 1:
        raise StitchError(f"{net.family}: the anchors take different inputs {[list(s) for s in inputs]} (C, H, W); "
                          "an SN-Net's anchors share one input size")


def build_network(state: dict[str, torch.Tensor], anchors: list[str] | None = None,
                  family: str | None = None) -> StitchableNet:
    """Detect the family of ``state`` (or use ``family``) and build its network."""
    if family is not None:
        chosen = [f for f in FAMILIES if f.NAME == family]
        if not chosen:
            raise StitchError(f"unknown family {family!r}; known: {', '.join(f.NAME for f in FAMILIES)}")
        return _build(chosen[0], state, anchors)
    for fam in FAMILIES:
        if fam.matches(state):
            return _build(fam, state, anchors)
    sample = ", ".join(sorted(state)[:5])
    raise StitchError(
        "unknown checkpoint layout: expected SN-Net keys 'anchors.<i>.<timm keys>' and "
        f"'stitch_layers.<pair>.<layer>.transform.*'; found {len(state)} tensors such as {sample}")
