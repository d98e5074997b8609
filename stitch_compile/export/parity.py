"""Parity: every exported config against the PyTorch StitchableNet on fresh random inputs."""

from __future__ import annotations

import math
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


class Reference:
    """PyTorch's logits of each config on random inputs, computed once and shared by every
    target's parity check: the eager forward costs about as much as the exported one, so each
    target after the first costs about half as much to check.

    Inputs are drawn per (config, batch) from one seed, so they are the same for every target
    and need not be kept; ``seed=None`` draws a fresh one.
    """

    def __init__(self, net: StitchableNet, seed: int | None = None):
        self.net = net
        self.seed = np.random.SeedSequence(seed).entropy
        self._logits: dict[tuple[int, int], np.ndarray] = {}

    def inputs(self, config_id: int, batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, config_id, batch])
        return rng.standard_normal((batch, *self.net.input_shape), dtype=np.float32)

    def logits(self, config_id: int, batch: int) -> np.ndarray:
        if (config_id, batch) not in self._logits:
            with torch.no_grad():
                x = torch.from_numpy(self.inputs(config_id, batch))
                self._logits[config_id, batch] = self.net(x, config_id).numpy()
        return self._logits[config_id, batch]


def compare(ref: Reference, config_id: int, run) -> dict:
    """{"batch_<n>": {"max_abs", "max_rel"}} for ``run`` (image array -> logits array) of one config.

    Relative error is max |out - ref| / max |ref|: logits near zero make element-wise ratios
    meaningless, while the scale of the logits is what a classifier's decision depends on.
    """
    out = {}
    for batch in BATCHES:
        want = ref.logits(config_id, batch)
        if not np.isfinite(want).all():
            raise StitchError(f"config {config_id}: PyTorch's own logits on random inputs are not finite; "
                              "the checkpoint's weights overflow float32 and no export can match them")
        err = float(np.abs(run(ref.inputs(config_id, batch)).astype(np.float64) - want).max())
        err = math.inf if math.isnan(err) else err  # a NaN would pass every "> tolerance" check
        out[f"batch_{batch}"] = {"max_abs": err, "max_rel": err / max(float(np.abs(want).max()), 1e-12)}
    return out


def worst_rel(entry: dict) -> float:
    return max(v["max_rel"] for v in entry.values())


def check_target(ref: Reference, root: str, graphs: dict[str, str], target: str, quiet: bool = True,
                 rel_tol: float = FP32_REL_TOL) -> dict:
    """Parity of every config graph of one target; raise naming the configs over ``rel_tol``."""
    shared = SharedWeights(os.path.join(root, "onnx"))
    results = {}
    for cid, rel in tqdm(graphs.items(), desc=f"parity {target}", disable=quiet, file=sys.stderr):
        session = shared.session(os.path.join(root, rel))
        results[cid] = compare(ref, int(cid), lambda x, s=session: s.run(["logits"], {"image": x})[0])
    return within(results, target, rel_tol)


def within(results: dict, target: str, rel_tol: float) -> dict:
    """``results`` when every config is within ``rel_tol``; else raise naming the configs that are not."""
    bad = {cid: worst_rel(r) for cid, r in results.items() if worst_rel(r) > rel_tol}
    if bad:
        worst = max(bad, key=bad.get)
        raise StitchError(f"parity check failed for {target} configs {', '.join(sorted(bad, key=int))} "
                          f"(worst: config {worst}, relative error {bad[worst]:.2e} > {rel_tol:g})")
    return results
