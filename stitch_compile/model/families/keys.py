"""Splitting a flat state dict into the numbered groups SN-Net checkpoints use."""

from __future__ import annotations

import torch

from ...errors import StitchError


def group(state: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """``{'anchors.1.x': t}`` -> ``{1: {'x': t}}`` for keys under ``prefix`` (e.g. 'anchors.')."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, _, rest = key[len(prefix):].partition(".")
        if not index.isdigit():
            raise StitchError(f"unexpected tensor {key}: expected {prefix}<number>.<name>")
        out.setdefault(int(index), {})[rest] = value
    return dict(sorted(out.items()))


def check_known(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], family: str) -> None:
    """Every tensor must belong to a known part; name the first stray one."""
    stray = [k for k in state if not k.startswith(prefixes)]
    if stray:
        raise StitchError(f"unexpected tensor {stray[0]} ({len(stray)} unexpected) in a {family} checkpoint; "
                          f"expected only keys under {', '.join(prefixes)}")


def anchor_ids(state: dict[str, torch.Tensor]) -> list[int]:
    """Ids of every ``anchors.<id>.*`` group."""
    return sorted({int(k.split(".")[1]) for k in state if k.startswith("anchors.") and k.split(".")[1].isdigit()})


def anchors_with(state: dict[str, torch.Tensor], name: str) -> list[int]:
    """Ids of the anchors holding ``anchors.<id>.<name>``: how a family recognises its anchors."""
    return [a for a in anchor_ids(state) if f"anchors.{a}.{name}" in state]


def anchor_tensors(state: dict[str, torch.Tensor], family: str, named: list[str] | None
                   ) -> list[tuple[dict[str, torch.Tensor], str, str | None]]:
    """(tensors, 'anchors.<a>', --anchors entry or None) per anchor, after checking the top-level layout."""
    check_known(state, ("anchors.", "stitch_layers."), family)
    anchor_state = group(state, "anchors.")
    n = len(anchor_state)
    if n < 2 or sorted(anchor_state) != list(range(n)):
        raise StitchError(f"{family}: expected anchors.0 .. anchors.N-1 with N >= 2, found anchors {sorted(anchor_state)}")
    if named is not None and len(named) != n:
        raise StitchError(f"--anchors: {len(named)} names given but the checkpoint holds {n} anchors")
    return [(anchor_state[a], f"anchors.{a}", named[a] if named else None) for a in range(n)]
