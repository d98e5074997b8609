"""Latency lookup tables: ``lut/<device key>.json``, one per device.

LUTs are written after export and are not covered by the manifest's hashes, so a LUT is checked
on every read: its structure, that it names this device key, that every config id exists in the
bundle, that every latency is a finite positive number with p50 <= p90 <= p99, and that it was
measured on this export of the checkpoint. Any problem is one StitchError line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import jsonschema

from ..bundle import Bundle, read_json, same_export, write_json
from ..errors import StitchError, command, exact_int
from .device import bench_options

FORMAT, VERSION = "stitch-compile-lut", 1
METRICS = ("p50", "p90", "p99")

_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_STATS = {"type": "object", "required": ["p50_ms", "p90_ms", "p99_ms", "throughput", "predicted"],
          "properties": {**{f"{m}_ms": _POSITIVE for m in METRICS}, "throughput": _POSITIVE,
                         "predicted": {"type": "boolean"}}}
_SCHEMA = {
    "type": "object",
    "required": ["format", "version", "device_key", "device", "bundle", "measured", "latency"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": VERSION},
        "device_key": {"type": "string"},
        "device": {"type": "object", "required": ["backend", "backend_version", "threads", "precision"]},
        "bundle": {"type": "object", "required": ["source_sha256"],
                   "properties": {"source_sha256": {"type": "string"}}},
        "measured": {"type": "object", "required": ["timer", "warmup", "runs", "batches"]},
        "latency": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[1-9][0-9]*$"},
                    "additionalProperties": {"type": "object", "minProperties": 1,
                                             "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"},
                                             "additionalProperties": _STATS}},
        "prediction": {"type": ["object", "null"]},
    },
}


@dataclass
class Lut:
    """A validated latency table: ``latency[batch][config id]`` -> stats dict."""

    path: str
    data: dict

    @property
    def device_key(self) -> str:
        return self.data["device_key"]

    @property
    def batches(self) -> list[int]:
        return sorted(int(b) for b in self.data["latency"])

    def table(self, batch: int, metric: str) -> dict[int, tuple[float, bool]]:
        """{config id: (latency ms at ``metric``, predicted)} for one batch size."""
        if metric not in METRICS:
            raise StitchError(f"unknown latency metric {metric!r}; choose from {', '.join(METRICS)}")
        rows = self.data["latency"].get(str(exact_int(batch)))
        if rows is None:
            raise StitchError(f"{self.path}: no entries for batch {batch!r} (measured: "
                              f"{', '.join(map(str, self.batches))}); run bench with --batch {batch}, "
                              f"or pass --batch {self.batches[0]}")
        return {int(cid): (e[f"{metric}_ms"], e["predicted"]) for cid, e in rows.items()}


def bench_command(bundle: Bundle, device_key: str) -> str:
    """The command that measures the table of ``device_key``, for messages that say to run it."""
    return command("bench", bundle.root, *bench_options(device_key))


def validate(data, bundle: Bundle, path: str, device_key: str) -> Lut:
    """Check a LUT object against the schema and the bundle; return it as a Lut."""
    fix = f"re-run `{bench_command(bundle, device_key)}`"
    try:
        jsonschema.validate(data, _SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top)"
        raise StitchError(f"{path}: invalid latency table at {where}: {exc.message}; {fix}") from None
    if data["device_key"] != device_key:
        raise StitchError(f"{path}: the table names device {data['device_key']!r}, not {device_key!r}; {fix}")
    source = bundle.manifest["source"]["sha256"]
    if data["bundle"]["source_sha256"] != source:
        raise StitchError(f"{path}: measured on another export of the checkpoint (source sha256 differs); {fix}")
    known = bundle.configs
    for batch, rows in data["latency"].items():
        for cid, e in rows.items():
            if int(cid) not in known:
                raise StitchError(f"{path}: batch {batch} names config {cid}, which this bundle does not have; {fix}")
            if not (e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] and math.isfinite(e["p99_ms"] + e["throughput"])):
                raise StitchError(f"{path}: batch {batch} config {cid}: latencies must be finite with "
                                  f"p50 <= p90 <= p99; {fix}")
    return Lut(path, data)


def read_lut(bundle: Bundle, device_key: str, alternative: str = "") -> Lut:
    """The validated LUT of ``device_key``. Errors say which bench command measures this table; a
    missing one also says ``alternative``."""
    path = bundle.lut_path(device_key)
    bench = bench_command(bundle, device_key)
    if not os.path.isfile(path):
        have = available(bundle)
        raise StitchError(f"{bundle.root}: no latency table for device {device_key} "
                          f"({'have: ' + ', '.join(have) if have else 'none measured yet'}); run `{bench}` "
                          f"on this machine first{alternative}")
    try:
        data = read_json(path)
    except ValueError as exc:  # bad JSON or encoding
        raise StitchError(f"{path}: corrupt latency table ({exc}); re-run `{bench}`") from None
    except OSError as e:  # unreadable: permissions, a folder under that name
        raise StitchError(f"{path}: cannot read the latency table ({e.strerror or e})") from None
    return validate(data, bundle, path, device_key)


def write_lut(bundle: Bundle, data: dict) -> Lut:
    """Validate, then write atomically (a half-written or invalid table never replaces a good one)."""
    path = bundle.lut_path(data["device_key"])
    lut = validate(data, bundle, path, data["device_key"])
    same_export(bundle, "bench", graphs=True)
    try:
        write_json(path, data)
    except OSError as e:  # e.g. the table's name taken by a folder (bench checked the folder first)
        raise StitchError(f"{path}: cannot write the latency table ({e.strerror or e})") from None
    return lut


def available(bundle: Bundle) -> list[str]:
    """Device keys that have a table in this bundle."""
    folder = os.path.join(bundle.root, "lut")
    if not os.path.isdir(folder):
        return []
    return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))


def check_tables(bundle: Bundle) -> str:
    """Validate every table of the bundle as ``select`` reads them (they are not hashed: ``bench``
    writes them after export); one line saying what was checked."""
    keys = available(bundle)
    for key in keys:
        read_lut(bundle, key)
    return f"latency tables: {len(keys)} valid{': ' + ', '.join(keys) if keys else ''}"
