"""What an export keeps from the bundle it replaces: the measurements made on that bundle.

Top-1 accuracy can take hours of evaluation and depends only on the checkpoint and the config, so
it is kept whenever the checkpoint is the same. Latency tables describe the compiled graphs, so
they are kept only when those are the same too (same checkpoint, tool, opset and configs: a
re-export that adds a target). Everything else is rebuilt.
"""

from __future__ import annotations

import os
import shutil

from ..bundle import MANIFEST, load_bundle, read_json
from ..errors import StitchError


def keep_measurements(out: str, tmp: str, key: dict, manifest: dict, report) -> None:
    """Copy accuracy into ``manifest`` and the LUTs into ``tmp`` from the bundle at ``out``."""
    if not key["source"] or not os.path.isfile(os.path.join(out, MANIFEST)):
        return
    try:
        old = load_bundle(out)
    except StitchError:  # a damaged bundle has nothing trustworthy to keep
        return
    have = old.manifest
    if have["source"]["sha256"] != key["source"]:
        return
    accuracy = {c["id"]: c["accuracy"] for c in have["configs"] if "accuracy" in c}
    kept = [c for c in manifest["configs"] if c["id"] in accuracy]
    for config in kept:
        config["accuracy"] = accuracy[config["id"]]
    if kept and "accuracy" in have:
        manifest["accuracy"] = have["accuracy"]
    luts = []
    if have.get("reuse_key") == key and os.path.isdir(old.path("lut")):
        luts = [n for n in os.listdir(old.path("lut")) if n.endswith(".json") and not n.startswith(".")
                and os.path.isfile(old.path(f"lut/{n}"))  # a pipe would block the read
                and _same_graphs(old.path(f"lut/{n}"), manifest["targets"])]
        os.makedirs(os.path.join(tmp, "lut"), exist_ok=True)
        for name in luts:
            shutil.copy2(old.path(f"lut/{name}"), os.path.join(tmp, "lut", name))
    if kept or luts:
        report(f"{out}: kept top-1 of {len(kept)} configs and {len(luts)} latency tables from the bundle it replaces")


def _same_graphs(lut_path: str, targets: dict) -> bool:
    """Whether the table was measured on graphs this bundle still runs: the ort backend's graphs
    mode runs the ``ort`` target's graphs where the bundle has them, else ``onnx``'s, so adding
    the ort target changes what such a table described."""
    try:
        measured = read_json(lut_path)["device"].get("target")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return measured not in ("onnx", "ort") or measured == ("ort" if "ort" in targets else "onnx")
