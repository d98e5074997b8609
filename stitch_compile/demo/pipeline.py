"""``stitch-compile demo``: the whole story on one CPU, through the public API only.

Train three ViT anchors on scikit-learn's digits, stitch them (LS init + stitched fine-tune),
save the checkpoint in the public SN-Net v1 layout, export every config, bench them on this CPU,
measure every config's test accuracy with the exported graphs, and pick configs for two budgets.
Latency is that of a batch of 64 digits: at batch 1 these tiny graphs cost their per-operator
overhead, not their FLOPs, and would hide the accuracy/latency trade-off the demo is about.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np

from ..bench import bench
from ..bundle import check_replaceable, leftover
from ..errors import StitchError, command
from ..accuracy import store_accuracy
from ..export import export
from ..model import describe_route, load
from ..model.checkpoint import save_checkpoint, starts_with_zip_magic
from ..plot import is_png, plot
from ..runtime import Runtime
from .train import train_demo

BATCH = 64
CHECKPOINT, BUNDLE, PLOT = "snnet_digits.pth", "bundle", "pareto.png"


def check_out(out: str) -> None:
    """Before a minute of training: ``out`` must be new, empty or an earlier demo's folder, whose
    three outputs the demo replaces. Anything else in it (or another file under those names) is
    the user's, and is refused rather than overwritten."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise StitchError(f"--out {out}: exists and is not a folder; choose a new or empty folder")
    if not os.path.isdir(out):
        return
    # what a killed demo's writers left is cleared when the outputs are written again
    outputs = {CHECKPOINT, BUNDLE, PLOT}
    foreign = sorted(n for n in set(os.listdir(out)) - outputs if leftover(n) not in outputs)
    for name, ours in ((CHECKPOINT, starts_with_zip_magic), (PLOT, is_png)):  # a torch zip, a PNG
        path = os.path.join(out, name)
        if os.path.exists(path) and not ours(path):
            foreign.append(name)
    if foreign:
        raise StitchError(f"--out {out}: holds {foreign[0]}, which an earlier demo did not write; "
                          "choose a new or empty folder")
    check_replaceable(os.path.join(out, BUNDLE))


def run_demo(out: str, fast: bool = False, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run every step into folder ``out``; return what the demo showed (for tests and scripts)."""
    check_out(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise StitchError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    started = time.perf_counter()
    say = (lambda _m: None) if quiet else (lambda m: echo(f"[{time.perf_counter() - started:5.1f}s] {m}"))
    trained = train_demo(fast=fast, progress=say)
    ckpt = os.path.join(out, CHECKPOINT)
    save_checkpoint(trained.net, ckpt, args=argparse.Namespace(model="snnet_digits", fast=fast))
    say(f"saved {ckpt} in the public SN-Net v1 layout")

    net = load(ckpt)  # from the file, as any user's checkpoint
    bundle = export(net, os.path.join(out, BUNDLE), targets="onnx", quiet=quiet, report=say)
    say(f"exported {len(bundle.configs)} configs to {bundle.root}")
    runtime = Runtime(bundle, device="cpu", threads=1)
    lut = bench(runtime, batches=(BATCH,), runs=20 if fast else 40, warmup=5, quiet=quiet)
    say(f"benched on {runtime.device_key}")

    test_x, test_y = trained.data.test_x.numpy(), trained.data.test_y.numpy()
    accuracy = {cid: 100.0 * float((runtime.run(test_x, cid).argmax(1) == test_y).mean()) for cid in runtime.config_ids}
    bundle = store_accuracy(bundle, accuracy, f"digits test split ({len(test_y)} images), measured with ONNX Runtime")
    runtime = Runtime(bundle, device="cpu", threads=1)
    selector = runtime.selector("p50", BATCH)
    frontier = {c.id for c in selector.frontier()}
    latency = {cid: ms for cid, (ms, _) in lut.table(BATCH, "p50").items()}

    echo(f"{'id':>3} {'GFLOPs':>8} {'p50 ms':>7} {'top-1 %':>7}  route   (latency: batch of {BATCH}; * = on the frontier)")
    for c in sorted(bundle.manifest["configs"], key=lambda c: latency[c["id"]]):
        mark = "*" if c["id"] in frontier else " "
        echo(f"{c['id']:>3} {c['flops'] / 1e9:>8.5f} {latency[c['id']]:>7.3f} {accuracy[c['id']]:>7.2f} {mark} "
             f"{describe_route(c['route'])}")
    summary = _effect(bundle.manifest["configs"], accuracy, latency, frontier)
    echo(summary["line"])
    budgets = _budgets(bundle.manifest["configs"], latency)
    for budget in budgets:
        choice = runtime.choice(budget, batch=BATCH)
        echo(f"budget {budget:.3f} ms -> config {choice.id}: {choice.latency_ms:.3f} ms, top-1 {choice.accuracy:.2f}%")
    png = plot(bundle, os.path.join(out, PLOT), selector=selector, title="SN-Net on digits")
    echo(f"wrote {png}; total {time.perf_counter() - started:.0f} s")
    echo(f"next: {command('select', bundle.root, '--budget-ms', f'{budgets[0]:g}', '--batch', BATCH, '--threads', 1)} "
         "(the table this demo measured)")
    return {"bundle": bundle.root, "accuracy": accuracy, "latency": latency, "frontier": sorted(frontier),
            "budgets": {b: runtime.select(b, batch=BATCH) for b in budgets}, "png": png, **summary}


def _anchor_ids(configs: list[dict]) -> list[int]:
    return [c["id"] for c in configs if len(c["anchors"]) == 1]


def _effect(configs: list[dict], accuracy: dict, latency: dict, frontier: set) -> dict:
    """How many stitched configs land between the anchors, and how many are on the frontier."""
    anchors = _anchor_ids(configs)
    lo, hi = min(accuracy[a] for a in anchors), max(accuracy[a] for a in anchors)
    fast, slow = min(latency[a] for a in anchors), max(latency[a] for a in anchors)
    stitched = [c["id"] for c in configs if c["id"] not in anchors]
    between = [cid for cid in stitched if lo <= accuracy[cid] <= hi and fast <= latency[cid] <= slow]
    on_frontier = [cid for cid in stitched if cid in frontier]
    line = (f"SN-Net effect: {len(between)} of {len(stitched)} stitched configs lie between the anchors in both "
            f"accuracy ({lo:.1f}-{hi:.1f}%) and latency; {len(frontier)} configs on the latency-accuracy frontier, "
            f"{len(on_frontier)} of them stitched")
    return {"between": between, "stitched": stitched, "stitched_on_frontier": on_frontier, "line": line}


def _budgets(configs: list[dict], latency: dict) -> list[float]:
    """Two budgets inside the anchors' latency range: a third and two thirds of the way up."""
    anchors = sorted(latency[a] for a in _anchor_ids(configs))
    lo, hi = anchors[0], anchors[-1]
    return [float(np.round(lo + (hi - lo) * f, 4)) for f in (1 / 3, 2 / 3)]
