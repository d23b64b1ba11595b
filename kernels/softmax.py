"""Softmax and log-softmax, forward and backward, in Triton.

Every kernel sees its tensors as a batch of rows laid out as [OUTER, N, INNER]:
row r starts at (r // INNER) * stride_outer + (r % INNER) * stride_inner and
its N elements are stride_n apart. A reduction over the last dim is INNER = 1
(Triton specialises the 1, so the division disappears); a reduction over an
inner dim of a contiguous tensor is read in place with stride_n = INNER.
Element offsets are int64; column indices and their compares are int32 (a row
is shorter than 2^31: the host checks).

Paths (chosen by ``softmax_gpu.softmax.softmax_config``):
- single: the row fits in one tile; ROWS rows per program; 1 read + 1 write.
- looped: an online (max, sum) pass, then a normalise pass; 2 reads + 1
  write. A program walks rows pid, pid + G, ... (G programs): G = M is one
  program per row; a persistent grid (G = programs per SM x SMs) keeps the
  rows in flight between a row's two reads, G x row bytes, inside L2, so that
  the second read is served from L2.
- split: a row is cut into chunks across programs; each writes its partial
  (max, sum), then every program merges its row's partials with the same
  associative combine and normalises its chunk. Two launches.
- coop: one persistent launch in which a row is cut into SPLITS chunks that
  different programs handle; the first pass of a chunk publishes its partial
  (max, sum) in global memory, the second pass of a chunk waits for all of
  its row's partials, merges them and normalises the chunk. The work is
  dealt out by a ticket counter in an order where every first pass of a row
  precedes (has a smaller ticket than) any second pass of that row, so a
  waiting program only waits for programs that are already running and never
  wait themselves: no deadlock whatever the number of resident programs (see
  ``coop_item``). Chunks in flight x chunk bytes stay inside L2.
- resident: a row is cut into chunks of BLOCK_N columns, one program each,
  every chunk held in registers from its read to its write (1 read + 1
  write at any row length); a row's programs exchange their partials
  through global memory and meet at one int64 word per row
  (``resident_meet``). A program that waits too long leaves its chunk to the
  row's last arrival, which reads that chunk again: no deadlock, whether or
  not a row's programs are resident at once.

Eviction hints (EVICT): the first read of a two-read path marks its lines
evict_last (kept in L2 for the second read), the second read and the stores
evict_first (streamed).

The normaliser: a row's state is (max m, r = sum_c e^(x_c - m) - 1), formed
without ever adding the max's own term 1 (the elements equal to the max are
counted instead; ``tile_state``, ``online_update``), so r keeps its own
precision when it is small, as in a confident row, and log(sum) =
log1p(r) (``log1p_acc``). Every exponential is e^(x - m) as 2^((x - m)
log2 e), the difference first: the max gives exactly 1, log-softmax is (x -
m) - log1p(r) (exactly 0 for a one-element row) and the cross-entropy of a
confident token is log1p(r) to a few ulp. States merge associatively
(``online_combine``) across tiles, chunks and programs. Lean loops: a tile
whose max stays below the running max costs per element one subtract, one
multiply, one exp2 and one add; a multiply by 1/sum instead of a division;
whole tiles unmasked, the last partial tile masked; rows that are
unit-stride but not 16-byte aligned (a row length or stride not a multiple
of 16 bytes, e.g. 50257 bf16 columns: VEC > 1) are walked as a head of fewer
than VEC columns up to the first 16-byte boundary, an aligned body read 16
bytes at a time, and a tail.

Arithmetic is fp32 (fp64 for fp64 tensors: ACC), cast to the output dtype on
store. Masked lanes load -inf, so a row that is entirely -inf gives NaN, as in
torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")

# FMA contraction (Triton's ``enable_fp_fusion``), passed to every launch of
# every kernel because Triton 3.10 turns its default off. On: ``a * b + c``
# compiles to one FFMA (DFMA), which is fewer instructions in the inner loops
# and is the correctly rounded a * b + c, so never less accurate than the
# separate multiply and add. Triton's interpreter (the CPU test runs)
# ignores the option: numpy rounds every step.
FP_FUSION = True

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

# Eviction policy of a load or store (the P argument of load_p / store_p).
P_NORMAL = tl.constexpr(0)
P_KEEP = tl.constexpr(1)  # evict_last: read again soon (the first of two reads)
P_STREAM = tl.constexpr(2)  # evict_first: not needed again (second read, stores)


# ----------------------------------------------------------------------------
# Shared jit helpers (also used by the cross-entropy and vocab-parallel kernels)
# ----------------------------------------------------------------------------


@triton.jit
def load_p(ptr, mask, other, P: tl.constexpr):
    """tl.load with eviction policy P (P_NORMAL, P_KEEP or P_STREAM)."""
    if P == 1:
        return tl.load(ptr, mask=mask, other=other, eviction_policy="evict_last")
    elif P == 2:
        return tl.load(ptr, mask=mask, other=other, eviction_policy="evict_first")
    else:
        return tl.load(ptr, mask=mask, other=other)


@triton.jit
def store_p(ptr, value, mask, P: tl.constexpr):
    """tl.store with eviction policy P (P_STREAM: evict_first)."""
    if P == 2:
        tl.store(ptr, value, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def finite_max(m):
    """The shift a row's terms are taken relative to: its max m, or 0 where m
    is -inf (an empty or all -inf row, whose terms are then all 0)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def exp_rel(x, s):
    """e^(x - s) as 2^((x - s) log2 e): the difference first, so that the
    element equal to the shift gives exactly 2^0 = 1."""
    return tl.exp2((x - s) * LOG2E)


@triton.jit
def log1p_acc(r):
    """log(1 + r) for r >= -1, accurate to a few ulp of the result also for
    |r| << 1: below |r| = 1/16 (fp64: 1/64) the alternating series through
    r^8 (fp64: r^10), truncation under 2^-31 (fp64 2^-62) relative; above,
    log(1 + r), where 1 + r loses at most r's last bit. log1p(0) = 0,
    log1p(-1) = -inf."""
    if r.dtype == tl.float64:
        small = tl.abs(r) < 0.015625
        p = 1.0 / 10.0 - r * (1.0 / 11.0)
        p = 1.0 / 9.0 - r * p
        p = 1.0 / 8.0 - r * p
    else:
        small = tl.abs(r) < 0.0625
        p = 1.0 / 8.0 - r * (1.0 / 9.0)
    p = 1.0 / 7.0 - r * p
    p = 1.0 / 6.0 - r * p
    p = 1.0 / 5.0 - r * p
    p = 1.0 / 4.0 - r * p
    p = 1.0 / 3.0 - r * p
    p = 0.5 - r * p
    series = r - (r * r) * p
    return tl.where(small, series, tl.log(1.0 + r))


@triton.jit
def online_combine(m_a, r_a, m_b, r_b):
    """Associative merge of two online-softmax states (max m, r = sum of
    e^(x - m) over the row minus 1; r = -1 for an empty state): the side
    with the larger max keeps its r and gains the other side's whole sum
    rescaled, (1 + r) e^(m_other - m) (a tie: the other max's 1 too). Never
    1 + (small): r keeps its own precision."""
    m = tl.maximum(m_a, m_b)
    s = finite_max(m)
    a = tl.where(m_a == float("-inf"), 0.0, exp_rel(m_a, s))
    b = tl.where(m_b == float("-inf"), 0.0, exp_rel(m_b, s))
    return m, tl.where(m_a >= m_b, r_a + (1.0 + r_b) * b, r_b + (1.0 + r_a) * a)


