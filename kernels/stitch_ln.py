"""Triton kernel: a stitching layer ``out = x W^T + b`` with the next block's LayerNorm as epilogue.

Why fuse: unfused, the GEMM writes the stitched residual stream ``out``, LayerNorm reads it back
and writes the normalised copy: three passes over a [tokens, Cb] tensor. Here each program owns
``BLOCK_M`` full rows (all Cb columns), so the LayerNorm statistics come from the accumulator in
registers and ``out`` is written once and never re-read: one pass over ``out``.

This module only launches; shape, dtype and device checks live in ``ops`` (the public entry).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Budgets checked offline by compiling for sm_80 and sm_90 (tests/test_kernels.py, slow): with
# them no family shape spills a register and shared memory stays under 100 KB.
ACC_BUDGET = 16384  # fp32 accumulators per program (BLOCK_M x BLOCK_N); 32768 spilled at 8 warps
TILE_BYTES = 128 * 1024  # bound on NUM_STAGES x BLOCK_K x (BLOCK_M + BLOCK_N) operand bytes
NUM_STAGES = 2


class Tiling(NamedTuple):
    """Launch parameters; ``block_n`` always covers all of Cb (the whole-row design)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def tiling(ca: int, cb: int, dtype: torch.dtype, block_m: int | None = None) -> Tiling:
    """Pick tiles from the shape alone (no autotuning: deterministic, and runs in the interpreter).

    ``block_m`` overrides the row tile; the benchmark sweeps it to tune this rule on a GPU.
    """
    block_n = max(16, triton.next_power_of_2(cb))  # tl.dot needs every tile side >= 16
    if block_m is None:
        block_m = max(16, min(64, ACC_BUDGET // block_n))
    block_k = 64
    while block_k > 16 and NUM_STAGES * block_k * (block_m + block_n) * dtype.itemsize > TILE_BYTES:
        block_k //= 2
    block_k = min(block_k, max(16, triton.next_power_of_2(ca)))
    num_warps = 8 if block_m * block_n >= 8192 else 4
    return Tiling(block_m, block_n, block_k, num_warps, NUM_STAGES)


@triton.jit
def _stitch_ln_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, out_ptr, normed_ptr,
    M, CA, CB, stride_xm, stride_xk, stride_wn, stride_wk, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < CB

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CA, BLOCK_K):
        k = k0 + ks
        k_ok = k < CA
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Round to the stream's dtype first: `normed` is then exactly LayerNorm of the stored `out`,
    # as in the unfused model.
    out = (acc + bias[None, :]).to(out_ptr.dtype.element_ty)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * CB + cols[None, :]
    tl.store(out_ptr + offs, out, mask=mask)

    y = tl.where(mask, out.to(tl.float32), 0.0)  # padded columns stay out of the statistics
    mean = tl.sum(y, axis=1) / CB
    centred = tl.where(col_ok[None, :], y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / CB + eps)
    gamma = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    normed = centred * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
           ln_bias: torch.Tensor, eps: float, out: torch.Tensor, normed: torch.Tensor,
           block_m: int | None = None) -> None:
    """Write into caller-owned contiguous ``out`` and ``normed`` [M, Cb] for validated 2-D ``x``.

    Caller-owned buffers let tests poison them and the benchmark sweep ``block_m``. fp32 follows
    torch's TF32 switch for matmuls, so fused and unfused agree on precision.
    """
    m, ca = x.shape
    cb = weight.shape[0]
    if m == 0:
        return
    t = tiling(ca, cb, x.dtype, block_m)
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    with torch.cuda.device_of(x):  # Triton launches on the current device, not x's
        _stitch_ln_kernel[(triton.cdiv(m, t.block_m),)](
            x, weight, bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), out, normed,
            m, ca, cb, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), eps,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            INPUT_PRECISION="ieee" if ieee else "tf32",  # tf32, Triton's default, only affects fp32
            num_warps=t.num_warps, num_stages=t.num_stages,
        )


def stitch_linear_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                     ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, LayerNorm(out))`` as new contiguous [M, Cb] tensors for validated 2-D ``x`` [M, Ca]."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    normed = torch.empty_like(out)
    launch(x, weight, bias, ln_weight, ln_bias, eps, out, normed)
    return out, normed
