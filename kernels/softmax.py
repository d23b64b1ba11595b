"""Softmax and log-softmax, forward and backward, in Triton.

Every kernel sees its tensors as a batch of rows laid out as [OUTER, N, INNER]:
row r starts at (r // INNER) * stride_outer + (r % INNER) * stride_inner and
its N elements are stride_n apart. A reduction over the last dim is INNER = 1
(Triton specialises the 1, so the division disappears); a reduction over an
inner dim of a contiguous tensor is read in place with stride_n = INNER.
All offsets are int64.

Paths (chosen by ``softmax_gpu.softmax.softmax_config``):
- single: the row fits in one tile; ROWS rows per program; 1 read + 1 write.
- looped: one program per row; an online (max, sum) pass, then a normalise
  pass; 2 reads + 1 write (the second read is served from L2 when it can be).
- split: a row is cut into chunks across programs; each writes its partial
  (max, sum), then every program merges its row's partials with the same
  associative combine and normalises its chunk. Two launches.

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


@triton.jit
def online_combine(m_a, d_a, m_b, d_b):
    """Associative merge of two online-softmax states (max m, sum d of e^(x-m))."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # both empty: keep d = 0
    return m, d_a * tl.exp(m_a - m_safe) + d_b * tl.exp(m_b - m_safe)


