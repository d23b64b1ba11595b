"""Vocab-parallel cross-entropy: the per-shard kernels.

Each tensor-parallel rank holds the columns [OFF, OFF + W) of the logits, a
shard of the global vocabulary of V classes. Rows follow the [OUTER, N, INNER]
layout of :mod:`softmax_gpu.kernels.softmax` (here N is the shard width W).
Targets are global class ids; a target equal to IGNORE is ignored, and one
outside [0, V) is invalid: its target logit is NaN (every rank knows V, so
every rank poisons the row without a collective).

With SOFTCAP the logits are z = cap * tanh(x / cap) before everything (the
cross-entropy kernels' ``load_logits``), and the gradient gets the softcap's
derivative. Class weights (HAS_WEIGHT, only with label smoothing) are the
GLOBAL [V] vector; a shard reads its slice CW[OFF : OFF + W] (the weight of a
row's target is applied by the host).

Two shard kernels (each in a single and a looped variant), launched around
the host's collectives (:mod:`softmax_gpu.vocab_parallel`), and two per-row
kernels between them (one launch each, instead of a score of small torch ops):

- stats: per row, this shard's online-softmax state (max m, sum d of
  e^(z - m)), the target logit z_t where this rank owns the target (0
  elsewhere, so that a SUM over ranks gives it), and with SMOOTH the sum of
  w_c (z_c - m) over the shard (w_c = 1 without weights; the looped kernel
  moves its running sum to each new max). One read of the shard. The host
  all-reduces MAX of m, moves d and the smoothing sum to the global max, and
  all-reduces SUM of the stacked rows. The smoothing term of the loss is
  then sum_c w_c (lse - z_c) = sw l - sum_c w_c (z_c - m): two terms of one
  sign, so that it loses nothing to logits far from 0 (sw lse - sum w z
  cancels there).
- grad: from per-row terms the host computes after the collectives (the
  global lse as m + l, its max and the log of its sum; a, b, c), writes the
  shard's gradient, reading the shard once more (DX may be X itself: each
  tile is read before it is written):
      dz = a e^((z - m) - l) - b [col == target] - c w_c,   dx = dz * (1 - (z / cap)^2)
  (the cross-entropy kernels' ``class_grad``), and 0 on rows whose three
  coefficients are 0 (ignored rows with no lse gradient), whatever the
  logits hold.
- rows (after the collectives): each row's global lse (as m and l = log of
  the sum, and in fp32 as m + l) and loss from the global (max, sum),
  target logit and smoothing sum, through the
  cross-entropy kernels' ``class_target`` and ``class_row_loss`` (divided by
  the mean's denominators, ``ce_denominators_kernel``'s DEN).
- coefs (backward): the gradient kernel's per-row terms (m, l, a, b, c) from
  the lse's (m, l), the targets, the loss's grad_output (one value, or one per row)
  and the lse's gradient, through ``class_scales`` and ``class_grad_coefs``.

Paths (from ``softmax_gpu.vocab_parallel.shard_config``; its split path is run
as looped, since a vocab shard has as many rows as there are tokens):
- single: the shard row fits in one tile; ROWS rows per program; no loop.
- looped: one program per row, tile by tile; the stats fold the smoothing
  sum into the online (max, sum) pass (one read).

Arithmetic is fp32 (fp64 for fp64 logits: ACC); gradients are cast to the
logits' dtype on store, statistics are stored in ACC. Masked lanes load -inf.
The softcap arrives as the int32 bit patterns of its fp32 hi and lo parts
(``f64_parts``; exact for fp64), never specialised. All offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cross_entropy import (DEN_LEN, class_grad, class_grad_coefs, class_row_loss, class_scales,
                            class_target, f64_parts, load_logits, scalar_arg,
                            smooth_weight_sum, softcap_tanh)
from .softmax import (FP_FUSION, acc_dtype, exp_rel, finite_max, online_sum_update, regs_meta,
                      row_base)

__all__ = ["stats_launcher", "grad_launcher", "rows_launcher", "coefs_launcher", "stats_rows",
           "COEF_ROWS", "DEN_LEN"]

# Rows of the per-row terms the gradient kernel reads: m, l (the lse m + l), a, b, c.
COEF_ROWS = 5


def stats_rows(smooth: bool) -> int:
    """Rows of the stacked statistics: sum of e^(z - max), target logit, (smooth) sum of
    w (z - max)."""
    return 3 if smooth else 2


@triton.jit
def plane(rows, M, K: tl.constexpr):
    """The offsets of ``rows`` (int64) in row K of a [k, M] array: K * M + rows,
    summed in int64 one M at a time (K * M of int32 arguments could wrap)."""
    for _ in tl.static_range(K):
        rows += M
    return rows


@triton.jit
def shard_target_logit(X, T, xb, sx_n, rows, row_mask, s_t, OFF, W, V, IGNORE, cap,
                       SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """Each row's (softcapped) target logit where this shard owns the target,
    else 0; NaN for a target outside [0, V) that is not IGNORE."""
    t = tl.load(T + rows * s_t, mask=row_mask, other=IGNORE).to(tl.int64)
    valid = t != IGNORE
    local = valid & (t >= OFF) & (t < OFF + W)
    tx = tl.load(X + xb + (t - OFF) * sx_n, mask=row_mask & local, other=0.0).to(ACC)
    if SOFTCAP:
        tx = softcap_tanh(tx, cap)
    bad = valid & ((t < 0) | (t >= V))
    return tl.where(bad, float("nan"), tx)


@triton.jit
def shard_weights(CW, OFF, cols, cmask, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """The class weights of this shard's columns ``cols`` (1 without weights; 0 masked)."""
    if HAS_WEIGHT:
        return tl.load(CW + OFF + cols, mask=cmask, other=0.0).to(ACC)
    return tl.where(cmask, 1.0, 0.0).to(ACC)


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def vp_stats_single_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    MX,  # [M] out: the shard's row maxima (ACC)
    ST,  # [K, M] out (ACC): sum of e^(z - max), target logit, (SMOOTH) sum of w (z - max)
    M,  # number of rows
    W,  # shard width: columns this rank holds
    INNER,  # rows sharing one outer index (1 when the vocabulary is the last dim)
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    cap_hi, cap_lo,  # softcap (f64_parts; used when SOFTCAP)
    SMOOTH: tl.constexpr,  # also write the sum of w (z - max) (label smoothing)
    HAS_WEIGHT: tl.constexpr,  # w = CW[OFF + c] in that sum (else 1)
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 logits)
    BLOCK_N: tl.constexpr,  # power of two >= W
    ROWS: tl.constexpr,  # rows per program
):
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < W
    mask = row_mask[:, None] & cmask[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    z = load_logits(X, xb[:, None] + cols[None, :] * sx_n, mask, cap, SOFTCAP, ACC)
    m = tl.max(z, 1)
    # e^(z - m), exactly 1 at the max; an empty or all -inf shard row: d = 0
    d = tl.sum(exp_rel(z, finite_max(m)[:, None]), 1)
    tx = shard_target_logit(X, T, xb, sx_n, rows, row_mask, s_t, OFF, W, V, IGNORE, cap,
                            SOFTCAP, ACC)
    tl.store(MX + rows, m.to(MX.dtype.element_ty), mask=row_mask)
    tl.store(ST + rows, d.to(ST.dtype.element_ty), mask=row_mask)
    tl.store(ST + plane(rows, M, 1), tx.to(ST.dtype.element_ty), mask=row_mask)
    if SMOOTH:  # sum of w (z - max): no cancellation against the max (logits far from 0)
        w = shard_weights(CW, OFF, cols, cmask, HAS_WEIGHT, ACC)
        xs = tl.sum(tl.where(mask, w[None, :] * (z - finite_max(m)[:, None]), 0.0), 1)
        tl.store(ST + plane(rows, M, 2), xs.to(ST.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def vp_stats_looped_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    MX,  # [M] out: the shard's row maxima (ACC)
    ST,  # [K, M] out (ACC): sum of e^(z - max), target logit, (SMOOTH) sum of w (z - max)
    M,  # number of rows
    W,  # shard width: columns this rank holds
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    cap_hi, cap_lo,  # softcap (f64_parts; used when SOFTCAP)
    SMOOTH: tl.constexpr,  # also write the sum of w (z - max) (label smoothing)
    HAS_WEIGHT: tl.constexpr,  # w = CW[OFF + c] in that sum (else 1)
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    xb = row_base(row, INNER, sx_o, sx_i)
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((BLOCK_N,), ACC)
    # (SMOOTH) the sum of w (z - max) as per-lane terms, each taken from the
    # max of its tile's time, plus the scalar shifts that move them to the
    # newest max: sum of w over the earlier tiles times (old max - new max)
    s = tl.zeros((BLOCK_N,), ACC)
    shift = tl.zeros((), ACC)
    w_before = tl.zeros((), ACC)  # with HAS_WEIGHT: sum of w over the earlier tiles
    for off in range(0, W, BLOCK_N):  # one pass: online (max, sum), and the smoothing sum
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < W
        z = load_logits(X, xb + cols * sx_n, cmask, cap, SOFTCAP, ACC)
        m_old = m
        m, d = online_sum_update(m, d, z)
        if SMOOTH:
            w = shard_weights(CW, OFF, cols, cmask, HAS_WEIGHT, ACC)
            if HAS_WEIGHT:
                shift += (finite_max(m_old) - finite_max(m)) * w_before
                w_before += tl.sum(w, 0)
            else:  # w = 1: the earlier tiles hold off columns
                shift += (finite_max(m_old) - finite_max(m)) * off
            s += tl.where(cmask, w * (z - finite_max(m)), 0.0)
    tx = shard_target_logit(X, T, xb, sx_n, row, row < M, s_t, OFF, W, V, IGNORE, cap,
                            SOFTCAP, ACC)
    tl.store(MX + row, m.to(MX.dtype.element_ty))
    tl.store(ST + row, tl.sum(d, 0).to(ST.dtype.element_ty))
    tl.store(ST + plane(row, M, 1), tx.to(ST.dtype.element_ty))
    if SMOOTH:
        tl.store(ST + plane(row, M, 2), (tl.sum(s, 0) + shift).to(ST.dtype.element_ty))


@triton.jit
def grad_row_terms(T, COEF, rows, row_mask, M, s_t, OFF, ACC: tl.constexpr):
    """Per-row terms of the gradient: (target column in this shard, m, l, a,
    b, c, live), the global lse being m + l (max, log of the sum: sigma =
    e^((z - m) - l) keeps the single-device op's precision, where e^(z - lse)
    would lose |lse| ulp); live is False where a, b and c are all 0 (that
    row's gradient is 0)."""
    t = tl.load(T + rows * s_t, mask=row_mask, other=0).to(tl.int64)
    m = tl.load(COEF + rows, mask=row_mask, other=0.0).to(ACC)
    l = tl.load(COEF + plane(rows, M, 1), mask=row_mask, other=0.0).to(ACC)
    a = tl.load(COEF + plane(rows, M, 2), mask=row_mask, other=0.0).to(ACC)
    b = tl.load(COEF + plane(rows, M, 3), mask=row_mask, other=0.0).to(ACC)
    c = tl.load(COEF + plane(rows, M, 4), mask=row_mask, other=0.0).to(ACC)
    live = (a != 0.0) | (b != 0.0) | (c != 0.0)
    return t - OFF, m, l, a, b, c, live


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def vp_grad_single_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    COEF,  # [5, M] per-row terms (ACC): m, l (the global lse m + l), a, b, c
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    DX,  # gradient of the shard to write (logits dtype); may be X itself
    M,  # number of rows
    W,  # shard width
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # gradient strides
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    cap_hi, cap_lo,  # softcap (f64_parts; used when SOFTCAP)
    SMOOTH: tl.constexpr,  # subtract c * w_c (label smoothing)
    HAS_WEIGHT: tl.constexpr,  # w_c = CW[OFF + c] (else 1)
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap); times its derivative
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # power of two >= W
    ROWS: tl.constexpr,  # rows per program
):
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < W
    mask = row_mask[:, None] & cmask[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    z = load_logits(X, xb[:, None] + cols[None, :] * sx_n, mask, cap, SOFTCAP, ACC)
    w = shard_weights(CW, OFF, cols, cmask, HAS_WEIGHT, ACC)[None, :]
    # the per-row terms as [ROWS, 1] columns, never expanded from 1-D: with
    # 1-D terms expanded to the tile, Triton 3.6 failed to compile the fp64
    # kernel at ROWS >= 32 (its layout pass gave the target mask two layouts).
    # Read after the tile's loads are issued: before them, bf16 at 16384 with
    # every extra spilled 24 B at 128 registers (sm_90 static check, Triton 3.9)
    tcol, m, l, a, b, c, live = grad_row_terms(T, COEF, rows[:, None], row_mask[:, None], M,
                                               s_t, OFF, ACC)
    dx = class_grad(tl.exp((z - m) - l), z, cols[None, :] == tcol, a, b, c, w, live, cap,
                    SMOOTH, SOFTCAP)
    tl.store(DX + yb[:, None] + cols[None, :] * sy_n, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def vp_grad_looped_kernel(
    X,  # local logits shard base pointer
    T,  # [M] global target ids (int64)
    COEF,  # [5, M] per-row terms (ACC): m, l (the global lse m + l), a, b, c
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    DX,  # gradient of the shard to write (logits dtype); may be X itself
    M,  # number of rows
    W,  # shard width
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # gradient strides
    s_t,  # target stride
    OFF,  # global id of this shard's first column
    cap_hi, cap_lo,  # softcap (f64_parts; used when SOFTCAP)
    SMOOTH: tl.constexpr,  # subtract c * w_c (label smoothing)
    HAS_WEIGHT: tl.constexpr,  # w_c = CW[OFF + c] (else 1)
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap); times its derivative
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    tcol, m, l, a, b, c, live = grad_row_terms(T, COEF, row, row < M, M, s_t, OFF, ACC)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    for off in range(0, W, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < W
        z = load_logits(X, xb + cols * sx_n, cmask, cap, SOFTCAP, ACC)
        w = shard_weights(CW, OFF, cols, cmask, HAS_WEIGHT, ACC)
        dx = class_grad(tl.exp((z - m) - l), z, cols == tcol, a, b, c, w, live, cap, SMOOTH,
                        SOFTCAP)
        tl.store(DX + yb + cols * sy_n, dx.to(DX.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["eps_hi", "eps_lo", "zl_hi", "zl_lo"])
def vp_rows_kernel(
    MG,  # [M] global row maxima (ACC)
    ST,  # [K, M] global sums (ACC): sum of e^(z - m), target logit, (SMOOTH) sum of w (z - m)
    T,  # [M] global target ids (int64)
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] denominators (ACC; read when use_den, and with weights and smoothing)
    LSE,  # [2, M] out (ACC): the global lse as its max m and the log l of its sum (lse = m + l)
    LSE32,  # [M] out: the lse m + l in fp32 (the caller's copy)
    LOSS,  # [M] out: row losses (ACC), divided by the mean's denominators
    M,  # number of rows
    s_t,  # target stride
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    use_den,  # 1: divide by DEN's denominators (the mean), 0: by 1
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient (f64_parts)
    HAS_WEIGHT: tl.constexpr,  # class weights CW
    SMOOTH: tl.constexpr,  # label smoothing: ST holds the sum of w (z - m)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rmask = rows < M
    _, kept, _, wt = class_target(T, CW, rows * s_t, rmask, V, IGNORE, HAS_WEIGHT, ACC)
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    inv_dl, inv_dz, _, _ = class_scales(DEN, use_den, z_loss, 1.0, ACC)
    m = tl.load(MG + rows, mask=rmask, other=0.0).to(ACC)
    # an all -inf row (d = 0): lse -inf, as torch's logsumexp
    l1p = tl.log(tl.load(ST + rows, mask=rmask, other=1.0).to(ACC))
    zt = tl.load(ST + plane(rows, M, 1), mask=rmask, other=0.0).to(ACC)
    lse = m + l1p
    smooth_sum = tl.zeros_like(lse)
    if SMOOTH:
        sw = smooth_weight_sum(DEN, V, HAS_WEIGHT, SMOOTH, ACC)
        # sum_c w_c (lse - z_c) = sw l - sum_c w_c (z_c - m): two terms >= 0, no cancellation
        smooth_sum = sw * l1p - tl.load(ST + plane(rows, M, 2), mask=rmask, other=0.0).to(ACC)
    loss = class_row_loss(m, l1p, zt, wt, smooth_sum, kept, eps, V, z_loss, inv_dl, inv_dz,
                          SMOOTH)
    tl.store(LSE + rows, m, mask=rmask)
    tl.store(LSE + plane(rows, M, 1), l1p, mask=rmask)
    tl.store(LSE32 + rows, lse.to(tl.float32), mask=rmask)
    tl.store(LOSS + rows, loss.to(LOSS.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=["eps_hi", "eps_lo", "zl_hi", "zl_lo"])
def vp_coefs_kernel(
    LSE,  # [2, M] the global lse (ACC) as m and l (lse = m + l)
    T,  # [M] global target ids (int64)
    CW,  # [V] global class weights (ACC; read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] denominators (ACC; read when use_den, and with weights and smoothing)
    G,  # the loss's grad_output: one value (s_g 0) or one per row (read when HAS_G)
    DLSE,  # [M] gradient of the returned lse (read when HAS_DLSE)
    COEF,  # [5, M] out (ACC): m, l, a, b, c
    M,  # number of rows
    s_t,  # target stride
    s_g,  # grad_output stride (0: one value for every row)
    s_dlse,  # lse gradient stride
    V,  # global vocabulary size
    IGNORE,  # ignore_index
    use_den,  # 1: the loss was divided by DEN's denominators (the mean), 0: by 1
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient (f64_parts)
    HAS_WEIGHT: tl.constexpr,  # class weights CW
    SMOOTH: tl.constexpr,  # label smoothing
    HAS_G: tl.constexpr,  # the loss has a gradient (else a, b, c come from the lse's alone)
    HAS_DLSE: tl.constexpr,  # the returned lse has a gradient
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rmask = rows < M
    m = tl.load(LSE + rows, mask=rmask, other=0.0).to(ACC)
    l1p = tl.load(LSE + plane(rows, M, 1), mask=rmask, other=0.0).to(ACC)
    lse = m + l1p
    a = tl.zeros_like(lse)
    b = tl.zeros_like(lse)
    c = tl.zeros_like(lse)
    if HAS_G:
        _, kept, _, wt = class_target(T, CW, rows * s_t, rmask, V, IGNORE, HAS_WEIGHT, ACC)
        eps = scalar_arg(eps_hi, eps_lo, ACC)
        z_loss = scalar_arg(zl_hi, zl_lo, ACC)
        g = tl.load(G + rows * s_g, mask=rmask, other=0.0).to(ACC)
        _, _, inv_l, zl2 = class_scales(DEN, use_den, z_loss, g, ACC)
        sw = smooth_weight_sum(DEN, V, HAS_WEIGHT, SMOOTH, ACC)
        ga, gb, gc = class_grad_coefs(lse, wt, sw, eps, V, inv_l, zl2, SMOOTH)
        # 0 on ignored rows even where the factors are inf or NaN (an all-ignored mean)
        a = tl.where(kept, ga, 0.0)
        b = tl.where(kept, gb, 0.0)
        c = tl.where(kept, gc, 0.0)
    if HAS_DLSE:
        a += tl.load(DLSE + rows * s_dlse, mask=rmask, other=0.0).to(ACC)
    tl.store(COEF + rows, m, mask=rmask)
    tl.store(COEF + plane(rows, M, 1), l1p, mask=rmask)
    tl.store(COEF + plane(rows, M, 2), a, mask=rmask)
    tl.store(COEF + plane(rows, M, 3), b, mask=rmask)
    tl.store(COEF + plane(rows, M, 4), c, mask=rmask)


# ----------------------------------------------------------------------------
# Launchers. The host plans a launch once per call signature and keeps the
# callable these return (a SoftmaxConfig for an [M, W] shard); a call then
# only passes tensors. Each callable returns the names of the kernels it ran.
# ----------------------------------------------------------------------------


def stats_launcher(M, W, inner, x_strides, s_t, off, V, ignore, smooth, has_weight, cap, dtype,
                   cfg):
    """``launch(x, t, cw, mx, st)``: mx[r], st[:, r] <- the shard statistics of
    row r (see the module docstring). ``cw`` may be any placeholder without
    weights; ``cap`` 0: no softcap."""
    args = (M, W, inner, *x_strides, s_t, off, V, ignore, *f64_parts(cap))
    meta = dict(SMOOTH=smooth, HAS_WEIGHT=has_weight and smooth, SOFTCAP=cap > 0,
                ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    if cfg.path == "single":
        kernel = vp_stats_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        meta["ROWS"] = cfg.rows_per_program
        names = ("vp_stats_single_kernel",)
    else:
        kernel = vp_stats_looped_kernel[(M,)]
        names = ("vp_stats_looped_kernel",)

    def launch(x, t, cw, mx, st):
        kernel(x, t, cw, mx, st, *args, **meta)
        return names
    return launch


def grad_launcher(M, W, inner, x_strides, dx_strides, s_t, off, smooth, has_weight, cap, dtype,
                  cfg):
    """``launch(x, t, coef, cw, dx)``: dx <- the gradient of the shard from the
    per-row terms ``coef`` [5, M] (m, l, a, b, c: the global lse is m + l);
    dx may be x itself."""
    args = (M, W, inner, *x_strides, *dx_strides, s_t, off, *f64_parts(cap))
    meta = dict(SMOOTH=smooth, HAS_WEIGHT=has_weight and smooth, SOFTCAP=cap > 0,
                ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    if cfg.path == "single":
        kernel = vp_grad_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        meta["ROWS"] = cfg.rows_per_program
        names = ("vp_grad_single_kernel",)
    else:
        kernel = vp_grad_looped_kernel[(M,)]
        names = ("vp_grad_looped_kernel",)

    def launch(x, t, coef, cw, dx):
        kernel(x, t, coef, cw, dx, *args, **meta)
        return names
    return launch


# Rows per program of the per-row kernels (a thread per row).
ROWS_BLOCK = 512
ROWS_WARPS = 4


def _row_meta(has_weight, smooth, dtype):
    return dict(HAS_WEIGHT=has_weight, SMOOTH=smooth, ACC=acc_dtype(dtype), BLOCK=ROWS_BLOCK,
                num_warps=ROWS_WARPS, enable_fp_fusion=FP_FUSION)


def rows_launcher(M, s_t, V, ignore, use_den, eps, z_loss, has_weight, dtype):
    """``launch(mg, st, t, cw, den, lse, lse32, loss)``: per row the global lse
    (``lse`` [2, M] ACC: its max m and log-sum l; ``lse32`` [M]: m + l in
    fp32) and loss (ACC, divided by ``den``'s denominators when
    ``use_den``) from the global maxima ``mg`` and sums ``st`` [k, M];
    ``cw`` and ``den`` may be placeholders when unused."""
    kernel = vp_rows_kernel[(max(1, triton.cdiv(M, ROWS_BLOCK)),)]
    args = (M, s_t, V, ignore, int(use_den), *f64_parts(eps), *f64_parts(z_loss))
    meta = _row_meta(has_weight, eps > 0, dtype)
    names = ("vp_rows_kernel",)

    def launch(mg, st, t, cw, den, lse, lse32, loss):
        kernel(mg, st, t, cw, den, lse, lse32, loss, *args, **meta)
        return names
    return launch


def coefs_launcher(M, s_t, V, ignore, use_den, eps, z_loss, has_weight, has_g, has_dlse, dtype):
    """``launch(lse, t, cw, den, g, dlse, coef, s_g, s_dlse)``: coef [5, M] <-
    (m, l, a, b, c) from ``lse`` [2, M] (m, l), the gradient kernel's per-row terms of
    ``sum_r (g_r loss_r + dlse_r lse_r)``; ``g`` one value (``s_g`` 0) or
    one per row, unused without ``has_g``, as ``dlse`` without ``has_dlse``."""
    kernel = vp_coefs_kernel[(max(1, triton.cdiv(M, ROWS_BLOCK)),)]
    args = (M, s_t)
    tail = (V, ignore, int(use_den), *f64_parts(eps), *f64_parts(z_loss))
    meta = dict(_row_meta(has_weight, eps > 0, dtype), HAS_G=has_g, HAS_DLSE=has_dlse)
    names = ("vp_coefs_kernel",)

    def launch(lse, t, cw, den, g, dlse, coef, s_g, s_dlse):
        kernel(lse, t, cw, den, g, dlse, coef, *args, s_g, s_dlse, *tail, **meta)
        return names
    return launch
