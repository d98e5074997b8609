"""The PyTorch side: what a stitchable network is. Never imports export or runtime."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import StitchError
from .space import StitchConfig, StitchSpace, describe_route, pareto_frontier

if TYPE_CHECKING:
    from .checkpoint import read_state_dict
    from .families import build_network
    from .network import Segment, StitchableNet

_LAZY = {"read_state_dict": ".checkpoint", "build_network": ".families", "Segment": ".network",
         "StitchableNet": ".network"}  # torch and timm: imported on first use (runtime and select need none)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load(path: str, anchors: list[str] | str | None = None, family: str | None = None) -> StitchableNet:
    """Read an SN-Net-family checkpoint as the public training code saved it; eval mode, CPU.

    ``anchors`` overrides detection with timm model names (``name`` or ``name:key=value:...``),
    given as a list or as one comma-separated string.
    """
    from .checkpoint import read_state_dict
    from .families import build_network

    state, _ = read_state_dict(path)
    if isinstance(anchors, str):
        anchors = [a for a in anchors.split(",") if a.strip()]
    try:
        net = build_network(state, anchors, family)
    except StitchError as exc:
        raise StitchError(f"{path}: {exc}") from None
    net.source_path = str(path)  # export records its sha256 in the bundle
    return net


__all__ = ["load", "read_state_dict", "build_network", "Segment", "StitchableNet", "StitchConfig",
           "StitchSpace", "describe_route", "pareto_frontier"]
