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
(``stitch_ln.launch`` uses the row schedule on a GPU with fewer SMs than that).

The counters are never reset. A launch adds exactly ``GENERATION`` to the counter of each row
tile it covers (its tiles add shares of it), so between launches every counter is a multiple of
``GENERATION``, and within a launch it is one again exactly when the row's last tile has arrived:
that is what a tile waits for. Launches that run in order (one stream) therefore share one
workspace with no memset and no reset step (``stream_workspace``), whatever their shapes. The
counters are int32 and wrap around, which keeps them multiples of ``GENERATION`` (a power of two).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


GENERATION = 4096  # what a launch adds to a row tile's counter: a power of two > the tiles of any row (128)


class Workspace(NamedTuple):
    """The exchange between the tiles of a row: their statistics, and per row tile a counter of
    arrivals."""

    stats: torch.Tensor  # float32, at least 3 x tiles per row x M: shift, centred mean, M2
    arrivals: torch.Tensor  # int32, at least one per row tile; a multiple of GENERATION between launches


def workspace(stats: int, row_tiles: int, device: torch.device) -> Workspace:
    """A new workspace for launches of up to ``stats`` floats and ``row_tiles`` row tiles."""
    return Workspace(torch.empty(stats, dtype=torch.float32, device=device),
                     torch.zeros(row_tiles, dtype=torch.int32, device=device))


def workspace_size(m: int, cb: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(stats floats, row tiles) a launch at this shape and tiling needs."""
    return 3 * triton.cdiv(cb, block_n) * m, triton.cdiv(m, block_m)


_STREAM_WORKSPACES: dict = {}  # (device, raw stream) -> Workspace


def stream_workspace(m: int, cb: int, block_m: int, block_n: int, device: torch.device) -> Workspace:
    """The workspace for a launch on ``device``'s current stream (call under its device guard).

    Launches on one stream run one after another and leave the counters ready for the next, so a
    stream keeps one workspace, grown as needed, and launches skip the memset a new one costs.
    Other streams get their own: concurrent launches must not share counters. A launch being
    captured into a CUDA graph gets a new one, zeroed by a memset the graph records, so that
    replays of different graphs on different streams never share one either."""
    need_stats, need_rows = workspace_size(m, cb, block_m, block_n)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return workspace(need_stats, need_rows, device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    kept = _STREAM_WORKSPACES.get(key)
    have = (kept.stats.numel(), kept.arrivals.numel()) if kept else (0, 0)
    if have[0] < need_stats or have[1] < need_rows:
        # the old one, if any, is freed in stream order: launches already queued keep using it
        kept = _STREAM_WORKSPACES[key] = workspace(max(need_stats, have[0]), max(need_rows, have[1]), device)
    return kept


def tma_operands(x: torch.Tensor, weight: torch.Tensor, block_m: int, block_n: int, block_k: int) -> tuple:
    """x and W as tensor descriptors for the kernel's ``TMA`` loads (an experiment the benchmark
    sweep times: on Hopper the copy engine then moves the operand tiles, which frees registers).
    Both must be row-major with rows aligned to 16 bytes, as TMA requires."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            raise ValueError(f"TMA loads need a row-major {name} with 16-byte aligned rows, got strides {t.stride()}")
    return (TensorDescriptor.from_tensor(x, [block_m, block_k]),
            TensorDescriptor.from_tensor(weight, [block_n, block_k]))


@triton.jit
def _stitch_ln_tiles_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, out_ptr, normed_ptr, stats_ptr, arrive_ptr,
    M, CA, CB, stride_xm, stride_xk, stride_wn, stride_wk, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GENERATION: tl.constexpr = GENERATION, TMA: tl.constexpr = False,
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
        if TMA:  # x_ptr, w_ptr are tensor descriptors: the copy engine loads, zero-filling outside
            a = x_ptr.load([row_tile * BLOCK_M, k0])
            w = w_ptr.load([col_tile * BLOCK_N, k0]).T
        else:
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
    # shared memory and a barrier, so the loads below see every peer's statistics. The row's tiles
    # add shares that sum to GENERATION (the first GENERATION - (tiles - 1), the others 1): from a
    # multiple of GENERATION at launch, the counter is one again exactly when all have arrived.
    # The probe follows this tile's own arrival in one thread at one address, so it never reads
    # the count from before it.
    tl.debug_barrier()
    share = tl.where(col_tile == 0, GENERATION - tiles_per_row + 1, 1)
    tl.atomic_add(arrive_ptr + row_tile, share, sem="release", scope="gpu")
    while tl.atomic_add(arrive_ptr + row_tile, 0, sem="acquire", scope="gpu") % GENERATION != 0:
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
