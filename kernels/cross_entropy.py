"""Fused cross-entropy in Triton: one launch reads the logits, writes each
row's loss and log-sum-exp and, when asked, the gradient, with no softmax
tensor in between.

Rows are laid out as in ``kernels/softmax.py``: row r of the logits starts at
(r // INNER) * s_outer + (r % INNER) * s_inner and its C classes are s_n
apart (an (N, C, d1..dK) input reduced over dim 1 is read in place; its row
r = n * INNER + i is element r of the flattened target). Element offsets are
int64, column compares int32; masked lanes load -inf.

Math, per row (z: the logits after the optional softcap z = cap * tanh(x / cap)):

    lse = log sum_c e^z_c,   sigma_c = e^(z_c - lse)
    class-index target t, class weights w (1 without), label smoothing eps:
        y_c  = (1 - eps) * w_t * [c == t] + (eps / C) * w_c     (effective target)
        loss = sum_c y_c * (lse - z_c)
             = (1 - eps) * w_t * (lse - z_t) + (eps / C) * sum_c w_c * (lse - z_c)
    probability target p:  y_c = w_c * ((1 - eps) * p_c + eps / C), same loss
    z-loss adds z_loss * lse^2 (kept rows only)
    dloss/dz_c = sigma_c * sum_j y_j - y_c  (+ 2 * z_loss * lse * sigma_c),
    times 1 - (z_c / cap)^2 under a softcap. sigma_t - 1 is formed in fp32
    (fp64 for fp64 logits) and cast once, on store.

Each row's loss is written already divided by the reduction's denominator
and by the caller's divisor (class targets: DEN[0] for the loss, DEN[1] for
the z-loss, which ``ce_denominators_kernel`` fills on the device before the
main launch: for the mean the sum of w_t over kept rows and the number of
kept rows, else 1, each times the divisor; it also writes their
reciprocals (``recip_rn``), DEN[3] and DEN[4], which the class kernels
multiply by, so no program repeats the divisions; probability targets: den_rows
(the number of rows for the mean, else 1) times DEN[0] when a divisor is
given), so ``LOSS.sum()`` is the reduced loss, and the gradient is written
already scaled the same way (times grad_scale). An all-ignored batch divides
0 by 0 and gives NaN, as torch does. Ignored rows get a zero loss and a zero
gradient row; their logits are not read at all (unless ``lse_all`` asks for
every row's lse). A class index outside [0, C) that is not ignore_index is
never used as an address (the loads are masked): that row's loss and
gradient are NaN.

Paths (chosen by ``softmax_gpu.cross_entropy.cross_entropy_config``):
- single: the row is one tile in registers, ROWS rows per program;
  1 read of the logits (+ 1 write of the gradient).
- looped: an online (max, sum) pass (``online_stats``) then a gradient
  pass: 2 reads + 1 write. A program walks rows pid, pid + G, ... of G
  programs (G = M: one per row; a persistent grid keeps G x row bytes inside
  L2, so the second read hits L2; eviction hints keep the first read's lines
  and stream the second read and the stores). The target logit is read
  before the gradient pass (in place safe). Without a gradient the second
  pass runs only for label smoothing.
- coop: a row cut into chunks shared by the programs of one persistent
  launch (``kernels/softmax.py``, ``coop_item``): a chunk's first pass
  publishes its (max, sum) (and the target logit, read before any gradient
  of that row is written), its second pass waits for the row's partials and
  writes the chunk's gradient; the row's last second pass to finish writes
  its loss, lse, state and hit.
- resident: a row cut into chunks of BLOCK_N columns, one program each
  (``resident_meet``): a chunk stays in registers from its read to its
  gradient write, so 1 read + 1 write at any row length; a chunk whose
  program gave up waiting for its row (programs not all resident at once)
  is read again by the row's last arrival.

``ce_grad_scale_kernel`` is the eager backward: it multiplies the saved
gradient rows by grad_output / (the factor already applied, kept per row in
STATE), a persistent grid of programs each taking a contiguous group of rows,
and a program returns at once, touching nothing but two scalars per row,
when that ratio is 1 for its whole group (the usual ``loss.backward()``, and
any grad_output stated ahead as the divisor). Its out-of-place variant
(IN_PLACE=False) serves a retained graph's later backwards. ``ce_class_backward_kernel`` is the
backward of a traced graph (torch.compile): the forward saved the lse, and
one pass over the logits writes the gradient times grad_output, rounded once.

Float scalars (label smoothing, z-loss, softcap, grad_scale, divisor) must be
exact for fp64 logits, but Triton passes Python floats as fp32. Each arrives
as two int32 arguments, the bit patterns of its fp32 hi and lo parts
(``f64_parts``), unspecialised (``do_not_specialize``: one compiled kernel
whatever the values), and ``scalar_arg`` rebuilds it in ACC.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .softmax import (FP_FUSION, PARTIALS, RESIDENT_MAX_SPLITS, RESIDENT_TILE, acc_dtype, arrive,
                      chunk_factor, chunk_shift, coop_arrive, coop_buffers, coop_grid, coop_place,
                      coop_wait, edge_columns, exp_rel, finite_max, load_logits, load_p, log1p_acc,
                      merge_partials, online_stats, partial_mask, recip_rn, regs_meta,
                      resident_columns, resident_launch_splits, resident_meet, resident_span,
                      row_base, row_vec, softcap_tanh, store_p, sum_partials, tile_offsets,
                      tile_state, vec_segment)

# Shared with the vocab-parallel kernels through this module.
__all__ = ["load_logits", "softcap_tanh", "scalar_arg", "class_grad", "f64_parts",
           "RESIDENT_MAX_SPLITS"]

# The class-target launch's DEN tensor: [loss denominator, z-loss denominator,
# sum of the class weights, 1 / loss denominator, 1 / z-loss denominator].
DEN_LEN = 5
DEN_INV = tl.constexpr(3)  # where the reciprocals start

# ----------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def scalar_arg(hi, lo, ACC: tl.constexpr):
    """A host float passed as the int32 bit patterns of its fp32 hi and lo
    parts (see ``f64_parts``), rebuilt in ACC: exact to ~2^-48 in fp64."""
    return (tl.zeros((), ACC) + hi.to(tl.float32, bitcast=True)) + lo.to(tl.float32, bitcast=True)


@triton.jit
def softcap_grad(g, z, cap, SOFTCAP: tl.constexpr):
    """Chain rule through the softcap: d(cap tanh(x/cap))/dx = 1 - (z/cap)^2,
    formed as (1 - r)(1 + r), r = z / cap (no cancellation where |r| -> 1)."""
    if SOFTCAP:
        r = z * recip_rn(cap)
        g = g * ((1.0 - r) * (1.0 + r))
    return g


@triton.jit
def class_target(T, W, rows, rmask, C, ignore_index, HAS_WEIGHT: tl.constexpr,
                 ACC: tl.constexpr):
    """(t, kept, inside, w_t) for ``rows``: the int64 target, whether the row
    counts (t != ignore_index), whether t is a valid class, and its weight:
    0 for ignored rows, NaN for a kept row whose target is outside [0, C)
    (the NaN then reaches that row's loss and gradient through w_t; W is read
    only at valid classes)."""
    t = tl.load(T + rows, mask=rmask, other=0).to(tl.int64)
    kept = t != ignore_index
    inside = (t >= 0) & (t < C)
    use = kept & inside
    if HAS_WEIGHT:
        wt = tl.load(W + t, mask=rmask & use, other=0.0).to(ACC)
    else:
        wt = use.to(ACC)
    wt = tl.where(kept & ~inside, float("nan"), wt)
    return t, kept, inside, wt


@triton.jit
def row_read(kept, lse_all):
    """Whether a row's logits are read: it is kept, or every row's lse is asked for."""
    return (kept.to(tl.int32) | lse_all) != 0


@triton.jit
def smooth_weight_sum(DEN, C, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                      ACC: tl.constexpr):
    """sum_c w_c: DEN[2] with class weights and smoothing, else C."""
    if HAS_WEIGHT and SMOOTH:
        return tl.load(DEN + 2).to(ACC)
    return tl.zeros((), ACC) + C


@triton.jit
def class_row_loss(m, l1p, zt, wt, smooth_sum, kept, eps, C, z_loss, inv_dl, inv_dz,
                   SMOOTH: tl.constexpr):
    """Row loss (already divided by the denominators: times inv_dl = 1 / dl,
    inv_dz = 1 / dz); 0 when ignored (NaN when the denominator is 0: an
    all-ignored mean), NaN when the target is outside [0, C) (w_t is NaN
    then). The row's max m and l1p = log(sum e^(z - m)): lse - z_t is
    formed as (m - z_t) + l1p, so a confident token (z_t the max) loses
    nothing to the rounding of lse. smooth_sum = sum_c w_c (lse - z_c)."""
    lse = m + l1p
    loss = wt * ((m - zt) + l1p)
    if SMOOTH:
        loss = (1.0 - eps) * loss + (eps / C) * smooth_sum
    return tl.where(kept, loss * inv_dl + (z_loss * lse * lse) * inv_dz,
                    0.0 * inv_dl + 0.0 * inv_dz)


@triton.jit
def class_scales(DEN, use_den, z_loss, gs, ACC: tl.constexpr):
    """The row-independent factors of a launch: (1 / dl, 1 / dz, gs / dl,
    2 z_loss gs / dz), with 1 / dl and 1 / dz the loss and z-loss
    denominators' reciprocals DEN[3], DEN[4] when use_den (formed once per
    launch by ``ce_denominators_kernel``), else 1."""
    on = use_den != 0
    inv_dl = tl.load(DEN + DEN_INV, mask=on, other=1.0).to(ACC)
    inv_dz = tl.load(DEN + DEN_INV + 1, mask=on, other=1.0).to(ACC)
    return inv_dl, inv_dz, gs * inv_dl, (2.0 * z_loss * gs) * inv_dz


@triton.jit
def class_launch_scalars(DEN, use_den, C, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, gs_hi,
                         gs_lo, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                         ACC: tl.constexpr):
    """The row-independent values of a long-row class-target launch, computed
    once before its row loop: (eps, z_loss, cap) from their f64 parts, the
    factors of ``class_scales`` and sum_c w_c (``smooth_weight_sum``)."""
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    gs = scalar_arg(gs_hi, gs_lo, ACC)
    inv_dl, inv_dz, inv_l, zl2 = class_scales(DEN, use_den, z_loss, gs, ACC)
    sw = smooth_weight_sum(DEN, C, HAS_WEIGHT, SMOOTH, ACC)
    return eps, z_loss, cap, inv_dl, inv_dz, inv_l, zl2, sw


@triton.jit
def class_grad_coefs(lse, wt, sw, eps, C, inv_l, zl2, SMOOTH: tl.constexpr):
    """Per-row coefficients of the gradient  a * sigma_c - b * [c == t] - cw * w_c.

    a = sum_j y_j * inv_l + zl2 * lse;  b = (1 - eps) w_t * inv_l;  cw = eps / C * inv_l;
    with inv_l = grad_scale / dl, zl2 = 2 z_loss grad_scale / dz (``class_scales``).
    NaN (through a: w_t is NaN) for a target outside [0, C)."""
    if SMOOTH:
        sy = (1.0 - eps) * wt + (eps / C) * sw
        b = (1.0 - eps) * wt * inv_l
        cw = (eps / C) * inv_l
    else:
        sy = wt
        b = wt * inv_l
        cw = 0.0 * inv_l
    a = sy * inv_l + zl2 * lse
    return a, b, cw


@triton.jit
def class_grad(sigma, z, is_t, a, b, cw, w, kept, cap, SMOOTH: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """Gradient tile; zero on ignored rows whatever the logits hold: their
    sigma (NaN where the row holds NaN or +inf) and coefficients (NaN: a
    target outside [0, C)) are left out in fp32 before the multiply (a
    select of the finished gradient would follow the low-precision pack),
    and the softcap's factor (NaN for a NaN logit) after it."""
    g = tl.where(kept, sigma, 0.0) * tl.where(kept, a, 0.0) - \
        tl.where(is_t, tl.where(kept, b, 0.0), 0.0)
    if SMOOTH:
        g = g - tl.where(kept, cw, 0.0) * w
    if SOFTCAP:
        g = tl.where(kept, softcap_grad(g, z, cap, SOFTCAP), 0.0)
    return g