@triton.jit
def row_base(rows, INNER, s_outer, s_inner):
    """Element offset (int64) of column 0 of each of ``rows`` (int64)."""
    return (rows // INNER) * s_outer + (rows % INNER) * s_inner


@triton.jit
def tile_state(x, AXIS: tl.constexpr, FROM_E: tl.constexpr = False):
    """The state of whole rows held in one tile, reduced along AXIS: (m, r, e)
    with m the max, e = e^(x - m) (0 where x is -inf) and r = sum(e) - 1
    formed without that 1: the terms equal to the max are left out of the
    sum and counted instead, so r keeps its own precision when it is small
    (a confident row) and log(sum e) = log1p(r). An all -inf row: m = -inf,
    r = -1; a row holding +inf: r = NaN (its term inf - inf), as torch.

    FROM_E: the terms counted are those with e == 1 exactly (the maxima, and
    any term that rounds to 1, whose 1 is then counted rather than summed:
    the same r), so that x is dead once e is formed: fewer registers where a
    thread holds many values under a tight budget (the log-softmax forward's
    ``LEAN`` rows: bf16 32768 on 32 warps fits 64 registers, 16 B of spill
    without), more elsewhere (its 4096 rows: 48 -> 56; python -m
    perf.static)."""
    m = tl.max(x, AXIS)
    s = finite_max(tl.expand_dims(m, AXIS))
    e = exp_rel(x, s)
    # the maxima: a difference of exactly 0 (x == m, finite; an -inf row's
    # -inf and a +inf's NaN are not), one compare per element
    if FROM_E:
        top = e == 1.0
    else:
        top = (x - s) == 0.0
    # the terms below the max, and the count of maxima (two plain sums: a
    # tuple reduction costs no fewer shuffles, and runs per element in Python
    # in the interpreter)
    rest = tl.sum(tl.where(top, 0.0, e), AXIS)
    count = tl.sum(tl.where(top, 1.0, 0.0).to(e.dtype), AXIS)
    return m, rest + (count - 1.0), e


@triton.jit
def online_update(m, t, c, q, x):
    """Fold tile ``x`` into the running state of a row: scalar max ``m``,
    per-lane sums ``t`` of the terms e^(x - m) below the max, the count ``c``
    of elements equal to m and the scalar sum ``q`` of earlier maxima's terms
    (the state's r is sum(t) + q + c - 1, see ``online_finish``).

    A tile whose max stays below m (most of them) costs per element one
    subtract, one multiply, one exp2 and one add; a tile that reaches the
    max rescales t and q by e^(m_old - m_new) (exactly 1 on a tie), leaves
    its elements equal to the max out of t and counts them."""
    tm = tl.max(x, 0)
    if tm < m:
        t += exp_rel(x, m)
    else:
        s = finite_max(tm)
        alpha = tl.where(m == float("-inf"), 0.0, exp_rel(m, s))
        top = (x == tm) & (tl.abs(x) < float("inf"))
        k = tl.sum(top.to(t.dtype), 0)
        t = t * alpha + tl.where(top, 0.0, exp_rel(x, s))
        moved = tm > m
        q = q * alpha + tl.where(moved, c * alpha, 0.0)
        c = tl.where(moved, k, c + k)
        m = tl.maximum(m, tm)
    return m, t, c, q


@triton.jit
def online_sum_update(m, d, x):
    """The plain online update of a running (scalar max ``m``, per-lane sums
    ``d`` of e^(x - m)) by tile ``x``: the sums keep the max's 1 (for
    statistics that only need the sum itself, such as a vocabulary shard's,
    merged by the caller). e^(x - m) is exactly 1 at the max."""
    m_new = tl.maximum(m, tl.max(x, 0))
    s = finite_max(m_new)
    alpha = tl.where(m == float("-inf"), 0.0, exp_rel(m, s))
    return m_new, d * alpha + exp_rel(x, s)


@triton.jit
def online_finish(t, c, q):
    """r = sum(e^(x - m)) - 1 of a running state (``online_update``); -1 when empty."""
    return tl.sum(t, 0) + q + (c - 1.0)


@triton.jit
def lse_of(m, r):
    """log-sum-exp of a row from its state (max m, r = sum e^(x - m) - 1)."""
    return m + log1p_acc(r)


@triton.jit
def softcap_tanh(x, cap):
    """cap * tanh(x / cap), accurate to a few ulp at every cap; saturates to
    +-cap (also for +-inf).

    For |u| = |x / cap| < 1/2 (fp64: 1/8): x + x * u^2 * P(u^2), P the odd
    Taylor series of tanh through u^17 (truncation below 2^-30, fp64 2^-66,
    relative): the leading term is x itself, exact, and the rounding of
    1 / cap only reaches the correction, at most u^2 / 3 of it. Above:
    cap * (1 - q) / (1 + q) with q = e^(-2|u|) <= e^-1 (fp64 e^-1/4), which
    has little cancellation. (1 - 2 / (e^(2u) + 1), the former formula, lost
    digits as u -> 0, i.e. at large caps.)"""
    u = x * recip(cap)
    a = tl.abs(u)
    if u.dtype == tl.float64:
        small = a < 0.125
    else:
        small = a < 0.5
    u2 = u * u
    # tanh(u) = u + u^3 * P(u^2), P's coefficients the Taylor series' own
    p = -1.4558343870513183e-03 + u2 * 5.9002744094558595e-04
    p = 3.5921280365724810e-03 + u2 * p
    p = -8.8632355299021966e-03 + u2 * p
    p = 2.1869488536155203e-02 + u2 * p
    p = -5.3968253968253971e-02 + u2 * p
    p = 1.3333333333333333e-01 + u2 * p
    p = -3.3333333333333333e-01 + u2 * p
    z_small = x + (x * u2) * p
    q = tl.exp2(a * (-2.0 * LOG2E))
    t_big = (1.0 - q) * recip(1.0 + q)
    z_big = cap * tl.where(u < 0, -t_big, t_big)
    return tl.where(small, z_small, z_big)


@triton.jit
def recip(d):
    """1 / d for d > 0 in fp32's normal range (or 0, inf, NaN). fp64 without a division: an fp64
    division compiles to a subroutine call, around which ptxas keeps values
    on the stack (in the row loops of the persistent kernels, spills); an
    fp32 reciprocal refined by two Newton steps (relative error 2^-22,
    2^-44, then fp64 rounding), d clamped to 2^120 first (fp32 range), which
    moves 1 / d by less than 2^-119. fp32: 1.0 / d."""
    if d.dtype == tl.float64:
        d = tl.where(d > 1.329227995784916e36, 1.329227995784916e36, d)
        r = (1.0 / d.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - d * r)
        return r * (2.0 - d * r)
    return 1.0 / d


@triton.jit
def recip_rn(d):
    """1 / d for per-row and per-launch factors, where its cost does not
    count: fp32 correctly rounded (``div.rn``; ``recip``'s fp32 ``1.0 / d`` is
    the 2-ulp ``div.full``, kept for per-element use); fp64 within 2 ulp
    over fp64's whole range: ``recip`` (no fp64 division: its subroutine call
    makes ptxas spill around it) of d scaled by a power of two into [1, 4)
    (exact, from d's exponent bits), scaled back, so that a denominator
    outside fp32's range (class weights or a divisor below 1e-38) keeps its
    digits and sign; 1 / 0 = inf, 1 / inf = 0, NaN stays NaN."""
    if d.dtype == tl.float64:
        e = (d.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        scale = (tl.minimum(tl.maximum(2046 - e, 1), 2046) << 52).to(tl.float64, bitcast=True)
        out = recip(d * scale) * scale
        out = tl.where(d == 0.0, float("inf"), tl.where(tl.abs(d) == float("inf"), 0.0, out))
    else:
        out = tl.div_rn(1.0, d)
    return out


@triton.jit
def load_logits(X, offs, mask, cap, SOFTCAP: tl.constexpr, ACC: tl.constexpr,
                P: tl.constexpr = 0):
    """Logits at X + offs in ACC, softcapped when SOFTCAP; masked lanes are -inf.
    P: eviction policy (P_NORMAL, P_KEEP, P_STREAM)."""
    z = load_p(X + offs, mask, float("-inf"), P).to(ACC)
    if SOFTCAP:
        z = tl.where(mask, softcap_tanh(z, cap), float("-inf"))
    return z


# ----------------------------------------------------------------------------
# Walking a row (or a chunk of it) tile by tile
# ----------------------------------------------------------------------------


@triton.jit
def vec_segment(base, start, end, VEC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pieces of columns [start, end) of a row whose column 0 is at element
    offset ``base``: (a, body_end, vec_end) with a head [start, a) of fewer
    than VEC columns up to the first multiple of VEC elements (16 bytes),
    whole tiles [a, body_end), one partial tile of whole vectors
    [body_end, vec_end) and a tail [vec_end, end) of fewer than VEC columns.
    VEC > 1 only for unit-stride rows; VEC = 1: no head, no tail."""
    if VEC > 1:
        a = tl.minimum(start + (VEC - (base + start) % VEC) % VEC, end)
        vec_end = a + (end - a) // VEC * VEC
    else:
        a = start
        vec_end = end
    body_end = a + (vec_end - a) // BLOCK_N * BLOCK_N
    return a, body_end, vec_end


@triton.jit
def tile_offsets(base, off, cols, s_n, VEC: tl.constexpr):
    """Element offsets (int64) of columns off + cols (cols: int32 arange) of a
    row at ``base``; VEC > 1: unit stride and base + off a multiple of VEC
    (the 16-byte alignment hint that vectorises an unaligned row's body)."""
    if VEC > 1:
        return tl.multiple_of(base + off, VEC) + cols
    return base + (off + cols).to(tl.int64) * s_n


@triton.jit
def partial_mask(cols, n, VEC: tl.constexpr):
    """cols < n for the last partial tile, n a multiple of VEC (int32 compare)."""
    return cols < tl.multiple_of(tl.cast(n, tl.int32), VEC)


@triton.jit
def edge_columns(start, a, vec_end, end, VEC: tl.constexpr):
    """The head [start, a) and the tail [vec_end, end) of ``vec_segment`` (each
    fewer than VEC columns) as one 2*VEC-lane tensor of columns and its mask."""
    j = tl.arange(0, 2 * VEC)
    head = j < VEC
    cols = tl.where(head, start + j, vec_end + (j - VEC))
    mask = tl.where(head, j < tl.cast(a - start, tl.int32),
                    j - VEC < tl.cast(end - vec_end, tl.int32))
    return cols, mask


@triton.jit
def online_stats(X, base, s_n, start, end, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                 VEC: tl.constexpr = 1, P: tl.constexpr = 0, cap=1.0,
                 SOFTCAP: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """The state (max m, r = sum e^(x - m) - 1) of X[base + c*s_n] for c in
    [start, end) (``online_update``; m = -inf, r = -1 when empty).

    One tile max per step; per element of a tile below the running max one
    subtract, one multiply, one exp2 and one add into per-lane sums. Whole
    tiles are read unmasked; VEC > 1 (unit-stride rows): the head and tail of
    ``vec_segment`` first, then an aligned body. P: eviction policy of the
    loads; SOFTCAP: the state of cap * tanh(x / cap); STAGES: tiles in flight
    (``tile_loop``)."""
    cols = tl.arange(0, BLOCK_N)
    a, body_end, vec_end = vec_segment(base, start, end, VEC, BLOCK_N)
    m = tl.full((), float("-inf"), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    c = tl.zeros((), ACC)
    q = tl.zeros((), ACC)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a, vec_end, end, VEC)
        xe = load_logits(X, base + e_cols, e_mask, cap, SOFTCAP, ACC, P)
        m, te, c, q = online_update(m, tl.zeros((2 * VEC,), ACC), c, q, xe)
        q += tl.sum(te, 0)
    for off in tl.range(a, body_end, BLOCK_N, num_stages=STAGES):
        x = load_logits(X, tile_offsets(base, off, cols, s_n, VEC), cols < BLOCK_N, cap,
                        SOFTCAP, ACC, P)
        m, t, c, q = online_update(m, t, c, q, x)
    if body_end < vec_end:
        x = load_logits(X, tile_offsets(base, body_end, cols, s_n, VEC),
                        partial_mask(cols, vec_end - body_end, VEC), cap, SOFTCAP, ACC, P)
        m, t, c, q = online_update(m, t, c, q, x)
    return m, online_finish(t, c, q)


@triton.jit
def normalize_tile(X, Y, xo, yo, mask, s, inv, l1p, LOG: tl.constexpr, ACC: tl.constexpr,
                   P: tl.constexpr):
    """Y[yo] = softmax e^(x - s) * inv or log-softmax (x - s) - l1p of X[xo]
    (s the row's finite max, inv = 1 / sum, l1p = log of the sum)."""
    x = load_p(X + xo, mask, 0.0, P).to(ACC)
    if LOG:
        y = (x - s) - l1p
    else:
        y = exp_rel(x, s) * inv
    store_p(Y + yo, y.to(Y.dtype.element_ty), mask, P)


@triton.jit
def normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, r,
                    LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                    VEC: tl.constexpr = 1, P: tl.constexpr = 0, STAGES: tl.constexpr = 1):
    """Y[c] = softmax (or log-softmax) of X[c] for c in [start, end), given the
    row's state (m, r). VEC > 1: X and Y rows congruent modulo VEC (same head)."""
    s = finite_max(m)
    l1p = log1p_acc(r) + (s - m)  # an all -inf row (m = -inf): NaN, as torch
    normalize_span(X, Y, xb, yb, sx_n, sy_n, start, end, s, recip_rn(1.0 + r), l1p, LOG, ACC,
                   BLOCK_N, VEC, P, STAGES)


@triton.jit
def normalize_span(X, Y, xb, yb, sx_n, sy_n, start, end, s, inv, l1p,
                   LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                   VEC: tl.constexpr = 1, P: tl.constexpr = 0, STAGES: tl.constexpr = 1):
    """``normalize_tile`` over columns [start, end): Y = e^(X - s) * inv, or
    (LOG) (X - s) - l1p."""
    cols = tl.arange(0, BLOCK_N)
    a, body_end, vec_end = vec_segment(xb, start, end, VEC, BLOCK_N)
    for off in tl.range(a, body_end, BLOCK_N, num_stages=STAGES):
        normalize_tile(X, Y, tile_offsets(xb, off, cols, sx_n, VEC),
                       tile_offsets(yb, off, cols, sy_n, VEC), cols < BLOCK_N, s, inv, l1p,
                       LOG, ACC, P)
    if body_end < vec_end:
        normalize_tile(X, Y, tile_offsets(xb, body_end, cols, sx_n, VEC),
                       tile_offsets(yb, body_end, cols, sy_n, VEC),
                       partial_mask(cols, vec_end - body_end, VEC), s, inv, l1p, LOG, ACC, P)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a, vec_end, end, VEC)
        normalize_tile(X, Y, xb + e_cols, yb + e_cols, e_mask, s, inv, l1p, LOG, ACC, P)


# ----------------------------------------------------------------------------
# The cooperative path: work tickets, partials exchanged through global memory
# ----------------------------------------------------------------------------


@triton.jit
def coop_item(ticket, n, LAG):
    """(second, item) of work ticket ``ticket`` of a cooperative launch over
    ``n`` chunk items (item = row * SPLITS + chunk): ``second`` is whether it
    is the item's second pass.

    Order: the first passes of items 0 .. LAG-1, then alternately the first
    pass of item LAG + i and the second pass of item i, then the remaining
    second passes. With LAG >= SPLITS - 1, every first pass of a row's items
    has a smaller ticket than any second pass of that row. Tickets are taken
    by running programs in increasing order, and a first pass never waits,
    so a program that waits (a second pass) waits only for first passes held
    by programs that are running and will finish: the launch cannot deadlock,
    whatever the number of programs resident at once (one suffices; Triton's
    interpreter runs them one after the other). LAG of about half the grid
    makes the wait rare (the first passes a second pass needs were dealt out
    a grid's worth of tickets before it)."""
    lag = tl.minimum(LAG, n)
    mid = 2 * n - lag
    u = ticket - lag
    second = (ticket >= mid) | ((ticket >= lag) & (u % 2 == 1))
    item = tl.where(ticket < lag, ticket,
                    tl.where(ticket >= mid, ticket - n,
                             tl.where(u % 2 == 0, lag + u // 2, u // 2)))
    return second, item


@triton.jit
def coop_place(ticket, n, LAG, SPLITS, CHUNK, N):
    """(second, item, row, start, end) of a ticket (``coop_item``): the pass,
    the chunk item, its row (int64) and its columns [start, end). int32
    arithmetic (n < 2^31 items): a 64-bit division is a subroutine call."""
    second, item = coop_item(ticket, n, LAG)
    row = item // SPLITS
    start = (item - row * SPLITS) * CHUNK
    return second, item, row.to(tl.int64), start, tl.minimum(start.to(tl.int64) + CHUNK, N)


@triton.jit
def arrive(WORD):
    """Add 1 to the int32 counter at WORD and return its value before. The CTA
    barrier and the release make this program's earlier global writes (its
    partials) visible to whoever acquires the count; the acquire side makes
    the other programs' partials visible to this one (read them with ``.cg``
    loads: L2, never a stale L1 line)."""
    tl.debug_barrier()
    old = tl.atomic_add(WORD, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return old


@triton.jit
def coop_arrive(SYNC, row):
    """Count one finished pass of ``row`` (SYNC[1 + row], ``arrive``) and
    return the count before it."""
    return arrive(SYNC + 1 + row)


@triton.jit
def coop_wait(SYNC, row, count):
    """Spin until ``count`` passes of ``row`` have arrived (acquire). The
    partials are then read with ``.cg`` loads (L2, never a stale L1 line)."""
    c = tl.atomic_add(SYNC + 1 + row, 0, sem="acquire", scope="gpu")
    while c < count:
        c = tl.atomic_add(SYNC + 1 + row, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


# Partials (of the split and cooperative paths) merged per step: any count in
# a loop, so no kernel is compiled for a worst-case width.
PARTIALS = tl.constexpr(32)


@triton.jit
def merge_partials(PM, PD, row, SPLITS, CG: tl.constexpr):
    """The merged state (max, r) of ``row`` from its SPLITS partial states
    PM / PD[row * SPLITS + k] (``online_combine``); CG: ``.cg`` loads
    (written by other programs of the same launch: never a stale L1 line)."""
    k = tl.arange(0, PARTIALS)
    m = tl.full((), float("-inf"), PM.dtype.element_ty)
    d = tl.full((), -1.0, PD.dtype.element_ty)
    for off in range(0, SPLITS, PARTIALS):
        ok = off + k < SPLITS
        at = row * SPLITS + off + k
        if CG:
            pm = tl.load(PM + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
            pd = tl.load(PD + at, mask=ok, other=-1.0, cache_modifier=".cg")
        else:
            pm = tl.load(PM + at, mask=ok, other=float("-inf"))
            pd = tl.load(PD + at, mask=ok, other=-1.0)
        mk, dk = tl.reduce((pm, pd), 0, online_combine)
        m, d = online_combine(m, d, mk, dk)
    return m, d


@triton.jit
def sum_partials(PS, row, SPLITS, CG: tl.constexpr):
    """sum_k PS[row * SPLITS + k] over the SPLITS partials (CG: ``.cg`` loads)."""
    k = tl.arange(0, PARTIALS)
    acc = tl.zeros((PARTIALS,), PS.dtype.element_ty)
    for off in range(0, SPLITS, PARTIALS):
        ok = off + k < SPLITS
        if CG:
            acc += tl.load(PS + row * SPLITS + off + k, mask=ok, other=0.0, cache_modifier=".cg")
        else:
            acc += tl.load(PS + row * SPLITS + off + k, mask=ok, other=0.0)
    return tl.sum(acc, 0)


# The resident path: a row cut into SPLITS chunks of BLOCK_N columns, one per
# program, each chunk held in registers from its read to its write (one HBM
# read and one write per element, whatever the row length). A row's programs
# meet at one int64 word: the arrivals are counted in its low RESIDENT_SHIFT
# bits, and chunk k that gave up waiting sets bit RESIDENT_SHIFT + k.
RESIDENT_SHIFT = tl.constexpr(16)
RESIDENT_COUNT = tl.constexpr((1 << 16) - 1)  # the arrivals' bits
# Chunks per row on the resident path (the meeting word's bits above the
# count, the sign bit left alone).
RESIDENT_MAX_SPLITS = 47
# Tile of the re-read of a chunk left to its row's last arrival: few
# registers beside those of the arrival's own chunk.
RESIDENT_TILE = tl.constexpr(2048)


@triton.jit
def resident_columns(base, k, N, VEC: tl.constexpr, BLOCK_N: tl.constexpr):
    """(c0, cols, mask) of chunk ``k`` of a row whose column 0 is at element
    offset ``base``: its columns c0 + cols, c0 = k * BLOCK_N - h, with h =
    base % VEC the row's elements before its first 16-byte boundary (0 for
    VEC 1), so that every chunk's columns start on a 16-byte boundary of the
    row (``tile_offsets(base, c0, cols, s_n, VEC)``); mask: the columns in
    [0, N). The host launches SPLITS = cdiv(N + h, BLOCK_N) chunks, h at
    most VEC - 1 (``resident_launch_splits``)."""
    if VEC > 1:
        c0 = k * BLOCK_N - (base % VEC).to(tl.int32)
    else:
        c0 = k * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    c = cols + c0
    return c0, cols, (c >= 0) & (c < N)


@triton.jit
def resident_span(j, k, c0, N, BLOCK_N: tl.constexpr):
    """Columns [start, end) of chunk ``j`` of the row whose chunk ``k`` starts
    at column c0 (``resident_columns``): what the row's last arrival reads
    again for a chunk left to it."""
    h = k * BLOCK_N - c0  # the row's columns before its first 16-byte boundary
    return tl.maximum(j * BLOCK_N - h, 0), tl.minimum((j + 1) * BLOCK_N - h, N)


@triton.jit
def chunk_factor(mk, s, f):
    """The factor that takes a chunk's e^(x - m_k) (its own max m_k, as
    ``tile_state`` forms it) to the row's e^(x - m) * f (s: the row's finite
    max): e^(m_k - m) * f, 0 for a chunk of -inf only. A chunk written from
    registers and one read again by its row's last arrival both use it, so
    which of them wrote it never shows in the bits."""
    return tl.where(mk == float("-inf"), 0.0, exp_rel(mk, s)) * f


@triton.jit
def chunk_shift(PM, row, j, SPLITS, s, f):
    """(s_j, factor) for chunk j of ``row`` written by another program than its
    own: its finite max from the partial maxima PM[row * SPLITS + j] and
    ``chunk_factor``, so that e^(x - s_j) * factor are the bits its program
    would have written."""
    mj = tl.load(PM + row * SPLITS + j, cache_modifier=".cg")
    return finite_max(mj), chunk_factor(mj, s, f)


@triton.jit
def resident_meet(SYNC, row, k, SPLITS, spin):
    """Chunk ``k``'s arrival at its row's meeting word SYNC[row] (int64, zero
    before the launch), once its partials are stored; then at most ``spin``
    polls for the row's other chunks. Returns (own, last, left):

    - own: this program writes its chunk from its registers (every partial
      of the row is then visible to it);
    - last: it arrived last: it writes the row's outputs, and also the chunks
      in ``left`` (bit j: chunk j gave up before this arrival), read again.

    A chunk gives up when no last arrival came within ``spin`` polls (its
    row's programs are not all resident at once; Triton's interpreter runs
    programs one after the other). It records that in the word; if the last
    arrival came first, that arrival did not see the bit, and the chunk is
    written by its own program after all. So no chunk is written twice or
    left out, and no program waits unboundedly. The CTA barriers and the
    acq_rel / acquire atomics publish and acquire the partials as
    ``coop_arrive`` / ``coop_wait`` do."""
    tl.debug_barrier()
    old = tl.atomic_add(SYNC + row, 1, sem="acq_rel", scope="gpu")
    count = RESIDENT_COUNT
    last = (old & count) == SPLITS - 1
    left = old >> RESIDENT_SHIFT
    own = last
    if not last:
        w = tl.atomic_add(SYNC + row, 0, sem="acquire", scope="gpu")
        polls = 0
        while ((w & count) < SPLITS) & (polls < spin):
            w = tl.atomic_add(SYNC + row, 0, sem="acquire", scope="gpu")
            polls += 1
        if (w & count) < SPLITS:
            gave_up = tl.full((), 1, tl.int64) << (RESIDENT_SHIFT + k)
            w = tl.atomic_add(SYNC + row, gave_up, sem="acq_rel", scope="gpu")
        own = (w & count) >= SPLITS
    tl.debug_barrier()
    return own, last, left


# ----------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------


@triton.jit
def softmax_fwd_single_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index (1 when reducing the last dim)
    sx_o, sx_n, sx_i,  # input strides: outer, along the row, inner
    sy_o, sy_n, sy_i,  # output strides
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 input)
    BLOCK_N: tl.constexpr,  # power of two >= N
    ROWS: tl.constexpr,  # rows per program
    LEAN: tl.constexpr = False,  # a budget of 64 registers a thread (``lean_forms``)
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    x = tl.load(X + xb[:, None] + cols[None, :].to(tl.int64) * sx_n, mask=mask,
                other=float("-inf")).to(ACC)
    if LOG:
        # (x - m) - log1p(r): exactly 0 at the max of a one-element row
        m, r, e = tile_state(x, 1, LEAN)
        s = finite_max(m)
        y = (x - s[:, None]) - (log1p_acc(r) + (s - m))[:, None]
    else:
        m = tl.max(x, 1)
        e = exp_rel(x, finite_max(m)[:, None])
        y = e * recip_rn(tl.sum(e, 1))[:, None]
    tl.store(Y + yb[:, None] + cols[None, :].to(tl.int64) * sy_n, y.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def softmax_fwd_looped_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    M,  # number of rows (program pid takes rows pid, pid + G, ... of G programs)
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        xb = row_base(row, INNER, sx_o, sx_i)
        yb = row_base(row, INNER, sy_o, sy_i)
        m, r = online_stats(X, xb, sx_n, 0, N, ACC, BLOCK_N, VEC, 1 if EVICT else 0,
                            STAGES=STAGES)
        normalize_store(X, Y, xb, yb, sx_n, sy_n, 0, N, m, r, LOG, ACC, BLOCK_N, VEC,
                        2 if EVICT else 0, STAGES)


@triton.jit
def softmax_fwd_split_stats_kernel(
    X,  # input base pointer
    PM,  # [M, SPLITS] fp32/fp64 partial maxima
    PD,  # [M, SPLITS] partial r = sum of e^(x - max) - 1
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program (a multiple of BLOCK_N)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride rows (else 1)
    EVICT: tl.constexpr,  # evict_last on this (first) read
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    split = pid % SPLITS
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    xb = row_base(row, INNER, sx_o, sx_i)
    m, r = online_stats(X, xb, sx_n, start, end, ACC, BLOCK_N, VEC, 1 if EVICT else 0,
                        STAGES=STAGES)
    tl.store(PM + pid, m)
    tl.store(PD + pid, r)


@triton.jit
def softmax_fwd_split_norm_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    PM,  # [M, SPLITS] partial maxima from the stats kernel
    PD,  # [M, SPLITS] partial r (sum of e^(x - max) - 1)
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # evict_first on this (second) read and the stores
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    split = pid % SPLITS
    m, r = merge_partials(PM, PD, row, SPLITS, False)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, r, LOG, ACC, BLOCK_N, VEC,
                    2 if EVICT else 0, STAGES)


@triton.jit(do_not_specialize=["SPLITS", "LAG"])
def softmax_fwd_coop_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    WS,  # [2, M * SPLITS] ACC workspace: partial maxima, then partial r
    SYNC,  # [1 + M] int32, zero: SYNC[0] deals the tickets, SYNC[1 + row] counts partials
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    SPLITS,  # chunks per row (programs that share it)
    CHUNK,  # columns per chunk (a multiple of BLOCK_N)
    LAG,  # first passes dealt ahead of the second passes (>= SPLITS - 1)
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    n = M * SPLITS
    PD = WS + n
    ticket = tl.atomic_add(SYNC, 1)
    while ticket < 2 * n:
        second, item, row, start, end = coop_place(ticket, n, LAG, SPLITS, CHUNK, N)
        xb = row_base(row, INNER, sx_o, sx_i)
        if second:
            coop_wait(SYNC, row, SPLITS)
            m, r = merge_partials(WS, PD, row, SPLITS, True)
            yb = row_base(row, INNER, sy_o, sy_i)
            normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, r, LOG, ACC, BLOCK_N,
                            VEC, 2 if EVICT else 0, STAGES)
        else:
            m, r = online_stats(X, xb, sx_n, start, end, ACC, BLOCK_N, VEC, 1 if EVICT else 0,
                                STAGES=STAGES)
            tl.store(WS + item, m)
            tl.store(PD + item, r)
            coop_arrive(SYNC, row)
        ticket = tl.atomic_add(SYNC, 1)


@triton.jit(do_not_specialize=["SPLITS", "spin"])
def softmax_fwd_resident_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    WS,  # [2 * M * SPLITS + M] ACC workspace: partial maxima, then partial r
    SYNC,  # [M] int64, zero: each row's meeting word (resident_meet)
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    SPLITS,  # chunks per row (resident_launch_splits), at most RESIDENT_MAX_SPLITS
    spin,  # polls a chunk waits for its row's last chunk before leaving its write to it
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # columns per chunk (a power of two), held in registers
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
):
    """Program pid owns chunk pid % SPLITS of row pid // SPLITS: it reads the
    chunk into registers, publishes its (max, r), meets the row's other
    chunks (``resident_meet``) and writes the chunk's output from its
    registers; the row's last arrival also writes any chunk whose program
    gave up waiting, reading it again."""
    pid = tl.program_id(0)
    k = pid % SPLITS
    row = (pid // SPLITS).to(tl.int64)
    item = row * SPLITS + k
    PD = WS + M * SPLITS
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    c0, cols, cmask = resident_columns(xb, k, N, VEC, BLOCK_N)
    x = tl.load(X + tile_offsets(xb, c0, cols, sx_n, VEC), mask=cmask,
                other=float("-inf")).to(ACC)
    mk, rk, e = tile_state(x, 0)
    tl.store(WS + item, mk)
    tl.store(PD + item, rk)
    own, last, left = resident_meet(SYNC, row, k, SPLITS, spin)
    if own | last:
        m, r = merge_partials(WS, PD, row, SPLITS, True)
        if own:
            s = finite_max(m)
            if LOG:
                # (x - m) - log1p(r): exactly 0 at the max of a one-element row
                y = (x - s) - (log1p_acc(r) + (s - m))
            else:
                # e = e^(x - m_k): e^(x - m) / sum = e * e^(m_k - m) / (1 + r)
                y = e * chunk_factor(mk, s, recip_rn(1.0 + r))
            tl.store(Y + tile_offsets(yb, c0, cols, sy_n, VEC), y.to(Y.dtype.element_ty),
                     mask=cmask)
        if last:
            for j in range(0, SPLITS):
                if ((left >> j) & 1) != 0:
                    start, end = resident_span(j, k, c0, N, BLOCK_N)
                    if LOG:
                        normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, r, LOG, ACC,
                                        RESIDENT_TILE, VEC)
                    else:
                        # as chunk j's program would have
                        sj, fj = chunk_shift(WS, row, j, SPLITS, finite_max(m),
                                             recip_rn(1.0 + r))
                        normalize_span(X, Y, xb, yb, sx_n, sy_n, start, end, sj, fj, 0.0, LOG,
                                       ACC, RESIDENT_TILE, VEC)


# ----------------------------------------------------------------------------
# Backward: softmax  dx = y * (dy - sum(dy * y));  log-softmax  dx = dy - exp(y) * sum(dy)
# ----------------------------------------------------------------------------


@triton.jit
def bwd_terms(y, dy, LOG: tl.constexpr):
    """The per-element term whose row sum the backward needs."""
    if LOG:
        return dy
    else:
        return dy * y


@triton.jit
def bwd_value(y, dy, s, LOG: tl.constexpr):
    """dx from y, dy and the row sum s (broadcast by the caller)."""
    if LOG:
        return dy - tl.exp2(y * LOG2E) * s
    else:
        return y * (dy - s)


@triton.jit
def bwd_sum_tile(Y, DY, yo, go, mask, LOG: tl.constexpr, ACC: tl.constexpr, P: tl.constexpr):
    y = load_p(Y + yo, mask, 0.0, P).to(ACC)
    dy = load_p(DY + go, mask, 0.0, P).to(ACC)
    return bwd_terms(y, dy, LOG)


@triton.jit
def bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, start, end, LOG: tl.constexpr,
                ACC: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr = 1,
                P: tl.constexpr = 0, STAGES: tl.constexpr = 1):
    """sum over [start, end) of dy * y (log-softmax: dy); VEC > 1: Y and DY
    rows congruent modulo VEC."""
    cols = tl.arange(0, BLOCK_N)
    a, body_end, vec_end = vec_segment(yb, start, end, VEC, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), ACC)
    for off in tl.range(a, body_end, BLOCK_N, num_stages=STAGES):
        acc += bwd_sum_tile(Y, DY, tile_offsets(yb, off, cols, sy_n, VEC),
                            tile_offsets(gb, off, cols, sg_n, VEC), cols < BLOCK_N, LOG, ACC, P)
    if body_end < vec_end:
        acc += bwd_sum_tile(Y, DY, tile_offsets(yb, body_end, cols, sy_n, VEC),
                            tile_offsets(gb, body_end, cols, sg_n, VEC),
                            partial_mask(cols, vec_end - body_end, VEC), LOG, ACC, P)
    total = tl.sum(acc, 0)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a, vec_end, end, VEC)
        total += tl.sum(bwd_sum_tile(Y, DY, yb + e_cols, gb + e_cols, e_mask, LOG, ACC, P), 0)
    return total


@triton.jit
def bwd_apply_tile(Y, DY, DX, yo, go, xo, mask, s, LOG: tl.constexpr, ACC: tl.constexpr,
                   P: tl.constexpr):
    y = load_p(Y + yo, mask, 0.0, P).to(ACC)
    dy = load_p(DY + go, mask, 0.0, P).to(ACC)
    store_p(DX + xo, bwd_value(y, dy, s, LOG).to(DX.dtype.element_ty), mask, P)


@triton.jit
def bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG: tl.constexpr,
              ACC: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr = 1,
              P: tl.constexpr = 0, STAGES: tl.constexpr = 1):
    """DX = the backward over [start, end) given the row sum s; VEC > 1: the
    three rows congruent modulo VEC."""
    cols = tl.arange(0, BLOCK_N)
    a, body_end, vec_end = vec_segment(yb, start, end, VEC, BLOCK_N)
    for off in tl.range(a, body_end, BLOCK_N, num_stages=STAGES):
        bwd_apply_tile(Y, DY, DX, tile_offsets(yb, off, cols, sy_n, VEC),
                       tile_offsets(gb, off, cols, sg_n, VEC),
                       tile_offsets(xb, off, cols, sx_n, VEC), cols < BLOCK_N, s, LOG, ACC, P)
    if body_end < vec_end:
        bwd_apply_tile(Y, DY, DX, tile_offsets(yb, body_end, cols, sy_n, VEC),
                       tile_offsets(gb, body_end, cols, sg_n, VEC),
                       tile_offsets(xb, body_end, cols, sx_n, VEC),
                       partial_mask(cols, vec_end - body_end, VEC), s, LOG, ACC, P)
    if VEC > 1:
        e_cols, e_mask = edge_columns(start, a, vec_end, end, VEC)
        bwd_apply_tile(Y, DY, DX, yb + e_cols, gb + e_cols, xb + e_cols, e_mask, s, LOG, ACC, P)


@triton.jit
def softmax_bwd_single_kernel(
    Y,  # forward output (softmax, or log-softmax when LOG)
    DY,  # incoming gradient
    DX,  # gradient to write
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # power of two >= N
    ROWS: tl.constexpr,  # rows per program
    LEAN: tl.constexpr = False,  # a budget of 64 registers a thread (``lean_forms``)
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols32 = tl.arange(0, BLOCK_N)[None, :]
    cols = cols32.to(tl.int64)
    mask = (rows < M)[:, None] & (cols32 < N)
    yb = row_base(rows, INNER, sy_o, sy_i)
    gb = row_base(rows, INNER, sg_o, sg_i)
    xb = row_base(rows, INNER, sx_o, sx_i)
    y = tl.load(Y + yb[:, None] + cols * sy_n, mask=mask, other=0.0,
                eviction_policy="evict_last" if LEAN else "").to(ACC)
    dy = tl.load(DY + gb[:, None] + cols * sg_n, mask=mask, other=0.0).to(ACC)
    s = tl.sum(bwd_terms(y, dy, LOG), 1)
    if LEAN:
        # y read again (from L1, kept there by the first read's hint), so that
        # only dy is live across the row sum: bf16 32768 on 32 warps at 60
        # registers, 16384 on 16 at 62, no spill (held, y and dy spill 56 and
        # 64 B); the log-softmax backward reads y here only, the first read
        # being dead
        y = tl.load(Y + yb[:, None] + cols * sy_n, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)
    dx = bwd_value(y, dy, s[:, None], LOG)
    tl.store(DX + xb[:, None] + cols * sx_n, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_looped_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    DX,  # gradient to write
    M,  # number of rows (program pid takes rows pid, pid + G, ... of G programs)
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        yb = row_base(row, INNER, sy_o, sy_i)
        gb = row_base(row, INNER, sg_o, sg_i)
        xb = row_base(row, INNER, sx_o, sx_i)
        s = bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, 0, N, LOG, ACC, BLOCK_N, VEC,
                        1 if EVICT else 0, STAGES)
        bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, 0, N, s, LOG, ACC, BLOCK_N, VEC,
                  2 if EVICT else 0, STAGES)


@triton.jit
def softmax_bwd_split_sum_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    PS,  # [M, SPLITS] partial row sums
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # evict_last on this (first) read
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    start = (pid % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    tl.store(PS + pid, bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, start, end, LOG, ACC, BLOCK_N,
                                   VEC, 1 if EVICT else 0, STAGES))


@triton.jit
def softmax_bwd_split_apply_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    DX,  # gradient to write
    PS,  # [M, SPLITS] partial row sums
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # evict_first on this (second) read and the stores
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    start = (pid % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    s = sum_partials(PS, row, SPLITS, False)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    xb = row_base(row, INNER, sx_o, sx_i)
    bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG, ACC, BLOCK_N, VEC,
              2 if EVICT else 0, STAGES)


@triton.jit(do_not_specialize=["SPLITS", "LAG"])
def softmax_bwd_coop_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    DX,  # gradient to write
    PS,  # [M * SPLITS] ACC workspace: partial row sums
    SYNC,  # [1 + M] int32, zero: SYNC[0] deals the tickets, SYNC[1 + row] counts partials
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    SPLITS,  # chunks per row (programs that share it)
    CHUNK,  # columns per chunk (a multiple of BLOCK_N)
    LAG,  # first passes dealt ahead of the second passes (>= SPLITS - 1)
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
    EVICT: tl.constexpr,  # eviction hints: keep on the first read, stream on the second
    STAGES: tl.constexpr,  # tiles in flight per program (software pipelining; 1: none)
):
    n = M * SPLITS
    ticket = tl.atomic_add(SYNC, 1)
    while ticket < 2 * n:
        second, item, row, start, end = coop_place(ticket, n, LAG, SPLITS, CHUNK, N)
        yb = row_base(row, INNER, sy_o, sy_i)
        gb = row_base(row, INNER, sg_o, sg_i)
        if second:
            coop_wait(SYNC, row, SPLITS)
            s = sum_partials(PS, row, SPLITS, True)
            xb = row_base(row, INNER, sx_o, sx_i)
            bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG, ACC, BLOCK_N,
                      VEC, 2 if EVICT else 0, STAGES)
        else:
            tl.store(PS + item, bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, start, end, LOG, ACC,
                                            BLOCK_N, VEC, 1 if EVICT else 0, STAGES))
            coop_arrive(SYNC, row)
        ticket = tl.atomic_add(SYNC, 1)


