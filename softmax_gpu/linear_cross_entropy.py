"""Fused linear + cross-entropy: the LM-head loss without ever holding the logits.

``linear_cross_entropy(input, linear_weight, target)`` is
``cross_entropy(F.linear(input, linear_weight, linear_bias), target)`` computed
chunk by chunk over the tokens, so no [N, V] tensor ever exists.

Per chunk of rows (about 700 at an LLM vocabulary; see :func:`chunk_rows`),
in the forward, when a gradient is needed:

1. one GEMM writes the chunk's logits into a reused [chunk, V] buffer
   (``torch.mm(out=)`` / ``torch.addmm(out=)`` with the bias);
2. the fused cross-entropy kernel (``kernels/cross_entropy.py``, one launch)
   writes each row's loss and log-sum-exp and, in place over the logits,
   the gradient ``sigma * sum(y) - y``, already divided by the mean's
   denominators, which are computed once from ALL the targets on the device
   (no host sync);
3. ``dX[chunk] = dlogits @ W`` goes straight into the preallocated dX, and
   ``dW += dlogits^T @ X[chunk]`` is accumulated IN PLACE in the returned
   weight gradient itself, in the weight's dtype (cuBLAS accumulates each
   chunk's product in fp32 and rounds the sum once per chunk, as Liger
   does, with 4 to 8 times fewer chunks); the bias gradient is the column
   sums in fp32.

So the memory beyond the returned gradients is one chunk of logits (192
MiB at most by default). Two opt-ins trade it differently
(:class:`LinearCrossEntropyOptions`): ``acc_policy="balanced"`` accumulates
a 16-bit weight's gradient in an fp32 [V, D] buffer (rounded once; costs
3 x the weight's size more at the peak), and ``chunking_method="lean"``
uses chunks no larger than the input (at least 32 MiB; under autocast
over fp32 parameters, the default chunks and the weight cast to 16 bits a
slice at a time instead of whole). A Megatron-style
fp32 ``main_grad`` gets the weight gradient added straight into it (no dW
tensor at all).

With ``overlap`` (CUDA only), each chunk's cross-entropy runs on a side
stream in two halves, ordered by events (no host sync, capturable in a CUDA
graph): the first half's under the second half's logits GEMM, the second
half's under the first half's dX GEMM.

The backward of ``reduction="mean"/"sum"`` multiplies the gradients the
forward computed by grad_output IN PLACE (a launch that touches nothing
when grad_output is 1, e.g. ``loss.backward()`` or a scale given ahead as
``divisor``) and hands them out when the graph is freed after it; a
backward that retains the graph gets new tensors, and the ones handed out
never change. ``reduction="none"``
cannot know its per-row grad_output in the forward, and dW sums over rows,
so the forward computes only the loss (and the lse) and the backward
recomputes each chunk's logits, turns them into grad_output times the
gradient in one pass from the forward's lse (``ce_class_backward_kernel``,
rounded once), and runs the GEMMs (four in all instead of three); so does
a call with ``main_grad``, whose weight gradient must include grad_output,
and any call with fp16 GEMMs (a loss scale known only at backward). Without
a gradient (eval, no_grad) each chunk is one GEMM and the loss kernel.

Eagerly the op is a ``torch.autograd.Function``; while a graph is traced
(``torch.compile(fullgraph=True)``, make_fx) it is the ``torch.library`` ops
``softmax_gpu::linear_cross_entropy_*`` with fake implementations; both run
the same passes (traced, the backward's grad_output scaling writes new
tensors). On CPU without ``TRITON_INTERPRET=1`` the kernels are replaced by
a torch reference with the same semantics; everything else (chunking,
GEMMs) is shared. :class:`_ChunkLoss` is the only code here that touches the
cross-entropy internals (launchers, launch configs, reference).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import heuristics
from ._checks import (check_float, check_loss_dtype, check_row_length, check_tensor,
                      check_strided, check_weight_takes_no_grad)
from ._dispatch import (anchor_output, autocast_on, backend_for, first_order, launch_device,
                        graph_kept, launch_on, new_output, plan_cache,
                        refuse_batched_backward, refuse_transformed, remember, saved, traced)
from .cross_entropy import (_scalar_options, _scale_, _scaled, check_divisor, cross_entropy,
                            cross_entropy_backward_config, cross_entropy_config,
                            cross_entropy_scale_config, denominators_plan, reference_lse_grad,
                            times_keeping_zeros)
from .kernels import cross_entropy as K

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "LinearCrossEntropyOptions"]


# ----------------------------------------------------------------------------
# Chunk plan
# ----------------------------------------------------------------------------

# Largest chunk of logits (bytes) of the default plan ("auto"). The memory a
# call needs beyond its gradients is this one buffer: at 4096 tokens x 4096
# hidden x 128256 vocabulary in bf16 the plan is 6 chunks of 704 rows
# (0.17 GiB), for a peak of 1.18 GiB with the 0.98 GiB dW and 0.03 GiB dX.
# Each chunk's dW += G^T X reads and writes the [V, D] gradient once: 2 V n D
# flops against 4 V D bytes (bf16), n / 2 flops per byte, and an H200 needs
# about 165 (790 TFLOP/s over 4.8 TB/s); 700 rows keep a 2x margin.
CHUNK_BYTES = 192 << 20
# The memory-first plan ("lean"): chunks of logits no larger than the input
# [N, D] itself, and at least LEAN_BYTES: 128 rows at 4096 x 4096 x 128256
# bf16, peak 1.04 GiB; its dW GEMMs are memory-bound there (n / 2 = 64 flops
# per byte), about 1.5x the default's time (1.7x the floor). At 16384 tokens
# 512 rows (as many chunks as Liger's, so the same bf16 accumulation error),
# peak 1.23 GiB.
LEAN_BYTES = 32 << 20
# "lean" under autocast over fp32 weights: the weight is cast to the GEMMs'
# dtype a slice of at most this many 16-bit bytes at a time (4096 rows at
# D = 4096), twice per chunk (the logits, then dX; four times with
# ``overlap``, which cuts a chunk in two), never whole.
WEIGHT_SLICE_BYTES = 32 << 20
# Chunks are balanced (equal up to this multiple of rows) rather than
# leaving a small last chunk, and never fewer rows than MIN_ROWS.
ROW_ALIGN = 64
MIN_ROWS = 16
# Whether the chunks' cross-entropy runs on a side CUDA stream by default.
# Off until measured: see perf/NOTES.md.
OVERLAP = False

_CHUNKINGS = ("auto", "lean")


def chunk_rows(N: int, V: int, elem_bytes: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk for N tokens of a V-wide vocabulary: as many as fit
    ``budget`` bytes of logits (at least MIN_ROWS), cut into balanced chunks
    whose size is a multiple of ROW_ALIGN (of MIN_ROWS when the budget holds
    fewer than 4 ROW_ALIGN rows)."""
    cap = max(MIN_ROWS, budget // max(1, V * elem_bytes))
    if N <= cap:
        return max(N, 1)
    align = ROW_ALIGN if cap >= 4 * ROW_ALIGN else MIN_ROWS
    rows = cap // align * align
    chunks = -(-N // rows)
    per = -(-N // chunks)
    return min(rows, -(-per // align) * align)


def aspect_rows(N: int, V: int, D: int, factor: int = 1) -> int:
    """torch's ``chunking_method="aspect_ratio:factor"``: chunks whose logits
    are about the size of the input, ``next_pow2(ceil(N / ceil(V / D)))``,
    divided by ``factor`` (at least one row)."""
    rows = -(-N // max(1, -(-V // max(D, 1))))
    return max(1, (1 << max(0, rows - 1).bit_length()) // factor)


def plan_rows(N: int, V: int, x: Tensor, chunk_size: int = 0, chunking: str = "auto") -> int:
    """Rows per chunk for the [N, D] input ``x`` and a V-wide vocabulary:
    ``chunk_size`` when given (> 0), else the plan named by ``chunking``
    ("auto": :data:`CHUNK_BYTES` of logits; "lean": as many as the input
    ``x`` holds, at least :data:`LEAN_BYTES`; "aspect_ratio[:k]":
    :func:`aspect_rows`)."""
    if chunk_size > 0:
        return max(1, min(chunk_size, N))
    if chunking.startswith("aspect_ratio"):
        _, _, factor = chunking.partition(":")
        return max(1, min(N, aspect_rows(N, V, x.shape[1], int(factor or 1))))
    budget = CHUNK_BYTES
    if chunking == "lean":
        budget = min(CHUNK_BYTES, max(LEAN_BYTES, N * x.shape[1] * x.element_size()))
    return chunk_rows(N, V, x.element_size(), budget)


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """Options of :func:`linear_cross_entropy`, field names as torch's
    ``torch.nn.LinearCrossEntropyOptions`` (which is accepted as well, as is
    any object with some of these attributes).

    Attributes:
        batch_chunk_size: rows per chunk (None: planned by ``chunking_method``).
        chunking_method: ``"auto"`` (or None): speed first, chunks of at most
            192 MiB of logits (704 rows at 4096 tokens x 128256 bf16; peak
            1.18 GiB at 4096 x 4096 x 128256 with the 0.98 GiB dW).
            ``"lean"``: memory first, chunks of logits no larger than the
            input (at least 32 MiB): 128 rows there, peak 1.04 GiB; the dW
            GEMM of so few rows is memory-bound, about 1.5x the time of
            "auto" (predicted, see perf/NOTES.md); 512 rows at 16384 tokens
            (peak 1.23 GiB, about the default's time). Under autocast over
            a wider weight (fp32 parameters, bf16 / fp16 GEMMs), ``"lean"``
            instead keeps the default chunks and casts the weight a slice of
            32 MiB at a time, twice per chunk (four times with ``overlap``),
            where the default casts it
            whole once per pass (a 16-bit copy of the weight, 0.98 GiB at
            128256 x 4096, as F.linear under autocast makes): peak the fp32
            dW and dX plus one chunk of logits and two slices (2.3 GiB there
            instead of 3.2), at about 1.3x the default's time (each chunk
            reads the fp32 weight twice more; predicted, see
            perf/NOTES.md); dX is accumulated in fp32 over the slices. In
            eager mode only: under torch.compile the weight is cast whole.
            ``"aspect_ratio"`` / ``"aspect_ratio:k"``: torch's rule, chunks
            whose logits are about the input's size (divided by k).
        acc_policy: how a bf16 / fp16 weight's gradient is accumulated over
            the chunks. ``"auto"`` / ``"compact"``: in place in the returned
            gradient (cuBLAS adds each chunk's fp32 product and rounds once
            per chunk: no memory beyond dW). ``"balanced"`` / ``"accurate"``:
            in an fp32 [V, D] buffer, rounded once at the end (the error of
            eager's single GEMM), which costs 4 V D bytes while the chunks
            run and 6 V D bytes (the fp32 buffer and the 16-bit result) at the
            end: 2.9 GiB instead of 1.2 at 4096 x 4096 x 128256. fp32 / fp64
            weights always accumulate in place in their own dtype.
        overlap: run each chunk's cross-entropy on a side CUDA stream,
            overlapped with the GEMMs (None: the library default,
            ``OVERLAP``). Same results bit for bit; no effect on CPU.
    """

    batch_chunk_size: Optional[int] = None
    chunking_method: Optional[str] = "auto"
    acc_policy: str = "auto"
    overlap: Optional[bool] = None


_ACC32 = {"auto": False, "compact": False, "balanced": True, "accurate": True}


def _check_options(options) -> tuple[int, str, bool, bool]:
    """(rows per chunk or 0, chunking, fp32 accumulation, overlap) from an
    options object (any object; missing attributes take the defaults)."""
    if options is None:
        return 0, "auto", False, OVERLAP
    if isinstance(options, (str, bytes, numbers.Number, collections.abc.Mapping)) or \
            type(options) in (list, tuple):
        # its fields would silently read as the defaults
        raise TypeError(f"options must be a LinearCrossEntropyOptions (or an object with its "
                        f"attributes), got {type(options).__name__}")
    chunk = _check_chunk(getattr(options, "batch_chunk_size", None), "options.batch_chunk_size")
    method = getattr(options, "chunking_method", "auto")
    method = "auto" if method is None else method
    ok = method in _CHUNKINGS
    if isinstance(method, str) and method.startswith("aspect_ratio"):
        _, sep, factor = method.partition(":")
        ok = method == "aspect_ratio" or (sep and factor.isdigit() and int(factor) > 0)
    if not ok:
        raise ValueError(f"options.chunking_method must be 'auto', 'lean', 'aspect_ratio' or "
                         f"'aspect_ratio:k' (k > 0) or None, got {method!r}")
    policy = getattr(options, "acc_policy", "auto")
    if not isinstance(policy, str) or policy not in _ACC32:
        raise ValueError(f"options.acc_policy must be one of {sorted(_ACC32)}, got {policy!r}")
    overlap = getattr(options, "overlap", None)
    if overlap is not None and not isinstance(overlap, bool):
        raise ValueError(f"options.overlap must be a bool or None, got {overlap!r}")
    return chunk, method, _ACC32[policy], OVERLAP if overlap is None else overlap


# ----------------------------------------------------------------------------
# The loss kernel over one call's chunks
# ----------------------------------------------------------------------------


class _Spec(NamedTuple):
    """A call's options, validated (cap 0: no softcap; chunk_size 0: planned
    by ``chunking``; ``acc32``: a 16-bit weight's gradient accumulated in
    fp32; ``overlap``: the cross-entropy on a side CUDA stream)."""

    ignore_index: int
    reduction: str
    eps: float
    z_loss: float
    cap: float
    chunk_size: int
    divisor: Optional[float] = None  # a number divisor (a tensor one travels beside the spec)
    chunking: str = "auto"
    acc32: bool = False
    overlap: bool = False
    # the GEMMs' dtype when it is not the weight's (torch.autocast): the
    # weight and bias are cast once per pass, their gradients accumulate in
    # their own dtypes
    gemm: Optional[torch.dtype] = None


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
            self.den = new_output((K.DEN_LEN,), acc, x.device)
            launch = denominators_plan(
                t.shape[0], V, spec.ignore_index, self.w is not None, spec.eps > 0, x.dtype,
                x.device, count=self.mean,
                divisor="tensor" if div_t is not None else spec.divisor)
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
            extras = has_w or sp.eps > 0 or sp.cap > 0
            if kind == "lse":
                cfg = cross_entropy_scale_config(n, self.V, z.element_size(), z.device)
                launch = K.lse_grad_launcher(n, self.V, 1, strides, strides, sp.cap, self.dtype,
                                             cfg)
            elif kind == "backward":
                cfg = cross_entropy_backward_config(n, self.V, z.element_size(), z.device, extras)
                launch = K.class_backward_launcher(n, self.V, 1, strides, strides,
                                                   sp.ignore_index, self.use_den, sp.eps,
                                                   sp.z_loss, sp.cap, 1.0, has_w, self.dtype, cfg)
            else:
                cfg = cross_entropy_config(n, self.V, z.element_size(), z.device, extras,
                                           reread=kind == "grad" or sp.eps > 0)
                launch = K.class_launcher(n, self.V, 1, strides, strides, sp.ignore_index,
                                          self.use_den, sp.eps, sp.z_loss, sp.cap, 1.0, has_w,
                                          kind == "grad", self.dtype, cfg, write_hit=hit)
            remember(_LAUNCHERS, key, launch)
        return launch

    def loss_(self, z: Tensor, t: Tensor, write_grad: bool, loss: Tensor, lse: Tensor,
              state: Tensor, hit: Optional[Tensor] = None) -> None:
        """The loss of the chunk ``z`` ([n, V] contiguous rows, targets ``t``
        [n]) and, when ``write_grad``, its gradient written over ``z``:
        d(sum of the chunk's row losses)/dz. Writes ``loss`` [n] (fp32 / fp64,
        already divided by the global denominators), ``lse`` [n] (the same) and,
        with ``write_grad``, the kernel's per-row scratch ``state`` [n] (ACC).
        ``hit`` ([n] int8, optional) gets 1 where the row is kept and its
        target is an argmax of its logits, from the same pass. The outputs
        are views of tensors allocated by the caller: nothing is allocated
        here (the call may run on a side stream)."""
        if z.shape[0] == 0:
            return
        if not self.triton:
            _chunk_reference(z, t, self.w, self.spec, self.den, write_grad, loss, lse, hit)
            return
        launch = self._launcher("grad" if write_grad else "loss", z, hit is not None)
        launch_on(self.dev, launch, z, t, self.w if self.w is not None else loss,
                  self.den if self.den is not None else loss, z, loss, lse,
                  state if write_grad else loss, loss if hit is None else hit)

    def grad_(self, z: Tensor, t: Tensor, lse: Tensor, go: Tensor) -> None:
        """In place: row r of the chunk ``z`` ([n, V] contiguous rows, targets
        ``t`` [n]) becomes go[r] * d loss_r / dz (divided by the global
        denominators), from the forward's ``lse`` [n] (fp32 / fp64): one read
        and one write, formed in fp32 (fp64) and rounded once, so that no
        small entry is lost before grad_output scales it (fp16)."""
        if z.shape[0] == 0:
            return
        if not self.triton:
            scratch = go.new_empty(go.shape, dtype=self.acc)
            _chunk_reference(z, t, self.w, self.spec, self.den, True, scratch,
                             torch.empty_like(lse), go=go)
            return
        launch_on(self.dev, self._launcher("backward", z), z, t,
                  self.w if self.w is not None else lse, self.den if self.den is not None else lse,
                  lse, go, z, go.stride(0) if go.numel() > 1 else 0)

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


def _chunk_reference(z, t, weight, spec, den, write_grad, loss, lse, hit=None,
                     go=None) -> None:
    """Torch reference of :meth:`_ChunkLoss.loss_` and (``go``: the rows'
    grad_output, applied before the gradient is rounded) :meth:`_ChunkLoss.grad_`
    (the CPU path without the interpreter), dividing by the global
    denominators ``den`` (mean): fills ``loss`` and ``lse``, and ``z`` with
    the gradient. Targets outside [0, V) that are not ignored raise
    IndexError, as torch does."""
    n, V = z.shape
    acc = loss.dtype
    x = z.to(acc)
    if spec.cap > 0:
        x = spec.cap * torch.tanh(x / spec.cap)
    lse_ = torch.logsumexp(x, 1)
    t = t.long()
    kept = t != spec.ignore_index
    bad = kept & ((t < 0) | (t >= V))
    if z.device.type != "meta" and bool(bad.any()):  # meta: shapes only
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
        if go is not None:
            g = g * go.to(acc)[:, None]
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
# out_dtype=float32 into an fp32 ``out`` on CUDA (addmm: with the fp32
# accumulator itself as the added input, which older torch refuses); learnt
# at the first call, before any launch.
_OUT_DTYPE_OK: dict[str, bool] = {}
# Rows of the accumulator per fp32 product when addmm refuses (64 MiB each).
SLAB_BYTES = 64 << 20


def _try_out_dtype(op, *args, out: Tensor) -> bool:
    """``op(*args, out_dtype=out.dtype, out=out)`` if this torch accepts it."""
    if not _OUT_DTYPE_OK.get(op.__name__, True):
        return False
    try:
        op(*args, out_dtype=out.dtype, out=out)
        return True
    except (RuntimeError, TypeError, NotImplementedError):  # checked before any launch
        _OUT_DTYPE_OK[op.__name__] = False
        return False


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, add: bool) -> None:
    """acc <- a @ b (``add``: acc += a @ b), in place, without a copy of the
    product: the GEMM accumulates in fp32 (fp64) and rounds into ``acc`` once.

    Same dtype: ``mm`` / ``addmm_`` into ``acc`` (a bf16 ``acc`` is rounded
    once per call). bf16/fp16 operands into an fp32 ``acc`` on CUDA: cuBLAS
    with ``out_dtype=float32`` (beta = 1 into ``acc`` to add). Where addmm
    refuses that (older torch), the product goes through fp32 slabs of
    SLAB_BYTES (``mm(out_dtype=float32)``, then ``add_``: one more fp32
    rounding and twice the accumulator's traffic). On CPU, the operands are
    copied to the accumulator's dtype first (one chunk-sized copy; the
    products are still exact in fp32)."""
    if a.dtype == acc.dtype:
        if add:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
        return
    if acc.is_cuda:
        if _try_out_dtype(torch.addmm if add else torch.mm, *((acc,) if add else ()), a, b,
                          out=acc):
            return
        if add:  # addmm refused the fp32 accumulator as its input: fp32 slabs
            step = max(1, SLAB_BYTES // max(1, acc.shape[1] * acc.element_size()))
            slab = acc.new_empty((min(step, acc.shape[0]), acc.shape[1]))
            for r in range(0, acc.shape[0], step):
                part = acc[r: r + step]
                if not _try_out_dtype(torch.mm, a[r: r + step], b, out=slab[: part.shape[0]]):
                    break  # (only ever at the first slab)
                part.add_(slab[: part.shape[0]])
            else:
                return
    a, b = a.to(acc.dtype), b.to(acc.dtype)
    if add:
        acc.addmm_(a, b)
    else:
        torch.mm(a, b, out=acc)


class _Grads(NamedTuple):
    """Where one pass's gradients go: dx [N, D] (input dtype), dw [V, D] and
    db [V] accumulators; None for a gradient not asked. ``dw_add``: dw is a
    caller's buffer (``main_grad``) that every chunk adds into, never
    overwrites."""

    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]
    dw_add: bool = False


def _weight_grad_dtype(w: Tensor, acc32: bool) -> torch.dtype:
    """The dtype dW is accumulated in: the weight's, or fp32 for a 16-bit
    weight with ``acc32``."""
    return torch.float32 if acc32 and w.element_size() < 4 else w.dtype


def _grad_buffers(x: Tensor, w: Tensor, b: Optional[Tensor], needs, acc32: bool = False,
                  main_grad: Optional[Tensor] = None) -> _Grads:
    """The gradient accumulators of one pass: dx in the input's dtype; dw in
    the weight's dtype (fp32 for a 16-bit weight with ``acc32``), or
    ``main_grad`` itself, added into; db in fp32 (fp64); None where not
    needed. The chunks write every element of dx and of the first chunk's
    dw and db (no zero fill), except for an empty batch (zeros)."""
    N, D = x.shape
    V = w.shape[0]

    def alloc(shape, dtype):  # poisoned in the tests: the chunks must write every element
        return new_output(shape, dtype, x.device) if N else torch.zeros(shape, dtype=dtype,
                                                                         device=x.device)

    dx = alloc((N, D), x.dtype) if needs[0] else None
    if not needs[1]:
        dw = None
    elif main_grad is not None:
        dw = main_grad
    else:
        dw = alloc((V, D), _weight_grad_dtype(w, acc32))
    db = alloc((V,), _acc(x.dtype)) if needs[2] and b is not None else None
    return _Grads(dx, dw, db, main_grad is not None)


def _input_grad(g: Tensor, w: Tensor, out: Tensor) -> None:
    """out <- g @ w: rows of dX from their logits gradient (input dtype)."""
    torch.mm(g, w, out=out)


def _sliced(w: Tensor, spec: _Spec) -> bool:
    """Whether the chunks cast the weight slice by slice: ``"lean"`` under
    autocast over a weight wider than the GEMMs' dtype (fp32 parameters),
    so that no 16-bit copy of the whole weight exists."""
    return (spec.chunking == "lean" and spec.gemm is not None and
            w.element_size() > torch.finfo(spec.gemm).bits // 8)


def _weight_slices(w: Tensor, gemm: torch.dtype):
    """(rows, w[rows] cast to ``gemm``) over the weight's rows, slices of at
    most WEIGHT_SLICE_BYTES in ``gemm`` and a multiple of ROW_ALIGN rows (so
    that the logits' and the gradient's column slices start aligned); two
    alive at once at most (the next is cast while the caller holds the last)."""
    step = WEIGHT_SLICE_BYTES // max(1, w.shape[1] * torch.finfo(gemm).bits // 8)
    step = max(ROW_ALIGN, step // ROW_ALIGN * ROW_ALIGN)
    for r in range(0, w.shape[0], step):
        rows = slice(r, min(w.shape[0], r + step))
        yield rows, w[rows].to(gemm)


def _logits_sliced(x: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor,
                   gemm: torch.dtype) -> None:
    """out <- x @ w^T (+ b), the weight (and bias) cast to ``gemm`` a slice
    of its rows at a time: the same logits as :func:`_logits` on the cast
    weight (each element is the same dot product)."""
    for rows, ws in _weight_slices(w, gemm):
        _logits(x, ws, b[rows].to(gemm) if b is not None else None, out[:, rows])


def _input_grad_sliced(g: Tensor, w: Tensor, out: Tensor, gemm: torch.dtype) -> None:
    """out <- g @ w with the weight cast to ``gemm`` a slice at a time: the
    products accumulated in fp32 (in ``out`` itself when it is fp32, else in
    an fp32 [n, D] buffer rounded once into ``out``)."""
    acc = out if out.dtype == torch.float32 else out.new_empty(out.shape, dtype=torch.float32)
    for i, (rows, ws) in enumerate(_weight_slices(w, gemm)):
        _accumulate(acc, g[:, rows], ws, add=i > 0)
    if acc is not out:
        out.copy_(acc)


def _backprop(g: Tensor, x: Tensor, w: Tensor, grads: _Grads, first: bool) -> None:
    """The weight and bias gradients of one chunk's logits gradient ``g``
    [n, V] (input rows ``x`` [n, D]):
    dw += g^T @ x and db += the column sums of g, in place (the first chunk
    writes them, unless dw is a caller's buffer, which is always added to)."""
    if grads.dw is not None:
        _accumulate(grads.dw, g.t(), x, add=grads.dw_add or not first)
    if grads.db is not None:
        if first:
            torch.sum(g, 0, dtype=grads.db.dtype, out=grads.db)
        else:
            grads.db.add_(g.sum(0, dtype=grads.db.dtype))


# ----------------------------------------------------------------------------
# Streams: where each chunk's cross-entropy runs
# ----------------------------------------------------------------------------

# One side stream per CUDA device, made at the first overlapped call (warm a
# call up before capturing it in a CUDA graph).
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


class _Lanes:
    """Where a chunk's memory-bound cross-entropy runs relative to its
    compute-bound GEMMs.

    Serial (CPU, or overlap off): everything in order on the current stream,
    each chunk's cross-entropy in one piece. Overlapped (CUDA with
    ``overlap``): each chunk is cut in two halves; the cross-entropy of a
    half runs on a side stream once its logits GEMM is done (an event
    recorded on the main stream), and the main stream waits for it (an event
    recorded on the side stream) before that half's backprop GEMMs. The only
    memory allocated on the side stream is a launch's small workspace (the
    cooperative and resident plans'), used and given back in that stream's
    order; every side-stream launch is waited for by the main stream before
    the pass returns, so the main stream's tensors need no ``record_stream``
    and a CUDA graph capture forks and joins cleanly. No host sync. One side
    stream serves every call on a device: overlapped calls from two streams
    (or threads) of one device take turns on it."""

    def __init__(self, device: torch.device, overlap: bool):
        self.on = overlap and device.type == "cuda"
        if self.on:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.main = torch.cuda.current_stream(index)
            side = _SIDE_STREAMS.get(index)
            if side is None:
                side = _SIDE_STREAMS[index] = torch.cuda.Stream(index)
            self.side = side

    def parts(self, n: int) -> list[slice]:
        """The row ranges of an n-row chunk whose cross-entropy runs as one piece."""
        if not self.on or n < 2:
            return [slice(0, n)]
        return [slice(0, n // 2), slice(n // 2, n)]

    def cross_entropy(self):
        """Context for a part's cross-entropy: on the side stream after the
        main stream's work so far (serial: a no-op)."""
        if not self.on:
            return contextlib.nullcontext()
        ready = torch.cuda.Event()
        ready.record(self.main)
        self.side.wait_event(ready)
        return torch.cuda.stream(self.side)

    def mark(self):
        """An event after the side stream's work so far (serial: None)."""
        if not self.on:
            return None
        done = torch.cuda.Event()
        done.record(self.side)
        return done

    def wait(self, done) -> None:
        """The main stream waits for ``done`` (from :meth:`mark`)."""
        if done is not None:
            self.main.wait_event(done)


def _sweep(x: Tensor, w: Tensor, b: Optional[Tensor], spec: _Spec, loss_fn,
           grads: Optional[_Grads]) -> None:
    """The chunk loop of every pass. Per chunk of rows: the logits GEMM into
    a reused [chunk, V] buffer, ``loss_fn(z, rows)`` on each part of it (the
    cross-entropy, in place; ``rows``: the part's rows of the call), then,
    with ``grads``, dX[rows] = z @ W per part and dW, db accumulated over the
    whole chunk (:func:`_backprop`). See :class:`_Lanes` for the order."""
    N, V = x.shape[0], w.shape[0]
    if N == 0:
        return
    sliced = _sliced(w, spec)
    if spec.gemm is not None and not sliced:  # autocast: the GEMMs in its dtype, as F.linear's
        w = w.to(spec.gemm)
        b = b.to(spec.gemm) if b is not None else None
    # sliced: the default chunks (each one casts the weight twice: fewer is cheaper)
    rows = plan_rows(N, V, x, spec.chunk_size, "auto" if sliced else spec.chunking)
    buf = x.new_empty((min(rows, N), V))
    lanes = _Lanes(x.device, spec.overlap)
    for i, start in enumerate(range(0, N, rows)):
        sl = slice(start, min(N, start + rows))
        z, xs = buf[: sl.stop - start], x[sl]
        parts = lanes.parts(sl.stop - start)
        marks = []
        for p in parts:
            if sliced:
                _logits_sliced(xs[p], w, b, z[p], spec.gemm)
            else:
                _logits(xs[p], w, b, z[p])
            with lanes.cross_entropy():
                loss_fn(z[p], slice(start + p.start, start + p.stop))
            marks.append(lanes.mark())
        for p, done in zip(parts, marks):
            lanes.wait(done)
            if grads is not None and grads.dx is not None:
                dx = grads.dx[start + p.start: start + p.stop]
                if sliced:
                    _input_grad_sliced(z[p], w, dx, spec.gemm)
                else:
                    _input_grad(z[p], w, dx)
        if grads is not None:
            _backprop(z, xs, w, grads, first=i == 0)


# ----------------------------------------------------------------------------
# The two passes over the chunks
# ----------------------------------------------------------------------------


def _precomputes(reduction: str, main_grad: Optional[Tensor], gemm: torch.dtype) -> bool:
    """Whether the forward computes the gradients (mean / sum without
    ``main_grad``, GEMMs in ``gemm`` not fp16); else the backward recomputes
    the logits. In fp16 the gradients are formed after grad_output (a loss
    scale known only then) is applied, so that nothing underflows that
    torch's fp32-formed gradient keeps: one more GEMM (the logits again)
    at backward time."""
    return reduction != "none" and main_grad is None and gemm != torch.float16


def _forward(x, w, b, target, weight, spec: _Spec, needs, want_hits: bool = False,
             div_t: Optional[Tensor] = None, main_grad: Optional[Tensor] = None):
    """(loss, lse, grads, hits): the loss (0-d for mean / sum, [N] for none,
    in fp32 / fp64), lse [N] (the same), and for mean / sum without ``main_grad``
    the gradients ``needs`` asks for (:class:`_Grads`: dx in the input's
    dtype, dw in the weight's or fp32 with ``spec.acc32``, db in fp32 /
    fp64; None otherwise), chunk by chunk; ``hits`` [N] int8 (``want_hits``:
    1 where the row is kept and its target is an argmax; else empty). The
    loss and gradients are divided by the divisor (``spec.divisor`` or the
    one-element tensor ``div_t``)."""
    N = x.shape[0]
    V = w.shape[0]
    t = target.contiguous()
    kern = _ChunkLoss(x, t, weight, V, spec, div_t)
    grad = any(needs) and _precomputes(spec.reduction, main_grad, spec.gemm or x.dtype)
    grads = _grad_buffers(x, w, b, needs, spec.acc32) if grad else None
    loss = new_output((N,), kern.acc, x.device)
    lse = new_output((N,), kern.acc, x.device)
    state = new_output((N,), kern.acc, x.device) if grad else loss
    hits = new_output((N if want_hits else 0,), torch.int8, x.device)

    def loss_fn(z, rows):
        kern.loss_(z, t[rows], grad, loss[rows], lse[rows], state[rows],
                   hits[rows] if want_hits else None)

    _sweep(x, w, b, spec, loss_fn, grads)
    if spec.reduction != "none":
        loss = loss.sum()
        if spec.reduction == "mean" and N == 0:
            loss = loss * math.nan  # the mean of no rows, as torch
    return loss, lse, grads, hits


def _recompute(x, w, b, target, weight, spec: _Spec, row_scale, lse, lse_scale, needs,
               div_t: Optional[Tensor] = None, main_grad: Optional[Tensor] = None) -> _Grads:
    """The backward's pass over the chunks: recompute each chunk's logits and
    turn them into row_scale[r] * d(loss_r)/dz (the loss's gradient) or, when
    ``row_scale`` is None, into lse_scale[r] * d(lse_r)/dz, both from the
    forward's ``lse`` [N] (fp32 / fp64) in one pass over the chunk (grad_output
    applied in fp32 before the single rounding: nothing underflows in fp16
    that torch's fp32-formed gradient keeps), then backpropagate through the
    GEMMs. Returns the :class:`_Grads` (dw is ``main_grad``, added into,
    when given)."""
    V = w.shape[0]
    t = target.contiguous()
    loss_term = row_scale is not None
    kern = _ChunkLoss(x, t, weight, V, spec, div_t) if loss_term else \
        _ChunkLoss(x, t, None, V, spec._replace(reduction="sum", divisor=None))
    grads = _grad_buffers(x, w, b, needs, spec.acc32, main_grad)

    def loss_fn(z, rows):
        if loss_term:
            kern.grad_(z, t[rows], lse[rows], row_scale[rows])
        else:
            kern.lse_grad_(z, lse[rows], lse_scale[rows])

    _sweep(x, w, b, spec, loss_fn, grads)
    return grads


# ----------------------------------------------------------------------------
# Autograd: eagerly torch.autograd.Functions that run the passes directly;
# while a graph is traced (torch.compile, make_fx), the torch.library ops
# softmax_gpu::linear_cross_entropy_* (opaque to the tracer, with fake
# implementations). Both share the helpers below.
#
# Gradients handed out never change afterwards: a backward of mean / sum that
# frees the graph scales the forward's gradients in place and hands them out;
# one that retains it (a later backward reads them again) scales them into
# new tensors.
# ----------------------------------------------------------------------------


def _rescale_(g: Tensor, state: Tensor, go: Tensor) -> None:
    """g's rows *= go / state[row] in place (``state``: the factor the
    forward applied, ones). A launch that reads two scalars per row when
    grad_output is 1 (``loss.backward()``). Exact zeros (the rows of ignored
    targets in dx, a dw with no kept row) stay 0 whatever go is."""
    if backend_for(g) == "triton":
        _scale_(g, state, go)
        return
    times_keeping_zeros(g.data, (go.to(state.dtype) / state)[:, None], state[:, None],
                        out=g.data)


def _rescaled(g: Tensor, state: Tensor, go: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new tensor in ``dtype`` (None: g's): g's rows times go / state[row]
    (g and state untouched; exact zeros stay 0)."""
    if backend_for(g) == "triton" and g.dim() == 2 and not traced(go):
        return _scaled(g, state, go, dtype)
    rows = (-1, *(1,) * (g.dim() - 1))
    return times_keeping_zeros(g, (go.to(state.dtype) / state).reshape(rows), state.reshape(rows),
                               out=g.new_empty(g.shape, dtype=dtype or g.dtype))


def _stash(ctx, tensors: tuple, anchored: bool) -> Optional[Tensor]:
    """Save ``tensors`` for backward; ``anchored`` (eager): with the anchor
    output of :func:`anchor_output`, returned."""
    if anchored:
        return anchor_output(ctx, *tensors)
    ctx.save_for_backward(*tensors)
    return None


def _save(ctx, x, w, b, t, cw, lse, grads: Optional[_Grads], spec: _Spec, needs, div_t=None,
          main_grad=None, anchored: bool = False) -> Optional[Tensor]:
    ctx.spec = spec
    ctx.needs = (needs[0], needs[1], needs[2] and b is not None)
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else x.dtype)
    # not saved for backward: other users may add into it before this backward
    ctx.main_grad = main_grad
    ctx.precomputed = _precomputes(spec.reduction, main_grad, spec.gemm or x.dtype)
    if ctx.precomputed:  # the backward only scales the gradients the forward computed
        return _stash(ctx, grads[:3] if grads is not None else (None,) * 3, anchored)
    # the backward recomputes from the inputs and the forward's lse
    return _stash(ctx, (x, w, b, t, cw, div_t, lse), anchored)


def _hand_out(ctx, dx, dw, db) -> tuple:
    """The recomputed gradients as autograd gets them: in the parameters'
    dtypes (dw and db cast from their accumulators where those differ);
    None for the weight when its gradient went into ``main_grad``."""
    def out(g, need, dtype):
        return g.to(dtype) if need and g is not None else None

    return (out(dx, ctx.needs[0], ctx.dtypes[0]),
            out(dw, ctx.needs[1] and ctx.main_grad is None, ctx.dtypes[1]),
            out(db, ctx.needs[2], ctx.dtypes[2]))


def _scale_out(ctx, dx, dw, db, go: Tensor) -> tuple:
    """The forward's gradients times grad_output ``go``, in the parameters'
    dtypes. Eagerly, a backward that frees the graph scales dx and dw in place
    when they are in the parameters' dtypes and hands them out; one that
    retains it (a later backward reads them again), a traced one, and the
    fp32 accumulators write new tensors."""
    in_place = not traced(go) and not graph_kept()
    out = []
    for g, need, dtype in zip((dx, dw, db), ctx.needs, ctx.dtypes):
        if not need or g is None:
            out.append(None)
            continue
        ones = g.new_ones(g.shape[:1], dtype=_acc(g.dtype))  # the forward's factor
        if not in_place or g.dtype != dtype or g.dim() != 2:
            out.append(_rescaled(g, ones, go, dtype))
        else:
            _rescale_(g, ones, go)
            out.append(g)
    return tuple(out)


def _loss_grads(ctx, d_loss, recompute) -> tuple:
    """(d input, d linear_weight, d linear_bias) from the loss's grad_output."""
    if d_loss is None or not any(ctx.needs):
        return None, None, None
    if ctx.precomputed:
        return _scale_out(ctx, *saved(ctx), d_loss)
    x, w, b, t, cw, div_t, lse = saved(ctx)
    row_scale = d_loss.reshape(-1) if ctx.spec.reduction == "none" else \
        d_loss.reshape(1).expand(x.shape[0])
    return _hand_out(ctx, *recompute(x, w, b, t, cw, ctx.spec, row_scale, lse, None, ctx.needs,
                                     div_t, ctx.main_grad)[:3])


def _lse_grads(ctx, d_lse, recompute) -> tuple:
    """(d input, d linear_weight, d linear_bias) from the lse's gradient."""
    if d_lse is None or not any(ctx.needs):
        return None, None, None
    x, w, b, t, lse = saved(ctx)
    return _hand_out(ctx, *recompute(x, w, b, t, None, ctx.spec, None, lse, d_lse.reshape(-1),
                                     ctx.needs, None, ctx.main_grad)[:3])


def _save_lse(ctx, x, w, b, t, lse, spec, needs, main_grad,
              anchored: bool = False) -> Optional[Tensor]:
    ctx.spec = spec
    ctx.needs = (needs[0], needs[1], needs[2] and b is not None)
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else x.dtype)
    ctx.main_grad = main_grad
    return _stash(ctx, (x, w, b, t, lse), anchored)


class _LinearCEFunction(torch.autograd.Function):
    """Eager autograd: the forward runs the chunks (and, for mean / sum, the
    gradients); the backward scales or recomputes them."""

    @staticmethod
    def forward(ctx, x, w, b, t, cw, spec, needs, want_hits, div_t, main_grad):
        loss, lse, grads, hits = _forward(x, w, b, t, cw, spec, needs, want_hits, div_t,
                                          main_grad)
        ctx.mark_non_differentiable(lse, hits)
        ctx.set_materialize_grads(False)
        anchor = _save(ctx, x, w, b, t, cw, lse, grads, spec, needs, div_t, main_grad, True)
        return loss, lse, hits, anchor

    @staticmethod
    @first_order
    def backward(ctx, d_loss, d_lse, d_hits, d_anchor):
        refuse_batched_backward("linear_cross_entropy", grad_output=d_loss)
        return (*_loss_grads(ctx, d_loss, _recompute), None, None, None, None, None, None, None)


class _LseFunction(torch.autograd.Function):
    """A copy of the lse whose backward flows through the GEMMs."""

    @staticmethod
    def forward(ctx, lse, x, w, b, t, spec, needs, main_grad):
        anchor = _save_lse(ctx, x, w, b, t, lse, spec, needs, main_grad, True)
        return lse.clone(), anchor

    @staticmethod
    @first_order
    def backward(ctx, d_lse, d_anchor):
        refuse_batched_backward("linear_cross_entropy", grad_lse=d_lse)
        return (None, *_lse_grads(ctx, d_lse, _recompute), None, None, None, None)


def _tensors(grads: Optional[_Grads], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) for an op's outputs: an empty (0,) tensor for each
    gradient not computed, and for a dw that went into ``main_grad``."""
    empty = lambda: x.new_empty((0,))  # noqa: E731
    if grads is None:
        return empty(), empty(), empty()
    return (grads.dx if grads.dx is not None else empty(),
            grads.dw if grads.dw is not None and not grads.dw_add else empty(),
            grads.db if grads.db is not None else empty())


def _present(g: Tensor) -> Optional[Tensor]:
    """None for the (0,) marker of :func:`_tensors`."""
    return None if g.dim() == 1 and g.numel() == 0 else g


@torch.library.custom_op("softmax_gpu::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
    weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float, chunk_size: int, need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool, want_hits: bool,
    divisor: Optional[float] = None, divisor_t: Optional[Tensor] = None,
    chunking: str = "auto", acc32: bool = False, overlap: bool = False,
    main_grad: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.

    input [N, D], linear_weight [V, D], linear_bias [V] or None (all one
    float dtype), target [N] integer class indices, weight [V] or None.
    softcap 0: none; chunk_size 0: planned by ``chunking``. Returns
    ``(loss, lse, dx, dw, db, hits)``: loss 0-d (mean / sum) or [N] (none) in
    fp32 (fp64 for fp64 input), lse [N] (the same), and for mean / sum without
    ``main_grad`` (which only the backward uses) the gradients of the loss
    when asked: dx [N, D] in the input's dtype, dw [V, D] in the weight's
    (fp32 for a 16-bit weight with ``acc32``), db [V] in fp32 (fp64);
    gradients not computed are empty (0,); and hits [N] int8 (``want_hits``:
    1 where the row is kept and its target is an argmax; else empty). The
    loss and gradients are divided by ``divisor`` (or the one-element
    ``divisor_t``) when given."""
    spec = _Spec(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, divisor,
                 chunking, acc32, overlap)
    loss, lse, grads, hits = _forward(input, linear_weight, linear_bias, target, weight, spec,
                                      (need_input_grad, need_weight_grad, need_bias_grad),
                                      want_hits, divisor_t, main_grad)
    return (loss, lse, *_tensors(grads, input), hits)


def _fake_grads(x, w, b, needs, acc32, main_grad=None):
    N, D = x.shape
    V = w.shape[0]
    empty = x.new_empty((0,))  # as _tensors: a gradient not computed, in x's dtype
    return (x.new_empty((N, D)) if needs[0] else empty,
            x.new_empty((V, D), dtype=_weight_grad_dtype(w, acc32))
            if needs[1] and main_grad is None else empty.clone(),
            x.new_empty((V,), dtype=_acc(x.dtype))
            if needs[2] and b is not None else empty.clone())


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size, need_input_grad, need_weight_grad,
      need_bias_grad, want_hits, divisor=None, divisor_t=None, chunking="auto", acc32=False,
      overlap=False, main_grad=None):
    N = input.shape[0]
    loss = input.new_empty((N,) if reduction == "none" else (), dtype=_acc(input.dtype))
    grad = _precomputes(reduction, main_grad, input.dtype)  # the op's input: cast already
    needs = (grad and need_input_grad, grad and need_weight_grad, grad and need_bias_grad)
    return (loss, input.new_empty((N,), dtype=_acc(input.dtype)),
            *_fake_grads(input, linear_weight, linear_bias, needs, acc32),
            input.new_empty((N if want_hits else 0,), dtype=torch.int8))


# No argument has a default: torch 2.11 drops trailing arguments equal to
# their defaults before it bumps the mutated one's version (an IndexError
# there when main_grad is None).
@torch.library.custom_op("softmax_gpu::linear_cross_entropy_backward", mutates_args=("main_grad",))
def linear_cross_entropy_backward(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
    weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    z_loss: float, softcap: float, chunk_size: int, row_scale: Optional[Tensor],
    lse: Optional[Tensor], lse_scale: Optional[Tensor], need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool, divisor: Optional[float],
    divisor_t: Optional[Tensor], chunking: str, acc32: bool, overlap: bool,
    main_grad: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_r row_scale[r] * loss_r`` or, when ``row_scale`` is
    None, of ``sum_r lse_scale[r] * lse_r``, by recomputing each chunk of
    logits (``lse`` [N] fp32 / fp64: the forward's, used by both). Returns (dx
    in the input's dtype, dw in the weight's or fp32 with ``acc32``, db in
    fp32 / fp64), empty (0,) where not asked; with ``main_grad`` the
    weight's gradient is added into it instead (dw empty)."""
    spec = _Spec(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, divisor,
                 chunking, acc32, overlap)
    grads = _recompute(input, linear_weight, linear_bias, target, weight, spec, row_scale, lse,
                       lse_scale, (need_input_grad, need_weight_grad, need_bias_grad), divisor_t,
                       main_grad)
    return _tensors(grads, input)


@linear_cross_entropy_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_size, row_scale, lse, lse_scale, need_input_grad,
      need_weight_grad, need_bias_grad, divisor, divisor_t, chunking, acc32, overlap, main_grad):
    return _fake_grads(input, linear_weight, linear_bias,
                       (need_input_grad, need_weight_grad, need_bias_grad), acc32, main_grad)


def _recompute_op(x, w, b, t, cw, spec, row_scale, lse, lse_scale, needs, div_t=None,
                  main_grad=None):
    """:func:`_recompute` through the traced op: (dx, dw, db), None where absent."""
    out = linear_cross_entropy_backward(x, w, b, t, cw, *spec[:6], row_scale, lse, lse_scale,
                                        *needs, spec.divisor, div_t, spec.chunking, spec.acc32,
                                        spec.overlap, main_grad)
    return tuple(_present(g) for g in out)


def _op_setup(ctx, inputs, output):
    (x, w, b, t, cw, *options, nx, nw, nb, _, divisor, div_t, chunking, acc32, overlap,
     main_grad) = inputs
    _, lse, dx, dw, db, hits = output
    ctx.mark_non_differentiable(lse, dx, dw, db, hits)
    spec = _Spec(*options, divisor, chunking, acc32, overlap)
    grads = _Grads(_present(dx), _present(dw), _present(db))
    _save(ctx, x, w, b, t, cw, lse, grads, spec, (nx, nw, nb), div_t, main_grad)


def _op_backward(ctx, d_loss, d_lse, d_dx, d_dw, d_db, d_hits):
    return (*_loss_grads(ctx, d_loss, _recompute_op),) + (None,) * 18


linear_cross_entropy_forward.register_autograd(_op_backward, setup_context=_op_setup)


@torch.library.custom_op("softmax_gpu::linear_cross_entropy_lse", mutates_args=())
def linear_cross_entropy_lse(
    lse: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
    target: Tensor, softcap: float, chunk_size: int, need_input_grad: bool,
    need_weight_grad: bool, need_bias_grad: bool, chunking: str = "auto", acc32: bool = False,
    overlap: bool = False, main_grad: Optional[Tensor] = None,
) -> Tensor:
    """A copy of ``lse`` (the per-row log-sum-exp of the forward) whose
    backward is d(lse)/d(input, linear_weight, linear_bias): each chunk's
    logits are recomputed, turned into grad_lse[r] * softmax(z_r) and
    backpropagated through the GEMMs (the weight's part added into
    ``main_grad`` when given). It runs only when the lse takes part in what
    is differentiated."""
    return lse.clone()


@linear_cross_entropy_lse.register_fake
def _(lse, input, linear_weight, linear_bias, target, softcap, chunk_size, need_input_grad,
      need_weight_grad, need_bias_grad, chunking="auto", acc32=False, overlap=False,
      main_grad=None):
    return torch.empty_like(lse)


def _lse_spec(cap: float, chunk: int, chunking: str, acc32: bool, overlap: bool,
              gemm: Optional[torch.dtype] = None) -> _Spec:
    return _Spec(-100, "sum", 0.0, 0.0, cap, chunk, None, chunking, acc32, overlap, gemm)


def _lse_op_setup(ctx, inputs, output):
    lse, x, w, b, t, cap, chunk, nx, nw, nb, chunking, acc32, overlap, main_grad = inputs
    _save_lse(ctx, x, w, b, t, lse, _lse_spec(cap, chunk, chunking, acc32, overlap),
              (nx, nw, nb), main_grad)


def _lse_op_backward(ctx, d_lse):
    return (None, *_lse_grads(ctx, d_lse, _recompute_op)) + (None,) * 10


linear_cross_entropy_lse.register_autograd(_lse_op_backward, setup_context=_lse_op_setup)


# ----------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------


def _check_same(t: Tensor, name: str, x: Tensor, gemm: Optional[torch.dtype] = None) -> None:
    """``t`` has the input's dtype and device (F.linear's requirement), or
    under torch.autocast (``gemm``: its dtype) a dtype autocast casts to it."""
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    if gemm is not None and t.dtype in _AUTOCAST_CASTS:
        return
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {t.dtype}")


# The dtypes torch.autocast casts to its own for F.linear (not fp64).
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs F.linear in on ``x``'s device; None when
    autocast is off there, or for fp64 ``x`` (which autocast leaves alone)."""
    if x.dtype not in _AUTOCAST_CASTS or not autocast_on(x):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _check_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size, options, loss_dtype, gemm=None):
    """Validate; return the call's :class:`_Spec` (floats; softcap 0: none;
    chunk_size 0: planned; ``gemm``: torch.autocast's dtype, the input
    already cast to it)."""
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
    _check_same(linear_weight, "linear_weight", input, gemm)
    if linear_bias is not None:
        check_tensor(linear_bias, "linear_bias")
        if tuple(linear_bias.shape) != (V,):
            raise ValueError(f"linear_bias must have shape ({V},), got {tuple(linear_bias.shape)}")
        _check_same(linear_bias, "linear_bias", input, gemm)
    check_tensor(target, "target")
    batch = tuple(input.shape[:-1])
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices of shape {batch} or class "
                        f"probabilities of shape {batch + (V,)}, got {target.dtype}")
    probs = target.is_floating_point()
    want = batch + (V,) if probs else batch
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} for input of shape "
                         f"{tuple(input.shape)} (class {'probabilities' if probs else 'indices'}"
                         f"), got {tuple(target.shape)}")
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
        check_weight_takes_no_grad(weight, "linear_cross_entropy")
    if ignore_index is None:
        ignore_index = -100  # torch's F.linear_cross_entropy default
    ignore_index, eps, zl, cap = _scalar_options(ignore_index, reduction, label_smoothing, z_loss,
                                                 softcap)
    chunk = _check_chunk(chunk_size, "chunk_size")
    from_options, chunking, acc32, overlap = _check_options(options)
    if chunk and from_options and chunk != from_options:
        raise ValueError(f"chunk_size={chunk_size} and options.batch_chunk_size="
                         f"{from_options} disagree; pass one")
    chunk = chunk or from_options
    check_loss_dtype(loss_dtype)
    casts = gemm is not None and (linear_weight.dtype != gemm or (
        linear_bias is not None and linear_bias.dtype != gemm))
    return _Spec(ignore_index, reduction, eps, zl, cap, chunk, None, chunking, acc32, overlap,
                 gemm if casts else None)


def _check_main_grad(main_grad, w: Tensor) -> None:
    """``main_grad``: a contiguous floating [V, D] tensor on the weight's device."""
    if main_grad is None:
        return
    if not isinstance(main_grad, Tensor):
        raise TypeError(f"main_grad must be a tensor or None, got {type(main_grad).__name__}")
    if not main_grad.is_floating_point():
        raise TypeError(f"main_grad must be a floating tensor, got {main_grad.dtype}")
    if tuple(main_grad.shape) != tuple(w.shape):
        raise ValueError(f"main_grad must have linear_weight's shape {tuple(w.shape)}, got "
                         f"{tuple(main_grad.shape)}")
    if main_grad.device != w.device:
        raise ValueError(f"main_grad is on {main_grad.device} but linear_weight is on {w.device}")
    if not main_grad.is_contiguous():
        raise ValueError("main_grad must be contiguous (it is accumulated into in place)")
    if main_grad.requires_grad:
        raise ValueError("main_grad must not require grad (it is a gradient buffer)")


def _check_chunk(value, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


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
    main_grad: Optional[Tensor] = None,
):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target)``
    without ever holding the [N, V] logits: a drop-in for torch's
    ``F.linear_cross_entropy``. (Class-probability targets, themselves
    [N, V], take torch's reference path: the fused cross-entropy of the
    whole logits.)

    Args:
        input: (N, D) or (D,) hidden states; float16, bfloat16, float32 or
            float64, on CUDA or CPU.
        linear_weight: (V, D) projection (the LM head), the input's dtype and
            device (under ``torch.autocast``: any dtype it casts, see below).
        target: (N,) or () integer class indices (any integer dtype); rows
            equal to ``ignore_index`` count for nothing. Or (N, V) / (V,)
            class probabilities (floating): then the call is
            ``softmax_gpu.cross_entropy(F.linear(input, linear_weight,
            linear_bias), target, ...)`` with the same options, the [N, V]
            logits in memory (as torch's reference path; ``chunk_size`` and
            ``options`` do not apply, ``return_token_accuracy`` and
            ``main_grad`` are errors).
        linear_bias: (V,) bias of the projection, or None.
        weight: (V,) class weights, or None (any float dtype). They get no
            gradient: one that requires grad is an error, as in torch.
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
            = exp(z - lse) uses the forward's lse, kept in fp64 for fp64
            input).
        chunk_size: rows per chunk (default: planned by
            ``options.chunking_method``, see :class:`LinearCrossEntropyOptions`).
        options: :class:`LinearCrossEntropyOptions`, torch's
            ``LinearCrossEntropyOptions`` (torch >= 2.13) or any object with
            some of the fields ``batch_chunk_size`` (honoured as
            ``chunk_size``), ``chunking_method`` ("auto", "lean",
            "aspect_ratio[:k]"), ``acc_policy`` (the weight gradient's
            accumulation: in place in the weight's dtype, or in fp32 with
            "balanced" / "accurate", whose memory cost is stated there) and
            ``overlap`` (the cross-entropy on a side CUDA stream). torch's
            ``acc_dtype`` and ``allow_retain_graph`` do not apply
            (backpropagating twice always works).
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
            costs the backward nothing. A finite nonzero number or a
            one-element tensor on the input's device (read there, no host
            sync). It gets no gradient.
        main_grad: a [V, D] floating buffer (Megatron's ``param.main_grad``,
            fp32) into which the backward ADDS the gradient of
            ``linear_weight`` (grad_output applied), accumulated in its own
            dtype by the GEMMs (fp32 precision, no [V, D] tensor allocated);
            ``linear_weight`` then gets no gradient from this call (its
            ``.grad`` is not touched and hooks on its gradient accumulator do
            not run: Megatron's DDP with ``overlap_grad_reduce`` needs the
            parameter marked by the caller, e.g. ``grad_added_to_main_grad``
            and a gradient of its own). Used only when ``linear_weight``
            requires grad. The backward then recomputes the logits, as
            ``reduction="none"`` does (four GEMMs instead of three).
            Contiguous, on the weight's device, not requiring grad. Every
            backward through the call adds into it, as Megatron's fused
            weight-gradient accumulation does: ``torch.autograd.grad`` for
            the input alone (a gradient-norm probe) adds dW too, so take
            such a gradient from a call without ``main_grad``.

    Returns:
        the loss, then the lse with ``return_lse``, then the accuracy with
        ``return_token_accuracy`` (a tuple when either is asked).

    Semantics and numerics: the logits of each chunk are the input's dtype,
    rounded as F.linear rounds them; the loss and gradient arithmetic is fp32
    (fp64 for fp64). The weight gradient accumulates over the chunks IN
    PLACE in the tensor handed out, in the weight's dtype: each chunk's
    ``dW += G^T X`` is one GEMM with fp32 accumulation, rounded once (for a
    bf16 weight that is about 2^-9 per chunk, as Liger's, with fewer
    chunks; ``acc_policy="balanced"`` rounds once in all, or pass
    ``main_grad``). The bias gradient accumulates in fp32 and is cast once.
    Class indices outside [0, V) that are not ignored are never used as
    addresses: on CUDA (and in Triton's interpreter) their rows' loss and
    gradient are NaN (a mean becomes NaN); the CPU torch path raises
    IndexError as torch does. No host-device sync; capturable in a CUDA
    graph (warm a call up first) and traceable by
    ``torch.compile(fullgraph=True)``.

    Memory beyond the gradients it returns (dX [N, D], dW [V, D]): one
    [chunk, V] logits buffer, 192 MiB at most by default (the input's size,
    at least 32 MiB, with ``chunking_method="lean"``), plus O(N + V)
    vectors: 1.18 GiB in all at 4096 x 4096 x 128256 bf16, 1.29 GiB at
    16384 tokens (predicted from the sizes; see perf/NOTES.md). The backward of
    mean / sum scales the forward's gradients in place (traced by
    torch.compile: into new tensors). With ``reduction="none"`` the backward
    recomputes the logits (four GEMMs instead of three), and a grad_output
    other than 1 is applied to each gradient row (one more rounding in
    16-bit dtypes) before the GEMMs. A gradient, once returned, is never
    changed by a later backward over a retained graph. The gradient is not
    itself differentiable (no double backward), and ``weight`` gets none.
    Under ``torch.autocast`` (CUDA or CPU), torch's policy for
    ``F.linear_cross_entropy`` (``F.linear`` in the autocast dtype, the
    cross-entropy in fp32): fp32 / fp16 / bf16 input, weight and bias are
    cast to the autocast dtype for the GEMMs (the input once, with autograd;
    the weight and bias once per pass, as autocast's own copies), the loss is
    fp32 unless ``loss_dtype`` says otherwise, and every gradient has its
    parameter's dtype. An fp32 weight's gradient (autocast training with fp32
    parameters) is accumulated by the 16-bit GEMMs straight into fp32, the
    gradient handed out: no 16-bit [V, D] gradient exists and none is rounded
    to 16 bits (torch's is). fp64 input is left alone, as autocast does.
    Under ``torch.compile`` the weight and bias are cast before the op and
    their gradients go back through the casts.
    With fp16 GEMMs (fp16 input, or fp16 autocast) the forward computes the
    loss only, and the backward recomputes each chunk's logits and forms its
    gradient with grad_output (a GradScaler's loss scale) and the mean's
    denominator applied in fp32, rounded to fp16 once before the GEMMs: no
    entry underflows that torch's gradient, formed after the scale, keeps.
    That costs the fp16 backward one more GEMM (the logits again, ~1.33x the
    three-GEMM floor); bf16 (fp32's range) and fp32 keep the gradients the
    forward computes (mean / sum), which a backward that frees the graph
    scales in place and hands out; one that retains it scales them into new
    tensors, as for :func:`softmax_gpu.cross_entropy`. ``torch.func`` transforms and
    forward-mode AD are refused, and so is a batched grad_output
    (``is_grads_batched``, ``jacobian(vectorize=True)``): the backward takes
    one grad_output at a time.
    """
    if has_torch_function_variadic(input, linear_weight, target, linear_bias, weight):
        # a Tensor subclass's override, an FX Proxy: as torch's functions
        return handle_torch_function(
            linear_cross_entropy, (input, linear_weight, target, linear_bias, weight), input,
            linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, return_lse=return_lse, chunk_size=chunk_size, options=options,
            loss_dtype=loss_dtype, return_token_accuracy=return_token_accuracy,
            divisor=divisor, main_grad=main_grad)
    check_strided("linear_cross_entropy", input=input, linear_weight=linear_weight,
                  target=target, linear_bias=linear_bias, weight=weight, main_grad=main_grad)
    refuse_transformed("linear_cross_entropy", "which the chunked passes and their in-place "
                       "gradients do not support; use softmax_gpu.cross_entropy(F.linear(...), "
                       "...) there", input=input, linear_weight=linear_weight,
                       linear_bias=linear_bias, target=target, weight=weight, divisor=divisor)
    gemm = _autocast_dtype(input) if isinstance(input, Tensor) else None
    if gemm is not None:  # torch.autocast: F.linear in its dtype, the cross-entropy in fp32
        loss_dtype = loss_dtype or torch.float32
        if input.dtype != gemm:
            input = input.to(gemm)
    spec = _check_args(input, linear_weight, target, linear_bias, weight, reduction,
                       ignore_index, label_smoothing, z_loss, softcap, chunk_size, options,
                       loss_dtype, gemm)
    if spec.gemm is not None and traced(input):  # the ops take one dtype: cast before them
        linear_weight = linear_weight.to(gemm)
        linear_bias = linear_bias.to(gemm) if linear_bias is not None else None
        spec = spec._replace(gemm=None)
    _check_main_grad(main_grad, linear_weight)
    if target.is_floating_point():
        return _probability_targets(input, linear_weight, target, linear_bias, weight, spec,
                                    return_lse, loss_dtype, return_token_accuracy, divisor,
                                    main_grad)
    div_f, div_t = check_divisor(divisor, input)
    spec = spec._replace(divisor=div_f)
    x = input if input.dim() == 2 else input.unsqueeze(0)
    t = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
             grad_on and linear_bias is not None and linear_bias.requires_grad)
    mg = main_grad if needs[1] else None
    cap, chunk = spec.cap, spec.chunk_size
    extra = (spec.chunking, spec.acc32, spec.overlap)
    want_hits = bool(return_token_accuracy)
    if traced(x):
        loss, lse, _, _, _, hits = linear_cross_entropy_forward(
            x, linear_weight, linear_bias, t, weight, *spec[:6], *needs, want_hits, spec.divisor,
            div_t, *extra, mg)
        if return_lse and any(needs):
            lse = linear_cross_entropy_lse(lse, x, linear_weight, linear_bias, t, cap, chunk,
                                           *needs, *extra, mg)
    elif any(needs):
        loss, lse, hits, _ = _LinearCEFunction.apply(x, linear_weight, linear_bias, t, weight,
                                                     spec, needs, want_hits, div_t, mg)
        if return_lse:
            lse = _LseFunction.apply(lse, x, linear_weight, linear_bias, t,
                                     _lse_spec(cap, chunk, *extra, spec.gemm), needs, mg)[0]
    else:
        loss, lse, _, hits = _forward(x, linear_weight, linear_bias, t, weight, spec, needs,
                                      want_hits, div_t)
    loss = loss.to(loss_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    out = (loss,)
    if return_lse:
        out += (lse.reshape(target.shape).to(torch.float32),)
    if want_hits:
        kept = (t != spec.ignore_index).sum(dtype=torch.float32)
        out += (hits.sum(dtype=torch.float32) / kept.clamp(min=1.0),)
    return out[0] if len(out) == 1 else out


def _probability_targets(input, linear_weight, target, linear_bias, weight, spec: _Spec,
                         return_lse, loss_dtype, return_token_accuracy, divisor, main_grad):
    """Class-probability targets, as torch's reference path computes them:
    :func:`softmax_gpu.cross_entropy` (one fused kernel) of ``F.linear``'s
    [N, V] logits, which exist in full (no chunking)."""
    if return_token_accuracy:
        raise ValueError("return_token_accuracy needs class-index targets, got class "
                         "probabilities")
    if main_grad is not None:
        raise ValueError("main_grad needs class-index targets (with class probabilities the "
                         "weight's gradient comes from F.linear's own backward)")
    logits = F.linear(input, linear_weight, linear_bias)
    return cross_entropy(logits, target, weight=weight, ignore_index=spec.ignore_index,
                         reduction=spec.reduction, label_smoothing=spec.eps, z_loss=spec.z_loss,
                         softcap=spec.cap or None, return_lse=return_lse, loss_dtype=loss_dtype,
                         divisor=divisor)


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
                 loss_dtype: Optional[torch.dtype] = None, use_main_grad: bool = False) -> None:
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
        self.use_main_grad = use_main_grad

    def forward(self, input: Tensor, target: Tensor):
        main_grad = None
        if self.use_main_grad:
            main_grad = getattr(self.linear.weight, "main_grad", None)
            if main_grad is None:
                raise ValueError("use_main_grad=True but linear.weight has no main_grad buffer")
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse, chunk_size=self.chunk_size, options=self.options,
            loss_dtype=self.loss_dtype, main_grad=main_grad)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"bias={self.linear.bias is not None}", f"reduction={self.reduction}",
                 f"ignore_index={self.ignore_index}", f"label_smoothing={self.label_smoothing}"]
        for name in ("z_loss", "softcap", "chunk_size", "options", "use_main_grad"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        return ", ".join(parts)
