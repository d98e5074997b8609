"""Host time per call of the fused stitching op's entry points, against unfused eager.

    python benchmarks/op_overhead.py [--device cpu|cuda] [--calls 2000] [--rounds 7]

With tiny tensors the device work is negligible, so what is left is the host's cost of one call:
  unfused     ``F.linear`` + ``F.layer_norm`` (what the op replaces)
  dispatcher  ``torch.ops.stitch_compile.stitch_linear_ln`` (the registered custom op, as
              torch.export / torch.compile / autograd see it)
  fused       ``stitch_linear_ln`` (a plain eager call runs the implementation directly)
On a GPU the calls are only enqueued (one synchronisation per round); on the CPU they run the
reference implementation. Rounds of the three alternate, so they see the same load; the best
round of each is reported, with ratios to unfused (below 1: cheaper than unfused).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from stitch_compile.kernels import stitch_linear_ln

EPS = 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/op_overhead.py: no CUDA device; pass --device cpu", file=sys.stderr)
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, weight = torch.randn(2, 16, device=device, dtype=dtype), torch.randn(32, 16, device=device, dtype=dtype)
    vectors = [torch.randn(32, device=device, dtype=dtype) for _ in range(3)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    calls = {
        "unfused": lambda: F.layer_norm(F.linear(x, weight, vectors[0]), (32,), vectors[1], vectors[2], EPS),
        "dispatcher": lambda: torch.ops.stitch_compile.stitch_linear_ln(x, weight, *vectors, EPS),
        "fused": lambda: stitch_linear_ln(x, weight, *vectors, EPS),
    }
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for fn in calls.values():  # warm-up: kernels compiled, caches filled
            for _ in range(50):
                fn()
        sync()
        for _ in range(args.rounds):
            for name, fn in calls.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                sync()
                best[name] = min(best[name], (time.perf_counter() - start) / args.calls * 1e6)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {what}  torch {torch.__version__}  host us per call, best of {args.rounds} rounds of {args.calls}")
    for name, us in best.items():
        print(f"{name:>10} {us:8.1f} us   {us / best['unfused']:5.2f} x unfused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
