"""Vocab-parallel cross-entropy: the per-shard kernels.

Each tensor-parallel rank holds the columns [OFF, OFF + W) of the logits, a
shard of the global vocabulary of V classes. Rows follow the [OUTER, N, INNER]
layout of :mod:`softmax_gpu.kernels.softmax` (here N is the shard width W).
Targets are global class ids; a target equal to IGNORE is ignored, and one
outside [0, V) is invalid: its row's outputs are NaN (every rank knows V, so
every rank poisons the row without a collective).

Two kernels (each in a single and a looped variant), launched around the
host's collectives (:mod:`softmax_gpu.vocab_parallel`):

- stats: per row, this shard's online-softmax state (max m, sum d of
  e^(x - m)), the target logit where this rank owns the target (0 elsewhere,
  so that a SUM over ranks gives the target logit), and with SMOOTH the sum of
  the row's logits. One read of the shard. The host all-reduces MAX of m,
  rescales d to the global max, and all-reduces SUM of the stacked rows.
- grad: from the global lse and the reduction scale g, writes the shard's
  part of the gradient, reading the shard once more:
      dx = g * (e^(x - lse) * (1 + 2 z lse) - (1 - eps) [col == target] - eps / V)
  and 0 on ignored rows.

Paths (from ``softmax_gpu.vocab_parallel.shard_config``; its split path is run
as looped, since a vocab shard has as many rows as there are tokens):
- single: the shard row fits in one tile; ROWS rows per program; no loop
  (a column loop around a [ROWS, BLOCK_N] tile doubled the registers).
- looped: one program per row, tile by tile; the stats reuse ``online_stats``.

Arithmetic is fp32 (fp64 for fp64 logits: ACC); gradients are cast to the
logits' dtype on store, statistics are stored in ACC. Masked lanes load -inf.
All offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .softmax import FP_FUSION, acc_dtype, online_stats, row_base

__all__ = ["launch_vp_stats", "launch_vp_grad", "stats_rows"]


def stats_rows(smooth: bool) -> int:
    """Rows of the stacked statistics: sum of e^(x - max), target logit, (smooth) sum of logits."""
    return 3 if smooth else 2


@triton.jit
def shard_target_logit(X, T, xb, sx_n, rows, row_mask, s_t, OFF, W, V, IGNORE,
                       ACC: tl.constexpr):
    """Each row's target logit where this shard owns the target, else 0;
    NaN for a target outside [0, V) that is not IGNORE."""
    t = tl.load(T + rows * s_t, mask=row_mask, other=IGNORE).to(tl.int64)
    valid = t != IGNORE
    local = valid & (t >= OFF) & (t < OFF + W)
    tx = tl.load(X + xb + (t - OFF) * sx_n, mask=row_mask & local, other=0.0).to(ACC)
    bad = valid & ((t < 0) | (t >= V))
    return tl.where(bad, float("nan"), tx)


@triton.jit
def vp_stats_single_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    MX,  # [M] out: the shard's row maxima (ACC)
    ST,  # [K, M] out (ACC): sum of e^(x - max), target logit, (SMOOTH) sum of logits
    M,  # number of rows
    W,  # shard width: columns this rank holds
    INNER,  # rows sharing one outer index (1 when the vocabulary is the last dim)
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    SMOOTH: tl.constexpr,  # also write the sum of logits (label smoothing)
    ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 logits)
    BLOCK_N: tl.constexpr,  # power of two >= W
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = row_mask[:, None] & (cols < W)[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    x = tl.load(X + xb[:, None] + cols[None, :] * sx_n, mask=mask, other=float("-inf")).to(ACC)
    m = tl.max(x, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # empty or all -inf shard row: d = 0
    d = tl.sum(tl.exp(x - m_safe[:, None]), 1)
    tx = shard_target_logit(X, T, xb, sx_n, rows, row_mask, s_t, OFF, W, V, IGNORE, ACC)
    tl.store(MX + rows, m.to(MX.dtype.element_ty), mask=row_mask)
    tl.store(ST + rows, d.to(ST.dtype.element_ty), mask=row_mask)
    tl.store(ST + M + rows, tx.to(ST.dtype.element_ty), mask=row_mask)
    if SMOOTH:
        xs = tl.sum(tl.where(mask, x, 0.0), 1)
        tl.store(ST + 2 * M + rows, xs.to(ST.dtype.element_ty), mask=row_mask)


@triton.jit
def vp_stats_looped_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    MX,  # [M] out: the shard's row maxima (ACC)
    ST,  # [K, M] out (ACC): sum of e^(x - max), target logit, (SMOOTH) sum of logits
    M,  # number of rows
    W,  # shard width: columns this rank holds
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    SMOOTH: tl.constexpr,  # also write the sum of logits (label smoothing)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    row = tl.program_id(0).to(tl.int64)
    xb = row_base(row, INNER, sx_o, sx_i)
    m, d = online_stats(X, xb, sx_n, 0, W, ACC, BLOCK_N)
    tx = shard_target_logit(X, T, xb, sx_n, row, row < M, s_t, OFF, W, V, IGNORE, ACC)
    tl.store(MX + row, m.to(MX.dtype.element_ty))
    tl.store(ST + row, d.to(ST.dtype.element_ty))
    tl.store(ST + M + row, tx.to(ST.dtype.element_ty))
    if SMOOTH:
        # A second pass over the row (from L2 when it fits): online_stats
        # returns only (max, sum of exp).
        acc = tl.zeros((BLOCK_N,), ACC)
        for off in range(0, W, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
            x = tl.load(X + xb + cols * sx_n, mask=cols < W, other=float("-inf")).to(ACC)
            acc += tl.where(cols < W, x, 0.0)
        tl.store(ST + 2 * M + row, tl.sum(acc, 0).to(ST.dtype.element_ty))


@triton.jit
def grad_row_coefs(T, LSE, G, COEF, rows, row_mask, s_t, s_g, OFF, V, IGNORE,
                   ACC: tl.constexpr):
    """Per-row terms of the gradient: (valid, target column in this shard, lse,
    a, b, c) with dx = a e^(x - lse) - b - c [col == target] on valid rows."""
    t = tl.load(T + rows * s_t, mask=row_mask, other=IGNORE).to(tl.int64)
    valid = t != IGNORE
    bad = valid & ((t < 0) | (t >= V))
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0).to(ACC)
    g = tl.load(G + rows * s_g, mask=row_mask, other=0.0).to(ACC)
    g = tl.where(bad, float("nan"), g)  # an invalid target poisons its row
    hit = tl.load(COEF).to(ACC)  # 1 - eps
    uniform = tl.load(COEF + 1).to(ACC)  # eps / V
    two_z = tl.load(COEF + 2).to(ACC)  # 2 z
    a = g * (1.0 + two_z * lse)
    return valid, t - OFF, lse, a, g * uniform, g * hit


@triton.jit
def grad_value(x, cols, tcol, valid, lse, a, b, c):
    """dx of a tile from its per-row terms (broadcast by the caller); 0 on ignored rows."""
    dx = tl.exp(x - lse) * a - b - tl.where(cols == tcol, c, 0.0)
    return tl.where(valid, dx, 0.0)


@triton.jit
def vp_grad_single_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    LSE,  # [M] global logsumexp of each row (ACC)
    G,  # reduction scale per row (ACC): dloss/dloss_row, stride s_g (0: one scalar)
    COEF,  # [3] (ACC): 1 - eps, eps / V, 2 * z_loss
    DX,  # gradient of the shard to write (logits dtype)
    M,  # number of rows
    W,  # shard width
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # gradient strides
    s_t,  # target stride
    s_g,  # scale stride (0 for mean / sum)
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # power of two >= W
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < M
    # the per-row terms as [ROWS, 1] columns, never expanded from 1-D: with
    # 1-D terms expanded to the tile, Triton 3.6 failed to compile the fp64
    # kernel at ROWS >= 32 (its layout pass gave the target mask two layouts)
    valid, tcol, lse, a, b, c = grad_row_coefs(T, LSE, G, COEF, rows[:, None], row_mask[:, None],
                                               s_t, s_g, OFF, V, IGNORE, ACC)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = row_mask[:, None] & (cols < W)[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    x = tl.load(X + xb[:, None] + cols[None, :] * sx_n, mask=mask, other=float("-inf")).to(ACC)
    dx = grad_value(x, cols[None, :], tcol, valid, lse, a, b, c)
    tl.store(DX + yb[:, None] + cols[None, :] * sy_n, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def vp_grad_looped_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    LSE,  # [M] global logsumexp of each row (ACC)
    G,  # reduction scale per row (ACC), stride s_g (0: one scalar)
    COEF,  # [3] (ACC): 1 - eps, eps / V, 2 * z_loss
    DX,  # gradient of the shard to write (logits dtype)
    M,  # number of rows
    W,  # shard width
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # gradient strides
    s_t,  # target stride
    s_g,  # scale stride (0 for mean / sum)
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    row = tl.program_id(0).to(tl.int64)
    valid, tcol, lse, a, b, c = grad_row_coefs(T, LSE, G, COEF, row, row < M, s_t, s_g,
                                               OFF, V, IGNORE, ACC)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    for off in range(0, W, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < W
        x = tl.load(X + xb + cols * sx_n, mask=mask, other=float("-inf")).to(ACC)
        dx = grad_value(x, cols, tcol, valid, lse, a, b, c)
        tl.store(DX + yb + cols * sy_n, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers: take validated tensors and a SoftmaxConfig for an [M, W] shard;
# return the names of the kernels launched.
# ----------------------------------------------------------------------------


def launch_vp_stats(x, t, mx, st, M, W, inner, x_strides, s_t, off, V, ignore, smooth, cfg):
    """mx[r], st[:, r] <- the shard statistics of row r (see the module docstring)."""
    acc = acc_dtype(x.dtype)
    common = (x, t, mx, st, M, W, inner, *x_strides, s_t, off, V, ignore)
    if cfg.path == "single":
        grid = (triton.cdiv(M, cfg.rows_per_program),)
        vp_stats_single_kernel[grid](
            *common, SMOOTH=smooth, ACC=acc, BLOCK_N=cfg.block_n,
            ROWS=cfg.rows_per_program, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
        )
        return ("vp_stats_single_kernel",)
    vp_stats_looped_kernel[(M,)](
        *common, SMOOTH=smooth, ACC=acc, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    return ("vp_stats_looped_kernel",)


def launch_vp_grad(x, t, lse, g, s_g, coef, dx, M, W, inner, x_strides, dx_strides, s_t,
                   off, V, ignore, cfg):
    """dx <- the gradient of the shard, given the global lse and the reduction scale g."""
    acc = acc_dtype(x.dtype)
    common = (x, t, lse, g, coef, dx, M, W, inner, *x_strides, *dx_strides, s_t, s_g, off, V,
              ignore)
    if cfg.path == "single":
        grid = (triton.cdiv(M, cfg.rows_per_program),)
        vp_grad_single_kernel[grid](
            *common, ACC=acc, BLOCK_N=cfg.block_n, ROWS=cfg.rows_per_program,
            num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
        )
        return ("vp_grad_single_kernel",)
    vp_grad_looped_kernel[(M,)](*common, ACC=acc, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                                 enable_fp_fusion=FP_FUSION)
    return ("vp_grad_looped_kernel",)
