"""Runtime benchmark: memory, switch time, ONNX Runtime and AOTInductor vs PyTorch eager, latency model.

    python benchmarks/runtime.py [--work DIR] [--runs 20] [--warmup 3] [--configs all|0,1,2,...]

On a DeiT Ti/S/B SN-Net with random weights (real architecture, 71 configs, 224 px), exported
once to --work with the onnx, ort and aoti (CPU) targets, it measures, printing ratios against
baselines measured in the same run:
  1. memory: RSS growth of a process holding every config (each ORT mode and the AOTInductor
     backend in a fresh process), against
     the unique weight bytes and against 71 independent plain ONNX Runtime sessions (estimated
     from a sample of configs, scaled by their weight bytes);
  2. switch time: ``rt.runner(rt.select(budget))`` with a different budget each call, in
     microseconds, against one inference of the fastest config;
  3. latency per config, ONNX Runtime (segments and graphs mode) and AOTInductor against eager, one
     block of runs per engine back to back for each config, so they see about the same load;
  4. the latency model: segments and every config timed in the same interleaved rounds; the model
     fitted on the anchors + 4 configs predicts the others (error on the configs it did not see).
Timings on a shared machine are noisy: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from common import deit_snnet_checkpoint


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def config_weight_bytes(bundle, cid: int) -> int:
    import onnx

    graph = onnx.load(bundle.graph("onnx", cid), load_external_data=False).graph
    slots = {(e["location"], e["offset"]): int(e["length"]) for e in
             ({x.key: x.value for x in t.external_data} for t in graph.initializer if t.external_data)}
    return sum(slots.values())


def child_memory(bundle_dir: str, what: str, sample: list[int]) -> dict:
    """Runs in a fresh process: RSS growth for one way of holding configs, after one run of each."""
    import onnxruntime as ort

    import stitch_compile as sc
    from stitch_compile.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    x = np.zeros((1, *bundle.manifest["input"]["shape"][1:]), np.float32)
    base = rss_bytes()
    if what in ("segments", "graphs", "aoti"):
        started = time.perf_counter()
        rt = sc.Runtime(bundle, backend="aoti") if what == "aoti" else sc.Runtime(bundle, mode=what)
        load_s = time.perf_counter() - started
        for cid in rt.config_ids:
            rt.run(x, cid)
        return {"rss": rss_bytes() - base, "load_s": load_s}
    sessions, per_config = [], {}
    for cid in sample:  # independent: the way a user loads one exported model per config
        before = rss_bytes()
        sessions.append(ort.InferenceSession(bundle.graph("onnx", cid), providers=["CPUExecutionProvider"]))
        sessions[-1].run(None, {"image": x})
        per_config[cid] = rss_bytes() - before
    return {"per_config": per_config}


def in_child(bundle_dir: str, what: str, sample: list[int]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--bundle", bundle_dir,
                          "--sample", ",".join(map(str, sample))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def percentile_us(samples_ns, q) -> float:
    return float(np.percentile(samples_ns, q)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join("/tmp", "stitch-bench-runtime"))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per config and mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", default="", help="configs compared with PyTorch eager: 'all' or ids "
                        "[default: the anchors and every 6th stitched config]")
    parser.add_argument("--independent-sample", type=int, default=5, help="configs loaded as independent sessions")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sample", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.bundle, args.child, [int(c) for c in args.sample.split(",") if c])))
        return

    import torch

    import stitch_compile as sc
    from stitch_compile.bench import bench, calibration_sample
    from stitch_compile.bench.predict import LatencyModel
    from stitch_compile.bench.timing import summarize

    os.makedirs(args.work, exist_ok=True)
    checkpoint = deit_snnet_checkpoint(os.path.join(args.work, "snnet_deit_ti_s_b.pth"))
    out = os.path.join(args.work, "bundle")
    net = sc.load(checkpoint)
    bundle = sc.export(net, out, targets="onnx,ort,aoti", quiet=False, report=print)
    ids = bundle.configs
    unique = bundle.manifest["weights"]["unique_bytes"]
    threads = sc.Runtime(bundle, preload=False).threads
    print(f"DeiT Ti/S/B SN-Net, {len(ids)} configs, unique weights {unique / 1e6:.1f} MB, onnxruntime "
          f"{__import__('onnxruntime').__version__}, torch {torch.__version__}, {threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")

    # 1. memory
    step = max(1, len(ids) // args.independent_sample)
    sample = sorted(ids)[::step][: args.independent_sample]
    independent = in_child(out, "independent", sample)["per_config"]
    all_bytes = sum(config_weight_bytes(bundle, c) for c in ids)
    sampled_bytes = sum(config_weight_bytes(bundle, int(c)) for c in independent)
    independent_total = sum(independent.values()) / sampled_bytes * all_bytes
    print(f"\n1. memory, RSS growth with all {len(ids)} configs resident (after one run of each)")
    print(f"   {len(ids)} independent plain sessions (est. from {len(sample)}) {independent_total / 1e9:8.2f} GB"
          f"   = {independent_total / unique:6.2f} x unique weights (baseline)")
    for mode in ("segments", "graphs", "aoti"):
        m = in_child(out, mode, [])
        what = "backend=aoti " if mode == "aoti" else f"mode={mode:<8}"
        print(f"   Runtime {what} (load {m['load_s']:5.1f} s)       {m['rss'] / 1e9:8.2f} GB"
              f"   = {m['rss'] / unique:6.2f} x unique weights, "
              f"{independent_total / m['rss']:5.1f}x less than independent")

    # 2. switch time
    rt = sc.Runtime(bundle)
    started = time.perf_counter()
    predicted = bench(rt, runs=args.runs, warmup=args.warmup, predict=True).data  # the LUT to select from
    predict_s = time.perf_counter() - started
    table = rt.lut.table(1, "p50")
    lows, highs = min(v for v, _ in table.values()), max(v for v, _ in table.values()) * 1.1
    budgets = np.random.default_rng(0).uniform(lows, highs, 4096)
    samples = []
    for i in range(20000):
        budget = float(budgets[i % len(budgets)])
        start = time.perf_counter_ns()
        rt.runner(rt.select(budget))
        samples.append(time.perf_counter_ns() - start)
    x = np.random.default_rng(1).standard_normal((1, *rt.input_shape), dtype=np.float32)
    fastest = min(table, key=lambda c: table[c][0])
    infer = []
    for _ in range(args.runs):
        start = time.perf_counter_ns()
        rt.run(x, fastest)
        infer.append(time.perf_counter_ns() - start)
    p50, p99 = percentile_us(samples, 50), percentile_us(samples, 99)
    print(f"\n2. switch (select + dispatch), 20000 calls, a new budget each: p50 {p50:.1f} us, p99 {p99:.1f} us"
          f" (goal p99 <= 50 us); one inference of the fastest config (id {fastest}) "
          f"{percentile_us(infer, 50) / 1e3:.2f} ms"
          f" = {percentile_us(infer, 50) / p99:.0f}x the switch p99")

    # 3. ORT vs PyTorch eager, per config one block per engine, back to back
    anchors = [c for c in sorted(ids) if len(ids[c]["anchors"]) == 1]
    chosen = (sorted(ids) if args.configs == "all" else [int(c) for c in args.configs.split(",")] if args.configs
              else anchors + [c for c in sorted(ids) if c not in anchors][::6])
    graphs = sc.Runtime(bundle, mode="graphs", preload=False)
    aoti = sc.Runtime(bundle, backend="aoti", preload=False)
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)

    def eager(c):
        with torch.inference_mode():
            net(xt, c)

    runners = {"segments": lambda c: rt.run(x, c), "graphs": lambda c: graphs.run(x, c),
               "aoti": lambda c: aoti.run(x, c), "torch": eager}
    times = {}
    for c in chosen:
        for name, run in runners.items():
            for _ in range(args.warmup):
                run(c)
            times[name, c] = []
            for _ in range(args.runs):
                start = time.perf_counter_ns()
                run(c)
                times[name, c].append(time.perf_counter_ns() - start)
    med = {k: statistics.median(v) / 1e6 for k, v in times.items()}
    speedup = [med["torch", c] / med["segments", c] for c in chosen]
    chain = [med["segments", c] / med["graphs", c] for c in chosen]
    print(f"\n3. latency at batch 1, {len(chosen)} configs, {args.runs} runs each (median ms)")
    aoti_speedup = [med["torch", c] / med["aoti", c] for c in chosen]
    print(f"   {'id':>4} {'torch':>9} {'ort seg':>9} {'ort graph':>9} {'aoti':>9} {'torch/ort':>9} {'torch/aoti':>10}")
    for c in chosen:
        print(f"   {c:>4} {med['torch', c]:>9.2f} {med['segments', c]:>9.2f} {med['graphs', c]:>9.2f} "
              f"{med['aoti', c]:>9.2f} {med['torch', c] / med['segments', c]:>9.2f} {med['torch', c] / med['aoti', c]:>10.2f}")
    print(f"   PyTorch eager / ORT (segments): median {statistics.median(speedup):.2f}x, min {min(speedup):.2f}x, "
          f"max {max(speedup):.2f}x")
    print(f"   PyTorch eager / AOTInductor:    median {statistics.median(aoti_speedup):.2f}x, "
          f"min {min(aoti_speedup):.2f}x, max {max(aoti_speedup):.2f}x")
    print(f"   ORT segments / ORT graphs:      median {statistics.median(chain):.3f}, min {min(chain):.3f}, "
          f"max {max(chain):.3f}")

    # 4. latency model vs measurement: every segment and config timed in the same rounds, in a new
    #    random order each round, so a change of machine load hits the model and the truth alike
    routes = {c: ids[c]["route"] for c in ids}
    rng = np.random.default_rng(2)
    graphs_timed = [("segment", k, rt.backend.segment_runner(k),
                     rng.standard_normal((1, *bundle.manifest["segments"][k]["in_shape"]), dtype=np.float32))
                    for k in sorted({k for r in routes.values() for k in r})]
    graphs_timed += [("config", c, rt.runner(c), x) for c in sorted(ids)]
    samples = {(kind, key): [] for kind, key, _, _ in graphs_timed}
    for round_ in range(args.warmup + args.runs):
        for i in rng.permutation(len(graphs_timed)):
            kind, key, run, inp = graphs_timed[i]
            start = time.perf_counter_ns()
            run(inp)
            if round_ >= args.warmup:
                samples[kind, key].append((time.perf_counter_ns() - start) / 1e6)
    stats = {g: summarize(v, 1) for g, v in samples.items()}
    segments = {k: v for (kind, k), v in stats.items() if kind == "segment"}
    measured = {c: v for (kind, c), v in stats.items() if kind == "config"}
    calibration = calibration_sample(bundle.manifest["configs"])
    model = LatencyModel(routes, segments, {c: measured[c] for c in calibration})
    errors = [100 * abs(model.predict(c, 1)["p50_ms"] - measured[c]["p50_ms"]) / measured[c]["p50_ms"]
              for c in ids if c not in calibration]
    cost = sum(v["p50_ms"] for v in measured.values()) / (
        sum(v["p50_ms"] for v in segments.values()) + sum(measured[c]["p50_ms"] for c in calibration))
    print(f"\n4. latency model (batch 1): {len(segments)} segments + {len(calibration)} calibration configs; "
          f"bench --predict took {predict_s:.0f} s, timing all {len(ids)} configs costs {cost:.1f}x its timed work")
    print(f"   {args.runs} interleaved rounds of every segment and config: predicted vs measured p50 of the "
          f"{len(errors)} configs the model did not see: median {statistics.median(errors):.1f}%, "
          f"max {max(errors):.1f}% (goal median <= 5%, max <= 15%); scale {model.scale:.3f}, "
          f"overhead {model.overhead_ms:.2f} ms")
    loo = predicted["prediction"]["1"]["error_pct"]
    print(f"   the LUT of bench --predict (its own leave-one-out estimate): median {loo['median']:.1f}%, "
          f"max {loo['max']:.1f}%")
    print(f"   load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
