"""Export benchmark: storage and time of the bundle vs the naive per-config export.

    python benchmarks/export.py [--work DIR] [--naive-sample 4]

Builds a DeiT Ti/S/B SN-Net with random weights (real architecture, 71 configs), then in one
process measures: (1) the baseline, torch.onnx.export of the three anchors once; (2) the naive
per-config export (each config as a standalone ONNX file with its weights) on a sample of configs,
extrapolated to all 71 by their share of weights; (3) stitch-compile's export of all 71 configs
(onnx target), split into compile time and parity time; (4) parity of two targets on the sampled
configs against one shared PyTorch reference vs one reference per target. Prints ratios, not
absolute claims.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

import torch

import stitch_compile as sc
from stitch_compile.export import export
from stitch_compile.export.parity import Reference, check_target
from stitch_compile.export.trace import unfused_attention

from common import deit_snnet_checkpoint, folder_bytes


class OneConfig(torch.nn.Module):
    """A single config as a plain module, the way a user would export it without us."""

    def __init__(self, net, config_id):
        super().__init__()
        self.net, self.config_id = net, config_id

    def forward(self, x):
        return self.net(x, self.config_id)


def naive_export(module: torch.nn.Module, path: str, example: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.no_grad(), unfused_attention(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}})
    return time.perf_counter() - started


def route_bytes(net, config) -> int:
    """Bytes of the distinct parameters one config uses (what its standalone file must hold)."""
    params = {id(p): p for key in config.route for p in net.segments[key].module.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "stitch-bench"))
    parser.add_argument("--naive-sample", type=int, default=4, help="configs exported naively, then extrapolated")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    net = sc.load(deit_snnet_checkpoint(os.path.join(args.work, "snnet_deit_ti_s_b.pth")))
    example = torch.randn(1, *net.input_shape)
    scratch = tempfile.mkdtemp(dir=args.work)

    anchors_s = sum(naive_export(OneConfig(net, a), os.path.join(scratch, f"anchor{a}.onnx"), example)
                    for a in (0, 1, 2))
    sample = [c for c in net.configs if not c.is_anchor][:: max(1, 68 // args.naive_sample)][: args.naive_sample]
    sample_s = sample_bytes = 0
    for c in sample:
        path = os.path.join(scratch, f"config{c.id}.onnx")
        sample_s += naive_export(OneConfig(net, c.id), path, example)
        sample_bytes += folder_bytes(scratch, (f"config{c.id}.onnx",))
    share = sum(route_bytes(net, c) for c in net.configs) / sum(route_bytes(net, c) for c in sample)
    naive_s, naive_bytes = sample_s * share, sample_bytes * share
    shutil.rmtree(scratch)

    out = os.path.join(args.work, "bundle")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    bundle = export(net, out, targets="onnx", quiet=True)
    total_s = time.perf_counter() - started
    compile_s = bundle.manifest["compile_seconds"]
    unique = bundle.manifest["weights"]["unique_bytes"]
    onnx_bytes = folder_bytes(os.path.join(out, "onnx"))
    n = len(net.configs)
    graphs = {str(c.id): bundle.manifest["targets"]["onnx"]["graphs"][str(c.id)] for c in sample}
    started = time.perf_counter()
    for _ in range(2):  # the same graphs stand in for two targets of equal cost
        check_target(Reference(net), out, graphs, "onnx")
    separate_s = time.perf_counter() - started
    started, ref = time.perf_counter(), Reference(net)
    for _ in range(2):
        check_target(ref, out, graphs, "onnx")
    shared_s = time.perf_counter() - started

    print(f"DeiT Ti/S/B SN-Net, {n} configs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"unique weights                 {unique / 1e6:9.1f} MB")
    print(f"bundle (onnx target)           {onnx_bytes / 1e6:9.1f} MB   bundle / unique weights = {onnx_bytes / unique:.3f}"
          f"   (limit 1.02 + {n} x 100 KB = {(1.02 * unique + n * 100e3) / unique:.3f})")
    print(f"naive per-config ONNX (est.)   {naive_bytes / 1e6:9.1f} MB   naive / bundle = {naive_bytes / onnx_bytes:.1f}x")
    print(f"export 3 anchors (baseline)    {anchors_s:9.1f} s")
    print(f"naive per-config export (est.) {naive_s:9.1f} s   = {naive_s / anchors_s:.1f}x baseline")
    print(f"stitch-compile compile, {n} cfgs {compile_s:7.1f} s   = {compile_s / anchors_s:.2f}x baseline (goal <= 2x)")
    print(f"  + parity of every config      {total_s - compile_s:7.1f} s   (batch 1 and 4, ORT vs PyTorch)")
    print(f"naive / stitch-compile compile {naive_s / compile_s:9.1f}x")
    print(f"parity of 2 targets x {len(sample)} cfgs: a reference per target {separate_s:.1f} s, one shared "
          f"{shared_s:.1f} s = {separate_s / shared_s:.2f}x")


if __name__ == "__main__":
    main()
