"""Triton kernel, tile schedule: the stitching layer on 2-D output tiles, LayerNorm across tiles.

The row schedule (``stitch_ln``) gives each program whole rows, so W is re-read from L2 once per
row tile and each x strip once per column chunk; a traffic model fits its H200 times at that
(docs/kernels.md). Here each program owns one ``BLOCK_M x BLOCK_N`` tile of ``out``, as a GEMM
does, and the row statistics LayerNorm needs are exchanged between the tiles of a row:

1. the GEMM for the tile, plus bias, rounded to the stream's dtype and stored as ``out``;
2. the tile's per-row (shift, centred mean, M2), published to a workspace in global memory;
   then the program arrives at its row tile's counter (release) and waits (acquire) until all
   ``cdiv(Cb, BLOCK_N)`` tiles of the row have arrived;
3. the peers' statistics are merged (Chan's formula, relative to this tile's shift), and the tile,
   still in registers, is normalised and stored as ``normed``.

So ``out`` is written once and never read back, and the GEMM traffic is that of a 2-D tiling.
Waiting is safe without a grid barrier: the tiles of a row are consecutive program ids and wait
only for each other, so with programs dispatched in id order (as GPUs do) and a row's
``cdiv(Cb, BLOCK_N)`` tiles all resident at once, the lowest unfinished row always completes
(``stitch_ln.launch`` uses the row schedule on a GPU with fewer SMs than that). The counters must
be zero at launch (``stitch_ln.workspace``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stitch_ln_tiles_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, out_ptr, normed_ptr, stats_ptr, count_ptr,
    M, CA, CB, stride_xm, stride_xk, stride_wn, stride_wk, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tiles_per_row = tl.cdiv(CB, BLOCK_N)
    row_tile = tl.program_id(0) // tiles_per_row
    col_tile = tl.program_id(0) % tiles_per_row
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < CB
    ks = tl.arange(0, BLOCK_K)

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
    # Round first: `normed` is then exactly LayerNorm of the stored `out`, as unfused.
    out = (acc + bias[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * CB + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])

    # The tile's statistics of (out - shift), shift = its row mean: centred values keep their
    # precision when |mean| >> std, and shifts of neighbouring tiles subtract exactly. With the
    # values centred, sum(d^2) - n * mean(d)^2 does not cancel (mean(d) is rounding-sized).
    y = tl.where(col_ok[None, :], out.to(tl.float32), 0.0)
    count = tl.minimum(CB - col_tile * BLOCK_N, BLOCK_N).to(tl.float32)
    shift = tl.sum(y, axis=1) / count
    d = tl.where(col_ok[None, :], y - shift[:, None], 0.0)
    d_sum = tl.sum(d, axis=1)
    centred = d_sum / count
    m2 = tl.sum(d * d, axis=1) - d_sum * centred
    # stats[s, col_tile, row]: s = 0 shift, 1 centred mean, 2 M2
    slot = stats_ptr + col_tile * M + rows
    plane = tiles_per_row * M
    tl.store(slot, shift, mask=row_ok)
    tl.store(slot + plane, centred, mask=row_ok)
    tl.store(slot + 2 * plane, m2, mask=row_ok)

    # Every thread's stores, then one release; the acquire's result reaches all threads through
    # shared memory and a barrier, so the loads below see every peer's statistics.
    tl.debug_barrier()
    tl.atomic_add(count_ptr + row_tile, 1, sem="release", scope="gpu")
    while tl.atomic_add(count_ptr + row_tile, 0, sem="acquire", scope="gpu") < tiles_per_row:
        pass

    # Chan et al.'s merge of the row's tiles, each tile's mean taken relative to this tile's shift.
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    var_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(tiles_per_row):
        peer = stats_ptr + j * M + rows
        n_j = tl.minimum(CB - j * BLOCK_N, BLOCK_N).to(tl.float32)
        mean_j = ((tl.load(peer, mask=row_ok, other=0.0, cache_modifier=".cg") - shift)
                  + tl.load(peer + plane, mask=row_ok, other=0.0, cache_modifier=".cg"))
        m2_j = tl.load(peer + 2 * plane, mask=row_ok, other=0.0, cache_modifier=".cg")
        total += n_j
        delta = mean_j - mean
        mean += delta * (n_j / total)
        var_sum += m2_j + delta * delta * ((total - n_j) * n_j / total)
    rstd = 1.0 / tl.sqrt(var_sum / CB + eps)
    gamma = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    normed = (d - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(normed_ptr + rows[:, None] * CB + cols[None, :], normed.to(normed_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
