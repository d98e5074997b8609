"""Choosing a config for a latency budget, and the latency/quality Pareto frontier.

Quality is top-1 accuracy where the manifest knows it, else FLOPs (a bigger config of the same
family is, as a rule, the more accurate one). A config with known accuracy outranks one without;
ties go to the faster config. Candidates are sorted by latency once, with a running best, so a
``select`` is one binary search: the budget can change every request at no cost.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..errors import StitchError
from ..model.space import pareto_frontier


@dataclass(frozen=True)
class Choice:
    """A config as ``select`` reports it."""

    id: int
    latency_ms: float
    predicted: bool
    accuracy: float | None
    flops: int

    def to_json(self) -> dict:
        return {"id": self.id, "latency_ms": round(self.latency_ms, 4), "predicted": self.predicted,
                "accuracy": self.accuracy, "gflops": round(self.flops / 1e9, 4)}


class Selector:
    """Configs of one LUT table (one batch size and metric), ready for O(log n) selection."""

    def __init__(self, configs: dict[int, dict], latency: dict[int, tuple[float, bool]], where: str):
        self.where = where
        self.choices = {cid: Choice(cid, ms, predicted, configs[cid].get("accuracy"), configs[cid]["flops"])
                        for cid, (ms, predicted) in latency.items()}
        ordered = sorted(self.choices.values(), key=lambda c: (c.latency_ms, c.id))
        self._latencies = [c.latency_ms for c in ordered]
        self._best, best = [], None
        for c in ordered:
            if best is None or self.rank(c) > self.rank(best):
                best = c
            self._best.append(best.id)
        self.fastest = ordered[0]

    @staticmethod
    def rank(c: Choice) -> tuple:
        # equal ranks keep the faster config (candidates come fastest first)
        return (1, c.accuracy) if c.accuracy is not None else (0, c.flops)

    @property
    def quality(self) -> str:
        """What the frontier trades latency against: 'accuracy' when any config has one."""
        return "accuracy" if any(c.accuracy is not None for c in self.choices.values()) else "flops"

    def select(self, budget_ms: float) -> int:
        budget_ms = check_budget(budget_ms)
        i = bisect.bisect_right(self._latencies, budget_ms)
        if i == 0:
            f = self.fastest
            raise StitchError(f"no config fits {budget_ms:g} ms {self.where}: the fastest is config {f.id} at "
                              f"{f.latency_ms:.3f} ms{' (predicted)' if f.predicted else ''}; raise the budget")
        return self._best[i - 1]

    def report(self, budget_ms: float) -> dict:
        """What ``select --json`` prints: the choice for ``budget_ms`` and the frontier it lies on."""
        return {"budget_ms": budget_ms, "where": self.where, "quality": self.quality,
                "selected": self.choices[self.select(budget_ms)].to_json(),
                "frontier": [c.to_json() for c in self.frontier()]}

    def frontier(self) -> list[Choice]:
        """Configs no other config beats on both latency and quality, fastest first."""
        if self.quality == "accuracy":
            points = {c.id: (c.latency_ms, c.accuracy) for c in self.choices.values() if c.accuracy is not None}
        else:
            points = {c.id: (c.latency_ms, c.flops) for c in self.choices.values()}
        return [self.choices[cid] for cid in pareto_frontier(points)]


def check_budget(budget_ms) -> float:
    try:
        budget = float(budget_ms)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        budget = float("nan")
    if not budget > 0 or budget == float("inf"):
        raise StitchError(f"budget {budget_ms!r} ms: expected a positive, finite number of milliseconds")
    return budget
