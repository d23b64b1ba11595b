"""Fused linear + cross-entropy: the LM-head loss without ever holding the logits.

``linear_cross_entropy(input, linear_weight, target)`` is
``cross_entropy(F.linear(input, linear_weight, linear_bias), target)`` computed
chunk by chunk over the tokens, so no [N, V] tensor ever exists.

Per chunk of rows, in the forward, when a gradient is needed:

1. one GEMM writes the chunk's logits into a reused [chunk, V] buffer
   (``torch.mm(out=)`` / ``torch.addmm(out=)`` with the bias);
2. the fused cross-entropy kernel (``kernels/cross_entropy.py``, one launch)
   writes each row's loss and log-sum-exp and, in place over the logits,
   the gradient ``sigma * sum(y) - y``, already divided by the mean's
   denominators, which are computed once from ALL the targets on the device
   (no host sync);
3. ``dX[chunk] = dlogits @ W`` goes straight into the preallocated dX;
   ``dW += dlogits^T @ X[chunk]`` accumulates into ONE fp32 [V, D] buffer
   (fp64 for fp64), with bf16/fp16 operands and fp32 accumulation
   (``mm`` / ``addmm(out_dtype=float32)`` on CUDA, the first chunk writing
   it, the others adding with beta = 1; an fp32 copy of the chunk
   elsewhere), cast once in the backward; the bias gradient is the column
   sums of dlogits in fp32.

The backward of ``reduction="mean"/"sum"`` only multiplies dX, dW and db by
grad_output (fused with dW's cast from fp32) into new tensors, never touching
logits-sized data. ``reduction="none"`` cannot know its per-row grad_output
in the forward, and dW sums over rows, so the forward computes only the loss
and the backward recomputes each chunk's logits and gradient, scales the rows
by grad_output before the GEMMs, and runs them (four GEMMs in all instead of
three). Without a gradient (eval, no_grad) each chunk is one GEMM and the
loss kernel.

Eagerly the op is a ``torch.autograd.Function``; while a graph is traced
(``torch.compile(fullgraph=True)``, make_fx) it is the ``torch.library`` ops
``softmax_gpu::linear_cross_entropy_*`` with fake implementations; both run
the same passes. On CPU without ``TRITON_INTERPRET=1`` the kernels are
replaced by a torch reference with the same semantics; everything else
(chunking, GEMMs) is shared. :class:`_ChunkLoss` is the only code here that
touches the cross-entropy internals (launchers, launch configs, reference).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import heuristics
from ._checks import FLOAT_DTYPES, check_float, check_row_length, check_tensor
from ._dispatch import (backend_for, launch_device, launch_on, new_output, plan_cache,
                        remember, traced)
from .cross_entropy import (_scalar_options, check_divisor, cross_entropy_config,
                            cross_entropy_scale_config, reference_lse_grad)
from .kernels import cross_entropy as K

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]


# ----------------------------------------------------------------------------
# Chunk size
# ----------------------------------------------------------------------------

# Rows per chunk when memory allows. dW += dlogits^T @ X[chunk] is a GEMM with
# K = rows that reads and writes the fp32 [V, D] accumulator once per chunk:
# 2 * V * rows * D flops against 8 * V * D bytes, i.e. rows / 4 flops per
# byte; H100/H200 bf16 need ~300, so 4096 rows keep that GEMM compute-bound
# with a 3x margin (the fastest published anchor, QuACK, also uses 4096).
GEMM_ROWS = 4096
# Largest logits chunk (bytes) the default plan allocates: 2 GiB holds 4096
# rows of a 151936-wide bf16 vocabulary (1.2 GB); wider rows get fewer.
CHUNK_BYTES = 2 << 30
# Never fewer rows than this many per multiprocessor: the loss kernel runs
# one program per row on long rows, and each chunk is one launch.
ROWS_PER_SM = 8
# Chunks are balanced (equal up to this multiple) rather than leaving a
# small last chunk.
ROW_ALIGN = 64


def chunk_rows(N: int, V: int, elem_bytes: int, sm_count: int) -> int:
    """Rows per chunk for N tokens of a V-wide vocabulary: GEMM_ROWS, fewer
    when a chunk of logits would exceed CHUNK_BYTES, never fewer than
    ROWS_PER_SM per multiprocessor; then balanced so that the chunks are of
    equal size (rounded up to ROW_ALIGN)."""
    rows = min(GEMM_ROWS, max(ROWS_PER_SM * sm_count, CHUNK_BYTES // max(1, V * elem_bytes)))
    if N <= rows:
        return max(N, 1)
    chunks = -(-N // rows)
    per = -(-N // chunks)
    return min(N, -(-per // ROW_ALIGN) * ROW_ALIGN)


def _plan(N: int, V: int, x: Tensor, chunk_size: int) -> int:
    """``chunk_size`` when given (> 0), else :func:`chunk_rows` for ``x``'s device."""
    if chunk_size > 0:
        return max(1, min(chunk_size, N))
    return chunk_rows(N, V, x.element_size(), heuristics.sm_count(x.device))


