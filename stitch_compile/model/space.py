"""Stitching configurations: ids, routes, cost, and the Pareto frontier.

A config's ``route`` is the ordered list of segment keys it runs (``stem:0``, ``block:0:3``,
``stitch:0:1``, ``head:1`` ...). Everything downstream (forward, export, latency prediction) is a
fold over routes, so a family only has to say which segments exist and which routes it allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from ..errors import StitchError, exact_int


@dataclass(frozen=True)
class StitchConfig:
    """One stitching configuration, with the reference code's id and enumeration fields."""

    id: int
    route: tuple[str, ...]
    flops: int
    params: int
    anchors: tuple[int, ...]  # the public code's comb_id
    positions: tuple[tuple[int, int], ...] = ()  # stitch_cfgs: (front block, back block) per stitch
    layers: tuple[int, ...] = ()  # stitching layer ids (v2 ends with -1 = identity)
    accuracy: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_anchor(self) -> bool:
        return len(self.anchors) == 1

    def to_json(self) -> dict:
        out = {
            "id": self.id,
            "route": list(self.route),
            "flops": self.flops,
            "params": self.params,
            "anchors": list(self.anchors),
            "positions": [list(p) for p in self.positions],
            "layers": list(self.layers),
        }
        out.update(self.extra)
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


def describe_route(route: Sequence[str]) -> str:
    """Compact human form: runs of blocks collapse, e.g. ``A0[0-3] > L0.1 > A1[4-11] > H1``.

    Staged anchors key blocks ``block:a:stage.i``; a run stays inside one stage: ``A0.s2[0-5]``.
    """
    parts: list[str] = []
    run: list | None = None  # [anchor, stage prefix, first, last]

    def close():
        parts.append(f"A{run[0]}{'.s' + run[1] if run[1] else ''}[{run[2]}-{run[3]}]")

    for key in route:
        kind, *ids = key.split(":")
        if kind == "block":
            stage, _, index = ids[1].rpartition(".")
            anchor, index = int(ids[0]), int(index)
            if run and run[:2] == [anchor, stage] and run[3] + 1 == index:
                run[3] = index
                continue
            if run:
                close()
            run = [anchor, stage, index, index]
            continue
        if run:
            close()
            run = None
        if kind == "stitch":
            parts.append("L" + ".".join(ids))
        elif kind.startswith("head"):
            parts.append(("H" if kind == "head" else "h") + ids[0])
    if run:
        close()
    return " > ".join(parts)


class StitchSpace:
    """The configs of one network, indexed by config id (ids need not be contiguous)."""

    def __init__(self, configs: Sequence[StitchConfig]):
        self._by_id = {c.id: c for c in configs}
        if len(self._by_id) != len(configs):
            raise ValueError("duplicate config ids")

    def __getitem__(self, config_id: int) -> StitchConfig:
        """An integer id (Python or numpy); a float, bool or string is unknown, not converted."""
        config = self._by_id.get(exact_int(config_id))
        if config is None:
            raise StitchError(f"unknown config id {config_id!r}: valid ids are {self.id_ranges()}")
        return config

    def __contains__(self, config_id) -> bool:
        return exact_int(config_id) in self._by_id

    def __iter__(self) -> Iterator[StitchConfig]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def ids(self) -> list[int]:
        return list(self._by_id)

    def id_ranges(self) -> str:
        """'0-12, 14-134' style summary of the valid ids."""
        ids = sorted(self._by_id)
        spans, start = [], ids[0]
        for prev, cur in zip(ids, ids[1:] + [None]):
            if cur != prev + 1:
                spans.append(f"{start}-{prev}" if prev != start else f"{start}")
                start = cur
        return ", ".join(spans)

    def with_accuracy(self, accuracy: dict[int, float]) -> "StitchSpace":
        return StitchSpace([replace(c, accuracy=accuracy.get(c.id, c.accuracy)) for c in self])


def pareto_frontier(points: dict[int, tuple[float, float]]) -> list[int]:
    """Ids on the frontier of (cost, value) points: no other point is cheaper-or-equal and better.

    Returned in increasing cost. Used with (latency or FLOPs, accuracy or FLOPs).
    """
    frontier, best = [], float("-inf")
    for cid, (cost, value) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if value > best:
            frontier.append(cid)
            best = value
    return frontier
