"""The compiler: a StitchableNet -> a bundle of every config, weights stored once.

``export`` traces each unique segment once, composes one graph per config, writes the shared
weight store, checks every config against PyTorch, and renames the finished bundle into place.
Export never imports the runtime; both share ``bundle`` and ``ortweights``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import types

import onnx
import torch
from tqdm import tqdm

from .. import __version__
from ..bundle import (SCHEMA_VERSION, Bundle, list_files, load_bundle, recover, sha256_file, staging,
                      write_json)
from ..errors import StitchError
from ..model.network import StitchableNet
from ..hardware import torch_device
from . import targets as target_registry
from .aoti_target import build_aoti, build_key, check_aoti, keep_aoti_builds
from .carry import keep_measurements
from .compose import compose_config, file_key, prepare_segment, standalone_segment
from .fp16 import FP16_WEIGHTS, fp16_graphs
from .ort_target import optimize
from .parity import BATCHES, FP32_REL_TOL, REL_TOL, Reference, check_target, tolerance
from .tensorrt_ops import check_graphs
from .tensorrt_script import OPT_BATCH, write_build_script
from .tensorrt_target import build_engines, check_engines
from .trace import trace_segment
from .weights import WeightStore

DEFAULT_OPSET = 17
OPSETS = range(7, 24)  # what torch.onnx's TorchScript exporter accepts at all (torch 2.14)
DEFAULT_MAX_BATCH = 8


def export(net: StitchableNet, out: str, targets="onnx", configs="all", opset: int = DEFAULT_OPSET,
           quiet: bool = True, seed: int | None = None, report=print, precision: str = "fp32",
           max_batch: int = DEFAULT_MAX_BATCH, device: str = "cpu", jobs: int | None = None) -> Bundle:
    """Compile ``configs`` of ``net`` for ``targets`` into the bundle folder ``out``.

    Re-running with the same checkpoint, tool version, opset and configs reuses the bundle when
    it already holds the targets asked for. ``report`` receives one line per skipped target.
    ``precision`` and ``max_batch`` (the optimisation profile's largest batch) are the tensorrt
    target's options; ``device`` ('cpu' or 'cuda[:N]') is what the aoti target compiles for, with
    ``jobs`` packages compiled in parallel (default: one per two CPUs).
    AOTInductor builds for other devices already in ``out`` are kept when the checkpoint and
    configs are the same.
    """
    build, skipped = target_registry.resolve(targets)
    for name, reason in skipped.items():
        report(f"{name}: skipped ({reason})")
    trt_options = _tensorrt_options(build, precision, max_batch, report)
    ids = _config_ids(net, configs)
    source = _source(net)
    key = {"source": source["sha256"], "tool": __version__, "opset": opset, "configs": ids}
    if opset not in OPSETS:
        raise StitchError(f"--opset {opset}: the ONNX exporter writes opsets {OPSETS[0]} to {OPSETS[-1]}; "
                          f"the default is {DEFAULT_OPSET}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise StitchError(f"--jobs {jobs!r}: expected a positive integer")
    if "aoti" not in build and (device != "cpu" or jobs is not None):
        report("--device and --jobs apply to the aoti target only; ignored")
    aoti_key = build_key(torch_device(device)) if "aoti" in build else None
    recover(out)
    reused = _up_to_date(out, key, build, trt_options, aoti_key)
    if reused is not None:
        report(f"{out}: up to date ({', '.join(build)}); nothing to do")
        return reused
    started = time.perf_counter()
    with staging(out) as tmp:
        manifest, store = _compile(net, tmp, ids, opset, quiet)
        manifest["compile_seconds"] = round(time.perf_counter() - started, 3)
        parity = {"tolerance_rel": FP32_REL_TOL, "batches": list(BATCHES), "targets": {}}
        ref = Reference(net, seed)
        if "ort" in build:
            manifest["targets"]["ort"] = _build_ort(tmp, manifest["targets"]["onnx"]["graphs"], store, quiet)
        if "tensorrt" in build:
            manifest["targets"]["tensorrt"] = _build_tensorrt(tmp, manifest, trt_options, quiet, report)
        if "aoti" in build:
            manifest["targets"]["aoti"] = {"builds": dict([build_aoti(net, tmp, list(manifest["segments"]), store,
                                                                      device, quiet, jobs)])}
        checked = {}  # graphs -> parity: tensorrt's fp32 sources are the onnx graphs, checked once
        for name, target in manifest["targets"].items():
            if name == "aoti":
                for bk, entry in target["builds"].items():
                    parity["targets"][f"aoti:{bk}"] = check_aoti(ref, tmp, bk, entry, ids, quiet, FP32_REL_TOL)
                continue
            if target.get("engines"):
                parity["targets"][name] = check_engines(ref, tmp, target, quiet)
                continue
            graphs = tuple(target["graphs"].items())
            if graphs not in checked:
                checked[graphs] = check_target(ref, tmp, target["graphs"], name, quiet, tolerance(target))
            parity["targets"][name] = checked[graphs]
        if "aoti" in build:
            keep_aoti_builds(out, tmp, key, manifest, parity, report)
        write_json(os.path.join(tmp, "parity.json"), parity)
        manifest.update(source=source, reuse_key=key, files=list_files(tmp))
        keep_measurements(out, tmp, key, manifest, report)  # last: what bench/accuracy wrote meanwhile counts
        write_json(os.path.join(tmp, "manifest.json"), manifest)
    return load_bundle(out)


def _config_ids(net: StitchableNet, configs) -> list[int]:
    if configs in (None, "all"):
        return net.configs.ids
    given = configs
    if isinstance(configs, str):
        try:
            configs = [int(c) for c in configs.split(",") if c.strip()]
        except ValueError:
            raise StitchError(f"--configs {given!r}: expected 'all' or comma-separated config ids") from None
    ids = [net.configs[c].id for c in configs]
    if not ids:
        raise StitchError(f"--configs {given!r}: no config ids; pass 'all' or comma-separated ids")
    return ids


def _source(net: StitchableNet) -> dict:
    path = getattr(net, "source_path", None)
    if not path:
        return {"file": "", "sha256": ""}
    return {"file": os.path.basename(path), "sha256": sha256_file(path)}


def _up_to_date(out: str, key: dict, build: list[str], trt_options: dict, aoti_key: str | None) -> Bundle | None:
    if not key["source"] or not os.path.isfile(os.path.join(out, "manifest.json")):
        return None
    try:
        bundle = load_bundle(out)
    except StitchError:
        return None  # a damaged bundle is rebuilt, not reused
    have = bundle.manifest
    if have.get("reuse_key") != key or not set(build) <= set(have["targets"]):
        return None
    if aoti_key and aoti_key not in have["targets"]["aoti"]["builds"]:
        return None
    if "tensorrt" in build:
        trt = have["targets"]["tensorrt"]
        if any(trt.get(k) != v for k, v in trt_options.items()):
            return None
        if not trt.get("engines") and target_registry.unavailable_reason("tensorrt") is None:
            return None  # engines were pending and can be built here now
    return bundle


def _tensorrt_options(build: list[str], precision: str, max_batch: int, report) -> dict:
    if precision not in REL_TOL:
        raise StitchError(f"--precision {precision!r}: choose one of {', '.join(REL_TOL)}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise StitchError(f"--max-batch {max_batch!r}: expected a positive integer")
    if "tensorrt" not in build and (precision, max_batch) != ("fp32", DEFAULT_MAX_BATCH):
        report("--precision and --max-batch apply to the tensorrt target only; ignored")
    return {"precision": precision, "max_batch": max_batch}


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


def _build_tensorrt(root: str, manifest: dict, options: dict, quiet: bool, report) -> dict:
    """tensorrt/build.sh for any device, and the engines too where TensorRT and a GPU are here.

    The graphs the engines come from (fp32, or fp16 variants over one fp16 store) are first
    checked against the operators TensorRT's ONNX parser supports, so a bundle never ships a
    build script that fails on the device. The script is written even where engines are built:
    engines serve only this GPU model and TensorRT version, the script any other device.
    """
    graphs, weights = manifest["targets"]["onnx"]["graphs"], ["onnx/weights.bin"]
    if options["precision"] == "fp16":
        graphs, weights = fp16_graphs(root, graphs), weights + [f"onnx/{FP16_WEIGHTS}"]
    check_graphs(root, graphs)
    args = (root, graphs, manifest["input"]["name"], manifest["input"]["shape"][1:], options["precision"],
            options["max_batch"])
    entry = {**options, "opt_batch": OPT_BATCH, "weights": weights, "graphs": graphs,
             "build_script": write_build_script(*args)}
    reason = target_registry.unavailable_reason("tensorrt")
    if reason is None:
        return {**entry, **build_engines(*args, quiet)}
    report(f"tensorrt: engines not built here ({reason}); run {entry['build_script']} on the target device")
    return {**entry, "engines": None, "status": f"engines pending: run {entry['build_script']} on the target device"}


class _CallableModule(types.ModuleType):
    """This package, callable as ``export``: ``stitch_compile.export`` is the package itself
    whenever something imported it (or one of its modules) before the name was first read. It
    calls, shows the signature of and pickles as the function."""

    __call__ = staticmethod(export)

    def __reduce__(self):
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _CallableModule
sys.modules[__name__].__signature__ = inspect.signature(export)
