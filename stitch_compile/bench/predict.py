"""The latency model: a config costs its route's segments timed alone, scaled, plus a fixed overhead.

Timing each unique segment once makes bench O(segments) instead of O(configs). A config run
costs a little more than the sum of its segments timed alone: a per-graph part (calls, copies)
and a part that grows with the work (timed alone, a segment's weights stay in cache; in a config
they compete with the others'). So ``p50 = scale * sum + overhead``, fitted on a few configs
measured for real with the Theil-Sen estimator (median of pairwise slopes: one noisy measurement
cannot drag the line); with one config, or sums too close to fit a slope, scale is 1. The tail
(p90, p99) scales p50 by the median tail ratio of the measured configs. The error reported is
leave-one-out: each measured config is predicted by a model fitted without it.
"""

from __future__ import annotations

import itertools
import statistics

from .timing import summarize


class LatencyModel:
    def __init__(self, routes: dict[int, list[str]], segments: dict[str, dict], measured: dict[int, dict]):
        if not measured:
            raise ValueError("the latency model needs at least one measured config")
        self.routes, self.segments = routes, segments
        points = [(self.segment_sum(c), m["p50_ms"]) for c, m in measured.items()]
        slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in itertools.combinations(points, 2)
                  if abs(x1 - x0) > 0.05 * max(x0, x1)]
        self.scale = statistics.median(slopes) if slopes else 1.0
        self.overhead_ms = statistics.median(y - self.scale * x for x, y in points)
        self.tail = {q: statistics.median(m[f"{q}_ms"] / m["p50_ms"] for m in measured.values())
                     for q in ("p90", "p99")}

    def segment_sum(self, config_id: int) -> float:
        return sum(self.segments[key]["p50_ms"] for key in self.routes[config_id])

    def predict(self, config_id: int, batch: int) -> dict:
        p50 = max(self.scale * self.segment_sum(config_id) + self.overhead_ms, 1e-6)
        entry = summarize([p50], batch, predicted=True)
        entry.update({f"{q}_ms": round(p50 * ratio, 5) for q, ratio in self.tail.items()})
        return entry

    def describe(self) -> dict:
        return {"scale": round(self.scale, 5), "overhead_ms": round(self.overhead_ms, 5),
                "p90_ratio": round(self.tail["p90"], 4), "p99_ratio": round(self.tail["p99"], 4),
                "segments_p50_ms": {k: v["p50_ms"] for k, v in self.segments.items()}}


def leave_one_out(routes: dict[int, list[str]], segments: dict[str, dict], measured: dict[int, dict],
                  batch: int) -> dict[int, float]:
    """{config id: |predicted - measured| / measured p50, in %} for the measured configs inside the range.

    The two configs with the smallest and largest segment sums stay in every fit: the predicted
    configs lie between them (the anchors, by default), so leaving one out would measure
    extrapolation, which the model is never asked to do. Empty with fewer than 3 configs.
    """
    if len(measured) < 3:
        return {}
    model = LatencyModel(routes, segments, measured)
    ordered = sorted(measured, key=model.segment_sum)
    errors = {}
    for cid in ordered[1:-1]:
        fitted = LatencyModel(routes, segments, {c: v for c, v in measured.items() if c != cid})
        errors[cid] = round(100 * abs(fitted.predict(cid, batch)["p50_ms"] - measured[cid]["p50_ms"])
                            / measured[cid]["p50_ms"], 3)
    return errors
