"""AOTInductor per config on a GPU: PyTorch eager vs AOTInductor vs AOTInductor + CUDA graph.

    python benchmarks/gpu.py [--work DIR] [--anchors 3] [--batch 1,64] [--runs 20] [--warmup 5] [--device cuda:0]

A DeiT Ti/S/B SN-Net (71 configs; ``--anchors 2``: Ti/S, 36 configs) with random weights is
exported with ``--targets aoti --device cuda`` (packages compiled in parallel), then every config
runs at each batch size in three ways, back to back so they see the same conditions:
  eager   ``net(x, config)`` under ``torch.no_grad()``, fp32 (TF32 off, torch's default)
  aoti    the runtime's AOTInductor chain of segment packages (``Runtime(..., backend="aoti")``)
  graphs  the same chain captured as one CUDA graph per config and batch size
Inputs are already on the GPU; each call ends with a stream synchronisation; the median of
``--runs`` calls is reported, with ratios to eager (above 1: faster than eager) and each output's
relative error against eager. On the GPU it also prints the device memory that loading every
config takes, and what running every batch added (in graphs mode: the captured graphs and their
static inputs), against the unique weight bytes. ``--device cpu`` runs eager vs aoti on the CPU
(no graphs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import stitch_compile as sc
from common import deit_snnet_checkpoint
from stitch_compile.bundle import load_bundle
from stitch_compile.model import describe_route
from stitch_compile.runtime import Runtime


def median_ms(fn, x, warmup: int, runs: int, sync) -> float:
    for _ in range(warmup):
        fn(x)
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def gpu_memory(device) -> tuple[int, int]:
    """(bytes torch's allocator holds, bytes in use on the whole device): the second also counts
    what AOTInductor allocates outside torch's allocator, and code and context memory. Unreferenced
    blocks are collected and the allocator's cache emptied first, so that neither counts."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device), total - free


def report_memory(what: str, device, before: tuple[int, int], unique: int) -> dict:
    allocated, used = (now - then for now, then in zip(gpu_memory(device), before))
    print(f"{what}: +{allocated / 1e6:.1f} MB allocated by torch = {allocated / unique:.3f} x the "
          f"{unique / 1e6:.1f} MB of unique weights; +{used / 1e6:.1f} MB in use on the device", flush=True)
    return {"allocated_bytes": allocated, "device_bytes": used}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-gpu")
    parser.add_argument("--anchors", type=int, default=3, choices=[2, 3])
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--jobs", type=int, default=None, help="parallel package compiles (default: one per two CPUs)")
    parser.add_argument("--configs", default="all", help="'all' or comma-separated ids")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; run it on a machine with an NVIDIA GPU, or pass --device cpu",
              file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    name = "snnet_deit_ti_s_b.pth" if args.anchors == 3 else "snnet_deit_ti_s.pth"
    net = sc.load(deit_snnet_checkpoint(os.path.join(args.work, name), anchors=args.anchors))
    bundle = os.path.join(args.work, name.replace(".pth", ".bundle"))
    started = time.perf_counter()
    sc.export(net, bundle, targets="aoti", device=args.device, configs=args.configs, jobs=args.jobs, quiet=False,
              report=lambda line: print(line, flush=True))
    build = next(b for b in load_bundle(bundle).manifest["targets"]["aoti"]["builds"].values()
                 if b["device"] == device.type)
    print(f"export (onnx + aoti for {device.type}, parity included): {time.perf_counter() - started:.0f} s, "
          f"{len(build['packages'])} packages for {len(build['segments'])} segments", flush=True)

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    net = net.to(device).eval()
    modes = ["aoti", "graphs"] if cuda else ["aoti"]  # graphs last: a failed capture can spoil the CUDA context
    what = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {what}  torch {torch.__version__}  median of {args.runs} calls, ms", flush=True)
    table, resident = [], {}
    unique = load_bundle(bundle).manifest["weights"]["unique_bytes"]
    for mode in modes:
        before = gpu_memory(device) if cuda else None
        rt = Runtime(bundle, device=args.device, backend="aoti", cuda_graphs=mode == "graphs")  # every config loaded
        if cuda:  # the one-copy claim on the GPU: every config resident for about the unique weights
            resident[mode] = {"loaded": report_memory(f"{mode}: {len(rt.config_ids)} configs loaded",
                                                      device, before, unique)}
        routes = {c["id"]: c["route"] for c in rt.bundle.manifest["configs"]}
        try:
            for batch in [int(b) for b in args.batch.split(",")]:
                print(f"{'mode':>6} {'batch':>5} {'id':>3} {'eager':>8} {mode:>8} {'eager/' + mode:>12} "
                      f"{'rel err':>8}  route", flush=True)
                x = torch.randn(batch, *net.input_shape, device=device)
                rows = []
                for cid in rt.config_ids:
                    runner = rt.runner(cid)
                    with torch.no_grad():  # eager and this mode back to back: the same conditions
                        err = rel_err(runner(x), net(x, cid))
                        eager = median_ms(lambda t: net(t, cid), x, args.warmup, args.runs, sync)
                    ms = median_ms(runner, x, args.warmup, args.runs, sync)
                    rows.append({"mode": mode, "batch": batch, "id": cid, "eager_ms": eager, "ms": ms,
                                 "eager_over": eager / ms, "rel_err": err})
                    print(f"{mode:>6} {batch:5} {cid:3} {eager:8.3f} {ms:8.3f} {eager / ms:12.2f} {err:8.1e}  "
                          f"{describe_route(routes[cid])}", flush=True)
                ratios = [r["eager_over"] for r in rows]
                print(f"batch {batch}: eager/{mode} median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
                      f"max {max(ratios):.2f} over {len(rows)} configs; worst rel err "
                      f"{max(r['rel_err'] for r in rows):.1e}", flush=True)
                table.extend(rows)
                del x, runner  # no input of this batch in the next reading
        except Exception as e:  # report the mode that cannot run here; what was measured stays
            print(f"{mode}: failed, stopped: {str(e).splitlines()[0][:200]}", flush=True)
            break
        if cuda:  # what running added: activations, and in graphs mode the captured graphs and their inputs
            resident[mode]["after_runs"] = report_memory(f"{mode}: after every batch", device, before, unique)
        del rt  # the next mode's baseline holds none of this one
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": what, "torch": torch.__version__, "runs": args.runs, "unique_weight_bytes": unique,
                       "resident_bytes": resident, "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
