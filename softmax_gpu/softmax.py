"""Softmax and log-softmax: the host side (the kernels are in
``softmax_gpu/kernels/softmax.py``).

- Launch planning: :func:`softmax_config` picks the path (single / looped /
  split), tile, rows per program and warps; a plan per call signature
  (shape, strides, dtype, device, dim) is memoised, so a repeated call only
  allocates its output and launches.
- The torch reference (:func:`reference_forward`, :func:`reference_backward`):
  the CPU path when the kernels are not interpreted.
- Autograd: eagerly a ``torch.autograd.Function`` that calls the launchers
  directly; while a graph is traced or compiled, the ``torch.library`` ops
  ``softmax_gpu::softmax_forward`` / ``softmax_gpu::softmax_backward``.
- Public: :func:`softmax`, :func:`log_softmax`, :class:`Softmax`,
  :class:`LogSoftmax`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_unary

from . import heuristics
from ._checks import (FLOAT_DTYPES, STRIDED, check_float, check_row_length, check_strided,
                      check_tensor, wrap_dim)
from ._dispatch import (autocast_on, backend_for, empty_like, interpreted,
                        launch_device, launch_on, new_output, plan_cache, remember, traced,
                        transformed)
from ._layout import as_rows, rows_view
from .heuristics import MIN_BLOCK, SINGLE, SPLIT, next_pow2, warps_for
from .kernels import softmax as K

__all__ = [
    "softmax",
    "log_softmax",
    "Softmax",
    "LogSoftmax",
    "SoftmaxConfig",
    "softmax_config",
    "all_softmax_configs",
    "reference_forward",
    "reference_backward",
]


# ----------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    path: str  # SINGLE, LOOPED, SPLIT or COOP
    block_n: int  # tile width in elements (a power of two)
    rows_per_program: int  # rows one program owns (SINGLE only; else 1)
    num_warps: int
    splits: int  # programs (SPLIT) / chunks (COOP; RESIDENT: at most) per row; else 1
    chunk: int  # columns per split program / chunk, a multiple of block_n (SPLIT, COOP)
    programs: int = 0  # grid of a persistent LOOPED / a COOP launch (0: one program per row)
    evict: bool = False  # eviction hints on the two reads (LOOPED, SPLIT, COOP)
    lag: int = 0  # COOP: first passes dealt ahead of the second passes
    regs: int = 0  # register budget (maxnreg) of the long-row kernels; 0: ptxas's choice
    stages: int = 1  # long rows: tiles in flight per program (software pipelining)
    spin: int = 0  # RESIDENT: polls a chunk waits for its row (resident_spin; 0 interpreted)


def softmax_config(
    M: int, N: int, elem_bytes: int, device: torch.device, live_rows: int = 1, *,
    reread: int = 1, coop: bool = False, op: str = "softmax", wide: bool = False,
) -> SoftmaxConfig:
    """Pick the path and launch parameters for an [M, N] row-wise reduction.

    Used for the softmax / log-softmax forward and backward alike (each reads
    the row for a reduction, then writes it once). ``live_rows``: row-sized
    arrays the on-chip kernel keeps in registers (softmax forward 1;
    log-softmax forward and both backwards 2). ``reread``: row-sized tensors
    the long-row paths read twice (forward 1, backward 2: y and dy).
    ``coop``: the caller has the cooperative kernels (the softmax ops do; the
    vocab-parallel shard kernels do not), so the plan may cut long rows across
    programs (:func:`softmax_gpu.heuristics.long_rows`). ``op``: the tuned
    table's op whose limits apply (``CALL_KINDS``; "softmax" also for the
    vocabulary-parallel pieces). ``wide``: the on-chip kernel may spread one
    row over 32 warps, holding half the values a thread of 16, so that with
    2- and 4-byte elements it takes rows up to the forward's limit whatever
    ``live_rows`` (the log-softmax forward and the backward;
    ``Limits.wide_single``); below those, its longest 16-warp rows budget 64
    registers, two programs per SM (``Limits.lean_single``). Both take the
    kernels' lean forms (``lean_forms``).
    """
    lim = heuristics.limits_for(op, device, elem_bytes, N)
    block = next_pow2(N)
    cap = heuristics.by_elem(elem_bytes, lim.max_single_2byte, lim.max_single_4byte,
                             lim.max_single_8byte)
    narrow = max(1, cap // live_rows)
    two_row = wide and elem_bytes <= 4  # the kinds that may take the lean plans
    if block <= narrow or (two_row and lim.wide_single and block <= cap):
        block = max(block, MIN_BLOCK)
        # Short rows: several rows per program, unless that would leave fewer
        # than ~2 programs per multiprocessor. Two choices only (1 or the
        # full count), which keeps the set of compiled variants small.
        rows = max(1, lim.target_program_elems // block)
        if rows > 1 and -(-M // rows) < 2 * heuristics.sm_count(device):
            rows = 1
        warps = warps_for(block * rows)
        if block > narrow:  # one row on 32 warps: half the values a thread of 16
            rows, warps = 1, 32
        regs = heuristics.single_regs(warps)
        if two_row and lim.lean_single and elem_bytes == 2 and narrow < 2 * block <= 2 * narrow \
                and warps == 16:
            regs //= 2  # two programs per SM (the kernels' lean forms)
        return SoftmaxConfig(SINGLE, block, rows, warps, 1, block, regs=regs)
    if coop and lim.long_path == heuristics.RESIDENT and elem_bytes <= 4:
        # chunks laid out as the on-chip path lays out a row of that length
        # (fp64: none, its chunks spill)
        chunk = min(heuristics.resident_chunk(lim, max(1, cap // live_rows)), block)
        splits = heuristics.resident_splits(M, N, chunk, elem_bytes, 2, K.RESIDENT_MAX_SPLITS)
        if splits is not None:
            warps = warps_for(chunk)
            return SoftmaxConfig(heuristics.RESIDENT, chunk, 1, warps, splits, chunk,
                                 regs=heuristics.resident_regs(chunk, warps, elem_bytes,
                                                               reread > 1),
                                 spin=0 if interpreted() else lim.resident_spin)
    tile = min(lim.tile if elem_bytes <= 4 else max(1, lim.tile // 2), block)
    warps = lim.long_warps or warps_for(tile)
    programs = lim.split_programs_per_sm * heuristics.sm_count(device)
    # the backward (two tensors re-read) weighs more; the 4-byte one most
    regs = heuristics.long_row_budget(
        heuristics.long_row_regs(elem_bytes, 0 if reread == 1 else 2 if elem_bytes == 4 else 1),
        tile, warps, 16)
    if lim.long_path in ("auto", SPLIT) and M < programs:
        tiles = -(-N // tile)
        splits = min(tiles, -(-programs // M), lim.max_splits)
        if splits > 1:
            chunk = -(-tiles // splits) * tile
            splits = -(-N // chunk)
            return SoftmaxConfig(SPLIT, tile, 1, warps, splits, chunk, evict=lim.evict, regs=regs,
                                 stages=lim.long_stages)
    plan = heuristics.long_rows(M, N, tile, reread * N * elem_bytes, device, lim, coop, warps,
                                regs)
    return SoftmaxConfig(plan.path, tile, 1, warps, plan.splits, plan.chunk, plan.programs,
                         plan.evict, plan.lag, plan.regs, lim.long_stages)


# What each kind of call passes to softmax_config: (live_rows, reread, op, wide).
CALL_KINDS = {"fwd": (1, 1, "softmax", False), "log_fwd": (2, 1, "log_softmax", True),
              "bwd": (2, 2, "softmax_backward", True)}


def call_config(kind: str, M: int, N: int, elem_bytes: int,
                device: torch.device) -> SoftmaxConfig:
    """The plan of a softmax op's call of ``kind`` ("fwd", "log_fwd" or "bwd":
    ``CALL_KINDS``) over [M, N] rows, with the cooperative kernels."""
    live, reread, op, wide = CALL_KINDS[kind]
    return softmax_config(M, N, elem_bytes, device, live, reread=reread, coop=True, op=op,
                          wide=wide)


def all_softmax_configs(extra: Sequence[dict] = ()) -> list[tuple]:
    """Every (path, block_n, rows_per_program, num_warps, elem_bytes, kind,
    regs) the defaults can pick, for the static compile check; ``kind``: "fwd"
    (softmax forward), "log_fwd" (log-softmax forward) or "bwd" (both
    backwards). Enumerated from :func:`softmax_config` itself over all
    power-of-two row lengths and row counts, element sizes and call kinds,
    with the cooperative path allowed as the softmax ops plan, so the check
    cannot drift from the heuristics; long rows also with each path that
    ``Limits.long_path`` can force and each of the tuner's
    ``Limits.long_warps``, on-chip rows without ``Limits.lean_single``
    (tuning candidates), and with every entry of the installed tuned
    tables. ``extra``: further ``Limits`` overrides, each enumerated the same
    way at 2-byte rows (perf.static passes every candidate of perf.tune)."""
    seen = set()
    dev = torch.device("cpu")
    choices = [dict(long_path=p, resident_chunk=c) for p, c in heuristics.LONG_PATH_CHOICES]
    # (fields, element sizes): the tuner's warps at 2 bytes (it tunes bf16),
    # each table entry at its own size
    plans = [(f, (2, 4, 8)) for f in choices + [dict(lean_single=False)]]
    plans += [(dict(long_warps=w), (2,)) for w in heuristics.LONG_WARPS_CHOICES]
    plans += [(dict(f), (2,)) for f in extra]
    plans += [(f, (elem,)) for elem, f in heuristics.installed_overrides(
        "softmax", "log_softmax", "softmax_backward")]
    for fields, elems in plans:
        with heuristics.override(sm_count=132, **fields):
            for elem in elems:
                for kind in CALL_KINDS:
                    for logn in range(0, 21):
                        for logm in range(0, 25):
                            c = call_config(kind, 1 << logm, 1 << logn, elem, dev)
                            seen.add((c.path, c.block_n, c.rows_per_program, c.num_warps, elem,
                                      kind, c.regs))
    return sorted(seen)


# ----------------------------------------------------------------------------
# Torch reference: the CPU path, with the kernels' semantics (fp32 arithmetic,
# fp64 for fp64; result in the input's dtype, contiguous)
# ----------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(x: Tensor, dim: int, log: bool,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
    """softmax (or log-softmax) of ``x`` over ``dim``, in ``dtype`` (None: x's)."""
    xa = x.to(_acc(x.dtype))
    y = torch.log_softmax(xa, dim) if log else torch.softmax(xa, dim)
    return y.to(dtype or x.dtype).contiguous()


def reference_backward(y: Tensor, dy: Tensor, dim: int, log: bool,
                       dtype: Optional[torch.dtype] = None) -> Tensor:
    """Vector-Jacobian product at forward output ``y``, in ``dtype`` (None: y's):
    softmax dx = y * (dy - sum(dy * y)); log-softmax dx = dy - exp(y) * sum(dy)."""
    acc = _acc(y.dtype)
    ya, ga = y.to(acc), dy.to(acc)
    if log:
        dx = ga - torch.exp(ya) * ga.sum(dim, keepdim=True)
    else:
        dx = ya * (ga - (ga * ya).sum(dim, keepdim=True))
    return dx.to(dtype or y.dtype).contiguous()


# ----------------------------------------------------------------------------
# Eager launches, planned once per call signature
# ----------------------------------------------------------------------------

# key -> (copy the input first, CUDA device index or None, launch or None)
_PLANS = plan_cache()


def _plan_forward(x: Tensor, dim: int, log: bool):
    if x.numel() == 0:
        return False, None, None
    check_row_length(x.shape[dim] if x.dim() else 1, f"input's dim {dim}")
    copy = rows_view(x, dim) is None
    xv, rows = as_rows(x.contiguous() if copy else x, dim)
    y_strides = rows_view(_contiguous_probe(x.shape), dim).strides
    cfg = call_config("log_fwd" if log else "fwd", rows.m, rows.n, x.element_size(), x.device)
    launch = K.softmax_forward_launcher(rows.m, rows.n, rows.inner, rows.strides, y_strides,
                                        cfg, log, x.dtype)
    return copy, launch_device(x.device), launch


def _contiguous_probe(shape) -> Tensor:
    """A storage-free tensor with the strides of a contiguous tensor of ``shape``."""
    return torch.empty(shape, device="meta")


def _output(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A new contiguous kernel output of x's shape, in ``dtype`` (None: x's)."""
    if dtype is None or dtype == x.dtype:
        return empty_like(x)
    return new_output(x.shape, dtype, x.device)


def _forward(x: Tensor, dim: int, log: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Launch the forward: a new contiguous tensor of x's shape, in ``dtype``
    (None: x's; fp32 for 16-bit x: the kernel reads x and stores fp32)."""
    key = (x.shape, x.stride(), x.dtype, x.device, dim, log, heuristics.generation())
    plan = _PLANS.get(key)
    if plan is None:
        plan = remember(_PLANS, key, _plan_forward(x, dim, log))
    copy, dev, launch = plan
    y = _output(x, dtype)
    if launch is not None:
        launch_on(dev, launch, x.contiguous() if copy else x, y)
    return y


def _plan_backward(y: Tensor, dy: Tensor, dim: int, log: bool):
    if y.numel() == 0:
        return False, False, None, None
    copy_y = rows_view(y, dim) is None
    copy_g = rows_view(dy, dim) is None
    _, yrows = as_rows(y.contiguous() if copy_y else y, dim)
    _, grows = as_rows(dy.contiguous() if copy_g else dy, dim)
    x_strides = rows_view(_contiguous_probe(y.shape), dim).strides
    cfg = call_config("bwd", yrows.m, yrows.n, y.element_size(), y.device)
    launch = K.softmax_backward_launcher(yrows.m, yrows.n, yrows.inner, yrows.strides,
                                         grows.strides, x_strides, cfg, log, y.dtype)
    return copy_y, copy_g, launch_device(y.device), launch


def _backward(y: Tensor, dy: Tensor, dim: int, log: bool,
              dtype: Optional[torch.dtype] = None) -> Tensor:
    """Launch the backward: a new contiguous tensor, the gradient wrt the
    input, in ``dtype`` (None: y's; the input's 16-bit dtype for an fp32 y)."""
    if dy.dtype != y.dtype:
        dy = dy.to(y.dtype)
    key = (y.shape, y.stride(), dy.stride(), y.dtype, y.device, dim, log,
           heuristics.generation())
    plan = _PLANS.get(key)
    if plan is None:
        plan = remember(_PLANS, key, _plan_backward(y, dy, dim, log))
    copy_y, copy_g, dev, launch = plan
    dx = _output(y, dtype)
    if launch is not None:
        launch_on(dev, launch, y.contiguous() if copy_y else y,
                  dy.contiguous() if copy_g else dy, dx)
    return dx


class _SoftmaxFunction(torch.autograd.Function):
    """Eager autograd around the launchers (no dispatcher round trip)."""

    @staticmethod
    def forward(ctx, x, dim, log, dtype):
        y = _forward(x, dim, log, dtype)
        ctx.save_for_backward(y)
        ctx.dim, ctx.log, ctx.dx_dtype = dim, log, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if transformed(dy):  # a batched grad_output (is_grads_batched, vmap of a backward)
            return reference_backward(y, dy, ctx.dim, ctx.log, ctx.dx_dtype), None, None, None
        if torch.is_grad_enabled():  # create_graph: the gradient is differentiable
            return softmax_backward(y, dy, ctx.dim, ctx.log, ctx.dx_dtype), None, None, None
        return _backward(y, dy, ctx.dim, ctx.log, ctx.dx_dtype), None, None, None


# ----------------------------------------------------------------------------
# torch.library ops: what a traced graph (torch.compile, make_fx, opcheck) holds
# ----------------------------------------------------------------------------


@torch.library.custom_op("softmax_gpu::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, dim: int, log: bool,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """softmax (log=False) or log-softmax (log=True) of ``x`` over ``dim``.

    x: floating tensor of at least one dim; dim in [0, x.dim()). Returns a
    contiguous tensor of x's shape in ``dtype``: None (x's dtype), or
    torch.float32 for fp16/bf16 ``x`` (read as it is, the result stored in
    fp32: no fp32 copy of x).
    """
    if backend_for(x) == "triton":
        return _forward(x, dim, log, dtype)
    return reference_forward(x, dim, log, dtype)


@softmax_forward.register_fake
def _(x: Tensor, dim: int, log: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


@torch.library.custom_op("softmax_gpu::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, dim: int, log: bool,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
    """Gradient wrt the input of softmax (or log-softmax) whose output is ``y``,
    given the output gradient ``dy`` (same shape; any strides), in ``dtype``
    (None: y's; the input's 16-bit dtype when y is its fp32 result)."""
    if backend_for(y) == "triton":
        return _backward(y, dy, dim, log, dtype)
    return reference_backward(y, dy, dim, log, dtype)


@softmax_backward.register_fake
def _(y: Tensor, dy: Tensor, dim: int, log: bool,
      dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(y.shape, dtype=dtype or y.dtype, device=y.device)


def reference_double_backward(y: Tensor, dy: Tensor, g: Tensor, dim: int,
                              log: bool) -> tuple[Tensor, Tensor]:
    """Gradients wrt ``y`` and ``dy`` of sum(g * dx), dx the backward above
    (differentiable torch ops, so every further order works):
    softmax: g (dy - <dy, y>) - dy <g, y> and y (g - <g, y>);
    log-softmax: -g e^y sum(dy) and g - <g, e^y>."""
    acc = _acc(y.dtype)
    ya, da, ga = y.to(acc), dy.to(acc), g.to(acc)
    if log:
        p = torch.exp(ya)
        gy = -ga * p * da.sum(dim, keepdim=True)
        gdy = ga - (ga * p).sum(dim, keepdim=True)
    else:
        gp = (ga * ya).sum(dim, keepdim=True)
        gy = ga * (da - (da * ya).sum(dim, keepdim=True)) - da * gp
        gdy = ya * (ga - gp)
    return gy.to(y.dtype), gdy.to(dy.dtype)


def _bwd_setup_context(ctx, inputs, output):
    y, dy, dim, log, _ = inputs
    ctx.save_for_backward(y, dy)
    ctx.dim, ctx.log = dim, log


def _bwd_backward(ctx, g):
    y, dy = ctx.saved_tensors
    gy, gdy = reference_double_backward(y, dy, g, ctx.dim, ctx.log)
    return gy, gdy, None, None, None


softmax_backward.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def _op_setup_context(ctx, inputs, output):
    x, dim, log, _ = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log = dim, log
    ctx.dx_dtype = x.dtype if x.dtype != output.dtype else None


def _op_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return softmax_backward(y, grad, ctx.dim, ctx.log, ctx.dx_dtype), None, None, None


softmax_forward.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------
# Public functions and modules
# ----------------------------------------------------------------------------


def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch.nn.functional's choice when ``dim`` is None, with its warning
    (not while torch.compile traces, which cannot trace a warning: torch's
    own function gives none there either)."""
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"Implicit dimension choice for {name} has been deprecated. "
            "Change the call to include dim=X as an argument.",
            stacklevel=stacklevel,
        )
    return 0 if ndim in (0, 1, 3) else 1