# ----------------------------------------------------------------------------
# The loss kernel over one call's chunks
# ----------------------------------------------------------------------------


class _Spec(NamedTuple):
    """A call's options, validated (cap 0: no softcap; chunk_size 0: planned)."""

    ignore_index: int
    reduction: str
    eps: float
    z_loss: float
    cap: float
    chunk_size: int
    divisor: Optional[float] = None  # a number divisor (a tensor one travels beside the spec)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Kernel launches planned for a chunk shape and options, kept across calls.
_LAUNCHERS = plan_cache()


class _ChunkLoss:
    """The fused cross-entropy kernel applied chunk by chunk to one call's
    logits (``kernels/cross_entropy.py``), or its torch reference on the CPU
    path. The only code here that reaches into the cross-entropy internals
    (its launchers and launch configs, ``reference_lse_grad``) and the
    dispatch helpers.

    Built once per call from ALL the targets: the mean's denominators (sum
    of w_t over kept rows, number of kept rows; with class weights and label
    smoothing also sum(w)), each times the divisor (``spec.divisor``, or the
    one-element tensor ``div_t``), are computed on the device then, by one
    launch, so that every chunk divides by the global ones; no host sync.
    """

    def __init__(self, x: Tensor, t: Tensor, weight: Optional[Tensor], V: int, spec: _Spec,
                 div_t: Optional[Tensor] = None):
        self.spec, self.V, self.dtype = spec, V, x.dtype
        self.acc = acc = _acc(x.dtype)
        self.w = weight.to(acc).contiguous() if weight is not None else None
        self.triton = backend_for(x) == "triton"
        self.mean = spec.reduction == "mean"
        divided = spec.divisor is not None or div_t is not None
        self.use_den = self.mean or divided
        self.den = None
        if not self.triton:
            if self.use_den:
                one = torch.ones((), dtype=acc, device=x.device)
                dl, dz = _reference_denominators(t, self.w, spec.ignore_index, V, acc) \
                    if self.mean else (one, one)
                div = div_t.to(acc) if div_t is not None else (spec.divisor or 1.0)
                self.den = (dl * div, dz * div)
            return
        self.dev = launch_device(x.device)
        if self.use_den or (self.w is not None and spec.eps > 0):
            self.den = new_output((3,), acc, x.device)
            launch = K.denominators_launcher(
                t.shape[0], V, spec.ignore_index, self.w is not None, spec.eps > 0, x.dtype,
                count=self.mean, divisor="tensor" if div_t is not None else spec.divisor)
            launch_on(self.dev, launch, t, self.w if self.w is not None else self.den,
                      div_t if div_t is not None else self.den, self.den)

    def _launcher(self, kind: str, z: Tensor, hit: bool = False):
        """The kernel launch for an [n, V] chunk, memoised across calls."""
        sp, n = self.spec, z.shape[0]
        has_w = self.w is not None
        key = (kind, hit, n, self.V, z.stride(), self.dtype, z.device, sp.ignore_index,
               self.use_den, sp.eps, sp.z_loss, sp.cap, has_w, heuristics.generation())
        launch = _LAUNCHERS.get(key)
        if launch is None:
            strides = (z.stride(0), z.stride(1), 0)
            if kind == "lse":
                cfg = cross_entropy_scale_config(n, self.V, z.element_size(), z.device)
                launch = K.lse_grad_launcher(n, self.V, 1, strides, strides, sp.cap, self.dtype,
                                             cfg)
            else:
                extras = has_w or sp.eps > 0 or sp.cap > 0
                cfg = cross_entropy_config(n, self.V, z.element_size(), z.device, extras,
                                           reread=kind == "grad" or sp.eps > 0)
                launch = K.class_launcher(n, self.V, 1, strides, strides, sp.ignore_index,
                                          self.use_den, sp.eps, sp.z_loss, sp.cap, 1.0, has_w,
                                          kind == "grad", self.dtype, cfg, write_hit=hit)
            remember(_LAUNCHERS, key, launch)
        return launch

    def loss_(self, z: Tensor, t: Tensor, write_grad: bool,
              hit: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The loss of the chunk ``z`` ([n, V] contiguous logits, targets
        ``t`` [n]) and, when ``write_grad``, its gradient written over ``z``:
        d(sum of the chunk's row losses)/dz. Returns (row losses [n] in fp32 /
        fp64, already divided by the global denominators; lse [n] fp32).
        ``hit`` ([n] int8, optional) gets 1 where the row is kept and its
        target is an argmax of its logits, from the same pass."""
        n = z.shape[0]
        loss = new_output((n,), self.acc, z.device)
        lse = new_output((n,), torch.float32, z.device)
        if n == 0:
            return loss, lse
        if not self.triton:
            _chunk_reference(z, t, self.w, self.spec, self.den, write_grad, loss, lse, hit)
            return loss, lse
        state = new_output((n,), self.acc, z.device) if write_grad else loss
        launch = self._launcher("grad" if write_grad else "loss", z, hit is not None)
        launch_on(self.dev, launch, z, t, self.w if self.w is not None else loss,
                  self.den if self.den is not None else loss, z, loss, lse, state,
                  loss if hit is None else hit)
        return loss, lse

    def lse_grad_(self, z: Tensor, lse: Tensor, scale: Tensor) -> None:
        """In place: row r of the logits ``z`` becomes scale[r] * d lse_r / dz
        (softmax, times the softcap's derivative); ``lse`` [n] from the forward."""
        if z.shape[0] == 0:
            return
        if not self.triton:
            z.copy_(reference_lse_grad(z, lse, scale, self.spec.cap))
            return
        launch_on(self.dev, self._launcher("lse", z), z, lse, scale, z,
                  scale.stride(0) if scale.numel() > 1 else 0)


def _reference_denominators(t: Tensor, weight: Optional[Tensor], ignore_index: int, V: int,
                            acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """The mean's denominators over ALL rows in torch (the CPU path): (sum of
    w_t over kept rows, number of kept rows) as 0-d tensors."""
    kept = t != ignore_index
    count = kept.sum(dtype=acc)
    if weight is None:
        return count, count
    w_t = weight.gather(0, torch.where(kept, t, 0).long().clamp(0, V - 1))
    return (w_t * kept).sum(), count


def _chunk_reference(z, t, weight, spec, den, write_grad, loss, lse, hit=None) -> None:
    """Torch reference of :meth:`_ChunkLoss.loss_` (the CPU path without the
    interpreter), dividing by the global denominators ``den`` (mean): fills
    ``loss`` and ``lse``, and ``z`` with the gradient. Targets outside [0, V)
    that are not ignored raise IndexError, as torch does."""
    n, V = z.shape
    acc = loss.dtype
    x = z.to(acc)
    if spec.cap > 0:
        x = spec.cap * torch.tanh(x / spec.cap)
    lse_ = torch.logsumexp(x, 1)
    t = t.long()
    kept = t != spec.ignore_index
    bad = kept & ((t < 0) | (t >= V))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
    tc = torch.where(kept, t, 0)
    w = weight if weight is not None else x.new_ones(V)
    # effective target y_c = (1 - eps) w_t [c == t] + (eps / V) w_c on kept rows
    y = F.one_hot(tc, V).to(acc) * ((1 - spec.eps) * w[tc] * kept)[:, None]
    if spec.eps > 0:
        y = y + (spec.eps / V) * w * kept[:, None]
    dl, dz = den if den is not None else (torch.ones((), dtype=acc, device=z.device),) * 2
    zl = torch.where(kept, spec.z_loss * lse_, 0)
    loss.copy_((y * (lse_[:, None] - x)).sum(1) / dl + zl * lse_ / dz)
    lse.copy_(lse_)
    if hit is not None:
        hit.copy_(kept & (x.gather(1, tc[:, None])[:, 0] >= x.amax(1)))
    if write_grad:
        g = torch.softmax(x, 1) * (y.sum(1) / dl + 2 * zl / dz)[:, None] - y / dl
        if spec.cap > 0:
            g = g * (1 - (x / spec.cap) ** 2)
        z.copy_(torch.where(kept[:, None], g, 0))


# ----------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------


def _logits(x: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    """out <- x @ w^T (+ b), rounded as F.linear rounds it."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


# Whether this process's torch accepts mm / addmm with bf16/fp16 operands and
# out_dtype=float32 into an fp32 ``out`` on CUDA; learnt at the first call.
_OUT_DTYPE_OK: dict[str, bool] = {}


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, add: bool) -> None:
    """acc <- a @ b (``add``: acc += a @ b) with fp32 (fp64) accumulation
    whatever a and b's dtype, without a copy of the product.

    Same dtype: ``mm`` / ``addmm`` with ``out=acc``. bf16/fp16 operands on
    CUDA: cuBLAS with ``out_dtype=float32`` (beta = 1 into ``acc`` to add).
    Where that overload is missing or refuses an fp32 ``acc`` (older torch),
    and on CPU, the operands are copied to the accumulator's dtype first
    (one chunk-sized copy; the products are still exact in fp32)."""
    op = torch.addmm if add else torch.mm
    lead = (acc,) if add else ()
    if a.dtype == acc.dtype:
        op(*lead, a, b, out=acc)
        return
    if acc.is_cuda and _OUT_DTYPE_OK.get(op.__name__, True):
        try:
            op(*lead, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # checked before any launch
            _OUT_DTYPE_OK[op.__name__] = False
    op(*lead, a.to(acc.dtype), b.to(acc.dtype), out=acc)


def _backprop(g: Tensor, x: Tensor, w: Tensor, dx: Optional[Tensor], dw: Optional[Tensor],
              db: Optional[Tensor], add_acc: bool) -> None:
    """From one chunk's logits gradient ``g`` [n, V]: dx (the chunk's rows) =
    g @ w; dw = g^T @ x and db = the column sums of g, in fp32, added to the
    accumulators when ``add_acc`` (the first chunk writes them: no zero fill,
    no read)."""
    if dx is not None:
        torch.mm(g, w, out=dx)
    if dw is not None:
        _accumulate(dw, g.t(), x, add_acc)
    if db is not None:
        if add_acc:
            db.add_(g.sum(0, dtype=db.dtype))
        else:
            torch.sum(g, 0, dtype=db.dtype, out=db)


# ----------------------------------------------------------------------------
# The two passes over the chunks
# ----------------------------------------------------------------------------


def _grad_buffers(x, w, b, needs):
    """dx (input dtype), and the fp32 (fp64) dw and db accumulators; empty
    tensors for the gradients not needed."""
    N, D = x.shape
    V = w.shape[0]
    acc = _acc(x.dtype)

    def alloc(shape, dtype):  # the chunks write every element (poisoned in the tests)
        return new_output(shape, dtype, x.device) if N else torch.zeros(shape, dtype=dtype,
                                                                         device=x.device)

    dx = alloc((N, D) if needs[0] else (0,), x.dtype)
    dw = alloc((V, D) if needs[1] else (0,), acc)
    db = alloc((V,) if needs[2] and b is not None else (0,), acc)
    return dx, dw, db


def _chunks(N: int, V: int, x: Tensor, spec: _Spec):
    """(row slices, a reused [rows, V] logits buffer)."""
    rows = _plan(N, V, x, spec.chunk_size)
    buf = x.new_empty((min(rows, N), V))
    return [slice(r, min(N, r + rows)) for r in range(0, N, rows)], buf


def _outs(dx, dw, db, rows: slice):
    return (dx[rows] if dx.numel() else None, dw if dw.numel() else None,
            db if db.numel() else None)


def _forward(x, w, b, target, weight, spec: _Spec, needs, want_hits: bool = False,
             div_t: Optional[Tensor] = None):
    """(loss, lse, dx, dw, db, hits): the loss (0-d for mean / sum, [N] for
    none, in fp32 / fp64), lse [N] fp32, and for mean / sum the gradients
    ``needs`` asks for (dx in the input's dtype, dw and db in fp32 / fp64;
    empty otherwise), chunk by chunk; ``hits`` [N] int8 (``want_hits``: 1
    where the row is kept and its target is an argmax; else empty). The
    loss and gradients are divided by the divisor (``spec.divisor`` or the
    one-element tensor ``div_t``)."""
    N = x.shape[0]
    V = w.shape[0]
    t = target.contiguous()
    kern = _ChunkLoss(x, t, weight, V, spec, div_t)
    grad = any(needs) and spec.reduction != "none"
    dx, dw, db = _grad_buffers(x, w, b, needs if grad else (False,) * 3)
    slices, buf = _chunks(N, V, x, spec)
    losses, lses = [], []
    hits = new_output((N if want_hits else 0,), torch.int8, x.device)
    for i, sl in enumerate(slices):
        z = _logits(x[sl], w, b, buf[: sl.stop - sl.start])
        loss, lse = kern.loss_(z, t[sl], grad, hits[sl] if want_hits else None)
        losses.append(loss)
        lses.append(lse)
        if grad:
            _backprop(z, x[sl], w, *_outs(dx, dw, db, sl), add_acc=i > 0)
    loss = torch.cat(losses) if losses else x.new_empty(0, dtype=_acc(x.dtype))
    lse = torch.cat(lses) if lses else x.new_empty(0, dtype=torch.float32)
    if spec.reduction != "none":
        loss = loss.sum()
        if spec.reduction == "mean" and N == 0:
            loss = loss * math.nan  # the mean of no rows, as torch
    return loss, lse, dx, dw, db, hits


def _recompute(x, w, b, target, weight, spec: _Spec, row_scale, lse, lse_scale, needs,
               div_t: Optional[Tensor] = None):
    """The backward's pass over the chunks: recompute each chunk's logits and
    turn them into row_scale[r] * d(loss_r)/dz (``reduction="none"``: the
    rows are scaled before the GEMMs) or, when ``row_scale`` is None, into
    lse_scale[r] * d(lse_r)/dz (``lse``: the forward's), then backpropagate
    through the GEMMs. Returns (dx in the input's dtype, dw and db in fp32 /
    fp64), empty where not asked."""
    N = x.shape[0]
    V = w.shape[0]
    t = target.contiguous()
    loss_term = row_scale is not None
    kern = _ChunkLoss(x, t, weight, V, spec, div_t) if loss_term else \
        _ChunkLoss(x, t, None, V, spec._replace(reduction="sum", divisor=None))
    dx, dw, db = _grad_buffers(x, w, b, needs)
    slices, buf = _chunks(N, V, x, spec)
    for i, sl in enumerate(slices):
        z = _logits(x[sl], w, b, buf[: sl.stop - sl.start])
        if loss_term:
            kern.loss_(z, t[sl], True)
            z.mul_(row_scale[sl, None])
        else:
            kern.lse_grad_(z, lse[sl], lse_scale[sl])
        _backprop(z, x[sl], w, *_outs(dx, dw, db, sl), add_acc=i > 0)
    return dx, dw, db


# ----------------------------------------------------------------------------
# Autograd: eagerly torch.autograd.Functions that run the passes directly;
# while a graph is traced (torch.compile, make_fx), the torch.library ops
# softmax_gpu::linear_cross_entropy_* (opaque to the tracer, with fake
# implementations). Both share the helpers below.
#
# Gradients handed out are new tensors, never changed afterwards: a later
# backward over a retained graph computes new ones from the saved state.
# ----------------------------------------------------------------------------


def _save(ctx, x, w, b, t, cw, grads, spec: _Spec, needs, div_t=None) -> None:
    ctx.spec = spec
    ctx.needs = (needs[0], needs[1], needs[2] and b is not None)
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else x.dtype)
    if spec.reduction == "none":  # the backward recomputes from the inputs
        ctx.save_for_backward(x, w, b, t, cw, div_t)
    else:  # the backward only scales the gradients the forward computed
        ctx.save_for_backward(*grads)


def _finish(ctx, dx, dw, db, scale: Optional[Tensor] = None):
    """The gradients autograd receives: new tensors in the parameters' dtypes,
    ``scale`` (grad_output) applied, dw and db cast once from fp32."""
    def out(g, need, dtype):
        if not need:
            return None
        if scale is None:
            return g.to(dtype)
        return torch.mul(g, scale, out=g.new_empty(g.shape, dtype=dtype))

    return (out(dx, ctx.needs[0], ctx.dtypes[0]), out(dw, ctx.needs[1], ctx.dtypes[1]),
            out(db, ctx.needs[2], ctx.dtypes[2]))


def _loss_grads(ctx, d_loss, recompute) -> tuple:
    """(d input, d linear_weight, d linear_bias) from the loss's grad_output."""
    if d_loss is None or not any(ctx.needs):
        return None, None, None
    if ctx.spec.reduction == "none":
        x, w, b, t, cw, div_t = ctx.saved_tensors
        return _finish(ctx, *recompute(x, w, b, t, cw, ctx.spec, d_loss.reshape(-1), None, None,
                                       ctx.needs, div_t))
    return _finish(ctx, *ctx.saved_tensors, scale=d_loss)


def _lse_grads(ctx, d_lse, recompute) -> tuple:
    """(d input, d linear_weight, d linear_bias) from the lse's gradient."""
    if d_lse is None or not any(ctx.needs):
        return None, None, None
    x, w, b, t, lse = ctx.saved_tensors
    return _finish(ctx, *recompute(x, w, b, t, None, ctx.spec, None, lse, d_lse.reshape(-1),
                                   ctx.needs))


def _save_lse(ctx, x, w, b, t, lse, spec, needs) -> None:
    ctx.spec = spec
    ctx.needs = (needs[0], needs[1], needs[2] and b is not None)
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else x.dtype)
    ctx.save_for_backward(x, w, b, t, lse)


class _LinearCEFunction(torch.autograd.Function):
    """Eager autograd: the forward runs the chunks (and, for mean / sum, the
    gradients); the backward scales or recomputes them."""

    @staticmethod
    def forward(ctx, x, w, b, t, cw, spec, needs, want_hits, div_t):
        loss, lse, dx, dw, db, hits = _forward(x, w, b, t, cw, spec, needs, want_hits, div_t)
        ctx.mark_non_differentiable(lse, hits)
        ctx.set_materialize_grads(False)
        _save(ctx, x, w, b, t, cw, (dx, dw, db), spec, needs, div_t)
        return loss, lse, hits

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss, d_lse, d_hits):
        return (*_loss_grads(ctx, d_loss, _recompute), None, None, None, None, None, None)


class _LseFunction(torch.autograd.Function):
    """A copy of the lse whose backward flows through the GEMMs."""

    @staticmethod
    def forward(ctx, lse, x, w, b, t, spec, needs):
        _save_lse(ctx, x, w, b, t, lse, spec, needs)
        return lse.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_lse):
        return (None, *_lse_grads(ctx, d_lse, _recompute), None, None, None)


@torch.library.custom_op("softmax_gpu::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
    weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float, chunk_size: int, need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool, want_hits: bool,
    divisor: Optional[float] = None, divisor_t: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.

    input [N, D], linear_weight [V, D], linear_bias [V] or None (all one
    float dtype), target [N] integer class indices, weight [V] or None.
    softcap 0: none; chunk_size 0: planned. Returns ``(loss, lse, dx, dw, db)``:
    loss 0-d (mean / sum) or [N] (none) in fp32 (fp64 for fp64 input), lse
    [N] fp32, and for mean / sum when asked the gradients of the loss: dx
    [N, D] in the input's dtype, dw [V, D] and db [V] in fp32 (fp64);
    gradients not computed are empty; and hits [N] int8 (``want_hits``: 1
    where the row is kept and its target is an argmax; else empty). The loss
    and gradients are divided by ``divisor`` (or the one-element ``divisor_t``)
    when given."""
    spec = _Spec(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, divisor)
    return _forward(input, linear_weight, linear_bias, target, weight, spec,
                    (need_input_grad, need_weight_grad, need_bias_grad), want_hits, divisor_t)


def _fake_grads(x, w, b, needs):
    N, D = x.shape
    V = w.shape[0]
    acc = _acc(x.dtype)
    return (x.new_empty((N, D) if needs[0] else (0,)),
            x.new_empty((V, D) if needs[1] else (0,), dtype=acc),
            x.new_empty((V,) if needs[2] and b is not None else (0,), dtype=acc))


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size, need_input_grad, need_weight_grad,
      need_bias_grad, want_hits, divisor=None, divisor_t=None):
    N = input.shape[0]
    loss = input.new_empty((N,) if reduction == "none" else (), dtype=_acc(input.dtype))
    grad = reduction != "none"
    needs = (grad and need_input_grad, grad and need_weight_grad, grad and need_bias_grad)
    return (loss, input.new_empty((N,), dtype=torch.float32),
            *_fake_grads(input, linear_weight, linear_bias, needs),
            input.new_empty((N if want_hits else 0,), dtype=torch.int8))


@torch.library.custom_op("softmax_gpu::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
    weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float, chunk_size: int, row_scale: Optional[Tensor],
    lse: Optional[Tensor], lse_scale: Optional[Tensor], need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool, divisor: Optional[float] = None,
    divisor_t: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_r row_scale[r] * loss_r`` (``reduction="none"``)
    or, when ``row_scale`` is None, of ``sum_r lse_scale[r] * lse_r``
    (``lse``: the forward's), by recomputing each chunk of logits. Returns
    (dx in the input's dtype, dw and db in fp32 / fp64), empty where not
    asked."""
    spec = _Spec(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, divisor)
    return _recompute(input, linear_weight, linear_bias, target, weight, spec, row_scale, lse,
                      lse_scale, (need_input_grad, need_weight_grad, need_bias_grad), divisor_t)


@linear_cross_entropy_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size, row_scale, lse, lse_scale, need_input_grad,
      need_weight_grad, need_bias_grad, divisor=None, divisor_t=None):
    return _fake_grads(input, linear_weight, linear_bias,
                       (need_input_grad, need_weight_grad, need_bias_grad))


def _recompute_op(x, w, b, t, cw, spec, row_scale, lse, lse_scale, needs, div_t=None):
    """:func:`_recompute` through the traced op."""
    return linear_cross_entropy_backward(x, w, b, t, cw, *spec[:6], row_scale, lse, lse_scale,
                                         *needs, spec.divisor, div_t)


def _op_setup(ctx, inputs, output):
    x, w, b, t, cw, *options, nx, nw, nb, _, divisor, div_t = inputs
    _, lse, dx, dw, db, hits = output
    ctx.mark_non_differentiable(lse, dx, dw, db, hits)
    _save(ctx, x, w, b, t, cw, (dx, dw, db), _Spec(*options, divisor), (nx, nw, nb), div_t)


def _op_backward(ctx, d_loss, d_lse, d_dx, d_dw, d_db, d_hits):
    return (*_loss_grads(ctx, d_loss, _recompute_op),) + (None,) * 14


linear_cross_entropy_forward.register_autograd(_op_backward, setup_context=_op_setup)


@torch.library.custom_op("softmax_gpu::linear_cross_entropy_lse", mutates_args=())
def linear_cross_entropy_lse(
    lse: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
    target: Tensor, softcap: float, chunk_size: int, need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool,
) -> Tensor:
    """A copy of ``lse`` (the per-row log-sum-exp of the forward) whose
    backward is d(lse)/d(input, linear_weight, linear_bias): each chunk's
    logits are recomputed, turned into grad_lse[r] * softmax(z_r) and
    backpropagated through the GEMMs. It runs only when the lse takes part in
    what is differentiated."""
    return lse.clone()


@linear_cross_entropy_lse.register_fake
def _(lse, input, linear_weight, linear_bias, target, softcap, chunk_size, need_input_grad,
      need_weight_grad, need_bias_grad):
    return torch.empty_like(lse)


def _lse_op_setup(ctx, inputs, output):
    lse, x, w, b, t, cap, chunk, nx, nw, nb = inputs
    _save_lse(ctx, x, w, b, t, lse, _Spec(-100, "sum", 0.0, 0.0, cap, chunk), (nx, nw, nb))


def _lse_op_backward(ctx, d_lse):
    return (None, *_lse_grads(ctx, d_lse, _recompute_op)) + (None,) * 6


linear_cross_entropy_lse.register_autograd(_lse_op_backward, setup_context=_lse_op_setup)


# ----------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------


def _check_same(t: Tensor, name: str, x: Tensor) -> None:
    """``t`` has the input's dtype and device (F.linear's requirement)."""
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {t.dtype}")


def _check_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size, options, loss_dtype):
    """Validate; return the call's :class:`_Spec` (floats; softcap 0: none;
    chunk_size 0: planned)."""
    check_tensor(input, "input")
    check_float(input, "input")
    if input.dim() not in (1, 2):
        raise ValueError(f"input must have shape (N, D) or (D,), got {tuple(input.shape)}")
    D = input.shape[-1]
    check_tensor(linear_weight, "linear_weight")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must have shape (V, D) (V classes, D = {D} features), got "
            f"{tuple(linear_weight.shape)}; K-dimensional losses ((V, d1, ..., D) weights) "
            "are not supported")
    V = linear_weight.shape[0]
    if linear_weight.shape[1] != D:
        raise ValueError(f"linear_weight shape {tuple(linear_weight.shape)} does not match "
                         f"input shape {tuple(input.shape)}: expected ({V}, {D})")
    if V == 0:
        raise ValueError("linear_weight has no rows: there are no classes")
    check_row_length(V, "linear_weight's dim 0 (classes)")
    _check_same(linear_weight, "linear_weight", input)
    if linear_bias is not None:
        check_tensor(linear_bias, "linear_bias")
        if tuple(linear_bias.shape) != (V,):
            raise ValueError(f"linear_bias must have shape ({V},), got {tuple(linear_bias.shape)}")
        _check_same(linear_bias, "linear_bias", input)
    check_tensor(target, "target")
    batch = tuple(input.shape[:-1])
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices of shape {batch} (probability "
                        f"targets are not supported), got {target.dtype}")
    if tuple(target.shape) != batch:
        raise ValueError(f"target must have shape {batch} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if weight is not None:
        check_tensor(weight, "weight")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
        if tuple(weight.shape) != (V,):
            raise ValueError(f"weight must have shape ({V},) (one value per class), got "
                             f"{tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if ignore_index is None:
        ignore_index = -100  # torch's F.linear_cross_entropy default
    eps, zl, cap = _scalar_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    chunk = _check_chunk(chunk_size, "chunk_size")
    if options is not None:
        from_options = _check_chunk(getattr(options, "batch_chunk_size", None),
                                    "options.batch_chunk_size")
        if chunk and from_options and chunk != from_options:
            raise ValueError(f"chunk_size={chunk_size} and options.batch_chunk_size="
                             f"{from_options} disagree; pass one")
        chunk = chunk or from_options
    if loss_dtype is not None and loss_dtype not in FLOAT_DTYPES:
        raise TypeError(f"loss_dtype must be a floating dtype or None, got {loss_dtype}")
    return _Spec(ignore_index, reduction, eps, zl, cap, chunk)


def _check_chunk(value, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    options=None,
    loss_dtype: Optional[torch.dtype] = None,
    return_token_accuracy: bool = False,
    divisor: Optional[float | Tensor] = None,
):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target)``
    without ever holding the [N, V] logits: a drop-in for torch's
    ``F.linear_cross_entropy`` (class-index targets).

    Args:
        input: (N, D) or (D,) hidden states; float16, bfloat16, float32 or
            float64, on CUDA or CPU.
        linear_weight: (V, D) projection (the LM head), the input's dtype and
            device.
        target: (N,) or () integer class indices (any integer dtype); rows
            equal to ``ignore_index`` count for nothing.
        linear_bias: (V,) bias of the projection, or None.
        weight: (V,) class weights, or None (any float dtype).
        reduction: "mean" (weighted mean over the kept rows: NaN when every
            row is ignored, as torch), "sum" or "none" (per-row losses shaped
            like ``target``).
        ignore_index: int; None means -100 (torch's ``F.linear_cross_entropy``).
        label_smoothing: in [0, 1], torch's formula (weights included).
        z_loss: adds ``z_loss * lse**2`` per kept row (for the mean, divided by
            the number of kept rows, without class weights).
        softcap: logits become ``softcap * tanh(logits / softcap)`` first.
        return_lse: also return the per-row log-sum-exp of the (softcapped)
            logits, fp32, shaped like ``target``. It is differentiable: its
            gradient flows through the GEMMs into input, linear_weight and
            linear_bias (by a second pass that recomputes the logits, run
            only when the lse is part of what is differentiated; d lse / dz
            = exp(z - lse) uses this fp32 lse, so that gradient is
            fp32-accurate even for fp64 input).
        chunk_size: rows per chunk (default: planned from a memory budget and
            the multiprocessor count, 4096 rows for LLM shapes).
        options: torch's ``LinearCrossEntropyOptions`` (torch >= 2.13) or
            any object with ``batch_chunk_size``: that is honoured as
            ``chunk_size``; its precision and retain-graph fields do not
            apply (the weight gradient is always accumulated in fp32, and
            backpropagating twice always works).
        loss_dtype: dtype of the returned loss (default: the input's, as
            torch); ``torch.float32`` gives the fp32 value the kernel computed.
        return_token_accuracy: also return the token accuracy, a 0-d fp32
            tensor: the fraction of kept rows (target != ignore_index) whose
            target is an argmax of its (softcapped) logits, 0 when no row is
            kept. It comes from the loss kernel's own pass over each chunk
            (a target tied with another class at the maximum counts as
            correct); not differentiable.
        divisor: the returned loss is the reduced loss divided by it, and so
            are the gradients the forward computes (mean / sum), so that a
            backward scale stated ahead (gradient accumulation's 1/k as
            ``divisor=k``, a loss scale s as ``divisor=1/s``, a token count)
            costs the backward nothing but the final casts. A finite nonzero
            number or a one-element tensor on the input's device (read there,
            no host sync). It gets no gradient.

    Returns:
        the loss, then the lse with ``return_lse``, then the accuracy with
        ``return_token_accuracy`` (a tuple when either is asked).

    Semantics and numerics: the logits of each chunk are the input's dtype,
    rounded as F.linear rounds them; the loss and gradient arithmetic is fp32
    (fp64 for fp64); the weight and bias gradients accumulate in fp32 over
    the chunks and are cast once. Class indices outside [0, V) that are not
    ignored are never used as addresses: on CUDA (and in Triton's
    interpreter) their rows' loss and gradient are NaN (a mean becomes NaN);
    the CPU torch path raises IndexError as torch does. No host-device sync;
    capturable in a CUDA graph and traceable by
    ``torch.compile(fullgraph=True)``. Memory: one [chunk, V] logits buffer,
    the fp32 [V, D] weight-gradient accumulator, dX [N, D]. With
    ``reduction="none"`` the backward recomputes the logits (four GEMMs
    instead of three), and a grad_output other than 1 is applied to each
    gradient row (one more rounding in 16-bit dtypes) before the GEMMs.
    A gradient, once returned, is never changed by a later backward over a
    retained graph. The gradient is not itself differentiable (no double
    backward), and ``weight`` gets none. With fp16 input the logits'
    gradient is stored in fp16 before the GEMMs, already divided by the
    mean's denominator, so its smallest entries can underflow (as in torch's
    fp16 cross-entropy); bf16 has fp32's range.
    """
    spec = _check_args(input, linear_weight, target, linear_bias, weight, reduction,
                       ignore_index, label_smoothing, z_loss, softcap, chunk_size, options,
                       loss_dtype)
    div_f, div_t = check_divisor(divisor, input)
    spec = spec._replace(divisor=div_f)
    x = input if input.dim() == 2 else input.unsqueeze(0)
    t = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
             grad_on and linear_bias is not None and linear_bias.requires_grad)
    cap, chunk = spec.cap, spec.chunk_size
    want_hits = bool(return_token_accuracy)
    if traced(x):
        loss, lse, _, _, _, hits = linear_cross_entropy_forward(
            x, linear_weight, linear_bias, t, weight, *spec[:6], *needs, want_hits, spec.divisor,
            div_t)
        if return_lse and any(needs):
            lse = linear_cross_entropy_lse(lse, x, linear_weight, linear_bias, t, cap, chunk,
                                           *needs)
    elif any(needs):
        loss, lse, hits = _LinearCEFunction.apply(x, linear_weight, linear_bias, t, weight, spec,
                                                  needs, want_hits, div_t)
        if return_lse:
            lse = _LseFunction.apply(lse, x, linear_weight, linear_bias, t,
                                     _Spec(-100, "sum", 0.0, 0.0, cap, chunk), needs)
    else:
        loss, lse, _, _, _, hits = _forward(x, linear_weight, linear_bias, t, weight, spec,
                                            needs, want_hits, div_t)
    loss = loss.to(loss_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    out = (loss,)
    if return_lse:
        out += (lse.reshape(target.shape),)
    if want_hits:
        kept = (t != spec.ignore_index).sum(dtype=torch.float32)
        out += (hits.sum(dtype=torch.float32) / kept.clamp(min=1.0),)
    return out[0] if len(out) == 1 else out


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss` running
    :func:`linear_cross_entropy`.

    The same constructor and the same state (``linear`` is an
    :class:`torch.nn.Linear` of ``in_features -> num_classes``, ``weight`` a
    buffer), so a state_dict loads across; plus the keyword-only extras
    ``z_loss``, ``softcap``, ``return_lse``, ``chunk_size`` and
    ``loss_dtype``. K-dimensional losses (``out_features != ()``) are not
    supported.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False,
                 chunk_size: Optional[int] = None,
                 loss_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise NotImplementedError(
                f"out_features={tuple(out_features)}: K-dimensional losses are not supported "
                "by softmax_gpu.LinearCrossEntropyLoss")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got "
                             f"{tuple(weight.shape)}")
        _scalar_options(-100 if ignore_index is None else ignore_index, reduction,
                        label_smoothing, z_loss, softcap)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.chunk_size = chunk_size
        self.loss_dtype = loss_dtype

    def forward(self, input: Tensor, target: Tensor):
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse, chunk_size=self.chunk_size, options=self.options,
            loss_dtype=self.loss_dtype)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"bias={self.linear.bias is not None}", f"reduction={self.reduction}",
                 f"ignore_index={self.ignore_index}", f"label_smoothing={self.label_smoothing}"]
        for name in ("z_loss", "softcap", "chunk_size", "options"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        return ", ".join(parts)
