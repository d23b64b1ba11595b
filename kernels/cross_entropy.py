"""Fused cross-entropy in Triton: one launch reads the logits, writes each
row's loss and log-sum-exp and, when asked, the gradient, with no softmax
tensor in between.

Rows are laid out as in ``kernels/softmax.py``: row r of the logits starts at
(r // INNER) * s_outer + (r % INNER) * s_inner and its C classes are s_n
apart (an (N, C, d1..dK) input reduced over dim 1 is read in place; its row
r = n * INNER + i is element r of the flattened target). All offsets are
int64; masked lanes load -inf.

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
(class targets, mean: sum of w_t over kept rows for the loss, the number of
kept rows for the z-loss, both read from the device tensor DEN that
``ce_denominators_kernel`` fills before the main launch; probability
targets, mean: the number of rows), so ``LOSS.sum()`` is the reduced loss,
and the gradient is written already scaled the same way (times grad_scale).
An all-ignored batch divides 0 by 0 and gives NaN, as torch does. Ignored
rows get a zero loss and a zero gradient row. A class index outside [0, C)
that is not ignore_index is never used as an address (the loads are masked):
that row's loss and gradient are NaN.

Paths (chosen by ``softmax_gpu.cross_entropy.cross_entropy_config``):
- single: the row is one tile in registers, ROWS rows per program;
  1 read of the logits (+ 1 write of the gradient).
- looped: one program per row; an online (max, sum) pass (``online_stats``)
  then a gradient pass: 2 reads + 1 write. The second read comes from L2
  while the rows in flight (resident programs x row bytes) fit in it; not
  measured yet. The target logit is read before the gradient pass (in place
  safe). Without a gradient the second pass runs only for label smoothing.

``ce_grad_scale_kernel`` is the autograd backward: it multiplies the saved
gradient rows by grad_output / (the factor already applied, kept per row in
STATE) and returns at once, touching nothing but two scalars per row, when
that ratio is 1 (the usual ``loss.backward()``). Its out-of-place variant
(IN_PLACE=False) serves graphs traced by torch.compile, which cannot mutate
a saved tensor cheaply.

Float scalars (label smoothing, z-loss, softcap, grad_scale) must be exact
for fp64 logits, but Triton passes Python floats as fp32. Each arrives as
two int32 arguments, the bit patterns of its fp32 hi and lo parts
(``f64_parts``), unspecialised (``do_not_specialize``: one compiled kernel
whatever the values), and ``scalar_arg`` rebuilds it in ACC.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from .softmax import FP_FUSION, acc_dtype, online_stats, online_update, row_base

# ----------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def scalar_arg(hi, lo, ACC: tl.constexpr):
    """A host float passed as the int32 bit patterns of its fp32 hi and lo
    parts (see ``f64_parts``), rebuilt in ACC: exact to ~2^-48 in fp64."""
    return (tl.zeros((), ACC) + hi.to(tl.float32, bitcast=True)) + lo.to(tl.float32, bitcast=True)


@triton.jit
def recip_ge1_f64(d):
    """1 / d for fp64 d >= 1 (NaN stays NaN) without a division: an fp64
    division compiles to a subroutine call, and around those calls in the
    looped kernels Triton 3.6's ptxas kept values on the stack. An fp32
    reciprocal refined by two Newton steps (relative error 2^-22, 2^-44, then
    fp64 rounding); d is clamped to 2^120 first (fp32 range), which moves
    1 / d by less than 2^-119."""
    d = tl.where(d > 1.329227995784916e36, 1.329227995784916e36, d)
    r = (1.0 / d.to(tl.float32)).to(tl.float64)
    r = r * (2.0 - d * r)
    return r * (2.0 - d * r)


@triton.jit
def softcap_tanh(x, cap):
    """cap * tanh(x / cap) from one exp; saturates to +-cap (also for +-inf)."""
    d = tl.exp(2.0 * (x * (1.0 / cap))) + 1.0
    if d.dtype == tl.float64:
        return cap - (2.0 * cap) * recip_ge1_f64(d)
    return cap - (2.0 * cap) / d


@triton.jit
def load_logits(X, offs, mask, cap, SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """Logits at X + offs in ACC, softcapped when SOFTCAP; masked lanes are -inf."""
    z = tl.load(X + offs, mask=mask, other=float("-inf")).to(ACC)
    if SOFTCAP:
        z = tl.where(mask, softcap_tanh(z, cap), float("-inf"))
    return z


@triton.jit
def capped_stats(X, base, s_n, C, cap, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``online_stats`` over the softcapped logits: the same online (max, sum)
    loop, with the softcap applied to each tile before it is reduced."""
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((BLOCK_N,), ACC)
    for off in range(0, C, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        z = load_logits(X, base + cols * s_n, cols < C, cap, True, ACC)
        m, d = online_update(m, d, z)
    return m, tl.sum(d, 0)


@triton.jit
def row_lse(X, base, s_n, C, cap, SOFTCAP: tl.constexpr, ACC: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """(max, log-sum-exp) of one row (softcapped when SOFTCAP), looped over tiles."""
    if SOFTCAP:
        m, d = capped_stats(X, base, s_n, C, cap, ACC, BLOCK_N)
    else:
        m, d = online_stats(X, base, s_n, 0, C, ACC, BLOCK_N)
    return m, m + tl.log(d)


@triton.jit
def softcap_grad(g, z, cap, SOFTCAP: tl.constexpr):
    """Chain rule through the softcap: d(cap tanh(x/cap))/dx = 1 - (z/cap)^2."""
    if SOFTCAP:
        r = z * (1.0 / cap)
        g = g * (1.0 - r * r)
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
def class_denominators(DEN, use_den, ACC: tl.constexpr):
    """(loss denominator, z-loss denominator): DEN[0], DEN[1] for the mean, else 1."""
    on = use_den != 0
    dl = tl.load(DEN, mask=on, other=1.0).to(ACC)
    dz = tl.load(DEN + 1, mask=on, other=1.0).to(ACC)
    return dl, dz


@triton.jit
def class_row_loss(lse, zt, wt, smooth_sum, kept, eps, C, z_loss, dl, dz,
                   SMOOTH: tl.constexpr):
    """Row loss (already divided by the denominators); 0 when ignored, NaN when
    the target is outside [0, C) (w_t is NaN then). smooth_sum = sum_c w_c (lse - z_c)."""
    loss = wt * (lse - zt)
    if SMOOTH:
        loss = (1.0 - eps) * loss + (eps / C) * smooth_sum
    return tl.where(kept, loss / dl + (z_loss * lse * lse) / dz, 0.0 / dl + 0.0 / dz)


@triton.jit
def class_grad_coefs(lse, wt, sw, eps, C, z_loss, dl, dz, gs,
                     SMOOTH: tl.constexpr):
    """Per-row coefficients of the gradient  a * sigma_c - b * [c == t] - cw * w_c.

    a = sum_j y_j / dl + 2 z_loss lse / dz;  b = (1 - eps) w_t / dl;  cw = eps / (C dl);
    all times grad_scale gs. NaN (through a: w_t is NaN) for a target outside [0, C)."""
    inv_l = gs / dl
    if SMOOTH:
        sy = (1.0 - eps) * wt + (eps / C) * sw
        b = (1.0 - eps) * wt * inv_l
        cw = (eps / C) * inv_l
    else:
        sy = wt
        b = wt * inv_l
        cw = 0.0 * inv_l
    a = sy * inv_l + (2.0 * z_loss * gs / dz) * lse
    return a, b, cw


@triton.jit
def class_grad(sigma, z, is_t, a, b, cw, w, kept, cap, SMOOTH: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """Gradient tile; zero on ignored rows whatever the logits hold."""
    g = sigma * a - tl.where(is_t, b, 0.0)
    if SMOOTH:
        g = g - cw * w
    g = softcap_grad(g, z, cap, SOFTCAP)
    return tl.where(kept, g, 0.0)


# ----------------------------------------------------------------------------
# Class-index targets
# ----------------------------------------------------------------------------


# int32 bit patterns of float scalars: never specialised on their values
_SCALARS = ["eps_hi", "eps_lo", "zl_hi", "zl_lo", "cap_hi", "cap_lo", "gs_hi", "gs_lo"]


@triton.jit(do_not_specialize=_SCALARS)
def ce_class_single_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [3] ACC: sum of w_t over kept rows, kept rows (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] fp32: row log-sum-exp
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index (1 for (N, C) logits)
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1] (mean); 0: by 1
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
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    t, kept, inside, wt = class_target(T, W, rows, rmask, C, ignore_index, HAS_WEIGHT, ACC)
    z = load_logits(X, xb[:, None] + cols[None, :] * sx_n, mask, cap, SOFTCAP, ACC)
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    d = tl.sum(e, 1)
    lse = m + tl.log(d)
    is_t = cols[None, :] == t[:, None]
    zt = tl.sum(tl.where(is_t, z, 0.0), 1)  # from the tile: no second access
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    else:
        w = tl.where(cmask, 1.0, 0.0).to(ACC)[None, :]
    if SMOOTH:
        smooth_sum = tl.sum(tl.where(mask, w * (lse[:, None] - z), 0.0), 1)
        if HAS_WEIGHT:
            sw = tl.load(DEN + 2).to(ACC)
        else:
            sw = tl.zeros((), ACC) + C
    else:
        smooth_sum = lse * 0.0
        sw = tl.zeros((), ACC)
    dl, dz = class_denominators(DEN, use_den, ACC)
    loss = class_row_loss(lse, zt, wt, smooth_sum, kept, eps, C, z_loss, dl, dz, SMOOTH)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(LSE + rows, lse.to(tl.float32), mask=rmask)
    if WRITE_HIT:
        tl.store(HIT + rows, (kept & inside & (zt >= m)).to(tl.int8), mask=rmask)
    if WRITE_GRAD:
        gs = scalar_arg(gs_hi, gs_lo, ACC)
        a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, z_loss, dl, dz, gs, SMOOTH)
        sigma = e * (1.0 / d)[:, None]
        g = class_grad(sigma, z, is_t, a[:, None], b[:, None], cw, w, kept[:, None], cap,
                       SMOOTH, SOFTCAP)
        gb = row_base(rows, INNER, sg_o, sg_i)
        tl.store(G + gb[:, None] + cols[None, :] * sg_n, g.to(G.dtype.element_ty), mask=mask)
        tl.store(STATE + rows, tl.full((ROWS,), 1.0, ACC), mask=rmask)


@triton.jit(do_not_specialize=_SCALARS)
def ce_class_looped_kernel(
    X,  # logits base pointer
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [3] ACC: sum of w_t over kept rows, kept rows (read when use_den), sum of w (HAS_WEIGHT and SMOOTH)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by the denominators
    LSE,  # [M] fp32: row log-sum-exp
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    HIT,  # [M] int8: 1 where the row is kept and its target is an argmax (written when WRITE_HIT)
    M,  # number of rows (one program each)
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sg_o, sg_n, sg_i,  # gradient strides
    ignore_index,  # target value whose row is skipped
    use_den,  # 1: divide by DEN[0] / DEN[1] (mean); 0: by 1
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
):
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    xb = row_base(row, INNER, sx_o, sx_i)
    m, lse = row_lse(X, xb, sx_n, C, cap, SOFTCAP, ACC, BLOCK_N)
    t, kept, inside, wt = class_target(T, W, row, row < M, C, ignore_index, HAS_WEIGHT, ACC)
    # the target logit, read before any gradient tile can overwrite it (in place)
    zt = load_logits(X, xb + t * sx_n, kept & inside, cap, SOFTCAP, ACC)
    dl, dz = class_denominators(DEN, use_den, ACC)
    if HAS_WEIGHT and SMOOTH:
        sw = tl.load(DEN + 2).to(ACC)
    else:
        sw = tl.zeros((), ACC) + C
    gs = scalar_arg(gs_hi, gs_lo, ACC)
    a, b, cw = class_grad_coefs(lse, wt, sw, eps, C, z_loss, dl, dz, gs, SMOOTH)
    gb = row_base(row, INNER, sg_o, sg_i)
    acc = tl.zeros((BLOCK_N,), ACC)
    if WRITE_GRAD or SMOOTH:
        # second pass: the gradient tiles and / or sum_c w_c (lse - z_c)
        for off in range(0, C, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < C
            z = load_logits(X, xb + cols * sx_n, cmask, cap, SOFTCAP, ACC)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
            else:
                w = tl.where(cmask, 1.0, 0.0).to(ACC)
            if SMOOTH:
                acc += tl.where(cmask, w * (lse - z), 0.0)
            if WRITE_GRAD:
                sigma = tl.exp(z - lse)
                g = class_grad(sigma, z, cols == t, a, b, cw, w, kept, cap, SMOOTH, SOFTCAP)
                tl.store(G + gb + cols * sg_n, g.to(G.dtype.element_ty), mask=cmask)
    loss = class_row_loss(lse, zt, wt, tl.sum(acc, 0), kept, eps, C, z_loss, dl, dz,
                          SMOOTH)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse.to(tl.float32))
    if WRITE_GRAD:
        tl.store(STATE + row, tl.full((), 1.0, ACC))
    if WRITE_HIT:
        tl.store(HIT + row, (kept & inside & (zt >= m)).to(tl.int8))


# ----------------------------------------------------------------------------
# Probability targets
# ----------------------------------------------------------------------------


@triton.jit
def prob_target(Y, W, offs, mask, cols, cmask, eps, C, HAS_WEIGHT: tl.constexpr,
                ACC: tl.constexpr):
    """Effective target w_c ((1 - eps) p_c + eps / C); 0 on masked lanes."""
    p = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
    y = tl.where(mask, (1.0 - eps) * p + eps / C, 0.0)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        y = y * w
    return y


@triton.jit(do_not_specialize=_SCALARS)
def ce_prob_single_kernel(
    X,  # logits base pointer
    Y,  # probability targets base pointer (the logits' shape, any float dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by den_rows
    LSE,  # [M] fp32: row log-sum-exp
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    M,  # number of rows
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # target strides
    sg_o, sg_n, sg_i,  # gradient strides
    den_rows,  # denominator of every row: M for the mean, else 1
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
    inv = 1.0 / (tl.zeros((), ACC) + den_rows)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    z = load_logits(X, xb[:, None] + cols[None, :] * sx_n, mask, cap, SOFTCAP, ACC)
    y = prob_target(Y, W, yb[:, None] + cols[None, :] * sy_n, mask, cols[None, :],
                    cmask[None, :], eps, C, HAS_WEIGHT, ACC)
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    d = tl.sum(e, 1)
    lse = m + tl.log(d)
    loss = tl.sum(tl.where(mask, y * (lse[:, None] - z), 0.0), 1)
    tl.store(LOSS + rows, (loss + z_loss * lse * lse) * inv, mask=rmask)
    tl.store(LSE + rows, lse.to(tl.float32), mask=rmask)
    if WRITE_GRAD:
        gs = scalar_arg(gs_hi, gs_lo, ACC)
        a = (tl.sum(y, 1) + 2.0 * z_loss * lse) * (inv * gs)
        g = (e * (1.0 / d)[:, None]) * a[:, None] - y * (inv * gs)
        g = softcap_grad(g, z, cap, SOFTCAP)
        gb = row_base(rows, INNER, sg_o, sg_i)
        tl.store(G + gb[:, None] + cols[None, :] * sg_n, g.to(G.dtype.element_ty), mask=mask)
        tl.store(STATE + rows, tl.full((ROWS,), 1.0, ACC), mask=rmask)


@triton.jit(do_not_specialize=_SCALARS)
def ce_prob_looped_kernel(
    X,  # logits base pointer
    Y,  # probability targets base pointer (the logits' shape, any float dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    G,  # gradient base pointer; may be X itself (written when WRITE_GRAD)
    LOSS,  # [M] ACC: row losses, already divided by den_rows
    LSE,  # [M] fp32: row log-sum-exp
    STATE,  # [M] ACC: factor applied to each gradient row so far, set to 1 (WRITE_GRAD)
    C,  # number of classes (row length)
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # logits strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # target strides
    sg_o, sg_n, sg_i,  # gradient strides
    den_rows,  # denominator of every row: M for the mean, else 1
    eps_hi, eps_lo,  # label smoothing (f64_parts)
    zl_hi, zl_lo,  # z-loss coefficient
    cap_hi, cap_lo,  # softcap (used when SOFTCAP)
    gs_hi, gs_lo,  # grad_scale: extra factor on the gradient
    HAS_WEIGHT: tl.constexpr,  # class weights given
    SOFTCAP: tl.constexpr,  # z = cap * tanh(x / cap) first
    WRITE_GRAD: tl.constexpr,  # write the gradient to G
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    z_loss = scalar_arg(zl_hi, zl_lo, ACC)
    cap = scalar_arg(cap_hi, cap_lo, ACC)
    inv = 1.0 / (tl.zeros((), ACC) + den_rows)
    row = tl.program_id(0).to(tl.int64)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    a = tl.zeros((), ACC)
    if WRITE_GRAD:
        # sum_c y_c: the gradient's coefficient of sigma, needed before any tile is written
        sy = tl.zeros((BLOCK_N,), ACC)
        for off in range(0, C, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < C
            sy += prob_target(Y, W, yb + cols * sy_n, cmask, cols, cmask, eps, C, HAS_WEIGHT, ACC)
        a = tl.sum(sy, 0)
    _, lse = row_lse(X, xb, sx_n, C, cap, SOFTCAP, ACC, BLOCK_N)
    if WRITE_GRAD:
        gs = scalar_arg(gs_hi, gs_lo, ACC)
        a = (a + 2.0 * z_loss * lse) * (inv * gs)
    acc = tl.zeros((BLOCK_N,), ACC)
    for off in range(0, C, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < C
        z = load_logits(X, xb + cols * sx_n, cmask, cap, SOFTCAP, ACC)
        y = prob_target(Y, W, yb + cols * sy_n, cmask, cols, cmask, eps, C, HAS_WEIGHT, ACC)
        acc += tl.where(cmask, y * (lse - z), 0.0)
        if WRITE_GRAD:
            g = tl.exp(z - lse) * a - y * (inv * gs)
            g = softcap_grad(g, z, cap, SOFTCAP)
            tl.store(G + gb + cols * sg_n, g.to(G.dtype.element_ty), mask=cmask)
    tl.store(LOSS + row, (tl.sum(acc, 0) + z_loss * lse * lse) * inv)
    tl.store(LSE + row, lse.to(tl.float32))
    if WRITE_GRAD:
        tl.store(STATE + row, tl.full((), 1.0, ACC))


# ----------------------------------------------------------------------------
# Backward: rescale the saved gradient by grad_output
# ----------------------------------------------------------------------------


@triton.jit
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
    IN_PLACE: tl.constexpr,  # rescale G in place, skipping rows whose factor is right
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width (>= C when ROWS > 1)
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < M
    go = tl.load(GO + rows * s_go, mask=rmask, other=1.0).to(ACC)
    done = tl.load(STATE + rows, mask=rmask, other=1.0)
    if IN_PLACE:
        todo = rmask & (go != done)
        if tl.max(todo.to(tl.int32), 0) == 0:
            return  # every row already holds grad_output times its gradient
        tl.store(STATE + rows, go, mask=todo)
    else:
        todo = rmask
    factor = go / done
    gb = row_base(rows, INNER, sg_o, sg_i)
    ob = row_base(rows, INNER, so_o, so_i)
    for off in range(0, C, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = todo[:, None] & (cols < C)[None, :]
        g = tl.load(G + gb[:, None] + cols[None, :] * sg_n, mask=mask, other=0.0).to(ACC)
        tl.store(OUT + ob[:, None] + cols[None, :] * so_n, (g * factor[:, None]).to(OUT.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------
# The mean's denominators, on the device (no host sync, no torch ops)
# ----------------------------------------------------------------------------


@triton.jit
def ce_denominators_kernel(
    T,  # [M] class-index targets (any integer dtype)
    W,  # [C] class weights in ACC (read when HAS_WEIGHT)
    DEN,  # [3] ACC out: sum of w_t over kept rows, kept rows, sum of all w (HAS_WEIGHT and SMOOTH)
    M,  # number of rows
    C,  # number of classes
    ignore_index,  # target value whose row is not counted
    HAS_WEIGHT: tl.constexpr,  # class weights given (else w_t = 1 on kept rows)
    SMOOTH: tl.constexpr,  # also write the sum of the class weights
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # rows (and classes) per step
):
    # One program: a fixed summation order, so the loss is the same run to run.
    count = tl.zeros((BLOCK,), ACC)
    wsum = tl.zeros((BLOCK,), ACC)
    for off in range(0, M, BLOCK):
        rows = off + tl.arange(0, BLOCK).to(tl.int64)
        inb = rows < M
        t = tl.load(T + rows, mask=inb, other=0).to(tl.int64)
        kept = inb & (t != ignore_index)
        count += kept.to(ACC)
        if HAS_WEIGHT:
            use = kept & (t >= 0) & (t < C)
            wsum += tl.load(W + t, mask=use, other=0.0).to(ACC)
    n = tl.sum(count, 0)
    if HAS_WEIGHT:
        tl.store(DEN, tl.sum(wsum, 0))
    else:
        tl.store(DEN, n)
    tl.store(DEN + 1, n)
    if HAS_WEIGHT and SMOOTH:
        sw = tl.zeros((BLOCK,), ACC)
        for off in range(0, C, BLOCK):
            cols = off + tl.arange(0, BLOCK).to(tl.int64)
            sw += tl.load(W + cols, mask=cols < C, other=0.0).to(ACC)
        tl.store(DEN + 2, tl.sum(sw, 0))


# ----------------------------------------------------------------------------
# Gradient of the returned lse: d lse / d x_c = sigma_c (times the softcap's derivative)
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["cap_hi", "cap_lo"])
def ce_lse_grad_kernel(
    X,  # logits base pointer
    LSE,  # [M] fp32 row log-sum-exp from the forward
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
    lse = tl.load(LSE + rows, mask=rmask, other=0.0).to(ACC)
    dl = tl.load(DLSE + rows * s_dlse, mask=rmask, other=0.0).to(ACC)
    xb = row_base(rows, INNER, sx_o, sx_i)
    ob = row_base(rows, INNER, so_o, so_i)
    for off in range(0, C, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        z = load_logits(X, xb[:, None] + cols[None, :] * sx_n, mask, cap, SOFTCAP, ACC)
        g = softcap_grad(tl.exp(z - lse[:, None]) * dl[:, None], z, cap, SOFTCAP)
        tl.store(OUT + ob[:, None] + cols[None, :] * so_n, g.to(OUT.dtype.element_ty), mask=mask)


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
                   grad_scale, has_weight, write_grad, dtype, cfg, write_hit=False):
    """``launch(x, t, w, den, g, loss, lse, state, hit)`` for class-index
    targets ``t`` ([M], contiguous). Unused tensors (``w`` without weights,
    ``den`` unless ``use_den`` or weights with smoothing, ``g``/``state``
    unless ``write_grad``, ``hit`` unless ``write_hit``) may be any
    placeholder. ``hit`` [M] int8: 1 where the row is kept and its target is
    an argmax of the row (ties count), the token accuracy's numerator."""
    args = (M, C, inner, *x_strides, *g_strides, ignore_index, int(use_den),
            *_scalars(eps, z_loss, cap, grad_scale))
    meta = dict(HAS_WEIGHT=has_weight, SMOOTH=eps > 0, SOFTCAP=cap > 0, WRITE_GRAD=write_grad,
                WRITE_HIT=write_hit, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION)
    if cfg.path == "single":
        kernel = ce_class_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        meta["ROWS"] = cfg.rows_per_program
        names = ("ce_class_single_kernel",)
    else:
        kernel = ce_class_looped_kernel[(M,)]
        names = ("ce_class_looped_kernel",)

    def launch(x, t, w, den, g, loss, lse, state, hit):
        kernel(x, t, w, den, g, loss, lse, state, hit, *args, **meta)
        return names
    return launch


def prob_launcher(M, C, inner, x_strides, y_strides, g_strides, den_rows, eps, z_loss, cap,
                  grad_scale, has_weight, write_grad, dtype, cfg):
    """``launch(x, y, w, g, loss, lse, state)`` for probability targets ``y``
    (the logits' shape, its own strides)."""
    tail = (*x_strides, *y_strides, *g_strides, den_rows, *_scalars(eps, z_loss, cap, grad_scale))
    meta = dict(HAS_WEIGHT=has_weight, SOFTCAP=cap > 0, WRITE_GRAD=write_grad,
                ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION)
    if cfg.path == "single":
        kernel = ce_prob_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        args = (M, C, inner, *tail)
        meta["ROWS"] = cfg.rows_per_program
        names = ("ce_prob_single_kernel",)
    else:
        kernel = ce_prob_looped_kernel[(M,)]
        args = (C, inner, *tail)
        names = ("ce_prob_looped_kernel",)

    def launch(x, y, w, g, loss, lse, state):
        kernel(x, y, w, g, loss, lse, state, *args, **meta)
        return names
    return launch


def denominators_launcher(M, C, ignore_index, has_weight, smooth, dtype):
    """``launch(t, w, den)``: den[0] <- sum of w_t over kept rows (the kept
    count without weights), den[1] <- the kept count, den[2] <- sum of w
    (with weights and smoothing)."""
    kernel = ce_denominators_kernel[(1,)]
    args = (M, C, ignore_index)
    meta = dict(HAS_WEIGHT=has_weight, SMOOTH=smooth, ACC=acc_dtype(dtype), BLOCK=1024,
                num_warps=4, enable_fp_fusion=FP_FUSION)
    names = ("ce_denominators_kernel",)

    def launch(t, w, den):
        kernel(t, w, den, *args, **meta)
        return names
    return launch


def grad_scale_launcher(M, C, inner, g_strides, o_strides, in_place, dtype, cfg):
    """``launch(g, out, state, go, s_go)``: out[row] = g[row] * go[row] / state[row].
    ``in_place`` (out is g): rows whose factor is already right are untouched
    and state <- go; else every row of ``out`` is written and state is left
    alone. ``s_go``: grad_output's stride (0 for one value for every row)."""
    kernel = ce_grad_scale_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
    args = (M, C, inner, *g_strides, *o_strides)
    meta = dict(IN_PLACE=in_place, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n,
                ROWS=cfg.rows_per_program, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION)
    names = ("ce_grad_scale_kernel",)

    def launch(g, out, state, go, s_go):
        kernel(g, out, state, go, *args, s_go, **meta)
        return names
    return launch


def lse_grad_launcher(M, C, inner, x_strides, o_strides, cap, dtype, cfg):
    """``launch(x, lse, dlse, out, s_dlse)``: out <- sigma(x) * dlse per row
    (through the softcap when ``cap`` > 0)."""
    kernel = ce_lse_grad_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
    args = (M, C, inner, *x_strides, *o_strides)
    meta = dict(SOFTCAP=cap > 0, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n,
                ROWS=cfg.rows_per_program, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION)
    scal = f64_parts(cap)
    names = ("ce_lse_grad_kernel",)

    def launch(x, lse, dlse, out, s_dlse):
        kernel(x, lse, dlse, out, *args, s_dlse, *scal, **meta)
        return names
    return launch