@triton.jit
def row_base(rows, INNER, s_outer, s_inner):
    """Element offset (int64) of column 0 of each of ``rows`` (int64)."""
    return (rows // INNER) * s_outer + (rows % INNER) * s_inner


@triton.jit
def online_update(m, d, x):
    """Fold tile ``x`` into the running state (scalar max ``m``, per-lane sums
    ``d`` of e^(x - m)): one tile max and one exp per element."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep d = 0
    return m_new, d * tl.exp(m - m_safe) + tl.exp(x - m_safe)


@triton.jit
def online_stats(X, base, s_n, start, end, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """(max, sum e^(x-max)) over X[base + c*s_n] for c in [start, end).

    One tile max per step and one exp per element; the running sum stays a
    vector so the only per-tile cross-lane step is the max.
    """
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((BLOCK_N,), ACC)
    for off in range(start, end, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        x = tl.load(X + base + cols * s_n, mask=cols < end, other=float("-inf")).to(ACC)
        m, d = online_update(m, d, x)
    return m, tl.sum(d, 0)


@triton.jit
def normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, d,
                    LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[c] = softmax (or log-softmax) of X[c] for c in [start, end), given the row's (m, d)."""
    shift = m + tl.log(d)
    for off in range(start, end, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < end
        x = tl.load(X + xb + cols * sx_n, mask=mask, other=float("-inf")).to(ACC)
        if LOG:
            y = x - shift
        else:
            y = tl.exp(x - m) / d
        tl.store(Y + yb + cols * sy_n, y.to(Y.dtype.element_ty), mask=mask)


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
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    xb = row_base(rows, INNER, sx_o, sx_i)
    yb = row_base(rows, INNER, sy_o, sy_i)
    x = tl.load(X + xb[:, None] + cols[None, :] * sx_n, mask=mask, other=float("-inf")).to(ACC)
    m = tl.max(x, 1)
    e = tl.exp(x - m[:, None])
    d = tl.sum(e, 1)
    if LOG:
        y = x - (m + tl.log(d))[:, None]
    else:
        y = e / d[:, None]
    tl.store(Y + yb[:, None] + cols[None, :] * sy_n, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_looped_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    row = tl.program_id(0).to(tl.int64)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    m, d = online_stats(X, xb, sx_n, 0, N, ACC, BLOCK_N)
    normalize_store(X, Y, xb, yb, sx_n, sy_n, 0, N, m, d, LOG, ACC, BLOCK_N)


@triton.jit
def softmax_fwd_split_stats_kernel(
    X,  # input base pointer
    PM,  # [M, SPLITS] fp32/fp64 partial maxima
    PD,  # [M, SPLITS] partial sums of e^(x - max)
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program (a multiple of BLOCK_N)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    split = pid % SPLITS
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    xb = row_base(row, INNER, sx_o, sx_i)
    m, d = online_stats(X, xb, sx_n, start, end, ACC, BLOCK_N)
    tl.store(PM + pid, m)
    tl.store(PD + pid, d)


@triton.jit
def softmax_fwd_split_norm_kernel(
    X,  # input base pointer
    Y,  # output base pointer
    PM,  # [M, SPLITS] partial maxima from the stats kernel
    PD,  # [M, SPLITS] partial sums
    N,  # row length
    INNER,  # rows sharing one outer index
    sx_o, sx_n, sx_i,  # input strides
    sy_o, sy_n, sy_i,  # output strides
    SPLITS,  # programs per row
    CHUNK,  # columns per program
    LOG: tl.constexpr,  # log-softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
    BLOCK_S: tl.constexpr,  # power of two >= SPLITS
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    split = pid % SPLITS
    s = tl.arange(0, BLOCK_S)
    pm = tl.load(PM + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    pd = tl.load(PD + row * SPLITS + s, mask=s < SPLITS, other=0.0)
    m, d = tl.reduce((pm, pd), 0, online_combine)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    xb = row_base(row, INNER, sx_o, sx_i)
    yb = row_base(row, INNER, sy_o, sy_i)
    normalize_store(X, Y, xb, yb, sx_n, sy_n, start, end, m, d, LOG, ACC, BLOCK_N)


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
        return dy - tl.exp(y) * s
    else:
        return y * (dy - s)


@triton.jit
def bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, start, end, LOG: tl.constexpr,
                ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_N,), ACC)
    for off in range(start, end, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < end
        y = tl.load(Y + yb + cols * sy_n, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + gb + cols * sg_n, mask=mask, other=0.0).to(ACC)
        acc += bwd_terms(y, dy, LOG)
    return tl.sum(acc, 0)


@triton.jit
def bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG: tl.constexpr,
              ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    for off in range(start, end, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cols < end
        y = tl.load(Y + yb + cols * sy_n, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + gb + cols * sg_n, mask=mask, other=0.0).to(ACC)
        dx = bwd_value(y, dy, s, LOG)
        tl.store(DX + xb + cols * sx_n, dx.to(DX.dtype.element_ty), mask=mask)


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
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    yb = row_base(rows, INNER, sy_o, sy_i)
    gb = row_base(rows, INNER, sg_o, sg_i)
    xb = row_base(rows, INNER, sx_o, sx_i)
    y = tl.load(Y + yb[:, None] + cols[None, :] * sy_n, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + gb[:, None] + cols[None, :] * sg_n, mask=mask, other=0.0).to(ACC)
    s = tl.sum(bwd_terms(y, dy, LOG), 1)
    dx = bwd_value(y, dy, s[:, None], LOG)
    tl.store(DX + xb[:, None] + cols[None, :] * sx_n, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_looped_kernel(
    Y,  # forward output
    DY,  # incoming gradient
    DX,  # gradient to write
    N,  # row length
    INNER,  # rows sharing one outer index
    sy_o, sy_n, sy_i,  # Y strides
    sg_o, sg_n, sg_i,  # DY strides
    sx_o, sx_n, sx_i,  # DX strides
    LOG: tl.constexpr,  # log-softmax backward
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_N: tl.constexpr,  # tile width
):
    row = tl.program_id(0).to(tl.int64)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    xb = row_base(row, INNER, sx_o, sx_i)
    s = bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, 0, N, LOG, ACC, BLOCK_N)
    bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, 0, N, s, LOG, ACC, BLOCK_N)


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
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    start = (pid % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    tl.store(PS + pid, bwd_row_sum(Y, DY, yb, gb, sy_n, sg_n, start, end, LOG, ACC, BLOCK_N))


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
    BLOCK_S: tl.constexpr,  # power of two >= SPLITS
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // SPLITS
    start = (pid % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    s_idx = tl.arange(0, BLOCK_S)
    s = tl.sum(tl.load(PS + row * SPLITS + s_idx, mask=s_idx < SPLITS, other=0.0), 0)
    yb = row_base(row, INNER, sy_o, sy_i)
    gb = row_base(row, INNER, sg_o, sg_i)
    xb = row_base(row, INNER, sx_o, sx_i)
    bwd_apply(Y, DY, DX, yb, gb, xb, sy_n, sg_n, sx_n, start, end, s, LOG, ACC, BLOCK_N)


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


def softmax_forward_launcher(M, N, inner, x_strides, y_strides, cfg, log, dtype):
    """``launch(x, y)``: y <- softmax(x) (or log-softmax) over M rows of length N.

    x_strides / y_strides: (outer, along-row, inner) element strides; ``cfg``:
    a ``SoftmaxConfig``; ``dtype``: the element dtype of x and y.
    """
    meta = dict(LOG=log, ACC=acc_dtype(dtype), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                enable_fp_fusion=FP_FUSION)
    if cfg.path == "single":
        kernel = softmax_fwd_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        args = (M, N, inner, *x_strides, *y_strides)
        meta["ROWS"] = cfg.rows_per_program
        names = ("softmax_fwd_single_kernel",)

        def launch(x, y):
            kernel(x, y, *args, **meta)
            return names
        return launch
    if cfg.path == "looped":
        kernel = softmax_fwd_looped_kernel[(M,)]
        args = (N, inner, *x_strides, *y_strides)
        names = ("softmax_fwd_looped_kernel",)

        def launch(x, y):
            kernel(x, y, *args, **meta)
            return names
        return launch
    grid = (M * cfg.splits,)
    stats = softmax_fwd_split_stats_kernel[grid]
    norm = softmax_fwd_split_norm_kernel[grid]
    ws = dict(size=(M, cfg.splits), dtype=_workspace_dtype(dtype))
    stats_args = (N, inner, *x_strides, cfg.splits, cfg.chunk)
    stats_meta = dict(ACC=meta["ACC"], BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                      enable_fp_fusion=FP_FUSION)
    norm_args = (N, inner, *x_strides, *y_strides, cfg.splits, cfg.chunk)
    meta["BLOCK_S"] = triton.next_power_of_2(cfg.splits)
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
                enable_fp_fusion=FP_FUSION)
    strides = (*y_strides, *g_strides, *x_strides)
    if cfg.path == "single":
        kernel = softmax_bwd_single_kernel[(triton.cdiv(M, cfg.rows_per_program),)]
        args = (M, N, inner, *strides)
        meta["ROWS"] = cfg.rows_per_program
        names = ("softmax_bwd_single_kernel",)

        def launch(y, dy, dx):
            kernel(y, dy, dx, *args, **meta)
            return names
        return launch
    if cfg.path == "looped":
        kernel = softmax_bwd_looped_kernel[(M,)]
        args = (N, inner, *strides)
        names = ("softmax_bwd_looped_kernel",)

        def launch(y, dy, dx):
            kernel(y, dy, dx, *args, **meta)
            return names
        return launch
    grid = (M * cfg.splits,)
    partial = softmax_bwd_split_sum_kernel[grid]
    apply = softmax_bwd_split_apply_kernel[grid]
    ws = dict(size=(M, cfg.splits), dtype=_workspace_dtype(dtype))
    sum_args = (N, inner, *y_strides, *g_strides, cfg.splits, cfg.chunk)
    apply_args = (N, inner, *strides, cfg.splits, cfg.chunk)
    sum_meta = dict(meta)
    meta["BLOCK_S"] = triton.next_power_of_2(cfg.splits)
    names = ("softmax_bwd_split_sum_kernel", "softmax_bwd_split_apply_kernel")

    def launch(y, dy, dx):
        ps = torch.empty(**ws, device=y.device)
        partial(y, dy, ps, *sum_args, **sum_meta)
        apply(y, dy, dx, ps, *apply_args, **meta)
        return names
    return launch
