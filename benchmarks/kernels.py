"""Fused stitching kernel vs eager ``F.linear`` + ``F.layer_norm`` vs ``torch.compile`` of the same.

Shapes are the stitching layers of the DeiT (SN-Net v1) and DeiT-3 (SN-Netv2) SN-Nets, 197 tokens.
"fused" is the op (``stitch_linear_ln``, its default schedule); "tiles" is the tile schedule
(``stitch_ln`` with ``schedule="tiles"``), timed beside it to decide which the op should use.
Each time is the median over ``--repeats`` single calls bracketed by CUDA events, after warm-up,
with L2 flushed before every call. Bandwidth is the fused op's minimal traffic (read x, W and the
vectors; write ``out`` and ``normed``) over the time, shown against a device-to-device copy
measured in the same run. Ratios above 1 mean the fused kernel is faster.

Goal (issue 6), at batch 64: fused >= 1.2x eager and >= 1.0x torch.compile.

    python benchmarks/kernels.py --check            # verify on the GPU, then time
    python benchmarks/kernels.py --sweep --batch 64 # also time every tiling (tunes stitch_ln.tiling)
    python benchmarks/kernels.py --breakdown        # also time the kernel's parts: where the time goes
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

EPS = 1e-6
TOKENS = 197
SHAPES = [(192, 384), (384, 768), (384, 1024), (1024, 384)]  # (Ca, Cb): Ti->S, S->B, S->L, L->S
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # as tests/test_kernels.py
GOAL_EAGER, GOAL_COMPILE, GOAL_BATCH = 1.2, 1.0, 64
FLUSH_BYTES = 256 << 20  # larger than any current L2
COPY_BYTES = 1 << 30


def unfused(x, weight, bias, ln_weight, ln_bias):
    out = F.linear(x, weight, bias)
    return out, F.layer_norm(out, (weight.shape[0],), ln_weight, ln_bias, EPS)


class Timer:
    """Median device time of one call, in ms; L2 flushed before each call so nothing stays cached."""

    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / timer(lambda: dst.copy_(src)) / 1e6


def make_inputs(batch: int, ca: int, cb: int, dtype: torch.dtype) -> list[torch.Tensor]:
    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda") * scale + shift).to(dtype)

    return [rnd(batch, TOKENS, ca, shift=0.3), rnd(cb, ca, scale=ca ** -0.5), rnd(cb, scale=0.1),
            rnd(cb, scale=0.1, shift=1.0), rnd(cb, scale=0.1)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def check(cases, kernels: dict) -> bool:
    """Each kernel's and eager's outputs against a float64 reference of the same inputs, on the GPU."""
    ok = True
    for batch, ca, cb, dtype in cases:
        inputs = make_inputs(batch, ca, cb, dtype)
        want = unfused(*(t.double() for t in inputs))
        errors = {name: [rel_err(g, w) for g, w in zip(fn(*inputs), want)]
                  for name, fn in {**kernels, "eager": unfused}.items()}
        good = all(max(errors[name]) < TOLERANCE[dtype] for name in kernels)
        ok &= good
        shown = "  ".join(f"{name} {e[0]:.1e}/{e[1]:.1e}" for name, e in errors.items())
        print(f"check {NAMES[dtype]} batch {batch:3} {ca:4}->{cb:<4}  rel err out/normed: {shown}  {'ok' if good else 'FAIL'}")
    return ok


def traffic_bytes(batch: int, ca: int, cb: int, dtype: torch.dtype) -> int:
    m = batch * TOKENS
    return dtype.itemsize * (m * ca + cb * ca + 3 * cb + 2 * m * cb)


def l2_bytes(m: int, ca: int, cb: int, t, itemsize: int, schedule: str) -> int:
    """Bytes between L2 and the SMs by the kernel's schedule: for each row tile and column chunk,
    a program reads the tile's x rows and the chunk's W columns; `out` is written and `normed`
    written, and the row schedule also reads `out` back, the tile schedule the row statistics
    (3 floats per row and tile, read by every tile of the row). Time tracking this across tilings
    would mean the kernel is bound by L2 bandwidth."""
    row_tiles, chunks = -(-m // t.block_m), -(-cb // t.block_n)
    operands = itemsize * row_tiles * chunks * (t.block_m * ca + ca * t.block_n)
    if schedule == "rows":
        return operands + 3 * itemsize * m * cb
    return operands + 2 * itemsize * m * cb + 12 * m * chunks * (1 + chunks)


def kernel_args(inputs: list[torch.Tensor]) -> tuple:
    """``stitch_ln.launch``'s arguments for the op's inputs, with fresh ``out`` / ``normed``."""
    x = inputs[0].reshape(-1, inputs[0].shape[-1])
    out = torch.empty((x.shape[0], inputs[1].shape[0]), dtype=x.dtype, device="cuda")
    return (x, *inputs[1:], EPS, out, torch.empty_like(out))


# 16-bit launches timed beyond the candidates, as `launch` overrides: the traffic model's picks for
# the tile schedule, 128 x 256 for Cb = 768 / 1024 (x read half as often as with 128 x 128) and
# 256 x 128 for 1024->384 (W read half as often), and operand loads through TMA descriptors
# (fewer registers: 150 instead of 175 at 128 x 128 on sm_90). At 16 warps and BLOCK_K 32 the wide
# tiles sit at 128 registers and spill on some targets and Triton versions (docs/kernels.md), so
# they are not candidates (those must not spill anywhere). The sweep shows spills as `sN`.
EXPERIMENTS = {"tiles": [{"block_m": 128, "block_n": 256, "num_warps": 16},
                         {"block_m": 256, "block_n": 128, "num_warps": 16},
                         {"block_m": 128, "block_n": 128, "num_warps": 8, "tma": True},
                         {"block_m": 128, "block_n": 128, "num_warps": 16, "tma": True},
                         {"block_m": 128, "block_n": 256, "num_warps": 16, "tma": True},
                         {"block_m": 256, "block_n": 128, "num_warps": 16, "tma": True}]}


def sweep(timer: Timer, inputs: list[torch.Tensor]) -> tuple[str, str, float]:
    """Time both schedules at every row tile x column chunk within the budgets, and the
    EXPERIMENTS; '*' marks each schedule's default. Returns the lines, and the fastest launch
    with its time in ms (which the goal line then judges)."""
    from stitch_compile.kernels import stitch_ln

    args = kernel_args(inputs)
    (m, ca), cb, dtype = args[0].shape, args[1].shape[0], args[0].dtype
    lines, best = [], ("", float("inf"))
    for schedule in stitch_ln.SCHEDULES:
        default = stitch_ln.tiling(m, ca, cb, dtype, schedule=schedule)
        candidates = [{"block_m": t.block_m, "block_n": t.block_n, "num_warps": t.num_warps}
                      for t in stitch_ln.candidates(ca, dtype, schedule)]
        experiments = EXPERIMENTS.get(schedule, []) if dtype.itemsize == 2 else []
        parts = []
        for launch in candidates + experiments:
            name = f"{launch['block_m']}x{launch['block_n']}w{launch['num_warps']}{'tma' if launch.get('tma') else ''}"

            def run():
                return stitch_ln.launch(*args, schedule=schedule, **launch)

            try:
                spills = run().n_spills
            except Exception as e:  # an experiment that cannot run here must not cost the rest of the sweep
                if launch in candidates:
                    raise
                parts.append(f"{name}:failed({str(e).splitlines()[0][:80]})")
                continue
            ms = timer(run)
            t = stitch_ln.tiling(m, ca, cb, dtype, launch["block_m"], launch["block_n"], schedule, launch["num_warps"])
            star = "*" if launch in candidates and t == default else ""
            tbs = l2_bytes(m, ca, cb, t, dtype.itemsize, schedule) / ms / 1e9
            parts.append(f"{name}{star}{f's{spills}' if spills else ''}:{ms * 1e3:.1f}@{tbs:.1f}")
            best = min(best, (f"{schedule} {name}", ms), key=lambda b: b[1])
        lines.append(f"\n      {schedule} us@L2 TB/s at BLOCK_MxBLOCK_Nwarps " + " ".join(parts))
    return "".join(lines), *best


def occupancy(kernel, programs: int) -> str:
    """The compiled kernel's registers, spills and shared memory, and the programs per SM they allow."""
    props = torch.cuda.get_device_properties()
    threads = kernel.metadata.num_warps * 32
    regs = -(-kernel.n_regs // 8) * 8  # registers are allocated per thread in units of 8
    per_sm = min(props.max_threads_per_multi_processor // threads, props.regs_per_multiprocessor // (regs * threads),
                 props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024))  # 1 KB reserved per block
    waves = programs / (max(per_sm, 1) * props.multi_processor_count)
    return (f"regs {kernel.n_regs} spills {kernel.n_spills} smem {kernel.metadata.shared / 1024:.0f} KB: "
            f"{per_sm} programs/SM, {programs} programs = {waves:.2f} waves")


