"""``verify``: re-check a bundle as untrusted input, and optionally its parity against PyTorch."""

from __future__ import annotations

import functools

import onnx

from ..bundle import Bundle, load_bundle, read_json, sha256_file
from ..errors import StitchError
from ..model.network import StitchableNet
from ..hardware import torch_device
from .aoti_target import build_key, check_aoti
from .parity import Reference, check_target, tolerance, worst_rel


def verify_bundle(root: str, net: StitchableNet | None = None, quiet: bool = True) -> list[str]:
    """Lines describing what was checked; raises StitchError at the first problem."""
    bundle = load_bundle(root, check_hashes=True)
    m = bundle.manifest
    lines = [f"{root}: schema v{m['schema_version']}, {len(m['files'])} files, sha256 and paths ok"]
    if "parity.json" not in m["files"]:
        raise StitchError(f"{root}: parity.json is missing from the manifest; re-export the bundle")
    try:
        recorded = read_json(bundle.path("parity.json"))
    except ValueError as exc:  # it hashes right, so the manifest was edited to match
        raise StitchError(f"{root}: corrupt parity.json ({exc}); the bundle is tampered, re-export it") from None
    io = _segment_io(bundle)
    for cid in bundle.configs:
        bundle.check_route(cid, io)
    lines.append(f"routes: the segments of all {len(m['configs'])} configs fit one another")
    ids = {str(c["id"]) for c in m["configs"]}
    for name, target in _parity_targets(m):
        entries = recorded.get("targets", {}).get(name, {})
        if set(entries) != ids:
            raise StitchError(f"{root}: parity.json does not cover every {name} config; the bundle is tampered")
        worst = max(worst_rel(e) for e in entries.values())
        if worst > tolerance(target):
            raise StitchError(f"{root}: recorded {name} parity {worst:.2e} exceeds {tolerance(target):g}")
        lines.append(f"{name}: {len(entries)} configs, recorded worst relative error {worst:.2e}")
    if net is not None:
        source = m["source"]["sha256"]
        if source and getattr(net, "source_path", None) and sha256_file(net.source_path) != source:
            raise StitchError(f"{root}: the checkpoint given is not the one this bundle was exported from (sha256 differs)")
        for c in m["configs"]:  # parity runs the checkpoint's routes; the runtime runs the manifest's
            if c["id"] not in net.configs or list(net.configs[c["id"]].route) != c["route"]:
                raise StitchError(f"{root}: config {c['id']} runs another route than the checkpoint's config "
                                  f"{c['id']}; the bundle is tampered")
        lines.append(f"routes: all {len(m['configs'])} configs run the checkpoint's routes")
        ref = Reference(net)
        for name, target in _parity_targets(m):
            if name.startswith("aoti:"):
                key = name.split(":", 1)[1]
                if not _runs_here(key, target):
                    lines.append(f"{name}: built for another device; parity not re-run here")
                    continue
                fresh = check_aoti(ref, root, key, target, [int(i) for i in ids], quiet, tolerance(target))
            else:
                fresh = check_target(ref, root, target["graphs"], name, quiet, tolerance(target))
            lines.append(f"{name}: parity re-run on fresh inputs, worst relative error "
                         f"{max(worst_rel(e) for e in fresh.values()):.2e}")
    return lines


def _segment_io(bundle: Bundle):
    """key -> (input shape, output shape) of the segment's ONNX graph, read without its weights."""
    def io(key: str) -> tuple[list, list]:
        model = onnx.load(bundle.path(bundle.manifest["segments"][key]["file"]), load_external_data=False)
        graph = onnx.shape_inference.infer_shapes(model).graph  # the exporter leaves some outputs symbolic
        return tuple([d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                     for v in (graph.input[0], graph.output[0]))
    return functools.cache(io)


def _parity_targets(manifest: dict):
    """(name in parity.json, manifest entry): each aoti build is checked on its own."""
    for name, target in manifest["targets"].items():
        if name == "aoti":
            yield from ((f"aoti:{key}", build) for key, build in target["builds"].items())
        else:
            yield name, target


def _runs_here(key: str, build: dict) -> bool:
    try:
        return build_key(torch_device(build["device"])) == key
    except StitchError:  # e.g. a CUDA build on a machine without a GPU
        return False
