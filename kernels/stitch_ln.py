"""Triton kernel: a stitching layer ``out = x W^T + b`` with the next block's LayerNorm as epilogue.

Each program owns ``BLOCK_M`` rows and walks their Cb columns in ``BLOCK_N`` chunks, twice:

1. per chunk, the GEMM (``tl.dot`` over ``BLOCK_K`` steps, fp32 accumulation), plus bias, rounded to
   the stream's dtype and stored as ``out``; the chunk's row statistics (from those rounded values,
   still in registers) are merged into running (mean, M2) with Chan's parallel formula;
2. per chunk, the ``out`` chunk this program just wrote is read back (hot in L2), normalised, scaled
   and stored as ``normed``.

So ``out`` is written once and read once from L2, never from DRAM, and the register tile is
``BLOCK_M x BLOCK_N`` whatever Cb is: the row tile stays large enough to feed tensor cores and to
read W from L2 only ``M / BLOCK_M`` times. ``stitch_ln_tiles`` holds the other schedule, 2-D
tiles that exchange row statistics; ``launch`` runs either. This module only launches; checks live
in ``ops``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .stitch_ln_tiles import Workspace, _stitch_ln_tiles_kernel, stream_workspace, tma_operands

# Budgets checked offline by compiling for sm_80 and sm_90 (tests/test_kernels.py, slow): with
# them no tiling spills a register and shared memory stays within an A100's 163 KB. The epilogue
# keeps about three BLOCK_M x BLOCK_N fp32 tiles live (accumulator, centred values, stores), so a
# thread holds at most 64 accumulators (128x128 or 64x256 at 8 warps); fp32's FMA dot (no tensor
# cores) also holds its operands in registers and gets half. Above half the budget: 8 warps.
ACC_BUDGET = {torch.float16: 16384, torch.bfloat16: 16384, torch.float32: 8192}  # BLOCK_M x BLOCK_N
# The tile schedule's fp32 64 x 128 spills on sm_90, so its fp32 tiles get half.
TILE_ACC_BUDGET = {**ACC_BUDGET, torch.float32: 4096}
TILE_BYTES = 128 * 1024  # bound on NUM_STAGES x BLOCK_K x (BLOCK_M + BLOCK_N) operand bytes
NUM_STAGES = 3
PROGRAMS = 132  # about one program per SM of an H100 / H200 (an A100 has 108)
# "rows": whole rows per program (measured, docs/kernels.md). "tiles": 2-D tiles exchanging row
# statistics, not yet timed on a GPU; the op switches once benchmarks/kernels.py shows it faster.
SCHEDULES = ("rows", "tiles")
SCHEDULE = "rows"


def acc_budget(dtype: torch.dtype, schedule: str) -> int:
    """The most accumulators (BLOCK_M x BLOCK_N) a tile of this schedule may hold."""
    return (ACC_BUDGET if schedule == "rows" else TILE_ACC_BUDGET)[dtype]


class Tiling(NamedTuple):
    """Launch parameters: row tile, column chunk, K step, warps, pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=256)
def tiling(m: int, ca: int, cb: int, dtype: torch.dtype, block_m: int | None = None,
           block_n: int | None = None, schedule: str = "rows", num_warps: int | None = None) -> Tiling:
    """Pick tiles from the shape alone (no autotuning: deterministic, and runs in the interpreter).

    ``block_m``: the largest of 128/64/32/16 that still gives ``PROGRAMS`` programs (small batches
    get small tiles and more programs; the tile schedule counts a program per 128 columns).
    ``block_n``: the chunk of at most 128 columns within ``ACC_BUDGET`` that pads Cb least
    (largest on ties): on an H200 at batch 64, 64 x 128 was the fastest swept row-schedule tiling
    in fp16 and bf16 (docs/kernels.md). ``block_m`` / ``block_n`` / ``num_warps`` override the
    rule; the benchmark sweeps them to tune it on a GPU.
    """
    if block_m is None:
        per_row = triton.cdiv(cb, 128) if schedule == "tiles" else 1
        block_m = next((b for b in (128, 64, 32) if triton.cdiv(m, b) * per_row >= PROGRAMS), 16)
    budget = acc_budget(dtype, schedule)
    if block_n is None:
        fits = [b for b in (128, 64, 32, 16) if block_m * b <= budget]
        block_n = min(fits, key=lambda b: (triton.cdiv(cb, b) * b, -b))
    block_k = 128 // dtype.itemsize  # 64 for 16-bit; fp32 FMA dot operands live in registers
    while block_k > 16 and NUM_STAGES * block_k * (block_m + block_n) * dtype.itemsize > TILE_BYTES:
        block_k //= 2
    block_k = min(block_k, max(16, triton.next_power_of_2(ca)))
    if num_warps is None:
        num_warps = 8 if 2 * block_m * block_n >= ACC_BUDGET[dtype] else 4
    return Tiling(block_m, block_n, block_k, num_warps, NUM_STAGES)