_HALF = (torch.float16, torch.bfloat16)


def _softmax(input, dim, stacklevel, dtype, log: bool) -> Tensor:
    if has_torch_function_unary(input):  # a Tensor subclass's override, an FX Proxy: as torch
        return handle_torch_function(log_softmax if log else softmax, (input,), input, dim,
                                     stacklevel, dtype=dtype)
    if not isinstance(input, Tensor):
        check_tensor(input, "input")
    if input.layout is not STRIDED or input.is_nested:
        check_strided("log_softmax" if log else "softmax", input=input)
    if stacklevel is float:  # torch takes Python's float for float64
        stacklevel = torch.float64
    if dtype is float:
        dtype = torch.float64
    if stacklevel.__class__ is torch.dtype:
        # torch.softmax(input, dim, dtype): the third position is the dtype
        if dtype is not None:
            raise TypeError("softmax() got multiple values for argument 'dtype'")
        dtype, stacklevel = stacklevel, 3
    if dim is None:
        dim = _implicit_dim("log_softmax" if log else "softmax", input.dim(), stacklevel + 1)
    if dtype is None and input.dtype in _HALF and input.device.type == "cuda" and \
            autocast_on(input):
        dtype = torch.float32  # torch's CUDA autocast policy for softmax / log_softmax
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {dtype}")
    out = None  # the output dtype when it is not the (cast) input's
    if dtype is not None and dtype != input.dtype:
        if dtype == torch.float32 and input.dtype in _HALF:
            out = dtype  # the kernel reads the 16-bit input and stores fp32: no copy
        else:
            input = input.to(dtype)
    ndim = input.dim()
    d = wrap_dim(dim, ndim)
    if input.dtype not in FLOAT_DTYPES:
        check_float(input, "input")
    if traced(input):
        if ndim == 0:
            return softmax_forward(input.reshape(1), 0, log, out).reshape(())
        return softmax_forward(input, d, log, out)
    if backend_for(input, "input") == "torch":  # CPU without the interpreter, meta, torch.func
        return reference_forward(input, d, log, out)
    if ndim == 0:
        return _softmax(input.reshape(1), 0, 3, out, log).reshape(())
    if input.requires_grad and torch.is_grad_enabled():
        return _SoftmaxFunction.apply(input, d, log, out)
    return _forward(input, d, log, out)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """Softmax over ``dim``: ``exp(x) / exp(x).sum(dim, keepdim=True)``.

    A drop-in for :func:`torch.softmax` and :func:`torch.nn.functional.softmax`,
    bound the same way: ``softmax(x, dim, dtype)`` (torch's position of
    ``dtype``) and ``softmax(x, dim, _stacklevel, dtype)`` (functional's) both
    work, and ``dim=None`` picks torch's legacy implicit dim with its warning.

    Args:
        input: tensor of any shape (0-d and empty included), float16,
            bfloat16, float32 or float64, on CUDA or CPU.
        dim: the dim to normalise over; negative counts from the end.
        dtype: if given, the result's dtype: ``input`` is cast to it before
            the op (integer inputs need it), except fp16/bf16 ``input`` with
            ``torch.float32``, which the kernel reads as it is and stores in
            fp32 (no fp32 copy of the input; its gradient is in the input's
            dtype).

    Under ``torch.autocast``: torch's policy. On CUDA, fp16/bf16 ``input``
    without ``dtype`` gives an fp32 result (torch's autocast runs softmax and
    log_softmax in fp32), as ``dtype=torch.float32`` above; an explicit
    ``dtype`` is kept. CPU autocast leaves softmax alone, as torch's does.
    The same holds under ``torch.compile``.

    Returns:
        A contiguous tensor of ``input``'s shape and (cast) dtype. Arithmetic
        is fp32 (fp64 for fp64). Rows that are entirely -inf give NaN, as in
        torch. Differentiable; the backward is ``y * (dy - sum(dy * y))``,
        and under ``create_graph=True`` the gradient is differentiable too
        (gradient penalties, Hessian-vector products; the second order in
        torch ops).
    """
    return _softmax(input, dim, _stacklevel, dtype, False)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """Log-softmax over ``dim``: ``x - logsumexp(x, dim)``.

    A drop-in for :func:`torch.log_softmax` and
    :func:`torch.nn.functional.log_softmax`; arguments, binding and result as
    in :func:`softmax`. The backward is ``dy - exp(y) * sum(dy)``.
    """
    return _softmax(input, dim, _stacklevel, dtype, True)


class Softmax(nn.Softmax):
    """Drop-in for :class:`torch.nn.Softmax` (a subclass of it: ``isinstance``
    checks hold): :func:`softmax` over ``dim``."""

    def forward(self, input: Tensor) -> Tensor:
        return _softmax(input, self.dim, 5, None, False)


class LogSoftmax(nn.LogSoftmax):
    """Drop-in for :class:`torch.nn.LogSoftmax` (a subclass of it: ``isinstance``
    checks hold): :func:`log_softmax` over ``dim``."""

    def forward(self, input: Tensor) -> Tensor:
        return _softmax(input, self.dim, 5, None, True)
