"""The compiler: a StitchableNet -> a bundle of every config, weights stored once.

``export`` traces each unique segment once, composes one graph per config, writes the shared
weight store, checks every config against PyTorch, and renames the finished bundle into place.
Export never imports the runtime; both share ``bundle`` and ``ortweights``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnx
import torch
from tqdm import tqdm

from .. import __version__
from ..bundle import SCHEMA_VERSION, Bundle, list_files, load_bundle, sha256_file, staging, write_json
from ..errors import StitchError
from ..model.network import StitchableNet
from . import targets as target_registry
from .compose import compose_config, file_key, prepare_segment, standalone_segment
from .ort_target import optimize
from .parity import BATCHES, FP32_REL_TOL, check_target
from .trace import trace_segment
from .weights import WeightStore

DEFAULT_OPSET = 17


def export(net: StitchableNet, out: str, targets="onnx", configs="all", opset: int = DEFAULT_OPSET,
           quiet: bool = True, seed: int | None = None, report=print) -> Bundle:
    """Compile ``configs`` of ``net`` for ``targets`` into the bundle folder ``out``.

    Re-running with the same checkpoint, tool version, opset and configs reuses the bundle when
    it already holds the targets asked for. ``report`` receives one line per skipped target.
    """
    build, skipped = target_registry.resolve(targets)
    for name, reason in skipped.items():
        report(f"{name}: skipped ({reason})")
    ids = _config_ids(net, configs)
    source = _source(net)
    key = {"source": source["sha256"], "tool": __version__, "opset": opset, "configs": ids}
    reused = _up_to_date(out, key, build)
    if reused is not None:
        report(f"{out}: up to date ({', '.join(build)}); nothing to do")
        return reused
    torch_threads = torch.get_num_threads()
    started = time.perf_counter()
    with staging(out) as tmp:
        manifest, store = _compile(net, tmp, ids, opset, quiet)
        manifest["export_seconds"] = round(time.perf_counter() - started, 3)
        parity = {"tolerance_rel": FP32_REL_TOL, "batches": list(BATCHES), "targets": {}}
        rng = np.random.default_rng(seed)
        if "ort" in build:
            manifest["targets"]["ort"] = _build_ort(tmp, manifest["targets"]["onnx"]["graphs"], store, quiet)
        for name, target in manifest["targets"].items():
            parity["targets"][name] = check_target(net, tmp, target["graphs"], rng, name, quiet)
        write_json(os.path.join(tmp, "parity.json"), parity)
        manifest.update(source=source, reuse_key=key, files=list_files(tmp))
        write_json(os.path.join(tmp, "manifest.json"), manifest)
    torch.set_num_threads(torch_threads)
    return load_bundle(out)


def _config_ids(net: StitchableNet, configs) -> list[int]:
    if configs in (None, "all"):
        return net.configs.ids
    if isinstance(configs, str):
        try:
            configs = [int(c) for c in configs.split(",") if c.strip()]
        except ValueError:
            raise StitchError(f"--configs {configs!r}: expected 'all' or comma-separated config ids") from None
    return [net.configs[c].id for c in configs]


def _source(net: StitchableNet) -> dict:
    path = getattr(net, "source_path", None)
    if not path:
        return {"file": "", "sha256": ""}
    return {"file": os.path.basename(path), "sha256": sha256_file(path)}


def _up_to_date(out: str, key: dict, build: list[str]) -> Bundle | None:
    if not key["source"] or not os.path.isfile(os.path.join(out, "manifest.json")):
        return None
    try:
        bundle = load_bundle(out)
    except StitchError:
        return None  # a damaged bundle is rebuilt, not reused
    have = bundle.manifest
    return bundle if have.get("reuse_key") == key and set(build) <= set(have["targets"]) else None


def _compile(net: StitchableNet, root: str, ids: list[int], opset: int, quiet: bool) -> tuple[dict, WeightStore]:
    """Trace each unique segment once, compose every config, write the onnx target."""
    onnx_dir = os.path.join(root, "onnx")
    os.makedirs(onnx_dir)
    routes = {cid: list(net.configs[cid].route) for cid in ids}
    keys = list(dict.fromkeys(k for route in routes.values() for k in route))
    store = WeightStore(os.path.join(onnx_dir, "weights.bin"))
    prepared, segments = {}, {}
    for key in tqdm(keys, desc="trace segments", disable=quiet, file=sys.stderr):
        seg = net.segments[key]
        prepared[key] = prepare_segment(key, trace_segment(seg, opset), store)
        rel = f"onnx/segment_{file_key(key)}.onnx"
        onnx.save(standalone_segment(key, prepared[key]), os.path.join(root, rel))
        segments[key] = {"file": rel, "in_shape": list(seg.in_shape), "flops": seg.flops}
    store.close()
    with torch.no_grad():
        classes = int(net(torch.zeros(1, *net.input_shape), ids[0]).shape[-1])
    graphs = {}
    for cid in tqdm(ids, desc="compose configs", disable=quiet, file=sys.stderr):
        rel = f"onnx/config_{cid}.onnx"
        onnx.save(compose_config(routes[cid], prepared, list(net.input_shape), classes), os.path.join(root, rel))
        graphs[str(cid)] = rel
    description = net.describe()
    wanted = set(ids)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "stitch-compile", "version": __version__},
        "family": description["family"],
        "anchors": description["anchors"],
        "input": {"name": "image", "shape": ["batch", *net.input_shape], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", classes]},
        "configs": [c for c in description["configs"] if c["id"] in wanted],
        "segments": segments,
        "weights": {"file": "onnx/weights.bin", "unique_bytes": store.unique_bytes},
        "targets": {"onnx": {"opset": opset, "weights": ["onnx/weights.bin"], "graphs": graphs}},
    }, store


def _build_ort(root: str, onnx_graphs: dict[str, str], base: WeightStore, quiet: bool) -> dict:
    derived = WeightStore(os.path.join(root, "onnx", "weights.ort.bin"), base=base)
    graphs = {}
    for cid, rel in tqdm(onnx_graphs.items(), desc="ort optimise", disable=quiet, file=sys.stderr):
        out_rel = rel.replace(".onnx", ".ort.onnx")
        optimize(os.path.join(root, rel), os.path.join(root, out_rel), derived)
        graphs[cid] = out_rel
    derived.close()
    weights = ["onnx/weights.bin"] + (["onnx/weights.ort.bin"] if derived.size else [])
    if not derived.size:
        os.unlink(derived.path)
    return {"optimization": "extended", "provider": "CPUExecutionProvider", "weights": weights,
            "derived_bytes": derived.unique_bytes, "graphs": graphs}
