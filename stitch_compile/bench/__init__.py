"""bench: latency of every config on this device, written to ``lut/<device key>.json``.

Per batch size, each config (or, with ``predict``, each unique segment plus a few calibration
configs) gets warm-up calls and then timed calls; p50/p90/p99 and throughput go into the LUT with
how they were measured. A run replaces the device's LUT as a whole (atomically): name every batch
size you need in one run.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..bundle import check_writable
from ..errors import StitchError
from ..runtime import Runtime
from ..runtime.lut import FORMAT, VERSION, Lut, write_lut
from .predict import LatencyModel, leave_one_out
from .timing import TIMER, time_runner


MAX_BATCH = 4096  # 2.5 GB of 224-px inputs: beyond it a typo, not a deployment


def calibration_sample(configs: list[dict], extra: int = 4) -> list[int]:
    """The anchors (the fastest and slowest configs) plus ``extra`` evenly spaced stitched configs."""
    anchors = [c["id"] for c in configs if len(c.get("anchors", [])) == 1]
    others = [c["id"] for c in configs if c["id"] not in anchors]
    step = max(1, len(others) // (extra + 1))
    return (anchors + others[step::step][:extra]) or [configs[0]["id"]]


def parse_ids(runtime: Runtime, configs) -> list[int] | None:
    """None for 'all', else the valid ids of a comma-separated string or a list."""
    if configs in (None, "all"):
        return None
    if isinstance(configs, str):
        try:
            configs = [int(c) for c in configs.split(",") if c.strip()]
        except ValueError:
            raise StitchError(f"--configs {configs!r}: expected 'all' or comma-separated config ids") from None
    return [int(runtime.bundle.config(c)["id"]) for c in configs]


def bench(runtime: Runtime, batches=(1,), runs: int = 50, warmup: int = 10, configs=None,
          predict: bool = False, quiet: bool = True, seed: int = 0) -> Lut:
    """Measure (or predict) every config at every batch size; validate and write the LUT."""
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1 or batches[-1] > MAX_BATCH or runs < 1 or warmup < 0:
        raise StitchError(f"bench: batch sizes must be 1 to {MAX_BATCH}, --runs positive, --warmup not negative")
    check_writable(runtime.bundle.lut_path(runtime.device_key))
    manifest = runtime.bundle.manifest
    routes = {c["id"]: c["route"] for c in manifest["configs"]}
    chosen = parse_ids(runtime, configs)
    measured_ids = chosen or (calibration_sample(manifest["configs"]) if predict else list(routes))
    keys = list(dict.fromkeys(k for route in routes.values() for k in route)) if predict else []
    rng = np.random.default_rng(seed)
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    latency, prediction = {}, {} if predict else None
    with tqdm(total=len(batches) * (len(keys) + len(measured_ids)), desc="bench", unit="graph",
              disable=quiet, file=sys.stderr) as bar:
        for batch in batches:
            segments = {}
            for key in keys:
                shape = (batch, *manifest["segments"][key]["in_shape"])
                x = runtime.backend.prepare(rng.standard_normal(shape, dtype=np.float32))
                segments[key] = time_runner(runtime.backend.segment_runner(key), x, warmup, runs)
                bar.update()
            x = runtime.backend.prepare(rng.standard_normal((batch, *runtime.input_shape), dtype=np.float32))
            table = {}
            for cid in measured_ids:
                table[cid] = time_runner(runtime.runner(cid), x, warmup, runs)
                bar.update()
            if predict:
                model = LatencyModel(routes, segments, table)
                errors = leave_one_out(routes, segments, table, batch)
                table.update({cid: model.predict(cid, batch) for cid in routes if cid not in table})
                prediction[str(batch)] = {**model.describe(), "calibration": measured_ids, "error_pct": {
                    "method": "leave-one-out, measured configs between the fastest and slowest",
                    "configs": {str(c): e for c, e in errors.items()},
                    "median": float(np.median(list(errors.values()))) if errors else None,
                    "max": max(errors.values()) if errors else None}}
            latency[str(batch)] = {str(cid): table[cid] for cid in sorted(table)}
    backend = runtime.backend
    runtime.lut = write_lut(runtime.bundle, {
        "format": FORMAT, "version": VERSION, "device_key": runtime.device_key,
        "device": {"device": backend.device, "hardware": backend.hardware(), "backend": backend.name,
                   "backend_version": backend.version, "threads": runtime.threads, "precision": backend.precision,
                   **backend.describe()},
        "bundle": {"source_sha256": manifest["source"]["sha256"], "configs": len(routes)},
        "measured": {"timer": TIMER, "warmup": warmup, "runs": runs, "batches": batches,
                     "input": "standard normal float32, fixed seed", "configs_measured": len(measured_ids),
                     "predict": predict, "load_average_at_start": loadavg, "tool_version": __version__,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "latency": latency,
        "prediction": prediction,
    })
    return runtime.lut


def summary(lut: Lut) -> list[str]:
    """The table ``bench`` prints: one line per config and batch size, then the model's error."""
    lines = []
    for batch in lut.batches:
        rows = lut.data["latency"][str(batch)]
        lines.append(f"batch {batch}: {'id':>4} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'img/s':>10}")
        lines.extend(f"         {cid:>4} {e['p50_ms']:>10.3f} {e['p90_ms']:>10.3f} {e['p99_ms']:>10.3f} "
                     f"{e['throughput']:>10.1f}{'  predicted' if e['predicted'] else ''}" for cid, e in rows.items())
        model = (lut.data.get("prediction") or {}).get(str(batch))
        if model:
            err = model["error_pct"]
            quality = (f"median {err['median']:.1f}%, max {err['max']:.1f}%" if err["median"] is not None
                       else "not estimated (measure 3+ configs)")
            lines.append(f"batch {batch}: {sum(e['predicted'] for e in rows.values())} configs predicted from "
                         f"{len(model['segments_p50_ms'])} segments and {len(model['calibration'])} measured configs; "
                         f"leave-one-out error {quality}")
    lines.append(f"wrote {lut.path}")
    return lines
