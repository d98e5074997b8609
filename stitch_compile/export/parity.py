"""Parity: every exported config against the PyTorch StitchableNet on fresh random inputs."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from ..errors import StitchError
from ..model.network import StitchableNet
from ..ortweights import SharedWeights

BATCHES = (1, 4)
FP32_REL_TOL = 1e-4
# float16 keeps 11 significant bits; the test fixtures' fp16 graphs stay within 3e-3.
REL_TOL = {"fp32": FP32_REL_TOL, "fp16": 1e-2}


def tolerance(target: dict) -> float:
    """Relative tolerance for a manifest target entry, by its precision (fp32 when it has none)."""
    return REL_TOL[target.get("precision", "fp32")]


def compare(net: StitchableNet, config_id: int, run, rng: np.random.Generator) -> dict:
    """{"batch_<n>": {"max_abs", "max_rel"}} for ``run`` (image array -> logits array) of one config.

    Relative error is max |out - ref| / max |ref|: logits near zero make element-wise ratios
    meaningless, while the scale of the logits is what a classifier's decision depends on.
    """
    out = {}
    for batch in BATCHES:
        x = rng.standard_normal((batch, *net.input_shape), dtype=np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x), config_id).numpy()
        got = run(x)
        err = float(np.abs(got.astype(np.float64) - ref).max())
        out[f"batch_{batch}"] = {"max_abs": err, "max_rel": err / max(float(np.abs(ref).max()), 1e-12)}
    return out


def worst_rel(entry: dict) -> float:
    return max(v["max_rel"] for v in entry.values())


def check_target(net: StitchableNet, root: str, graphs: dict[str, str], rng: np.random.Generator,
                 target: str, quiet: bool = True, rel_tol: float = FP32_REL_TOL) -> dict:
    """Parity of every config graph of one target; raise naming the configs over ``rel_tol``."""
    shared = SharedWeights(os.path.join(root, "onnx"))
    results = {}
    for cid, rel in tqdm(graphs.items(), desc=f"parity {target}", disable=quiet, file=sys.stderr):
        session = shared.session(os.path.join(root, rel))
        results[cid] = compare(net, int(cid), lambda x, s=session: s.run(["logits"], {"image": x})[0], rng)
    return within(results, target, rel_tol)


def within(results: dict, target: str, rel_tol: float) -> dict:
    """``results`` when every config is within ``rel_tol``; else raise naming the configs that are not."""
    bad = {cid: worst_rel(r) for cid, r in results.items() if worst_rel(r) > rel_tol}
    if bad:
        worst = max(bad, key=bad.get)
        raise StitchError(f"parity check failed for {target} configs {', '.join(sorted(bad, key=int))} "
                          f"(worst: config {worst}, relative error {bad[worst]:.2e} > {rel_tol:g})")
    return results
