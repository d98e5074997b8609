"""What a process that only runs a bundle pays: import time and memory of the ONNX Runtime path.

    python benchmarks/footprint.py BUNDLE [--threads 1]

Two fresh processes each load BUNDLE with ``stitch_compile.Runtime`` (ONNX Runtime, every config
resident) and run every config once; the baseline first imports torch and timm, as every process
did while ``import stitch_compile`` imported the whole package. Printed: import seconds, RSS and
PSS (``/proc/self/smaps_rollup``: shared pages split between the processes that map them), and
the baseline's over the runtime's. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
t = time.perf_counter()
if {heavy}:
    import timm, torch
import numpy as np
import stitch_compile as sc
Runtime = sc.Runtime  # imported on first use
imported = time.perf_counter() - t
rt = Runtime({bundle!r}, threads={threads})
for cid in rt.config_ids:
    rt.run(np.zeros((1, *rt.input_shape), np.float32), cid)
fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup") if ":" in line)
kb = lambda name: int(fields[name].split()[0]) * 1024
print(json.dumps({{"import_s": imported, "rss": kb("Rss"), "pss": kb("Pss"), "torch": "torch" in sys.modules,
                  "configs": len(rt.config_ids)}}))
"""


def measure(bundle: str, threads: int, heavy: bool) -> dict:
    code = CHILD.format(heavy=heavy, bundle=bundle, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    runtime, baseline = measure(args.bundle, args.threads, False), measure(args.bundle, args.threads, True)
    print(f"{args.bundle}: {runtime['configs']} configs resident (ONNX Runtime), one run each")
    print(f"{'':26} {'import s':>9} {'RSS MB':>8} {'PSS MB':>8}  torch imported")
    for name, m in (("runtime", runtime), ("baseline (+ torch, timm)", baseline)):
        print(f"{name:26} {m['import_s']:9.2f} {m['rss'] / 1e6:8.0f} {m['pss'] / 1e6:8.0f}  {m['torch']}")
    print(f"{'baseline / runtime':26} {baseline['import_s'] / runtime['import_s']:9.1f} "
          f"{baseline['rss'] / runtime['rss']:8.2f} {baseline['pss'] / runtime['pss']:8.2f}")
    return 1 if runtime["torch"] else 0  # the runtime path must not import torch


if __name__ == "__main__":
    sys.exit(main())