@triton.jit(do_not_specialize=["SPLITS", "spin"])
def softmax_bwd_resident_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    DX,  # gradient to write
    PS,  # [M * SPLITS] ACC workspace: partial row sums
    SYNC,  # [M] int64, zero: each row's meeting word (resident_meet)
    M,  # number of rows
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    SPLITS,  # chunks per row (resident_launch_splits), at most RESIDENT_MAX_SPLITS
    spin,  # polls a chunk waits for its row's last chunk before leaving its write to it
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # columns per chunk (a power of two), held in registers
    VEC: tl.constexpr,  # elements per 16 bytes for unit-stride, congruent rows (else 1)
):
    """The resident forward's layout (``softmax_fwd_resident_kernel``) for the
    backward: a chunk's y and dy stay in registers while its partial row sum
    meets the others."""
    pid = tl.program_id(0)
    k = pid % SPLITS
    row = (pid // SPLITS).to(tl.int64)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    xb = row_base(row, INNER, sx_o, sx_i)
    c0, cols, cmask = resident_columns(yb, k, N, VEC, BLOCK_N)
    y = tl.load(Y + tile_offsets(yb, c0, cols, sy_n, VEC), mask=cmask, other=0.0).to(ACC)
    dy = tl.load(DY + tile_offsets(gb, c0, cols, sg_n, VEC), mask=cmask, other=0.0).to(ACC)
    tl.store(PS + row * SPLITS + k, tl.sum(bwd_terms(y, dy, LOG), 0))
    own, last, left = resident_meet(SYNC, row, k, SPLITS, spin)
    if own | last:
        s = sum_partials(PS, row, SPLITS, True)
        if own:
            tl.store(DX + tile_offsets(xb, c0, cols, sx_n, VEC),
                     bwd_value(y, dy, s, LOG).to(DX.dtype.element_ty), mask=cmask)
        if last:
            for j in range(0, SPLITS):
                if ((left >> j) & 1) != 0:
                    start, end = resident_span(j, k, c0, N, BLOCK_N)
                    bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG, ACC,
                              RESIDENT_TILE, VEC)