@triton.jit
def class_tile(X, G, W, xo, go, wo, mask, is_t, s, a, b, cw, l1p, cap,
               HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
               WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, P: tl.constexpr):
    """One tile of a kept row's gradient pass: G[go] = the gradient of the
    logits X[xo] (WRITE_GRAD), with sigma * sum(y) formed as e^(z - s) * a
    (s the row's finite max and a folding the row's 1 / sum, or s the lse);
    returns the tile's label-smoothing terms w_c (lse - z_c) = w_c ((s - z_c)
    + l1p) (zeros without SMOOTH)."""
    z = load_logits(X, xo, mask, cap, SOFTCAP, ACC, P)
    if HAS_WEIGHT:
        w = tl.load(W + wo, mask=mask, other=0.0).to(ACC)
    else:
        w = tl.where(mask, 1.0, 0.0).to(ACC)
    if WRITE_GRAD:
        g = class_grad(exp_rel(z, s), z, is_t, a, b, cw, w, True, cap, SMOOTH, SOFTCAP)
        store_p(G + go, g.to(G.dtype.element_ty), mask, P)
    terms = tl.zeros_like(z)
    if SMOOTH:
        terms = tl.where(mask, w * ((s - z) + l1p), 0.0)
    return terms


@triton.jit
def class_pass(X, G, W, xb, gb, sx_n, sg_n, start, end, t, s, a, b, cw, l1p, cap,
               HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
               WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
               VEC: tl.constexpr, P: tl.constexpr, SUM: tl.constexpr = True,
               STAGES: tl.constexpr = 1):
    """The gradient pass over columns [start, end) of a kept row (see
    ``class_tile``): whole tiles unmasked, the last partial tile masked,
    VEC > 1 the head and tail of an unaligned row; returns the sum of
    w_c (lse - z_c) over the columns (0 without SMOOTH, or SUM False). VEC >
    1: the logits' and gradient's rows congruent modulo VEC."""
    cols = tl.arange(0, BLOCK_N)
    a0, body_end, vec_end = vec_segment(xb, start, end, VEC, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), ACC)
    for off in tl.range(a0, body_end, BLOCK_N, num_stages=STAGES):
        terms = class_tile(X, G, W, tile_offsets(xb, off, cols, sx_n, VEC),
                           tile_offsets(gb, off, cols, sg_n, VEC), off + cols, cols < BLOCK_N,
                           cols == tl.cast(t - off, tl.int32), s, a, b, cw, l1p, cap,
                           HAS_WEIGHT, SMOOTH, SOFTCAP, WRITE_GRAD, ACC, P)
        if SMOOTH and SUM:
            acc += terms
    if body_end < vec_end:
        terms = class_tile(X, G, W, tile_offsets(xb, body_end, cols, sx_n, VEC),
                           tile_offsets(gb, body_end, cols, sg_n, VEC), body_end + cols,
                           partial_mask(cols, vec_end - body_end, VEC),
                           cols == tl.cast(t - body_end, tl.int32), s, a, b, cw, l1p, cap,
                           HAS_WEIGHT, SMOOTH, SOFTCAP, WRITE_GRAD, ACC, P)
        if SMOOTH and SUM:
            acc += terms
    total = tl.sum(acc, 0)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a0, vec_end, end, VEC)
        terms = class_tile(X, G, W, xb + e_cols, gb + e_cols, e_cols, e_mask, e_cols == t, s,
                           a, b, cw, l1p, cap, HAS_WEIGHT, SMOOTH, SOFTCAP, WRITE_GRAD, ACC, P)
        if SMOOTH and SUM:
            total += tl.sum(terms, 0)
    return total


@triton.jit
def zero_fill(G, gb, sg_n, start, end, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
              P: tl.constexpr):
    """G[gb + c * sg_n] = 0 for c in [start, end): the gradient of an ignored
    row, written without reading its logits."""
    cols = tl.arange(0, BLOCK_N)
    zero = tl.zeros((BLOCK_N,), G.dtype.element_ty)
    a, body_end, vec_end = vec_segment(gb, start, end, VEC, BLOCK_N)
    for off in range(a, body_end, BLOCK_N):
        store_p(G + tile_offsets(gb, off, cols, sg_n, VEC), zero, cols < BLOCK_N, P)
    if body_end < vec_end:
        store_p(G + tile_offsets(gb, body_end, cols, sg_n, VEC), zero,
                partial_mask(cols, vec_end - body_end, VEC), P)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a, vec_end, end, VEC)
        store_p(G + gb + e_cols, tl.zeros((2 * VEC,), G.dtype.element_ty), e_mask, P)