def breakdown(timer: Timer, inputs: list[torch.Tensor]) -> str:
    """Where the time goes, at the default tiling: the row schedule's kernel run up to each part
    (stitch_ln's PARTS), eager's two kernels alone, and both schedules' resources."""
    from stitch_compile.kernels import stitch_ln

    args = kernel_args(inputs)
    x, weight, bias, ln_weight, ln_bias, _, out, _ = args
    kernel = stitch_ln.launch(*args)  # also fills `out` for layer_norm below
    times = [timer(lambda: stitch_ln.launch(*args, parts=parts)) for parts in (1, 2, 3)]
    linear = timer(lambda: F.linear(x, weight, bias))
    norm = timer(lambda: F.layer_norm(out, (weight.shape[0],), ln_weight, ln_bias, EPS))
    (m, ca), cb = x.shape, weight.shape[0]
    t = stitch_ln.tiling(m, ca, cb, x.dtype)
    l2 = l2_bytes(m, ca, cb, t, x.dtype.itemsize, "rows")
    tiles = stitch_ln.tiling(m, ca, cb, x.dtype, schedule="tiles")
    tiles_kernel = stitch_ln.launch(*args, schedule="tiles")
    tiles_programs = -(-m // tiles.block_m) * -(-cb // tiles.block_n)
    return (f"\n      parts us: gemm+out {times[0] * 1e3:.1f}, +stats+normed store {times[1] * 1e3:.1f}, "
            f"+out read-back {times[2] * 1e3:.1f} | eager linear {linear * 1e3:.1f}, layer_norm {norm * 1e3:.1f} | "
            f"L2 model {l2 / 1e6:.0f} MB, {l2 / times[2] / 1e9:.1f} TB/s | "
            f"{t.block_m}x{t.block_n}x{t.block_k} {occupancy(kernel, -(-m // t.block_m))}"
            f"\n      tiles {tiles.block_m}x{tiles.block_n}x{tiles.block_k}: L2 model "
            f"{l2_bytes(m, ca, cb, tiles, x.dtype.itemsize, 'tiles') / 1e6:.0f} MB | "
            f"{occupancy(tiles_kernel, tiles_programs)}")


def print_goal(name: str, ratios: list[tuple[float, float]]) -> None:
    """Whether the goal holds at GOAL_BATCH, from each shape's (eager/x, compile/x)."""
    if ratios:
        worst_eager, worst_compile = min(g[0] for g in ratios), min(g[1] for g in ratios)
        met = worst_eager >= GOAL_EAGER and worst_compile >= GOAL_COMPILE
        print(f"goal at batch {GOAL_BATCH} ({name}): worst eager/{name} {worst_eager:.2f} (want >= {GOAL_EAGER}), "
              f"worst compile/{name} {worst_compile:.2f} (want >= {GOAL_COMPILE}): {'MET' if met else 'NOT MET'}",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the baseline")
    parser.add_argument("--check", action="store_true", help="verify correctness on the GPU first; exit 1 on failure")
    parser.add_argument("--sweep", action="store_true", help="also time every BLOCK_M x BLOCK_N of both schedules")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the kernel's parts and eager's two kernels, and show the kernel's resources")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2

    from stitch_compile.kernels import stitch_linear_ln, stitch_ln

    def fused(*inputs):
        return stitch_linear_ln(*inputs, EPS)

    def tiles(x, *rest):
        out, normed = stitch_ln.stitch_linear_ln(x.reshape(-1, x.shape[-1]), *rest, EPS, schedule="tiles")
        return out.view(*x.shape[:-1], -1), normed.view(*x.shape[:-1], -1)

    cases = [(b, ca, cb, DTYPES[d]) for d in args.dtype for b in args.batch for ca, cb in SHAPES]
    if args.check and not check(cases, {"fused": fused, "tiles": tiles}):
        print("check FAILED: not timing a wrong kernel", file=sys.stderr)
        return 1

    timer = Timer(args.warmup, args.repeats)
    copy = copy_bandwidth(timer)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy bandwidth {copy:.0f} GB/s  tokens {TOKENS}  median of {args.repeats}")
    print(f"{'dtype':5} {'batch':>5} {'Ca->Cb':>10} {'eager us':>9} {'compile us':>10} {'fused us':>9} "
          f"{'eager/fused':>11} {'compile/fused':>13} {'fused GB/s':>10} {'of copy':>7} "
          f"{'tiles us':>8} {'eager/tiles':>11} {'compile/tiles':>13}")
    goal, baselines = {"fused": [], "tiles": []}, []
    for batch, ca, cb, dtype in cases:
        inputs = make_inputs(batch, ca, cb, dtype)
        torch._dynamo.reset()  # a fresh, static-shape compile per case (no recompile limit, no dynamic shapes)
        compiled = torch.compile(unfused, dynamic=False, mode=args.compile_mode)
        t_eager = timer(lambda: unfused(*inputs))
        t_compile = timer(lambda: compiled(*inputs))
        t_fused = timer(lambda: fused(*inputs))
        t_tiles = timer(lambda: tiles(*inputs))
        gbs = traffic_bytes(batch, ca, cb, dtype) / t_fused / 1e6
        print(f"{NAMES[dtype]:5} {batch:5} {f'{ca}->{cb}':>10} {t_eager * 1e3:9.1f} {t_compile * 1e3:10.1f} "
              f"{t_fused * 1e3:9.1f} {t_eager / t_fused:11.2f} {t_compile / t_fused:13.2f} {gbs:10.0f} {gbs / copy:7.0%} "
              f"{t_tiles * 1e3:8.1f} {t_eager / t_tiles:11.2f} {t_compile / t_tiles:13.2f}", flush=True)
        baselines.append((t_eager, t_compile))
        if batch == GOAL_BATCH:
            goal["fused"].append((t_eager / t_fused, t_compile / t_fused))
            goal["tiles"].append((t_eager / t_tiles, t_compile / t_tiles))
    for name, ratios in goal.items():
        print_goal(name, ratios)
    if not (args.sweep or args.breakdown):
        return 0
    # The sweeps and breakdowns after the whole table: their untried launches (the experiments)
    # must not cost the table if one of them brings the GPU down.
    fastest = []
    for (batch, ca, cb, dtype), (t_eager, t_compile) in zip(cases, baselines):
        inputs = make_inputs(batch, ca, cb, dtype)
        line = f"{NAMES[dtype]:5} {batch:5} {f'{ca}->{cb}':>10}"
        if args.sweep:
            lines, best, t_best = sweep(timer, inputs)
            line += (f"{lines}\n      fastest swept: {best} {t_best * 1e3:.1f} us, eager/it {t_eager / t_best:.2f}, "
                     f"compile/it {t_compile / t_best:.2f}")
            if batch == GOAL_BATCH:
                fastest.append((t_eager / t_best, t_compile / t_best))
        print(line + (breakdown(timer, inputs) if args.breakdown else ""), flush=True)
    print_goal("fastest swept", fastest)  # each shape at its own fastest launch: what per-shape defaults could reach
    return 0


if __name__ == "__main__":
    sys.exit(main())
