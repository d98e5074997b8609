"""Timing one runner: warm-up calls, then timed calls, summarised as percentiles."""

from __future__ import annotations

import time

import numpy as np

TIMER = "time.perf_counter_ns around each call (wall clock; one call runs one batch)"


def summarize(samples_ms, batch: int, predicted: bool = False) -> dict:
    """p50/p90/p99 (linear interpolation between samples) and images per second at p50."""
    p50, p90, p99 = (float(v) for v in np.percentile(samples_ms, [50, 90, 99]))
    return {"p50_ms": round(p50, 5), "p90_ms": round(p90, 5), "p99_ms": round(p99, 5),
            "throughput": round(batch * 1000.0 / p50, 3), "predicted": predicted}


def time_runner(runner, x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        runner(x)
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        runner(x)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return summarize(samples, len(x))