@triton.jit
def class_row_pass(X, G, W, xb, gb, sx_n, sg_n, start, end, t, kept, s, ar, b, cw, l1p, cap,
                   HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                   VEC: tl.constexpr, P: tl.constexpr, STAGES: tl.constexpr = 1,
                   SUM: tl.constexpr = True):
    """The second pass over columns [start, end) of a row: a kept row's
    gradient (``class_pass``, when WRITE_GRAD or SMOOTH; ar: the gradient's a /
    (1 + r)), an ignored row's zeros (``zero_fill``, never reading its
    logits); returns the smoothing terms' sum (0 for an ignored row, or
    without SUM)."""
    total = tl.zeros((), ACC)
    if kept:
        if WRITE_GRAD or SMOOTH:
            total = class_pass(X, G, W, xb, gb, sx_n, sg_n, start, end, t, s, ar, b, cw, l1p, cap,
                               HAS_WEIGHT, SMOOTH, SOFTCAP, WRITE_GRAD, ACC, BLOCK_N, VEC, P,
                               SUM=SUM, STAGES=STAGES)
    elif WRITE_GRAD:
        zero_fill(G, gb, sg_n, start, end, BLOCK_N, VEC, P)
    return total


@triton.jit
def class_row_outputs(LOSS, LSE, STATE, HIT, row, m, l1p, zt, wt, smooth_sum, kept, inside, read,
                      eps, C, z_loss, inv_dl, inv_dz, SMOOTH: tl.constexpr,
                      WRITE_GRAD: tl.constexpr, WRITE_HIT: tl.constexpr, ACC: tl.constexpr):
    """A long row's outputs, once its state (m, l1p), target logit and
    smoothing sum are known: its loss (``class_row_loss``), its lse (0 unless
    read), its gradient factor 1 (WRITE_GRAD) and its hit (WRITE_HIT)."""
    loss = class_row_loss(m, l1p, zt, wt, smooth_sum, kept, eps, C, z_loss, inv_dl, inv_dz,
                          SMOOTH)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, tl.where(read, m + l1p, 0.0).to(LSE.dtype.element_ty))
    if WRITE_GRAD:
        tl.store(STATE + row, tl.full((), 1.0, ACC))
    if WRITE_HIT:
        tl.store(HIT + row, (kept & inside & (zt >= m)).to(tl.int8))


# ----------------------------------------------------------------------------
# Class-index targets
# ----------------------------------------------------------------------------


# int32 bit patterns of float scalars: never specialised on their values
_SCALARS = ["eps_hi", "eps_lo", "zl_hi", "zl_lo", "cap_hi", "cap_lo", "gs_hi", "gs_lo"]


@triton.jit(do_not_specialize=_SCALARS + ["lse_all"])
def ce_class_single_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] ACC: denominators and their reciprocals (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] row log-sum-exp (fp32, or ACC); 0 for ignored rows unless lse_all
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index (1 for (N, C) logits)
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1]; 0: by 1
    lse_all,  # 1: read ignored rows too, for their lse; 0: never read them
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SMOOTH: tl.constexpr,  # label smoothing > 0
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    WRITE_HIT: tl.constexpr,  # write HIT (token accuracy)
    ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 logits)
    BLOCK_N: tl.constexpr,  # power of two >= C
    ROWS: tl.constexpr,  # rows per program
):
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < C
    xb = row_base(rows, INNER, sx_o, sx_i)
    t, kept, inside, wt = class_target(T, W, rows, rmask, C, ignore_index, HAS_WEIGHT, ACC)
    read = rmask & row_read(kept, lse_all)
    mask = read[:, None] & cmask[None, :]
    z = load_logits(X, xb[:, None] + cols[None, :].to(tl.int64) * sx_n, mask, cap, SOFTCAP, ACC)
    m, r, e = tile_state(z, 1)
    s = finite_max(m)
    l1p = log1p_acc(r)
    lse = m + l1p
    # the target logit, read rather than picked out of the tile, which would
    # cost a select and an add per element; ordered before the gradient's
    # stores (G may be X) by the barrier below
    zt = load_logits(X, xb + t * sx_n, rmask & kept & inside, cap, SOFTCAP, ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    else:
        w = tl.where(cmask, 1.0, 0.0).to(ACC)[None, :]
    if SMOOTH:
        smooth_sum = tl.sum(tl.where(mask, w * ((s[:, None] - z) + l1p[:, None]), 0.0), 1)
    else:
        smooth_sum = lse * 0.0
    sw = smooth_weight_sum(DEN, C, HAS_WEIGHT, SMOOTH, ACC)
    gs = scalar_arg(gs_hi, gs_lo, ACC)
    inv_dl, inv_dz, inv_l, zl2 = class_scales(DEN, use_den, z_loss, gs, ACC)
    loss = class_row_loss(m, l1p, zt, wt, smooth_sum, kept, eps, C, z_loss, inv_dl, inv_dz,
                          SMOOTH)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(LSE + rows, tl.where(read, lse, 0.0).to(LSE.dtype.element_ty), mask=rmask)
    if WRITE_HIT:
        tl.store(HIT + rows, (kept & inside & (zt >= m)).to(tl.int8), mask=rmask)
    if WRITE_GRAD:
        # every thread's read of the target logit before any thread's store of
        # the gradient over it (in place: another warp owns that column)
        tl.debug_barrier()
        a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, inv_l, zl2, SMOOTH)
        ar = a * recip_rn(1.0 + r)
        # the row without its target's -b (no column compare per element: the
        # column indices would stay live in registers), then, once every
        # thread's store is ordered before it (CTA barrier), the target's
        # element over it: the same class_grad of the same logit, the bits a
        # select in the tile would give
        g = class_grad(e, z, False, ar[:, None], b[:, None], cw, w, kept[:, None], cap, SMOOTH,
                       SOFTCAP)
        gb = row_base(rows, INNER, sg_o, sg_i)
        tl.store(G + gb[:, None] + cols[None, :].to(tl.int64) * sg_n, g.to(G.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()
        gt = class_grad(exp_rel(zt, s), zt, True, ar, b, cw, wt, kept, cap, SMOOTH, SOFTCAP)
        tl.store(G + gb + t * sg_n, gt.to(G.dtype.element_ty), mask=rmask & kept & inside)
        tl.store(STATE + rows, tl.full((ROWS,), 1.0, ACC), mask=rmask)


@triton.jit(do_not_specialize=_SCALARS + ["lse_all"])
def ce_class_looped_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] ACC: denominators and their reciprocals (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] row log-sum-exp (fp32, or ACC); 0 for ignored rows unless lse_all
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    M,  # number of rows (program pid takes rows pid, pid + G, ... of G programs)
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1]; 0: by 1
    lse_all,  # 1: read ignored rows too, for their lse; 0: never read them
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SMOOTH: tl.constexpr,  # label smoothing > 0
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    WRITE_HIT: tl.constexpr,  # write HIT (token accuracy)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    eps, z_loss, cap, inv_dl, inv_dz, inv_l, zl2, sw = class_launch_scalars(
        DEN, use_den, C, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, gs_hi, gs_lo,
        HAS_WEIGHT, SMOOTH, ACC)
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        xb = row_base(row, INNER, sx_o, sx_i)
        read = row_read(tl.load(T + row).to(tl.int64) != ignore_index, lse_all)
        m = tl.full((), float("-inf"), ACC)
        r = tl.full((), -1.0, ACC)
        if read:
            m, r = online_stats(X, xb, sx_n, 0, C, ACC, BLOCK_N, VEC, 1 if EVICT else 0, cap,
                                SOFTCAP, STAGES)
        # the target's other terms after the stats pass: fewer values live across it
        t, kept, inside, wt = class_target(T, W, row, row < M, C, ignore_index, HAS_WEIGHT, ACC)
        l1p = log1p_acc(r)
        lse = m + l1p
        # the target logit, read before any gradient tile can overwrite it (in
        # place): every thread's read, before any thread's store (another warp
        # owns that column)
        zt = load_logits(X, xb + t * sx_n, kept & inside, cap, SOFTCAP, ACC)
        if WRITE_GRAD:
            tl.debug_barrier()
        a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, inv_l, zl2, SMOOTH)
        gb = row_base(row, INNER, sg_o, sg_i)
        smooth_sum = class_row_pass(X, G, W, xb, gb, sx_n, sg_n, 0, C, t, kept, finite_max(m),
                                    a * recip_rn(1.0 + r), b, cw, l1p, cap, HAS_WEIGHT, SMOOTH,
                                    SOFTCAP, WRITE_GRAD, ACC, BLOCK_N, VEC, 2 if EVICT else 0,
                                    STAGES)
        class_row_outputs(LOSS, LSE, STATE, HIT, row, m, l1p, zt, wt, smooth_sum, kept, inside,
                          read, eps, C, z_loss, inv_dl, inv_dz, SMOOTH, WRITE_GRAD, WRITE_HIT, ACC)