def candidates(ca: int, dtype: torch.dtype, schedule: str = "rows") -> list[Tiling]:
    """Every row tile x column chunk of 4096 accumulators or more within the budgets: what the
    benchmark sweeps and the slow test compiles, so any of them can become the default. The tile
    schedule also gets its 16384-accumulator tiles at 16 warps: half the registers per thread (99
    instead of 174 for 128 x 128 on sm_90), the same one program per SM, twice the warps to hide
    latency."""
    budget = acc_budget(dtype, schedule)
    found = [tiling(0, ca, 0, dtype, bm, bn, schedule) for bm in (16, 32, 64, 128) for bn in (64, 128, 256)
             if 4096 <= bm * bn <= budget]
    if schedule == "tiles":
        found += [tiling(0, ca, 0, dtype, t.block_m, t.block_n, schedule, 16) for t in found
                  if t.block_m * t.block_n == 16384]
    return found


@triton.jit
def _stitch_ln_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, out_ptr, normed_ptr,
    M, CA, CB, stride_xm, stride_xk, stride_wn, stride_wk, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PARTS: tl.constexpr,
):
    # PARTS < 3 exists for the benchmark's --breakdown only: 1 = GEMM and `out`; 2 = also the
    # statistics and `normed` stores, without reading `out` back; 3 = the op.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    out_rows = rows[:, None] * CB
    ks = tl.arange(0, BLOCK_K)

    # Pass 1: out chunk by chunk. Statistics are of (out - shift), shift = the first chunk's row
    # mean: with |mean| >> std the centred values keep their precision, and so does `normed`.
    shift = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, CB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < CB
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CA, BLOCK_K):
            k = k0 + ks
            k_ok = k < CA
            a = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # Round first: `normed` is then exactly LayerNorm of the stored `out`, as unfused.
        out = (acc + bias[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_rows + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])

        if PARTS >= 2:
            y = tl.where(col_ok[None, :], out.to(tl.float32), 0.0)
            count = tl.minimum(CB - n0, BLOCK_N).to(tl.float32)
            if n0 == 0:
                shift = tl.sum(y, axis=1) / count
            d = tl.where(col_ok[None, :], y - shift[:, None], 0.0)
            chunk_mean = tl.sum(d, axis=1) / count
            c = tl.where(col_ok[None, :], d - chunk_mean[:, None], 0.0)
            # Chan et al.: merge (n0, mean, m2) with (count, chunk_mean, sum c^2). Never sum/sumsq,
            # whose difference cancels catastrophically when |mean| >> std.
            total = n0 + count
            delta = chunk_mean - mean
            mean += delta * (count / total)
            m2 += tl.sum(c * c, axis=1) + delta * delta * (n0 * count / total)
    if PARTS >= 2:
        rstd = 1.0 / tl.sqrt(m2 / CB + eps)
        # Pass 2: other threads of this program wrote the chunks; the barrier makes them visible.
        tl.debug_barrier()
        for n0 in range(0, CB, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < CB
            mask = row_ok[:, None] & col_ok[None, :]
            offs = out_rows + cols[None, :]
            if PARTS == 3:
                y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            gamma = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            normed = ((y - shift[:, None]) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sms(device: torch.device) -> int:
    """SMs this process can hold at once: the device's (a MIG slice reports its own), cut to the
    share an MPS client is given through the environment, which the device properties ignore."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    try:
        share = float(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", 100))
    except ValueError:
        share = 100.0
    if not 0 < share <= 100:  # not a share (NaN included): treated as unset
        share = 100.0
    return max(1, int(sms * share / 100))


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32, as cuBLAS would for the unfused layer. torch's
    per-backend ``fp32_precision`` reflects both its APIs, whereas reading the legacy
    ``allow_tf32`` raises once the new API has been used (torch < 2.9 has only the legacy one)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return matmul.allow_tf32 if precision is None else precision == "tf32"


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
           ln_bias: torch.Tensor, eps: float, out: torch.Tensor, normed: torch.Tensor,
           block_m: int | None = None, block_n: int | None = None, parts: int = 3,
           schedule: str = SCHEDULE, exchange: Workspace | None = None, num_warps: int | None = None,
           tma: bool = False):
    """Write into caller-owned contiguous ``out`` and ``normed`` [M, Cb] for validated 2-D ``x``.

    Caller-owned buffers let tests poison them and the benchmark sweep the tiles and warps (the
    overrides of ``tiling``); ``parts`` < 3 runs only part of the row schedule's kernel so that
    the benchmark can time the parts, and ``tma`` loads the tile schedule's operands through
    tensor descriptors (an experiment it times). ``exchange`` is the tile schedule's workspace
    (by default the current stream's; Triton's interpreter runs programs one at a time, so there
    a row of several tiles cannot wait for its later tiles, see tests/test_kernels.py). fp32
    follows torch's TF32 switch for matmuls, so fused and unfused agree on precision. Returns
    Triton's compiled kernel (registers, spills and shared memory for the benchmark), or None
    when there are no rows.
    """
    if schedule not in SCHEDULES or (schedule == "tiles" and parts != 3) or (tma and schedule != "tiles"):
        raise ValueError(f"schedule {schedule!r} with parts {parts}, tma {tma}: expected one of {SCHEDULES}, "
                         "parts only for 'rows', tma only for 'tiles'")
    m, ca = x.shape
    if m == 0:
        return None
    cb = weight.shape[0]
    t = tiling(m, ca, cb, x.dtype, block_m, block_n, schedule, num_warps)
    if schedule == "tiles" and x.is_cuda and triton.cdiv(cb, t.block_n) > _sms(x.device):
        # a row's tiles wait for each other: they must all be resident, at least one per SM
        schedule, t = "rows", tiling(m, ca, cb, x.dtype, block_m, block_n, num_warps=num_warps)
    ieee = x.dtype == torch.float32 and not tf32_allowed()
    vectors = (bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous())
    sizes = (m, ca, cb, *x.stride(), *weight.stride(), eps)
    kwargs = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k,
              "INPUT_PRECISION": "ieee" if ieee else "tf32",  # tf32, Triton's default, only affects fp32
              "num_warps": t.num_warps, "num_stages": t.num_stages}
    # Triton launches, and a CUDA graph captures, on the current device's stream, not x's
    other_device = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device_of(x) if other_device else contextlib.nullcontext():
        if schedule == "rows":
            kernel, grid = _stitch_ln_kernel, triton.cdiv(m, t.block_m)
            args = (x, weight, *vectors, out, normed, *sizes)
            kwargs["PARTS"] = parts
        else:
            exchange = exchange or stream_workspace(m, cb, t.block_m, t.block_n, x.device)
            kernel, grid = _stitch_ln_tiles_kernel, triton.cdiv(m, t.block_m) * triton.cdiv(cb, t.block_n)
            operands = tma_operands(x, weight, t.block_m, t.block_n, t.block_k) if tma else (x, weight)
            args = (*operands, *vectors, out, normed, *exchange, *sizes)
            kwargs["TMA"] = tma
        return kernel[(grid,)](*args, **kwargs)


def stitch_linear_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                     ln_bias: torch.Tensor, eps: float, schedule: str = SCHEDULE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, LayerNorm(out))`` as new contiguous [M, Cb] tensors for validated 2-D ``x`` [M, Ca]."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    normed = torch.empty_like(out)
    launch(x, weight, bias, ln_weight, ln_bias, eps, out, normed, schedule=schedule)
    return out, normed
