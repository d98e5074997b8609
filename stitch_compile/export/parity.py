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


def compare(net: StitchableNet, config_id: int, session, rng: np.random.Generator) -> dict:
    """{"batch_<n>": {"max_abs", "max_rel"}} for one ONNX Runtime session of one config.

    Relative error is max |out - ref| / max |ref|: logits near zero make element-wise ratios
    meaningless, while the scale of the logits is what a classifier's decision depends on.
    """
    out = {}
    for batch in BATCHES:
        x = rng.standard_normal((batch, *net.input_shape), dtype=np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x), config_id).numpy()
        got = session.run(["logits"], {"image": x})[0]
        err = float(np.abs(got.astype(np.float64) - ref).max())
        out[f"batch_{batch}"] = {"max_abs": err, "max_rel": err / max(float(np.abs(ref).max()), 1e-12)}
    return out


def worst_rel(entry: dict) -> float:
    return max(v["max_rel"] for v in entry.values())


def check_target(net: StitchableNet, root: str, graphs: dict[str, str], rng: np.random.Generator,
                 target: str, quiet: bool = True) -> dict:
    """Parity of every config graph of one target; raise naming the configs over tolerance."""
    shared = SharedWeights(os.path.join(root, "onnx"))
    results = {}
    for cid, rel in tqdm(graphs.items(), desc=f"parity {target}", disable=quiet, file=sys.stderr):
        results[cid] = compare(net, int(cid), shared.session(os.path.join(root, rel)), rng)
    bad = {cid: worst_rel(r) for cid, r in results.items() if worst_rel(r) > FP32_REL_TOL}
    if bad:
        worst = max(bad, key=bad.get)
        raise StitchError(f"parity check failed for {target} configs {', '.join(sorted(bad, key=int))} "
                          f"(worst: config {worst}, relative error {bad[worst]:.2e} > {FP32_REL_TOL:g})")
    return results