@triton.jit(do_not_specialize=_SCALARS + ["lse_all", "SPLITS", "LAG"])
def ce_class_coop_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] ACC: denominators and their reciprocals (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] row log-sum-exp (fp32, or ACC); 0 for ignored rows unless lse_all
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    WS,  # [3 * M * SPLITS + M] ACC workspace: partial max, partial sum, smoothing sum per chunk; target logit per row
    SYNC,  # [1 + M] int32, zero: SYNC[0] deals the tickets, SYNC[1 + row] counts finished passes
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1]; 0: by 1
    lse_all,  # 1: read ignored rows too, for their lse; 0: never read them
    SPLITS,  # chunks per row
    CHUNK,  # columns per chunk (a multiple of BLOCK_N)
    LAG,  # first passes dealt ahead of the second passes (>= SPLITS - 1)
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SMOOTH: tl.constexpr,  # label smoothing > 0
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    WRITE_HIT: tl.constexpr,  # write HIT (token accuracy)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    eps, z_loss, cap, inv_dl, inv_dz, inv_l, zl2, sw = class_launch_scalars(
        DEN, use_den, C, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, gs_hi, gs_lo,
        HAS_WEIGHT, SMOOTH, ACC)
    n = M * SPLITS
    PD = WS + n
    PX = WS + 2 * n
    ZT = WS + 3 * n
    ticket = tl.atomic_add(SYNC, 1)
    while ticket < 2 * n:
        second, item, row, start, end = coop_place(ticket, n, LAG, SPLITS, CHUNK, C)
        xb = row_base(row, INNER, sx_o, sx_i)
        t, kept, inside, wt = class_target(T, W, row, row < M, C, ignore_index, HAS_WEIGHT, ACC)
        read = row_read(kept, lse_all)
        if second:
            coop_wait(SYNC, row, SPLITS)
            m, r = merge_partials(WS, PD, row, SPLITS, True)
            l1p = log1p_acc(r)
            lse = m + l1p
            a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, inv_l, zl2, SMOOTH)
            gb = row_base(row, INNER, sg_o, sg_i)
            part = class_row_pass(X, G, W, xb, gb, sx_n, sg_n, start, end, t, kept, finite_max(m),
                                  a * recip_rn(1.0 + r), b, cw, l1p, cap, HAS_WEIGHT, SMOOTH,
                                  SOFTCAP, WRITE_GRAD, ACC, BLOCK_N, VEC, 2 if EVICT else 0,
                                  STAGES)
            tl.store(PX + item, part)
            if coop_arrive(SYNC, row) == 2 * SPLITS - 1:
                # the row's last second pass: every partial is in, write the row's outputs
                smooth_sum = sum_partials(PX, row, SPLITS, True)
                zt = tl.load(ZT + row, mask=kept & inside, other=0.0, cache_modifier=".cg")
                class_row_outputs(LOSS, LSE, STATE, HIT, row, m, l1p, zt, wt, smooth_sum, kept,
                                  inside, read, eps, C, z_loss, inv_dl, inv_dz, SMOOTH, WRITE_GRAD,
                                  WRITE_HIT, ACC)
        else:
            m = tl.full((), float("-inf"), ACC)
            r = tl.full((), -1.0, ACC)
            if read:
                m, r = online_stats(X, xb, sx_n, start, end, ACC, BLOCK_N, VEC,
                                    1 if EVICT else 0, cap, SOFTCAP, STAGES)
            tl.store(WS + item, m)
            tl.store(PD + item, r)
            if kept & inside & (t >= start) & (t < end):
                # the target logit, before any second pass of the row can write over it
                tl.store(ZT + row, load_logits(X, xb + t * sx_n, True, cap, SOFTCAP, ACC))
            coop_arrive(SYNC, row)
        ticket = tl.atomic_add(SYNC, 1)


@triton.jit(do_not_specialize=_SCALARS + ["lse_all", "SPLITS", "spin"])
def ce_class_resident_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] ACC: denominators and their reciprocals (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] row log-sum-exp (fp32, or ACC); 0 for ignored rows unless lse_all
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    WS,  # [4 * M * SPLITS + M] ACC: per chunk max, r, smoothing terms, weight sum; target logit per row
    SYNC,  # [M] int64, zero: each row's meeting word (resident_meet)
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1]; 0: by 1
    lse_all,  # 1: read ignored rows too, for their lse; 0: never read them
    SPLITS,  # chunks per row (resident_launch_splits), at most RESIDENT_MAX_SPLITS
    spin,  # polls a chunk waits for its row's last chunk before leaving its write to it
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SMOOTH: tl.constexpr,  # label smoothing > 0
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    WRITE_HIT: tl.constexpr,  # write HIT (token accuracy)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # columns per chunk (a power of two), held in registers
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
):
    """Program pid owns chunk pid % SPLITS of row pid // SPLITS: it reads the
    chunk into registers, publishes its (max, r) (and the target logit, the
    smoothing terms), meets the row's other chunks (``resident_meet``) and
    writes the chunk's gradient from its registers; the row's last arrival
    writes the row's loss, lse, state and hit, and the gradient of any chunk
    whose program gave up waiting, reading that chunk again."""
    eps, z_loss, cap, inv_dl, inv_dz, inv_l, zl2, sw = class_launch_scalars(
        DEN, use_den, C, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, gs_hi, gs_lo,
        HAS_WEIGHT, SMOOTH, ACC)
    pid = tl.program_id(0)
    k = pid % SPLITS
    row = (pid // SPLITS).to(tl.int64)
    n = M * SPLITS
    item = row * SPLITS + k
    PD = WS + n
    PS = WS + 2 * n
    PW = WS + 3 * n
    ZT = WS + 4 * n
    xb = row_base(row, INNER, sx_o, sx_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    t, kept, inside, wt = class_target(T, W, row, row < M, C, ignore_index, HAS_WEIGHT, ACC)
    read = row_read(kept, lse_all)
    c0, cols, cmask = resident_columns(xb, k, C, VEC, BLOCK_N)
    mask = tl.where(read, cmask, False)
    z = load_logits(X, tile_offsets(xb, c0, cols, sx_n, VEC), mask, cap, SOFTCAP, ACC)
    mk, rk, e = tile_state(z, 0)
    sk = finite_max(mk)
    if HAS_WEIGHT:
        w = tl.load(W + (c0 + cols), mask=cmask, other=0.0).to(ACC)
    else:
        w = tl.where(cmask, 1.0, 0.0).to(ACC)
    tl.store(WS + item, mk)
    tl.store(PD + item, rk)
    if SMOOTH:
        # sum_c w_c (lse - z_c) = sum_k [ sum_c w_c (s_k - z_c) + (sum_c w_c) (lse - s_k) ]:
        # every term non-negative, none cancels
        tl.store(PS + item, tl.sum(tl.where(mask, w * (sk - z), 0.0), 0))
        tl.store(PW + item, tl.sum(tl.where(mask, w, 0.0), 0))
    if kept & inside & (t >= c0) & (t < c0 + BLOCK_N):
        # the target logit, before any gradient of the row can be written over it
        tl.store(ZT + row, load_logits(X, xb + t * sx_n, True, cap, SOFTCAP, ACC))
    own, last, left = resident_meet(SYNC, row, k, SPLITS, spin)
    if own | last:
        m, r = merge_partials(WS, PD, row, SPLITS, True)
        s = finite_max(m)
        l1p = log1p_acc(r)
        lse = m + l1p
        a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, inv_l, zl2, SMOOTH)
        ar = a * recip_rn(1.0 + r)
        if WRITE_GRAD and own:
            # e = e^(z - m_k): sigma * sum(y) = e * e^(m_k - m) * a / (1 + r)
            scale = chunk_factor(mk, s, ar)
            is_t = cols == tl.cast(t - c0, tl.int32)
            g = class_grad(e, z, is_t, scale, b, cw, w, kept, cap, SMOOTH, SOFTCAP)
            tl.store(G + tile_offsets(gb, c0, cols, sg_n, VEC), g.to(G.dtype.element_ty),
                     mask=cmask)
        if last:
            if WRITE_GRAD:
                for j in range(0, SPLITS):
                    if ((left >> j) & 1) != 0:
                        start, end = resident_span(j, k, c0, C, BLOCK_N)
                        # as chunk j's program would have (the smoothing sum
                        # comes from the partials)
                        sj, fj = chunk_shift(WS, row, j, SPLITS, s, ar)
                        class_row_pass(X, G, W, xb, gb, sx_n, sg_n, start, end, t, kept, sj, fj,
                                       b, cw, l1p, cap, HAS_WEIGHT, SMOOTH, SOFTCAP, True, ACC,
                                       RESIDENT_TILE, VEC, 0, SUM=False)
            smooth_sum = tl.zeros((), ACC)
            if SMOOTH:
                j = tl.arange(0, PARTIALS)
                for off in range(0, SPLITS, PARTIALS):
                    ok = off + j < SPLITS
                    at = row * SPLITS + off + j
                    pm = tl.load(WS + at, mask=ok, other=0.0, cache_modifier=".cg")
                    ps = tl.load(PS + at, mask=ok, other=0.0, cache_modifier=".cg")
                    pw = tl.load(PW + at, mask=ok, other=0.0, cache_modifier=".cg")
                    smooth_sum += tl.sum(
                        tl.where(ok, ps + pw * ((s - finite_max(pm)) + l1p), 0.0), 0)
            zt = tl.load(ZT + row, mask=kept & inside, other=0.0, cache_modifier=".cg")
            class_row_outputs(LOSS, LSE, STATE, HIT, row, m, l1p, zt, wt, smooth_sum, kept, inside,
                              read, eps, C, z_loss, inv_dl, inv_dz, SMOOTH, WRITE_GRAD, WRITE_HIT,
                              ACC)


@triton.jit(do_not_specialize=_SCALARS)
def ce_class_backward_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [DEN_LEN] ACC: denominators and their reciprocals (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    LSE,  # [M] ACC row log-sum-exp from the forward
    GO,  # [M] grad_output of the row losses (any stride: s_go)
    OUT,  # gradient wrt the logits, written
    M,  # number of rows (program pid takes rows pid, pid + G, ... of G programs)
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    so_o, so_n, so_i,  # OUT strides
    s_go,  # grad_output stride (0 when expanded from a scalar)
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1]; 0: by 1
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SMOOTH: tl.constexpr,  # label smoothing > 0
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    """grad_output[r] * d loss_r / d x for every row, from the logits and the
    forward's lse: one read of the logits and one write, the gradient rounded
    once (the backward of a traced graph)."""
    eps, z_loss, cap, inv_dl, inv_dz, inv_l, zl2, sw = class_launch_scalars(
        DEN, use_den, C, eps_hi, eps_lo, zl_hi, zl_lo, cap_hi, cap_lo, gs_hi, gs_lo,
        HAS_WEIGHT, SMOOTH, ACC)
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        xb = row_base(row, INNER, sx_o, sx_i)
        ob = row_base(row, INNER, so_o, so_i)
        t, kept, inside, wt = class_target(T, W, row, row < M, C, ignore_index, HAS_WEIGHT, ACC)
        if kept:
            lse = tl.load(LSE + row).to(ACC)
            go = tl.load(GO + row * s_go).to(ACC)
            a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, inv_l * go, zl2 * go, SMOOTH)
            class_pass(X, OUT, W, xb, ob, sx_n, so_n, 0, C, t, lse, a, b, cw, 0.0, cap,
                       HAS_WEIGHT, SMOOTH, SOFTCAP, True, ACC, BLOCK_N, VEC, 0, False, STAGES)
        else:
            zero_fill(OUT, ob, so_n, 0, C, BLOCK_N, VEC, 0)


