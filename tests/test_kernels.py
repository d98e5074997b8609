"""The fused stitching kernel (through Triton's CPU interpreter), its custom op, and fused_forward.

Triton 3.8 builds its interpreter into ``@triton.jit`` itself: TRITON_INTERPRET must be set before
``triton.language`` is imported (its own ``tl.zeros``, ``tl.sum`` are jit functions too), and then
holds for the whole process. So the ``test_interp_*`` tests run in a child pytest with
TRITON_INTERPRET=1 (``test_triton_interpreter`` starts it), and this process keeps compiled Triton
for the CUDA tests at the end (they skip without a GPU). ``TRITON_INTERPRET=1 pytest -k
test_interp_ tests/test_kernels.py`` runs them directly.

Inputs are fresh random numbers every run; the seed is printed and stored as a test property,
and ``STITCH_TEST_SEED=<seed>`` replays a run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stitch_compile
from snnet_reference import write_v1, write_v2
from stitch_compile.errors import StitchError
from stitch_compile.kernels import FusedStitch, StitchedBlock, fuse, fused_forward, stitch_linear_ln

EPS = 1e-6
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, Frobenius
DTYPES = list(TOLERANCE)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_triton_interpreter")
cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")


def run_interpreted_child(request, markexpr: str) -> None:
    """Run the ``test_interp_*`` tests selected by ``markexpr`` in a TRITON_INTERPRET=1 pytest."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter child")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", __file__, "-k", "test_interp_", "-m", markexpr]
    done = subprocess.run(cmd, env=env, cwd=request.config.rootpath, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and "skipped" not in summary, \
        f"interpreter tests failed or skipped:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"


def test_triton_interpreter(request):
    run_interpreted_child(request, "not slow")


@pytest.mark.slow
def test_triton_interpreter_slow(request):
    run_interpreted_child(request, "slow")


@pytest.fixture
def gen(request) -> torch.Generator:
    seed = int(os.environ.get("STITCH_TEST_SEED") or secrets.randbits(31))
    print(f"seed {seed} (replay: STITCH_TEST_SEED={seed})")
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def kernel():
    """The kernel module, its kernel run by Triton's interpreter on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from stitch_compile.kernels import stitch_ln

    assert isinstance(stitch_ln._stitch_ln_kernel, InterpretedFunction)
    return stitch_ln


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton's interpreter multiplies bf16 *bit patterns* in ``tl.dot`` and upstream does not
    support bf16 there (triton-lang/triton#11584). Widen bf16 operands exactly to fp32 inside
    the interpreter's dot; every other bf16 step of the kernel (loads, casts, stores) runs as is."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def make_inputs(gen, m: int, ca: int, cb: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random inputs in ``dtype`` at the scales of a trained stitching layer and LayerNorm."""
    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    return {"x": rnd(m, ca, shift=0.3), "weight": rnd(cb, ca, scale=ca ** -0.5), "bias": rnd(cb, scale=0.1),
            "ln_weight": rnd(cb, scale=0.1, shift=1.0), "ln_bias": rnd(cb, scale=0.1)}


def reference(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(out, LayerNorm(out))`` of the same (already rounded) inputs."""
    d = {k: v.double() for k, v in t.items()}
    out = F.linear(d["x"], d["weight"], d["bias"])
    return out, F.layer_norm(out, out.shape[-1:], d["ln_weight"], d["ln_bias"], EPS)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def run_poisoned(kernel, t: dict[str, torch.Tensor], guard: int = 5, schedule: str = "rows",
                 **tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch into NaN-poisoned buffers with ``guard`` extra rows that must stay NaN.

    ``tiles`` (``block_m``, ``block_n``) override ``tiling``'s choice."""
    m, cb = t["x"].shape[0], t["weight"].shape[0]
    bufs = [torch.full((m + guard, cb), float("nan"), dtype=t["x"].dtype, device=t["x"].device) for _ in range(2)]
    args = (t["x"], t["weight"], t["bias"], t["ln_weight"], t["ln_bias"], EPS, bufs[0][:m], bufs[1][:m])
    if schedule == "tiles" and INTERPRETED:
        launch_tiles_interpreted(kernel, args, tiles)
    else:
        kernel.launch(*args, schedule=schedule, **tiles)
    for buf in bufs:
        assert buf[m:].isnan().all(), "kernel wrote past the last row"
    return bufs[0][:m], bufs[1][:m]


@contextlib.contextmanager
def wait_probe_finds_all_arrived():
    """Triton's interpreter runs programs one after another, so a tile of the tile schedule that
    waits for a later tile of its row would spin forever. Inside this, the wait's probe (an
    atomic add of 0, which nothing else does) reads a whole number of generations, "every tile
    has arrived"; every other atomic runs as is. So the interpreter checks the exchange's
    arithmetic and bookkeeping, and the CUDA tests its synchronisation."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_atomic_rmw

    def create_atomic_rmw(self, op, ptr, val, mask, sem, scope):
        found = original(self, op, ptr, val, mask, sem, scope)
        if not val.data.any():
            found.data[...] = 0
        return found

    interpreter.InterpreterBuilder.create_atomic_rmw = create_atomic_rmw
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_atomic_rmw = original


def launch_tiles_interpreted(kernel, args: tuple, tiles: dict) -> None:
    """The tile schedule in the interpreter, launched twice: the first launch publishes every
    tile's statistics, the second reads them all (see ``wait_probe_finds_all_arrived``). Each
    launch must add exactly one generation to each row tile's counter, which the next launch on a
    GPU relies on: every tile arrives once, and the tiles' shares sum to ``GENERATION``."""
    from stitch_compile.kernels.stitch_ln_tiles import GENERATION, workspace, workspace_size

    x, weight = args[0], args[1]
    (m, ca), cb = x.shape, weight.shape[0]
    t = kernel.tiling(m, ca, cb, x.dtype, tiles.get("block_m"), tiles.get("block_n"), "tiles")
    exchange = workspace(*workspace_size(m, cb, t.block_m, t.block_n), x.device)
    exchange.stats.zero_()
    with wait_probe_finds_all_arrived():
        for launches in (1, 2):
            kernel.launch(*args, schedule="tiles", exchange=exchange, **tiles)
            assert (exchange.arrivals == launches * GENERATION).all(), "a launch must add one generation per row tile"


def check_kernel(kernel, gen, m, ca, cb, dtype, device="cpu", layout=lambda t: t, schedule="rows", **tiles):
    t = layout({k: v.to(device) for k, v in make_inputs(gen, m, ca, cb, dtype).items()})
    out, normed = run_poisoned(kernel, t, schedule=schedule, **tiles)
    want_out, want_normed = reference(t)
    assert not out.isnan().any() and not normed.isnan().any(), "some output element was never written"
    assert rel_err(out, want_out) < TOLERANCE[dtype]
    assert rel_err(normed, want_normed) < TOLERANCE[dtype]


# Odd shapes: rows not a multiple of the tile, Cb not a power of two, Ca not a multiple of BLOCK_K,
# Cb below tl.dot's minimum tile side of 16.
SMALL_SHAPES = [(17, 40, 72), (197, 64, 128), (33, 24, 8)]
FAMILY_SHAPES = [(192, 384), (384, 768), (384, 1024), (1024, 384)]  # (Ca, Cb) of the DeiT / DeiT-3 SN-Nets
SCHEDULES = ["rows", "tiles"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,ca,cb", SMALL_SHAPES)
@interpreted
def test_interp_matches_float64(kernel, gen, bf16_dot, m, ca, cb, dtype, schedule):
    check_kernel(kernel, gen, m, ca, cb, dtype, schedule=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@interpreted
def test_interp_strided_inputs(kernel, gen, schedule):
    """A column slice of x and a transposed view of W are read through their strides."""
    def layout(t):
        t["x"] = torch.cat([t["x"], t["x"]], dim=1)[:, 3:3 + t["x"].shape[1]]
        t["weight"] = t["weight"].t().contiguous().t()
        return t

    check_kernel(kernel, gen, 29, 40, 72, torch.float32, layout=layout, schedule=schedule)


@pytest.fixture
def matmul_precision():
    """Sets torch's fp32 matmul precision through either API, restoring both afterwards."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, matmul.fp32_precision

    def apply(*, allow_tf32=None, backends=None, cuda_matmul=None):
        if backends is not None:
            torch.backends.fp32_precision = backends
        if allow_tf32 is not None:
            matmul.allow_tf32 = allow_tf32
        if cuda_matmul is not None:
            matmul.fp32_precision = cuda_matmul

    yield apply
    torch.backends.fp32_precision, matmul.fp32_precision = saved


@pytest.mark.parametrize("setting, tf32", [
    ({}, False),
    ({"allow_tf32": True}, True),  # the legacy API
    ({"cuda_matmul": "tf32"}, True),  # the new one: reading allow_tf32 then raises
    ({"backends": "tf32"}, True),
    ({"backends": "tf32", "cuda_matmul": "ieee"}, False),
])
def test_tf32_follows_either_precision_api(matmul_precision, setting, tf32):
    from stitch_compile.kernels.stitch_ln import tf32_allowed

    matmul_precision(**setting)
    assert tf32_allowed() is tf32


@interpreted
def test_interp_fp32_under_the_new_precision_api(kernel, gen, matmul_precision):
    matmul_precision(cuda_matmul="tf32")
    check_kernel(kernel, gen, 29, 40, 72, torch.float32)


@interpreted
def test_interp_empty_input(kernel):
    t = make_inputs(torch.Generator().manual_seed(0), 0, 40, 72, torch.float32)
    out, normed = run_poisoned(kernel, t, guard=3)
    assert out.shape == normed.shape == (0, 72)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@interpreted
def test_interp_column_chunks(kernel, gen, bf16_dot, dtype, schedule):
    """Cb = 200 in chunks of 64 (the last one 8 columns wide), 2 row tiles with a ragged last one."""
    check_kernel(kernel, gen, 23, 40, 200, dtype, schedule=schedule, block_m=16, block_n=64)


@pytest.mark.parametrize("start", [0, 2**31 - 4096], ids=["zero", "wrapping"])
@interpreted
def test_interp_tile_schedule_single_tile_rows(kernel, gen, start):
    """With one tile per row, the tile schedule runs as on a GPU, with nothing faked: each tile
    arrives last, finds its row complete and goes on. A second launch reuses the workspace, as
    launches on one stream do, and waits for the next generation, also where the int32 counters
    wrap around (from 2^31 - 4096 to -2^31)."""
    from stitch_compile.kernels.stitch_ln_tiles import GENERATION, workspace

    t = make_inputs(gen, 37, 40, 72, torch.float32)
    exchange = workspace(3 * 37, 3, "cpu")
    exchange.arrivals.fill_(start)
    for launches in (1, 2):
        out, normed = torch.full((37, 72), float("nan")), torch.full((37, 72), float("nan"))
        kernel.launch(*t.values(), EPS, out, normed, block_m=16, block_n=128, schedule="tiles", exchange=exchange)
        want = (start + launches * GENERATION + 2**31) % 2**32 - 2**31  # int32 arithmetic
        assert exchange.arrivals.tolist() == [want] * 3
        for got, ref in zip((out, normed), reference(t)):
            assert rel_err(got, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("tiles", [{}, {"block_m": 16, "block_n": 64}], ids=["default", "chunked"])
@interpreted
def test_interp_mean_heavy_rows(kernel, gen, tiles, schedule):
    """Rows of `out` with mean ~1e3 and std ~1: a sum / sum-of-squares variance cancels here
    (checked below on the same values), the kernel's shifted Chan merge meets the fp32 limit."""
    t = make_inputs(gen, 37, 40, 200, torch.float32)
    t["bias"] += 1e3
    out, normed = run_poisoned(kernel, t, schedule=schedule, **tiles)
    assert rel_err(out, reference(t)[0]) < TOLERANCE[torch.float32]
    # normed is LayerNorm of the stored (rounded) out: compare with exactly that, in float64
    d = {k: v.double() for k, v in t.items()}
    want = F.layer_norm(out.double(), (200,), d["ln_weight"], d["ln_bias"], EPS)
    assert rel_err(normed, want) < TOLERANCE[torch.float32]
    naive_var = (out * out).mean(1) - out.mean(1) ** 2
    naive = (out - out.mean(1, keepdim=True)) / (naive_var.clamp_min(0)[:, None] + EPS).sqrt()
    naive = naive * t["ln_weight"] + t["ln_bias"]
    assert rel_err(naive, want) > 10 * TOLERANCE[torch.float32], "input too easy to tell the formulas apart"


@pytest.mark.parametrize("tiles", [(128, 256), (256, 128)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@interpreted
def test_interp_wide_tiles(kernel, gen, bf16_dot, dtype, tiles):
    """The tilings benchmarks/kernels.py --sweep times beyond the candidates (its EXPERIMENTS),
    on ragged shapes (the last tiles 2 rows by 44 columns): so the sweep times a correct kernel."""
    block_m, block_n = tiles
    check_kernel(kernel, gen, block_m + 2, 40, block_n + 44, dtype, schedule="tiles", block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("tiles", [(16, 64), (128, 256)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@interpreted
def test_interp_tma_loads(kernel, gen, bf16_dot, dtype, tiles):
    """The tile schedule with its operands loaded through tensor descriptors (the sweep's TMA
    experiments): ragged tiles in every dimension, K included (Ca = 40 in steps of 32 or 64), are
    filled with zeros by the descriptor instead of masks."""
    block_m, block_n = tiles
    check_kernel(kernel, gen, block_m + 2, 40, block_n + 44, dtype, schedule="tiles", block_m=block_m,
                 block_n=block_n, tma=True)


def test_tma_needs_row_major_operands():
    """TMA descriptors need row-major operands with 16-byte aligned rows: a transposed view of W
    is refused with one line before anything launches."""
    from stitch_compile.kernels import stitch_ln

    t = make_inputs(torch.Generator().manual_seed(0), 17, 40, 72, torch.float16)
    out = torch.empty(17, 72, dtype=torch.float16)
    weight = t["weight"].t().contiguous().t()
    with pytest.raises(ValueError, match="TMA loads need a row-major weight"):
        stitch_ln.launch(t["x"], weight, t["bias"], t["ln_weight"], t["ln_bias"], EPS, out, out.clone(),
                         schedule="tiles", tma=True)
    with pytest.raises(ValueError, match="tma only for 'tiles'"):
        stitch_ln.launch(t["x"], t["weight"], t["bias"], t["ln_weight"], t["ln_bias"], EPS, out, out.clone(),
                         schedule="rows", tma=True)


@interpreted
def test_interp_partial_runs(kernel, gen):
    """The benchmark's --breakdown parts: 1 writes only `out`, 2 also writes `normed` (of zeros,
    without reading `out` back), 3 is the op."""
    t = make_inputs(gen, 23, 40, 200, torch.float32)
    want_out, want_normed = reference(t)
    nans = [torch.full((23, 200), float("nan")) for _ in range(2)]
    kernel.launch(*t.values(), EPS, *nans, block_m=16, block_n=64, parts=1)
    assert rel_err(nans[0], want_out) < TOLERANCE[torch.float32] and nans[1].isnan().all()
    kernel.launch(*t.values(), EPS, *nans, block_m=16, block_n=64, parts=2)
    assert not nans[1].isnan().any() and rel_err(nans[1], want_normed) > 0.5
    kernel.launch(*t.values(), EPS, *nans, block_m=16, block_n=64, parts=3)
    assert rel_err(nans[1], want_normed) < TOLERANCE[torch.float32]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ca,cb", FAMILY_SHAPES)
@interpreted
def test_interp_family_shapes(kernel, gen, bf16_dot, ca, cb, dtype, schedule):
    check_kernel(kernel, gen, 197, ca, cb, dtype, schedule=schedule)


BATCH_ROWS = [197, 8 * 197, 64 * 197]  # M at batch 1, 8 and 64


def default_tilings(dtype, schedule: str) -> set:
    """Every tiling the family shapes get by default at batch 1, 8 and 64 (shape enters only here)."""
    from stitch_compile.kernels.stitch_ln import tiling

    return {tiling(m, ca, cb, dtype, schedule=schedule) for m in BATCH_ROWS for ca, cb in FAMILY_SHAPES}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tiling_within_budgets(schedule):
    from triton import cdiv

    from stitch_compile.kernels.stitch_ln import PROGRAMS, TILE_BYTES, acc_budget, tiling

    for ca, cb in [(40, 72), (40, 200), (24, 8)] + FAMILY_SHAPES:
        for m in [1, 17] + BATCH_ROWS:
            for dtype in DTYPES:
                t = tiling(m, ca, cb, dtype, schedule=schedule)
                assert t.block_m in (16, 32, 64, 128) and 16 <= t.block_n <= 128 and 16 <= t.block_k <= 64
                assert t.block_m * t.block_n <= acc_budget(dtype, schedule)
                assert t.num_stages * t.block_k * (t.block_m + t.block_n) * dtype.itemsize <= TILE_BYTES
                per_row = cdiv(cb, 128) if schedule == "tiles" else 1
                assert t.block_m == 16 or cdiv(m, t.block_m) * per_row >= PROGRAMS, "too few programs for the SMs"
    big = tiling(64 * 197, 384, 1024, torch.float16, schedule=schedule)
    assert big.block_m >= 64 and big.block_n == 128, "batch 64 must get tensor-core sized tiles"
    assert tiling(197, 384, 384, torch.float16, schedule=schedule).block_n == 128, "Cb = 384: three unpadded chunks"


@pytest.mark.parametrize("share,sms", [(None, 132), ("50", 66), ("5", 6), ("0.5", 1), ("0", 132), ("150", 132),
                                       ("nan", 132), ("half", 132)])
def test_tile_schedule_counts_an_mps_share_of_the_sms(monkeypatch, share, sms):
    """The tile schedule's residency check counts only the SMs an MPS client may hold (the
    device properties, faked here as an H200's 132 SMs, always report all of them)."""
    from types import SimpleNamespace

    from stitch_compile.kernels import stitch_ln

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    if share is None:
        monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    else:
        monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", share)
    stitch_ln._sms.cache_clear()
    try:
        assert stitch_ln._sms(torch.device("cuda", 0)) == sms
    finally:
        stitch_ln._sms.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernel")
@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_for_gpus_without_spills(arch, tmp_path):
    """No GPU needed: Triton compiles every default and swept tiling of both schedules for an
    A100 / H100 target and cuobjdump reports the cubin's register spills (STACK) and shared
    memory, the first things that would break on a real card."""
    import re

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from stitch_compile.kernels.stitch_ln import _stitch_ln_kernel, candidates
    from stitch_compile.kernels.stitch_ln_tiles import GENERATION, _stitch_ln_tiles_kernel

    kernels = {"rows": (_stitch_ln_kernel, {"PARTS": 3}),
               "tiles": (_stitch_ln_tiles_kernel, {"GENERATION": GENERATION, "TMA": False})}
    workspace = {"stats_ptr": "*fp32", "arrive_ptr": "*i32"}
    for (schedule, (kernel, extra)), dtype in ((k, d) for k in kernels.items() for d in DTYPES):
        tilings = default_tilings(dtype, schedule) | {t for ca, _ in FAMILY_SHAPES for t in candidates(ca, dtype, schedule)}
        for t in sorted(tilings):
            # a launch also makes the int arguments equal to 1 (the unit strides) constexpr
            constexprs = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k,
                          "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                          "stride_xk": 1, "stride_wk": 1, **extra}
            pointer = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
            signature = {name: "constexpr" if name in constexprs else workspace.get(name, pointer) if name.endswith("_ptr")
                         else "fp32" if name == "eps" else "i32" for name in kernel.arg_names}
            # what a launch with contiguous, 16-byte aligned tensors specialises on
            aligned = {n for n in signature if n.endswith("_ptr")} | {"CA", "CB", "stride_xm", "stride_wn"}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature) if n in aligned}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": t.num_warps, "num_stages": t.num_stages})
            cubin = tmp_path / "stitch_ln.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
            where = f"sm_{arch} {schedule} {dtype} {t}"
            assert int(re.search(r"STACK:(\d+)", usage).group(1)) == 0, f"{where} spills registers: {usage}"
            assert compiled.metadata.shared <= 160 * 1024, f"{where} needs {compiled.metadata.shared} B of shared memory"


# ---- the custom op ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_cpu_reference(gen, dtype):
    t = make_inputs(gen, 2 * 17, 40, 72, dtype)
    t["x"] = t["x"].view(2, 17, 40)
    out, normed = stitch_linear_ln(*t.values(), EPS)
    want_out, want_normed = reference(t)
    assert out.shape == normed.shape == (2, 17, 72) and out.dtype == normed.dtype == dtype
    assert rel_err(out, want_out) < TOLERANCE[dtype]
    assert rel_err(normed, want_normed) < TOLERANCE[dtype]


def test_op_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = make_inputs(torch.Generator().manual_seed(0), 6, 40, 72, torch.float16)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        fake["x"] = fake["x"].view(2, 3, 40)
        out, normed = torch.ops.stitch_compile.stitch_linear_ln(*fake.values(), EPS)
    assert out.shape == normed.shape == (2, 3, 72) and out.dtype == normed.dtype == torch.float16


def test_op_exports(gen):
    module = FusedStitch(nn.Linear(40, 72), nn.LayerNorm(72, eps=EPS))
    x = torch.randn(2, 17, 40, generator=gen)
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.stitch_compile.stitch_linear_ln.default in targets
    x3 = torch.randn(3, 17, 40, generator=gen)
    for got, want in zip(program.module()(x3), module(x3)):
        torch.testing.assert_close(got, want)


def recorded_ops(fn) -> set[str]:
    """Names of the operators the profiler records while ``fn`` runs (it observes, it does not
    intercept: the call takes the path it takes without it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_op_plain_call_skips_the_dispatcher(gen):
    """An eager call that needs no gradient runs the implementation directly (no custom-op
    dispatch, benchmarks/op_overhead.py), with the registered op's exact results; a call that
    needs a gradient goes through the op, whose backward raises: no autograd formula exists."""
    t = make_inputs(gen, 2 * 17, 40, 72, torch.float32)
    t["x"] = t["x"].view(2, 17, 40)
    with torch.no_grad():
        assert "stitch_compile::stitch_linear_ln" not in recorded_ops(lambda: stitch_linear_ln(*t.values(), EPS))
        got, want = stitch_linear_ln(*t.values(), EPS), torch.ops.stitch_compile.stitch_linear_ln(*t.values(), EPS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    t["weight"].requires_grad_()
    assert "stitch_compile::stitch_linear_ln" in recorded_ops(lambda: stitch_linear_ln(*t.values(), EPS))
    out, normed = stitch_linear_ln(*t.values(), EPS)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        normed.sum().backward()


def test_op_compiles_as_one_node(gen):
    """torch.compile sees the op, not its implementation, and traces it without a graph break."""
    t = make_inputs(gen, 17, 40, 72, torch.float32)
    seen = []

    def backend(gm, inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fused = torch.compile(lambda x: stitch_linear_ln(x, *list(t.values())[1:], EPS), fullgraph=True, backend=backend)
    with torch.no_grad():
        got = fused(t["x"])
    assert torch.ops.stitch_compile.stitch_linear_ln.default in seen
    assert rel_err(got[1], reference(t)[1]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(x=t["x"].long()), "x is torch.int64"),
    (lambda t: t.update(bias=t["bias"].half()), "bias is torch.float16 but x is torch.float32"),
    (lambda t: t.update(x=t["x"][:, :39]), "expects a last dimension of 40"),
    (lambda t: t.update(weight=t["weight"][None]), "weight must be [Cb, Ca]"),
    (lambda t: t.update(ln_bias=t["ln_bias"][:-1]), "ln_bias has shape [71]; expected [72]"),
    (lambda t: t.update(ln_weight=t["ln_weight"].to("meta")), "ln_weight is on meta but x is on cpu"),
])
def test_op_rejects_bad_input(change, message):
    t = make_inputs(torch.Generator().manual_seed(0), 4, 40, 72, torch.float32)
    change(t)
    with pytest.raises(StitchError, match=r"^stitch_linear_ln: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        stitch_linear_ln(*t.values(), EPS)


@pytest.mark.parametrize("rows, ca, cb, transposed, fits", [
    (2**21, 1023, 1023, False, True),
    (2**21, 1023, 1024, False, False),  # the outputs' M x Cb reach 2^31
    (2**21, 1024, 384, True, False),  # x [M, Ca] with strides (1, M): its last element is at Ca x M
    (2**21, 384, 1023, True, True),
])
def test_kernel_indexing_limit_counts_x_strides(rows, ca, cb, transposed, fits):
    """On the meta device: views of this size need no memory."""
    from stitch_compile.kernels.ops import check_int32_indexing

    x = torch.empty(ca, rows, device="meta").t() if transposed else torch.empty(rows, ca, device="meta")
    if fits:
        check_int32_indexing(x, cb)
    else:
        with pytest.raises(StitchError, match="too large for the kernel's int32 indexing"):
            check_int32_indexing(x, cb)


def test_fused_stitch_rejects_mismatched_norm():
    with pytest.raises(StitchError, match="does not match the Linear's 72 outputs"):
        FusedStitch(nn.Linear(40, 72), nn.LayerNorm(64))


# ---- fused_forward on StitchableNets --------------------------------------------------------------

@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A small SN-Net v1 (3 anchors, depth 4) and SN-Netv2 (depths 4/8: LoRA, LayerScale, two stitches)."""
    root = tmp_path_factory.mktemp("kernels")
    write_v1(root / "v1.pth", widths=(64, 128, 192), depth=4)
    write_v2(root / "v2.pth", widths=(64, 128), depths=(4, 8))
    return [stitch_compile.load(str(root / "v1.pth")), stitch_compile.load(str(root / "v2.pth"))]


def fusable_pairs(route) -> int:
    return sum(a.startswith("stitch:") and b.startswith("block:") for a, b in zip(route, route[1:]))


def sample_configs(net, gen, n: int = 6) -> list:
    """Anchor 0 and ``n`` stitched configs drawn with the test's seed (2 CPU cores: not all of them)."""
    stitched = [c for c in net.configs if not c.is_anchor]
    return [net.configs[0]] + [stitched[i] for i in torch.randperm(len(stitched), generator=gen)[:n].tolist()]


class OpCalls(TorchDispatchMode):
    """Counts the calls of the fused op that reach the dispatcher (under a dispatch mode, every
    call does: see ops._plain_call)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.stitch_compile.stitch_linear_ln.default
        return func(*args, **(kwargs or {}))


def test_fused_forward_equals_net(nets, gen):
    for net in nets:
        x = torch.randn(2, *net.input_shape, generator=gen)
        for config in sample_configs(net, gen):
            with torch.no_grad():
                got, want = fused_forward(net, x, config), net(x, config)
                with OpCalls() as calls:
                    asked = net(x, config, use_kernels=True)
            torch.testing.assert_close(got, want, msg=lambda m: f"{net.family} config {config.id}: {m}")
            assert torch.equal(asked, got), "use_kernels=True is fused_forward"
            fused = sum(isinstance(step, StitchedBlock) for step in fuse(net, config))
            assert fused == fusable_pairs(config.route) == calls.count and (fused > 0) != config.is_anchor


def test_fused_routes_built_once_per_config(nets):
    """use_kernels=True builds a config's fused route once and reuses it (by id or config), and
    keeps no net alive: the cache is weakly keyed."""
    import gc

    from stitch_compile.kernels import fused

    kept = len(fused._ROUTES)
    net = copy.deepcopy(nets[0])
    config = next(c for c in net.configs if not c.is_anchor)
    x = torch.randn(1, *net.input_shape)
    with torch.no_grad():
        first = net(x, config, use_kernels=True)
        route = fused._ROUTES[net][config.id]
        assert torch.equal(net(x, config.id, use_kernels=True), first)
    assert fused._ROUTES[net] == {config.id: route}
    del net, route
    gc.collect()
    assert len(fused._ROUTES) == kept


def test_fused_route_exports(nets):
    net = nets[1]
    config = max(net.configs, key=lambda c: fusable_pairs(c.route))
    x = torch.randn(1, *net.input_shape)
    program = torch.export.export(fuse(net, config), (x,))
    calls = [n for n in program.graph.nodes if n.target is torch.ops.stitch_compile.stitch_linear_ln.default]
    assert len(calls) == fusable_pairs(config.route) == 2


# ---- on a GPU: the compiled Triton kernel itself --------------------------------------------------

@cuda
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,ca,cb", SMALL_SHAPES + [(8 * 197, ca, cb) for ca, cb in FAMILY_SHAPES + [(384, 2048)]])
def test_cuda_kernel_matches_float64(gen, m, ca, cb, dtype, schedule):
    from stitch_compile.kernels import stitch_ln

    check_kernel(stitch_ln, gen, m, ca, cb, dtype, device="cuda", schedule=schedule)


@cuda
def test_cuda_tile_schedule_repeats(gen):
    """The tile schedule's tiles wait for each other through counters that launches on one stream
    share and never reset: run it many times at batch 64 (hundreds of rows, several waves),
    alternating with a shape of other row and column tiles, and every run must give the same,
    right answer and leave every counter at a whole generation."""
    from stitch_compile.kernels import stitch_ln
    from stitch_compile.kernels.stitch_ln_tiles import GENERATION, stream_workspace

    cases = [{k: v.cuda() for k, v in make_inputs(gen, m, ca, cb, torch.float16).items()}
             for m, ca, cb in [(64 * 197, 384, 1024), (8 * 197 + 5, 192, 384)]]
    first = [stitch_ln.stitch_linear_ln(*t.values(), EPS, schedule="tiles") for t in cases]
    for t, got in zip(cases, first):
        assert rel_err(got[1], reference(t)[1]) < TOLERANCE[torch.float16]
    for _ in range(50):
        for t, want in zip(cases, first):
            again = stitch_ln.stitch_linear_ln(*t.values(), EPS, schedule="tiles")
            assert all(torch.equal(a, b) for a, b in zip(again, want))
    torch.cuda.synchronize()
    counters = stream_workspace(1, 1, 128, 128, torch.device("cuda", torch.cuda.current_device())).arrivals
    assert counters.max() > 0 and not (counters % GENERATION).any()


@cuda
def test_cuda_tile_schedule_streams_and_graphs(gen):
    """Launches on two streams at once each use their stream's workspace, so they never mix
    their counters; a launch captured into a CUDA graph gets a workspace the graph zeroes, so
    its replays stay right between eager launches on the same stream."""
    from stitch_compile.kernels import stitch_ln

    host = [make_inputs(gen, 64 * 197, 384, 1024, torch.float16) for _ in range(2)]
    for h in host[1:]:  # one layer, two inputs
        h.update({k: v for k, v in host[0].items() if k != "x"})
    xs = [h["x"].cuda() for h in host]
    rest = [host[0][k].cuda() for k in ("weight", "bias", "ln_weight", "ln_bias")]
    want = [stitch_ln.stitch_linear_ln(x, *rest, EPS, schedule="tiles") for x in xs]
    for h, w in zip(host, want):
        assert rel_err(w[1], reference(h)[1]) < TOLERANCE[torch.float16]
    streams = [torch.cuda.Stream() for _ in xs]
    got = [[] for _ in xs]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for stream, x, results in zip(streams, xs, got):
            with torch.cuda.stream(stream):
                results.append(stitch_ln.stitch_linear_ln(x, *rest, EPS, schedule="tiles"))
    torch.cuda.synchronize()
    for results, w in zip(got, want):
        assert all(torch.equal(a, b) for r in results for a, b in zip(r, w))

    static_x = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = stitch_ln.stitch_linear_ln(static_x, *rest, EPS, schedule="tiles")
    for i in range(6):
        static_x.copy_(xs[i % 2])
        graph.replay()
        eager = stitch_ln.stitch_linear_ln(xs[(i + 1) % 2], *rest, EPS, schedule="tiles")
        assert all(torch.equal(a, b) for a, b in zip(static_out, want[i % 2]))
        assert all(torch.equal(a, b) for a, b in zip(eager, want[(i + 1) % 2]))


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_matches_float64(gen, dtype):
    t = {k: v.cuda() for k, v in make_inputs(gen, 2 * 197, 384, 768, dtype).items()}
    t["x"] = t["x"].view(2, 197, 384)
    out, normed = stitch_linear_ln(*t.values(), EPS)
    want_out, want_normed = reference(t)
    assert out.shape == normed.shape == (2, 197, 768)
    assert rel_err(out, want_out) < TOLERANCE[dtype]
    assert rel_err(normed, want_normed) < TOLERANCE[dtype]


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_fused_forward_equals_net(nets, gen, dtype):
    for net in nets:
        net = copy.deepcopy(net).to("cuda", dtype)  # segments follow: deepcopy keeps shared modules shared
        x = torch.randn(2, *net.input_shape, generator=gen).to("cuda", dtype)
        for config in net.configs:
            with torch.no_grad():
                got, want = net(x, config, use_kernels=True), net(x, config)
            assert rel_err(got, want.double()) < 10 * TOLERANCE[dtype], f"{net.family} config {config.id}"