# ----------------------------------------------------------------------------
# Launchers. The host plans a launch once per call signature (shapes, strides,
# dtype, device) and keeps the callable these return; a call then only passes
# the tensors. Each callable returns the names of the kernels it launched.
# ----------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype):
    """Accumulation dtype: fp64 for fp64 tensors, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_vec(dtype: torch.dtype, *strides) -> int:
    """VEC for rows described by (outer, along-row, inner) ``strides`` of each
    tensor a kernel walks: the elements in 16 bytes when every tensor is
    unit-stride along the row and their outer and inner strides agree modulo
    that count (the rows of all of them then reach a 16-byte boundary after
    the same head), else 1."""
    vec = max(1, 16 // dtype.itemsize)
    o0, _, i0 = strides[0]
    for o, n, i in strides:
        if n != 1 or (o - o0) % vec or (i - i0) % vec:
            return 1
    return vec


def resident_launch_splits(N: int, block_n: int, vec: int, *strides) -> int:
    """Chunks per row of a resident launch (``resident_columns``) over rows of
    length N walked with ``vec`` (``row_vec``) and the (outer, along-row,
    inner) ``strides`` of each tensor: cdiv(N, block_n) when every row starts
    on a 16-byte boundary of the data (VEC 1, or outer and inner strides
    multiples of VEC: no head), else cdiv(N + VEC - 1, block_n), the
    planned count (``heuristics.resident_splits``; a power-of-two row would
    otherwise get an empty last chunk, a program that only meets)."""
    if all(o % vec == 0 and i % vec == 0 for o, _, i in strides):
        return -(-N // block_n)
    return -(-(N + vec - 1) // block_n)


def regs_meta(cfg) -> dict:
    """Launch options from a config: its register budget (``maxnreg``; see
    ``softmax_gpu.heuristics.long_row_regs`` / ``single_regs``), if any."""
    return {"maxnreg": cfg.regs} if cfg.regs else {}


def coop_buffers(M: int, splits: int, slots: int, dtype: torch.dtype, device,
                 resident: bool = False):
    """(workspace, sync) of a cooperative launch: ``slots`` ACC values per
    chunk item (M * splits items) plus ``M`` more, and the zeroed int32 ticket
    and per-row counters; ``resident``: the zeroed int64 meeting word of each
    row (``resident_meet``) instead."""
    ws = torch.empty(slots * M * splits + M, dtype=_workspace_dtype(dtype), device=device)
    if resident:
        return ws, torch.zeros(M, dtype=torch.int64, device=device)
    return ws, torch.zeros(1 + M, dtype=torch.int32, device=device)


def coop_grid(cfg, M: int) -> int:
    """Programs of a cooperative launch: the planned grid, at most one per item."""
    return max(1, min(cfg.programs, M * cfg.splits))


def lean_forms(regs: int) -> bool:
    """Whether an on-chip launch with the register budget ``regs`` (maxnreg;
    0: none) takes its kernel's lean forms: at 64 registers a thread or
    fewer, which the plans give the longest rows of the log-softmax forward
    and of the backward (``softmax_config(wide=True)``: one row on 32
    warps, or two 16-warp programs per SM)."""
    return 0 < regs <= 64


def softmax_forward_launcher(M, N, inner, x_strides, y_strides, cfg, log, dtype):
    """``launch(x, y)``: y <- softmax(x) (or log-softmax) over M rows of length N.

    x_strides / y_strides: (outer, along-row, inner) element strides; ``cfg``:
    a ``SoftmaxConfig``; ``dtype``: the element dtype of x and y.
    """
    meta = dict(LOG=log, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    if cfg.path == "single":
        kernel = softmax_fwd_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        args = (M, N, inner, *x_strides, *y_strides)
        meta.update(ROWS=cfg.rows_per_program, LEAN=lean_forms(cfg.regs))
        names = ("softmax_fwd_single_kernel",)

        def launch(x, y):
            kernel(x, y, *args, **meta)
            return names
        return launch
    meta.update(VEC=row_vec(dtype, x_strides, y_strides), EVICT=cfg.evict, STAGES=cfg.stages)
    if cfg.path == "looped":
        kernel = softmax_fwd_looped_kernel[(min(M, cfg.programs or M),)]
        args = (M, N, inner, *x_strides, *y_strides)
        names = ("softmax_fwd_looped_kernel",)

        def launch(x, y):
            kernel(x, y, *args, **meta)
            return names
        return launch
    if cfg.path == "resident":
        splits = resident_launch_splits(N, cfg.block_n, meta["VEC"], x_strides, y_strides)
        kernel = softmax_fwd_resident_kernel[(M * splits,)]
        args = (M, N, inner, *x_strides, *y_strides, splits, cfg.spin)
        names = ("softmax_fwd_resident_kernel",)
        meta.pop("EVICT")
        meta.pop("STAGES")

        def launch(x, y):
            ws, sync = coop_buffers(M, splits, 2, dtype, x.device, resident=True)
            kernel(x, y, ws, sync, *args, **meta)
            return names
        return launch
    if cfg.path == "coop":
        kernel = softmax_fwd_coop_kernel[(coop_grid(cfg, M),)]
        args = (M, N, inner, *x_strides, *y_strides, cfg.splits, cfg.chunk, cfg.lag)
        names = ("softmax_fwd_coop_kernel",)

        def launch(x, y):
            ws, sync = coop_buffers(M, cfg.splits, 2, dtype, x.device)
            kernel(x, y, ws, sync, *args, **meta)
            return names
        return launch
    grid = (M * cfg.splits,)
    stats = softmax_fwd_split_stats_kernel[grid]
    norm = softmax_fwd_split_norm_kernel[grid]
    ws = dict(size=(M, cfg.splits), dtype=_workspace_dtype(dtype))
    stats_args = (N, inner, *x_strides, cfg.splits, cfg.chunk)
    stats_meta = dict(ACC=meta["ACC"], BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                      VEC=meta["VEC"], EVICT=cfg.evict, STAGES=cfg.stages,
                      enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    norm_args = (N, inner, *x_strides, *y_strides, cfg.splits, cfg.chunk)
    names = ("softmax_fwd_split_stats_kernel", "softmax_fwd_split_norm_kernel")

    def launch(x, y):
        pm = torch.empty(**ws, device=x.device)
        pd = torch.empty(**ws, device=x.device)
        stats(x, pm, pd, *stats_args, **stats_meta)
        norm(x, y, pm, pd, *norm_args, **meta)
        return names
    return launch


def softmax_backward_launcher(M, N, inner, y_strides, g_strides, x_strides, cfg, log, dtype):
    """``launch(y, dy, dx)``: dx <- vector-Jacobian product of softmax (or
    log-softmax) at output y with dy; strides as in :func:`softmax_forward_launcher`."""
    meta = dict(LOG=log, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION, **regs_meta(cfg))
    strides = (*y_strides, *g_strides, *x_strides)
    if cfg.path == "single":
        kernel = softmax_bwd_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        args = (M, N, inner, *strides)
        meta.update(ROWS=cfg.rows_per_program, LEAN=lean_forms(cfg.regs))
        names = ("softmax_bwd_single_kernel",)

        def launch(y, dy, dx):
            kernel(y, dy, dx, *args, **meta)
            return names
        return launch
    meta.update(VEC=row_vec(dtype, y_strides, g_strides, x_strides), EVICT=cfg.evict,
                STAGES=cfg.stages)
    if cfg.path == "looped":
        kernel = softmax_bwd_looped_kernel[(min(M, cfg.programs or M),)]
        args = (M, N, inner, *strides)
        names = ("softmax_bwd_looped_kernel",)

        def launch(y, dy, dx):
            kernel(y, dy, dx, *args, **meta)
            return names
        return launch
    if cfg.path == "resident":
        splits = resident_launch_splits(N, cfg.block_n, meta["VEC"], y_strides, g_strides,
                                        x_strides)
        kernel = softmax_bwd_resident_kernel[(M * splits,)]
        args = (M, N, inner, *strides, splits, cfg.spin)
        names = ("softmax_bwd_resident_kernel",)
        meta.pop("EVICT")
        meta.pop("STAGES")

        def launch(y, dy, dx):
            ws, sync = coop_buffers(M, splits, 1, dtype, y.device, resident=True)
            kernel(y, dy, dx, ws, sync, *args, **meta)
            return names
        return launch
    if cfg.path == "coop":
        kernel = softmax_bwd_coop_kernel[(coop_grid(cfg, M),)]
        args = (M, N, inner, *strides, cfg.splits, cfg.chunk, cfg.lag)
        names = ("softmax_bwd_coop_kernel",)

        def launch(y, dy, dx):
            ws, sync = coop_buffers(M, cfg.splits, 1, dtype, y.device)
            kernel(y, dy, dx, ws, sync, *args, **meta)
            return names
        return launch
    grid = (M * cfg.splits,)
    partial = softmax_bwd_split_sum_kernel[grid]
    apply = softmax_bwd_split_apply_kernel[grid]
    ws = dict(size=(M, cfg.splits), dtype=_workspace_dtype(dtype))
    sum_args = (N, inner, *y_strides, *g_strides, cfg.splits, cfg.chunk)
    apply_args = (N, inner, *strides, cfg.splits, cfg.chunk)
    names = ("softmax_bwd_split_sum_kernel", "softmax_bwd_split_apply_kernel")

    def launch(y, dy, dx):
        ps = torch.empty(**ws, device=y.device)
        partial(y, dy, ps, *sum_args, **meta)
        apply(y, dy, dx, ps, *apply_args, **meta)
        return names
    return launch