# ----------------------------------------------------------------------------
# Probability targets
# ----------------------------------------------------------------------------


@triton.jit
def prob_target(Y, W, offs, mask, cols, cmask, eps, C, HAS_WEIGHT: tl.constexpr,
                ACC: tl.constexpr, P: tl.constexpr = 0):
    """Effective target w_c ((1 - eps) p_c + eps / C); 0 on masked lanes."""
    p = load_p(Y + offs, mask, 0.0, P).to(ACC)
    y = tl.where(mask, (1.0 - eps) * p + eps / C, 0.0)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        y = y * w
    return y


@triton.jit
def prob_inverse(DEN, den_rows, use_div, ACC: tl.constexpr):
    """1 / (den_rows, times DEN[0] when use_div: the caller's divisor)."""
    div = tl.load(DEN, mask=use_div != 0, other=1.0).to(ACC)
    return recip_rn((tl.zeros((), ACC) + den_rows) * div)


@triton.jit(do_not_specialize=_SCALARS + ["use_div"])
def ce_prob_single_kernel(
    X,  # logits base pointer
    Y,  # probability targets base pointer (the logits' shape, any float dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [1] ACC: the divisor (read when use_div)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by den_rows (and the divisor)
    LSE,  # [M] row log-sum-exp (fp32, or ACC)
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # target strides
    sg_o, sg_n, sg_i,  # gradient strides
    den_rows,  # denominator of every row: M for the mean, else 1
    use_div,  # 1: also divide by DEN[0] (the divisor)
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # power of two >= C
    ROWS: tl.constexpr,  # rows per program
):
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    inv = prob_inverse(DEN, den_rows, use_div, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    cols64 = cols[None, :].to(tl.int64)
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    z = load_logits(X, xb[:, None] + cols64 * sx_n, mask, cap, SOFTCAP, ACC)
    y = prob_target(Y, W, yb[:, None] + cols64 * sy_n, mask, cols[None, :],
                    cmask[None, :], eps, C, HAS_WEIGHT, ACC)
    m, r, e = tile_state(z, 1)
    s = finite_max(m)
    l1p = log1p_acc(r) + (s - m)  # NaN for an all -inf row, as torch
    lse = m + log1p_acc(r)
    loss = tl.sum(tl.where(mask, y * ((s[:, None] - z) + l1p[:, None]), 0.0), 1)
    tl.store(LOSS + rows, (loss + z_loss * lse * lse) * inv, mask=rmask)
    tl.store(LSE + rows, lse.to(LSE.dtype.element_ty), mask=rmask)
    if WRITE_GRAD:
        gs = scalar_arg(gs_hi, gs_lo, ACC)
        a = (tl.sum(y, 1) + 2.0 * z_loss * lse) * (inv * gs) * recip_rn(1.0 + r)
        g = e * a[:, None] - y * (inv * gs)
        g = softcap_grad(g, z, cap, SOFTCAP)
        gb = row_base(rows, INNER, sg_o, sg_i)
        tl.store(G + gb[:, None] + cols64 * sg_n, g.to(G.dtype.element_ty), mask=mask)
        tl.store(STATE + rows, tl.full((ROWS,), 1.0, ACC), mask=rmask)


@triton.jit
def prob_sum_tile(Y, W, yo, cols, mask, eps, C, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                  P: tl.constexpr):
    return prob_target(Y, W, yo, mask, cols, mask, eps, C, HAS_WEIGHT, ACC, P)


@triton.jit
def prob_tile(X, Y, W, G, xo, yo, go, cols, mask, s, a, ig, l1p, eps, C, cap,
              HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
              ACC: tl.constexpr, P: tl.constexpr):
    """One tile of the probability-target loss / gradient pass: G[go] =
    e^(z - s) * a - y * ig (WRITE_GRAD; s the row's finite max); returns
    y (lse - z) = y ((s - z) + l1p)."""
    z = load_logits(X, xo, mask, cap, SOFTCAP, ACC, P)
    y = prob_target(Y, W, yo, mask, cols, mask, eps, C, HAS_WEIGHT, ACC, P)
    if WRITE_GRAD:
        g = softcap_grad(exp_rel(z, s) * a - y * ig, z, cap, SOFTCAP)
        store_p(G + go, g.to(G.dtype.element_ty), mask, P)
    return tl.where(mask, y * ((s - z) + l1p), 0.0)


@triton.jit(do_not_specialize=_SCALARS + ["use_div"])
def ce_prob_looped_kernel(
    X,  # logits base pointer
    Y,  # probability targets base pointer (the logits' shape, any float dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [1] ACC: the divisor (read when use_div)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by den_rows (and the divisor)
    LSE,  # [M] row log-sum-exp (fp32, or ACC)
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    M,  # number of rows (program pid takes rows pid, pid + G, ... of G programs)
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # target strides
    sg_o, sg_n, sg_i,  # gradient strides
    den_rows,  # denominator of every row: M for the mean, else 1
    use_div,  # 1: also divide by DEN[0] (the divisor)
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first reads, stream on the last
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    gs = scalar_arg(gs_hi, gs_lo, ACC)
    inv = prob_inverse(DEN, den_rows, use_div, ACC)
    cols = tl.arange(0, BLOCK_N)
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        xb = row_base(row, INNER, sx_o, sx_i)
        yb = row_base(row, INNER, sy_o, sy_i)
        gb = row_base(row, INNER, sg_o, sg_i)
        a0, body_end, vec_end = vec_segment(xb, 0, C, VEC, BLOCK_N)
        a = tl.zeros((), ACC)
        if WRITE_GRAD:
            # sum_c y_c: the gradient's coefficient of sigma, needed before any tile is written
            sy = tl.zeros((BLOCK_N,), ACC)
            for off in tl.range(a0, body_end, BLOCK_N, num_stages=STAGES):
                sy += prob_sum_tile(Y, W, tile_offsets(yb, off, cols, sy_n, VEC), off + cols,
                                    cols < BLOCK_N, eps, C, HAS_WEIGHT, ACC, 1 if EVICT else 0)
            if body_end < vec_end:
                sy += prob_sum_tile(Y, W, tile_offsets(yb, body_end, cols, sy_n, VEC),
                                    body_end + cols, partial_mask(cols, vec_end - body_end, VEC),
                                    eps, C, HAS_WEIGHT, ACC, 1 if EVICT else 0)
            a = tl.sum(sy, 0)
            if VEC > 1:
                e_cols, e_mask = edge_columns(0, a0, vec_end, C, VEC)
                a += tl.sum(prob_sum_tile(Y, W, yb + e_cols, e_cols, e_mask, eps, C, HAS_WEIGHT,
                                          ACC, 1 if EVICT else 0), 0)
        m, r = online_stats(X, xb, sx_n, 0, C, ACC, BLOCK_N, VEC, 1 if EVICT else 0, cap,
                            SOFTCAP, STAGES)
        s = finite_max(m)
        lse = m + log1p_acc(r)
        l1p = log1p_acc(r) + (s - m)  # NaN for an all -inf row, as torch
        ig = inv * gs
        a = (a + 2.0 * z_loss * lse) * ig * recip_rn(1.0 + r)
        acc = tl.zeros((BLOCK_N,), ACC)
        P2: tl.constexpr = 2 if EVICT else 0
        for off in tl.range(a0, body_end, BLOCK_N, num_stages=STAGES):
            acc += prob_tile(X, Y, W, G, tile_offsets(xb, off, cols, sx_n, VEC),
                             tile_offsets(yb, off, cols, sy_n, VEC),
                             tile_offsets(gb, off, cols, sg_n, VEC), off + cols, cols < BLOCK_N,
                             s, a, ig, l1p, eps, C, cap, HAS_WEIGHT, SOFTCAP, WRITE_GRAD, ACC, P2)
        if body_end < vec_end:
            acc += prob_tile(X, Y, W, G, tile_offsets(xb, body_end, cols, sx_n, VEC),
                             tile_offsets(yb, body_end, cols, sy_n, VEC),
                             tile_offsets(gb, body_end, cols, sg_n, VEC), body_end + cols,
                             partial_mask(cols, vec_end - body_end, VEC), s, a, ig, l1p, eps, C,
                             cap, HAS_WEIGHT, SOFTCAP, WRITE_GRAD, ACC, P2)
        total = tl.sum(acc, 0)
        if VEC > 1:
            e_cols, e_mask = edge_columns(0, a0, vec_end, C, VEC)
            total += tl.sum(prob_tile(X, Y, W, G, xb + e_cols, yb + e_cols, gb + e_cols, e_cols,
                                      e_mask, s, a, ig, l1p, eps, C, cap, HAS_WEIGHT, SOFTCAP,
                                      WRITE_GRAD, ACC, P2), 0)
        tl.store(LOSS + row, (total + z_loss * lse * lse) * inv)
        tl.store(LSE + row, lse.to(LSE.dtype.element_ty))
        if WRITE_GRAD:
            tl.store(STATE + row, tl.full((), 1.0, ACC))


# ----------------------------------------------------------------------------
# Eager backward: rescale the saved gradient by grad_output
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["group"])
def ce_grad_scale_kernel(
    G,  # gradient written by the forward
    OUT,  # where the scaled rows go: G itself when IN_PLACE
    STATE,  # [M] ACC: factor already applied to each row of G (set to GO when IN_PLACE)
    GO,  # [M] grad_output of the row losses (any stride: s_go)
    M,  # number of rows
    C,  # row length
    INNER,  # rows sharing one outer index
    sg_o, sg_n, sg_i,  # G strides
    so_o, so_n, so_i,  # OUT strides
    s_go,  # grad_output stride (0 when expanded from a scalar)
    group,  # rows per program, contiguous (a multiple of ROWS)
    IN_PLACE: tl.constexpr,  # rescale G in place, skipping rows whose factor is right
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width (>= C when ROWS > 1)
    ROWS: tl.constexpr,  # rows per tile
    CHECK: tl.constexpr,  # rows whose factors one step of the in-place check reads
):
    first = tl.program_id(0).to(tl.int64) * group
    end = tl.minimum(first + group, M)
    if IN_PLACE:
        # the usual backward: every factor already right, so the group is
        # done after reading two scalars a row, CHECK rows at a time
        pending = 0
        for r_off in range(first, end, CHECK):
            r = r_off + tl.arange(0, CHECK).to(tl.int64)
            ok = r < end
            want = tl.load(GO + r * s_go, mask=ok, other=1.0).to(ACC)
            have = tl.load(STATE + r, mask=ok, other=1.0)
            pending += tl.sum((ok & (want != have)).to(tl.int32), 0)
        if pending == 0:
            return
    cols = tl.arange(0, BLOCK_N)
    for r0 in range(first, end, ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        rmask = rows < end
        go = tl.load(GO + rows * s_go, mask=rmask, other=1.0).to(ACC)
        done = tl.load(STATE + rows, mask=rmask, other=1.0)
        if IN_PLACE:
            todo = rmask & (go != done)
            # one thread stores the rows' new factors: every warp must have
            # read the old ones first (here and in the check above), or a
            # late warp sees go == done and leaves its columns unscaled
            tl.debug_barrier()
            tl.store(STATE + rows, go, mask=todo)
        else:
            todo = rmask
        if tl.max(todo.to(tl.int32), 0) != 0:
            # go / done correctly rounded: exactly 1 where the factor is already applied
            if done.dtype == tl.float64:
                factor = go / done
            else:
                factor = tl.div_rn(go, done)
            gb = row_base(rows, INNER, sg_o, sg_i)
            ob = row_base(rows, INNER, so_o, so_i)
            for off in range(0, C, BLOCK_N):
                mask = todo[:, None] & (cols < C - off)[None, :]
                c64 = (off + cols)[None, :].to(tl.int64)
                g = tl.load(G + gb[:, None] + c64 * sg_n, mask=mask, other=0.0).to(ACC)
                # an exact 0 (every element of an ignored row) stays 0 whatever the
                # factor is, inf and NaN included, as in torch's backward; not in a
                # row scaled to 0 before (done 0: nothing left to scale, NaN)
                keep = (g == 0.0) & (done != 0.0)[:, None]
                g = tl.where(keep, 0.0, g * factor[:, None])
                tl.store(OUT + ob[:, None] + c64 * so_n, g.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# The mean's denominators and the divisor, on the device (no host sync, no torch ops)
# ----------------------------------------------------------------------------


@triton.jit
def block_sums(T, W, start, end, C, ignore_index, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
               BLOCK: tl.constexpr):
    """(kept rows, sum of their w_t) over targets T[start:end], in BLOCK steps."""
    count = tl.zeros((BLOCK,), ACC)
    wsum = tl.zeros((BLOCK,), ACC)
    for off in range(start, end, BLOCK):
        rows = off + tl.arange(0, BLOCK).to(tl.int64)
        inb = rows < end
        t = tl.load(T + rows, mask=inb, other=0).to(tl.int64)
        kept = inb & (t != ignore_index)
        count += kept.to(ACC)
        if HAS_WEIGHT:
            use = kept & (t >= 0) & (t < C)
            wsum += tl.load(W + t, mask=use, other=0.0).to(ACC)
    return tl.sum(count, 0), tl.sum(wsum, 0)


@triton.jit
def weight_sum(W, start, end, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of the class weights W[start:end], in BLOCK steps."""
    sw = tl.zeros((BLOCK,), ACC)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK).to(tl.int64)
        sw += tl.load(W + cols, mask=cols < end, other=0.0).to(ACC)
    return tl.sum(sw, 0)


@triton.jit(do_not_specialize=["div_hi", "div_lo"])
def ce_denominators_kernel(
    T,  # [M] class-index targets (any integer dtype; read when COUNT)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DIV,  # [1] the divisor (any float dtype; read when DIV_PTR)
    DEN,  # [DEN_LEN] ACC out: loss and z-loss denominators, sum of all w (HAS_WEIGHT and SMOOTH), 1 / each denominator
    WS,  # [3 x programs] ACC: each program's partial sums (read and written with several programs)
    SYNC,  # [1] int32, zero before the launch: programs finished (used with several programs)
    M,  # number of rows
    C,  # number of classes
    ignore_index,  # target value whose row is not counted
    div_hi, div_lo,  # the divisor as a float (f64_parts; 1 without one) unless DIV_PTR
    row_span,  # rows each program sums (a multiple of BLOCK)
    class_span,  # class weights each program sums (a multiple of BLOCK)
    HAS_WEIGHT: tl.constexpr,  # class weights given (else w_t = 1 on kept rows)
    SMOOTH: tl.constexpr,  # also write the sum of the class weights
    COUNT: tl.constexpr,  # the mean: sum of w_t over kept rows, kept rows (else 1, 1)
    DIV_PTR: tl.constexpr,  # the divisor is DIV[0] (a tensor), not div_hi / div_lo
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # rows (and classes) per step; at least the program count
):
    # Program p sums rows [p row_span, (p + 1) row_span) and classes likewise;
    # with several programs, each stores its partials and the last to arrive
    # adds them up in program order. The order of every sum is fixed by the
    # shape, so the loss is the same run to run.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n = tl.zeros((), ACC)
    wtot = tl.zeros((), ACC)
    sw = tl.zeros((), ACC)
    if COUNT:
        r0 = pid.to(tl.int64) * row_span
        n, wtot = block_sums(T, W, r0, tl.minimum(r0 + row_span, M), C, ignore_index, HAS_WEIGHT,
                             ACC, BLOCK)
    if HAS_WEIGHT and SMOOTH:
        c0 = pid.to(tl.int64) * class_span
        sw = weight_sum(W, c0, tl.minimum(c0 + class_span, C), ACC, BLOCK)
    last = programs == 1
    if not last:
        tl.store(WS + pid, n)
        tl.store(WS + programs + pid, wtot)
        tl.store(WS + 2 * programs + pid, sw)
        last = arrive(SYNC) == programs - 1
        if last:
            k = tl.arange(0, BLOCK)
            ok = k < programs
            n = tl.sum(tl.load(WS + k, mask=ok, other=0.0, cache_modifier=".cg"), 0)
            wtot = tl.sum(tl.load(WS + programs + k, mask=ok, other=0.0, cache_modifier=".cg"), 0)
            sw = tl.sum(tl.load(WS + 2 * programs + k, mask=ok, other=0.0, cache_modifier=".cg"),
                        0)
    if last:
        if DIV_PTR:
            div = tl.load(DIV).to(ACC)
        else:
            div = scalar_arg(div_hi, div_lo, ACC)
        if not COUNT:  # sum or none: both denominators are the divisor alone
            n = tl.zeros((), ACC) + 1.0
        if not (COUNT and HAS_WEIGHT):
            wtot = n
        dl = wtot * div
        dz = n * div
        tl.store(DEN, dl)
        tl.store(DEN + 1, dz)
        tl.store(DEN + DEN_INV, recip_rn(dl))
        tl.store(DEN + DEN_INV + 1, recip_rn(dz))
        if HAS_WEIGHT and SMOOTH:
            tl.store(DEN + 2, sw)


# ----------------------------------------------------------------------------
# Gradient of the returned lse: d lse / d x_c = sigma_c (times the softcap's derivative)
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def ce_lse_grad_kernel(
    X,  # logits base pointer
    LSE,  # [M] row log-sum-exp from the forward (fp32 or ACC)
    DLSE,  # [M] gradient of the lse (any float dtype; stride s_dlse)
    OUT,  # gradient wrt the logits, written
    M,  # number of rows
    C,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides
    so_o, so_n, so_i,  # OUT strides
    s_dlse,  # DLSE stride (0 when expanded)
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width (>= C when ROWS > 1)
    ROWS: tl.constexpr,  # rows per program
):
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < M
    s = tl.load(LSE + rows, mask=rmask, other=0.0).to(ACC)
    dl = tl.load(DLSE + rows * s_dlse, mask=rmask, other=0.0).to(ACC)
    xb = row_base(rows, INNER, sx_o, sx_i)
    ob = row_base(rows, INNER, so_o, so_i)
    cols = tl.arange(0, BLOCK_N)
    for off in range(0, C, BLOCK_N):
        mask = rmask[:, None] & (cols < C - off)[None, :]
        c64 = (off + cols)[None, :].to(tl.int64)
        z = load_logits(X, xb[:, None] + c64 * sx_n, mask, cap, SOFTCAP, ACC)
        g = softcap_grad(exp_rel(z, s[:, None]) * dl[:, None], z, cap, SOFTCAP)
        tl.store(OUT + ob[:, None] + c64 * so_n, g.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers. The host plans a launch once per call signature and keeps the
# callable these return; a call then only passes tensors. Each callable
# returns the names of the kernels it launched.
# ----------------------------------------------------------------------------


def f64_parts(v: float) -> tuple[int, int]:
    """``v`` as the int32 bit patterns of fp32 hi and lo with hi + lo = v to ~2^-48."""
    hi = np.float32(v)
    lo = np.float32(v - float(hi)) if np.isfinite(hi) else np.float32(0.0)
    return int(hi.view(np.int32)), int(lo.view(np.int32))


def _scalars(eps, z_loss, cap, grad_scale):
    return (*f64_parts(eps), *f64_parts(z_loss), *f64_parts(cap), *f64_parts(grad_scale))


def class_launcher(M, C, inner, x_strides, g_strides, ignore_index, use_den, eps, z_loss, cap,
                   grad_scale, has_weight, write_grad, dtype, cfg, write_hit=False,
                   lse_all=True):
    """``launch(x, t, w, den, g, loss, lse, state, hit)`` for class-index
    targets ``t`` ([M], contiguous). Unused tensors (``w`` without weights,
    ``den`` unless ``use_den`` or weights with smoothing, ``g``/``state``
    unless ``write_grad``, ``hit`` unless ``write_hit``) may be any
    placeholder. ``hit`` [M] int8: 1 where the row is kept and its target is
    an argmax of the row (ties count), the token accuracy's numerator.
    ``lse_all``: the lse of ignored rows too (their logits are read); False:
    ignored rows are never read and their lse is 0."""
    head = (M, C, inner, *x_strides, *g_strides, ignore_index, int(use_den), int(lse_all))
    scal = _scalars(eps, z_loss, cap, grad_scale)
    meta = dict(HAS_WEIGHT=has_weight, SMOOTH=eps > 0, SOFTCAP=cap > 0, WRITE_GRAD=write_grad,
                WRITE_HIT=write_hit, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    if cfg.path == "single":
        kernel = ce_class_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        meta["ROWS"] = cfg.rows_per_program
        names = ("ce_class_single_kernel",)
    else:
        meta.update(VEC=row_vec(dtype, x_strides, g_strides) if write_grad else
                    row_vec(dtype, x_strides), EVICT=cfg.evict, STAGES=cfg.stages)
    if cfg.path == "coop":
        kernel = ce_class_coop_kernel[(coop_grid(cfg, M),)]
        args = head + (cfg.splits, cfg.chunk, cfg.lag) + scal
        names = ("ce_class_coop_kernel",)

        def launch(x, t, w, den, g, loss, lse, state, hit):
            ws, sync = coop_buffers(M, cfg.splits, 3, dtype, x.device)
            kernel(x, t, w, den, g, loss, lse, state, hit, ws, sync, *args, **meta)
            return names
        return launch
    if cfg.path == "resident":
        splits = resident_launch_splits(C, cfg.block_n, meta["VEC"], x_strides,
                                        *((g_strides,) if write_grad else ()))
        kernel = ce_class_resident_kernel[(M * splits,)]
        meta.pop("EVICT")
        meta.pop("STAGES")
        args = head + (splits, cfg.spin) + scal
        names = ("ce_class_resident_kernel",)

        def launch(x, t, w, den, g, loss, lse, state, hit):
            ws, sync = coop_buffers(M, splits, 4, dtype, x.device, resident=True)
            kernel(x, t, w, den, g, loss, lse, state, hit, ws, sync, *args, **meta)
            return names
        return launch
    if cfg.path == "looped":
        kernel = ce_class_looped_kernel[(min(M, cfg.programs or M),)]
        names = ("ce_class_looped_kernel",)
    args = head + scal

    def launch(x, t, w, den, g, loss, lse, state, hit):
        kernel(x, t, w, den, g, loss, lse, state, hit, *args, **meta)
        return names
    return launch


def class_backward_launcher(M, C, inner, x_strides, o_strides, ignore_index, use_den, eps,
                            z_loss, cap, grad_scale, has_weight, dtype, cfg):
    """``launch(x, t, w, den, lse, go, out, s_go)``: out <- grad_output *
    d loss / d x per row, from the logits and the forward's lse (ACC);
    ``go`` with stride ``s_go`` (0: one value for every row)."""
    args = (M, C, inner, *x_strides, *o_strides)
    tail = (ignore_index, int(use_den), *_scalars(eps, z_loss, cap, grad_scale))
    meta = dict(HAS_WEIGHT=has_weight, SMOOTH=eps > 0, SOFTCAP=cap > 0, ACC=acc_dtype(dtype),
                BLOCK_N=cfg.block_n, VEC=row_vec(dtype, x_strides, o_strides),
                STAGES=cfg.stages, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
                **regs_meta(cfg))
    kernel = ce_class_backward_kernel[(min(M, cfg.programs or M),)]
    names = ("ce_class_backward_kernel",)

    def launch(x, t, w, den, lse, go, out, s_go):
        kernel(x, t, w, den, lse, go, out, *args, s_go, *tail, **meta)
        return names
    return launch


def prob_launcher(M, C, inner, x_strides, y_strides, g_strides, den_rows, eps, z_loss, cap,
                  grad_scale, has_weight, write_grad, dtype, cfg, use_div=False):
    """``launch(x, y, w, den, g, loss, lse, state)`` for probability targets
    ``y`` (the logits' shape, its own strides); ``den`` [1] holds the divisor
    when ``use_div``."""
    tail = (*x_strides, *y_strides, *g_strides, den_rows, int(use_div),
            *_scalars(eps, z_loss, cap, grad_scale))
    meta = dict(HAS_WEIGHT=has_weight, SOFTCAP=cap > 0, WRITE_GRAD=write_grad,
                ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    if cfg.path == "single":
        kernel = ce_prob_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        meta["ROWS"] = cfg.rows_per_program
        names = ("ce_prob_single_kernel",)
    else:
        kernel = ce_prob_looped_kernel[(min(M, cfg.programs or M),)]
        meta.update(VEC=row_vec(dtype, x_strides, y_strides, g_strides) if write_grad else
                    row_vec(dtype, x_strides, y_strides), EVICT=cfg.evict, STAGES=cfg.stages)
        names = ("ce_prob_looped_kernel",)
    args = (M, C, inner, *tail)

    def launch(x, y, w, den, g, loss, lse, state):
        kernel(x, y, w, den, g, loss, lse, state, *args, **meta)
        return names
    return launch


# Few programs, each streaming its slice: nothing to gain from occupancy, so a
# generous register budget (without one, ptxas 12.8 spilled 8 bytes of the
# fp64 variant for a second program per SM that never exists).
DENOMINATORS_REGS = 128
DENOMINATORS_BLOCK = 1024  # rows (classes) per step, and the most programs of a launch


def denominators_launcher(M, C, ignore_index, has_weight, smooth, dtype, count=True,
                          divisor=None, *, serial_steps):
    """``launch(t, w, div, den)``: den[0] <- (sum of w_t over kept rows, the
    kept count without weights; 1 unless ``count``) times the divisor,
    den[1] <- (the kept count; 1 unless ``count``) times the divisor, den[2]
    <- sum of w (with weights and smoothing), den[3], den[4] <- 1 / den[0],
    1 / den[1], correctly rounded (den: ``DEN_LEN`` values). ``divisor``:
    None (1), a float, or "tensor" (read from ``div``, a 1-element tensor).
    One program walks the targets it counts (the mean) and the weights it
    sums (weights and smoothing) in steps of ``DENOMINATORS_BLOCK``, one
    memory round trip each, while they are at most ``serial_steps`` steps;
    beyond, one program per step (at most ``DENOMINATORS_BLOCK``) shares
    them, and each launch allocates their partials and a zeroed int32
    counter."""
    B = DENOMINATORS_BLOCK
    steps = max(triton.cdiv(M, B) if count else 0,
                triton.cdiv(C, B) if has_weight and smooth else 0, 1)
    programs = 1 if steps <= serial_steps else min(steps, B)
    row_span = triton.cdiv(triton.cdiv(max(M, 1), programs), B) * B
    class_span = triton.cdiv(triton.cdiv(max(C, 1), programs), B) * B
    kernel = ce_denominators_kernel[(programs,)]
    from_ptr = isinstance(divisor, str)
    args = (M, C, ignore_index, *f64_parts(1.0 if divisor is None or from_ptr else divisor),
            row_span, class_span)
    acc = acc_dtype(dtype)
    meta = dict(HAS_WEIGHT=has_weight, SMOOTH=smooth, COUNT=count, DIV_PTR=from_ptr, ACC=acc,
                BLOCK=B, num_warps=4, enable_fp_fusion=FP_FUSION, maxnreg=DENOMINATORS_REGS)
    names = ("ce_denominators_kernel",)

    def launch(t, w, div, den):
        if programs == 1:  # neither read nor written
            ws, sync = den, den.view(torch.int32)
        else:
            ws = torch.empty(3 * programs, dtype=den.dtype, device=den.device)
            sync = torch.zeros(1, dtype=torch.int32, device=den.device)
        kernel(t, w, div, den, ws, sync, *args, **meta)
        return names
    return launch


def scale_check(num_warps: int) -> int:
    """Rows whose factors one step of the in-place rescale's check reads: 4 a thread."""
    return 4 * 32 * num_warps


def grad_scale_launcher(M, C, inner, g_strides, o_strides, in_place, dtype, cfg):
    """``launch(g, out, state, go, s_go)``: out[row] = g[row] * go[row] / state[row],
    exact zeros kept at 0 (ignored rows) whatever the factor, except in rows
    whose state is 0 (scaled to 0 by an earlier backward: NaN, none left).
    ``in_place`` (out is g): rows whose factor is already right are untouched
    and state <- go; else every row of ``out`` is written and state is left
    alone. ``s_go``: grad_output's stride (0 for one value for every row).
    ``cfg.programs`` (0: one per tile of ``cfg.rows_per_program`` rows)
    programs share the rows in contiguous groups."""
    rows = cfg.rows_per_program
    programs = max(1, min(cfg.programs or M, triton.cdiv(M, rows)))
    group = max(1, triton.cdiv(triton.cdiv(M, programs), rows)) * rows  # M = 0: one empty program
    kernel = ce_grad_scale_kernel[(triton.cdiv(M, group),)]
    args = (M, C, inner, *g_strides, *o_strides)
    meta = dict(IN_PLACE=in_place, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, ROWS=rows,
                CHECK=scale_check(cfg.num_warps), num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    names = ("ce_grad_scale_kernel",)

    def launch(g, out, state, go, s_go):
        kernel(g, out, state, go, *args, s_go, group, **meta)
        return names
    return launch


def lse_grad_launcher(M, C, inner, x_strides, o_strides, cap, dtype, cfg):
    """``launch(x, lse, dlse, out, s_dlse)``: out <- sigma(x) * dlse per row
    (through the softcap when ``cap`` > 0)."""
    kernel = ce_lse_grad_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
    args = (M, C, inner, *x_strides, *o_strides)
    meta = dict(SOFTCAP=cap > 0, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n,
                ROWS=cfg.rows_per_program, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
                **regs_meta(cfg))
    scal = f64_parts(cap)
    names = ("ce_lse_grad_kernel",)

    def launch(x, lse, dlse, out, s_dlse):
        kernel(x, lse, dlse, out, *args, s_dlse, *scal, **meta)
        return names
    return launch
