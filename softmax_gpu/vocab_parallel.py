"""Vocab-parallel cross-entropy over ``torch.distributed``: the host side
(the shard kernels are in ``softmax_gpu/kernels/vocab_parallel.py``); the
public names are re-exported by :mod:`softmax_gpu.distributed`.

When the output layer is sharded over tensor-parallel ranks, each rank holds
the logits of a slice of the vocabulary. The online-softmax state
(max, sum of e^(z - max)) merges associatively, so the loss and the gradient
need O(rows) communication, never the O(rows x vocab) logits.

Two public functions share one per-call object, :class:`_ShardLoss`:

- :func:`vocab_parallel_cross_entropy` (sharded logits in hand);
- :func:`vocab_parallel_linear_cross_entropy` (the lm_head's weight sharded
  by vocabulary rows, the input replicated): the logits are made chunk by
  chunk over the tokens in a reused [chunk, V_r] buffer, as in
  :func:`softmax_gpu.linear_cross_entropy`, whose GEMM helpers it reuses.

Per forward (per chunk for the linear version), on every rank of ``group``
(NCCL for CUDA tensors, gloo for CPU tensors):

1. shard widths: an all-gather of one int64 per rank gives this rank's column
   offset and the global vocabulary. It is cached per (group, local width,
   ``vocab_size``), so it runs (and syncs the host, to read the widths) on the
   first call of a layout only; see :func:`clear_width_cache`. A group of one
   rank runs none: its width is the vocabulary.
2. the stats kernel reads the shard once: per row its max m, sum d of
   e^(z - m), its target logit where this rank owns the target (else 0), and
   with label smoothing the sum of w_c (z_c - m) over its columns (z: the
   logits, softcapped when asked; w: the class weights, 1 without);
3. ``all_reduce(MAX)`` of m (n values);
4. d and the smoothing sum are moved to the global max on the device (d
   times e^(m_r - m), the sum plus sw_r (m_r - m), sw_r this shard's sum of
   w), then one ``all_reduce(SUM)``
   of the stacked [k, n] tensor (d, target logit[, smoothing sum]); k = 2, or
   3 with label smoothing. fp32, fp64 for fp64 logits.
5. The row losses, the lse and the gradient's per-row terms follow on the
   device from the global (max, sum) and the targets (which every rank holds
   alike, so every rank computes the same mean denominators): no host sync.

The gradient kernel writes the shard's gradient from the global lse, reading
the shard once more: in the backward for :func:`vocab_parallel_cross_entropy`
(into a new tensor, or over the logits with ``inplace_backward``; no
collective), in the forward over each chunk's logits for the linear version
(then ``dX[chunk] = dlogits @ W_r`` and ``dW_r += dlogits^T @ X[chunk]`` in
fp32, and one ``all_reduce(SUM)`` of dX [N, D] at the end: each rank's dX is
its shard's part).

Communication per step: (1 + k) * N * 4 bytes in two all-reduces per chunk
(8 bytes per value for fp64), plus N * D * itemsize for the linear version's
dX; against N * V * itemsize for gathering the logits; see
``perf/vocab_parallel.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import heuristics
from ._checks import (check_float, check_loss_dtype, check_not_grad_leaf, check_row_length,
                      check_tensor, check_weight_takes_no_grad)
from ._dispatch import (anchor_output, backend_for, first_order, graph_kept, launch_device,
                        launch_on, new_output, plan_cache, refuse_batched_backward,
                        refuse_transformed, remember, saved)
from ._layout import as_rows
from .cross_entropy import _scalar_options, check_inplace_rows, denominators_plan
from .kernels import vocab_parallel as K
from .linear_cross_entropy import _backprop, _check_main_grad, _grad_buffers, _hand_out, _logits
from .linear_cross_entropy import _check_options as _linear_options
from .linear_cross_entropy import _precomputes, _scale_out, plan_rows
from .softmax import SoftmaxConfig, softmax_config

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "clear_width_cache", "shard_config"]

# group -> {(local width, vocab_size or None): _Layout}; weak in the group, so
# that a destroyed group is not kept alive (its destructor would then run at
# interpreter exit, which has aborted gloo processes).
_WIDTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Layout(NamedTuple):
    """This rank's place in its group's vocabulary."""

    off: int  # global id of this rank's first column
    vocab: int  # global vocabulary V
    widths: tuple  # every rank's width, in rank order
    rank: int = 0  # this rank's index in the group

    @property
    def width(self) -> int:
        """This rank's shard width."""
        return self.widths[self.rank]

    @property
    def alone(self) -> bool:
        """A group of one rank: its shard is the vocabulary, and no collective runs."""
        return len(self.widths) == 1


class _Opts(NamedTuple):
    """A call's options, validated (cap 0: no softcap)."""

    ignore: int
    reduction: str
    eps: float
    z: float
    cap: float


def clear_width_cache() -> None:
    """Forget the cached shard widths.

    The widths of a group are gathered once per (group, local width,
    ``vocab_size``). A program that uses one group for several vocabulary
    layouts in which some rank's width repeats while another's changes must
    pass ``vocab_size=`` (part of the key) or call this on every rank between
    layouts: otherwise that rank would skip the gather the others run.
    """
    _WIDTHS.clear()


def _shard_layout(who: str, pg, width: int, vocab_size, device: torch.device) -> _Layout:
    cache = _WIDTHS.setdefault(pg, {})
    key = (width, vocab_size)
    hit = cache.get(key)
    if hit is None:
        world = dist.get_world_size(pg)
        if world == 1:  # no collective, no sync
            widths = (width,)
        else:
            mine = torch.full((1,), width, dtype=torch.int64, device=device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=pg)
            widths = tuple(int(w) for w in torch.cat(parts).tolist())  # host sync, first call only
        rank = dist.get_rank(pg)
        hit = _Layout(sum(widths[:rank]), sum(widths), widths, rank)
        cache[key] = hit
    if vocab_size is not None and hit.vocab != vocab_size:
        raise ValueError(
            f"{who}: the shard widths {list(hit.widths)} of the group add up to {hit.vocab}, "
            f"not vocab_size={vocab_size}"
        )
    return hit


def _resolve_group(who: str, group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who} needs an initialised process group: call "
            "torch.distributed.init_process_group() first (a single process can use "
            "world_size=1)"
        )
    pg = dist.group.WORLD if group is None else group
    if dist.get_rank(pg) < 0:
        raise ValueError(f"{who}: this process is not a member of `group`")
    return pg


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> _Opts:
    ii, eps, zl, cap = _scalar_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _Opts(ii, reduction, eps, zl, cap)


_COLLECTIVES = "which its collectives do not support"


def _check_target(target: Tensor, batch: tuple, like: Tensor, name: str) -> None:
    check_tensor(target, "target")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class ids (torch.long), got {target.dtype}; "
            "class probabilities are not supported"
        )
    if target.device != like.device:
        raise ValueError(f"target is on {target.device} but {name} on {like.device}")
    if tuple(target.shape) != batch:
        raise ValueError(f"target shape {tuple(target.shape)} must be {batch} ({name}'s shape "
                         f"without its last dim)")


def _check_class_weight(weight, like: Tensor, name: str) -> None:
    """Type and device of ``weight`` (its shape is checked against the global
    vocabulary once the layout is known)."""
    if weight is None:
        return
    check_tensor(weight, "weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.device != like.device:
        raise ValueError(f"weight is on {weight.device} but {name} on {like.device}")
    check_weight_takes_no_grad(weight, "the vocab-parallel cross-entropy")


def _check_weight_shape(weight, vocab: int) -> None:
    if weight is not None and tuple(weight.shape) != (vocab,):
        raise ValueError(
            f"weight must have shape ({vocab},): one value per class of the GLOBAL vocabulary "
            f"(the same full vector on every rank), got {tuple(weight.shape)}")


def _check_targets(t: Tensor, vocab: int, ignore_index: int) -> None:
    """Explicit range check, for CPU tensors only (reading them costs no device
    sync). CUDA targets are not read on the host: an out-of-range target makes
    its row's loss and gradient NaN on the device instead."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        first = int(t[bad][0])
        raise ValueError(
            f"target holds class id {first}, outside the global vocabulary [0, {vocab}) "
            f"(and not ignore_index={ignore_index})"
        )


# --- per-shard statistics and gradient: Triton kernels, or the torch reference --


def shard_config(M: int, W: int, elem_bytes: int, device: torch.device, extras: bool = False):
    """Launch parameters of both shard kernels for an [M, W] shard:
    :func:`softmax_gpu.softmax.softmax_config`'s choice; rows longer than
    the on-chip limit run looped, one program per row (a vocab shard has as
    many rows as there are tokens; the shard kernels have neither the split
    nor the persistent grid).

    ``live_rows=2``: on the single path the stats kernel keeps z and e^(z - m)
    (and with smoothing w (z - m)), the gradient kernel z, its target mask and dz;
    at the one-row limits both spilled in the sm_90 static check
    (perf/static.py, ``vocab_parallel_variants``), at half of them neither
    does. ``extras`` (a softcap, or class weights with label smoothing): fp64
    takes ``live_rows=3`` (its gradient kernel with every option on spilled
    8 B at 8192 columns, 16 warps); 2- and 4-byte logits do not spill at 2.
    Extras also halve the looped tile at the same warps (with every option
    on, the fp64 statistics kernel spilled 40 B at 2048 columns x 4 warps even
    at 255 registers, the fp32 one 8 B at 4096 x 8 warps), and for fp64 the
    rows per program on chip (the gradient kernel spilled 96-216 B at 4096
    fp64 elements per program on unaligned rows). The kernels launch with a
    register budget: on chip the one-program maximum, looped
    ``heuristics.long_row_regs`` (one class heavier with extras).
    """
    live = 3 if extras and elem_bytes > 4 else 2
    cfg = softmax_config(M, W, elem_bytes, device, live_rows=live)
    if cfg.path == heuristics.SINGLE:
        if live == 3 and cfg.rows_per_program > 1:
            cfg = dataclasses.replace(cfg, rows_per_program=cfg.rows_per_program // 2)
        return cfg
    tile = max(heuristics.MIN_BLOCK, cfg.block_n // 2 if extras else cfg.block_n)
    return SoftmaxConfig(heuristics.LOOPED, tile, 1, cfg.num_warps, 1, W,
                         regs=heuristics.long_row_regs(elem_bytes, 2 if extras else 1))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _capped(x2: Tensor, cap: float) -> Tensor:
    """The logits in ACC, softcapped when ``cap`` > 0."""
    z = x2.to(_acc(x2.dtype))
    return cap * torch.tanh(z / cap) if cap > 0 else z


def _shard_w(cw: Optional[Tensor], off: int, W: int, like: Tensor) -> Tensor:
    return cw[off:off + W] if cw is not None else like.new_ones(W)


def _finite_max(m: Tensor) -> Tensor:
    """The shift the stats are taken relative to: m, or 0 where m is -inf
    (the kernels' ``finite_max``)."""
    return torch.where(m == -math.inf, torch.zeros_like(m), m)


def _torch_stats(x2: Tensor, t: Tensor, off: int, vocab: int, ignore: int, smooth: bool,
                 cap: float = 0.0, cw: Optional[Tensor] = None):
    """Reference of the stats kernel on an [M, W] shard: (mx [M], st [k, M])."""
    z = _capped(x2, cap)
    M, W = z.shape
    m = z.amax(1) if W else z.new_full((M,), -math.inf)
    m_safe = _finite_max(m)
    d = torch.exp(z - m_safe[:, None]).sum(1)
    valid = t != ignore
    local = valid & (t >= off) & (t < off + W)
    if W:
        col = torch.where(local, t - off, torch.zeros_like(t))
        tx = torch.where(local, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(d))
    else:
        tx = torch.zeros_like(d)
    bad = valid & ((t < 0) | (t >= vocab))
    tx = torch.where(bad, torch.full_like(tx, math.nan), tx)
    rows = [d, tx] + ([((z - m_safe[:, None]) * _shard_w(cw, off, W, z)).sum(1)] if smooth
                      else [])
    return m, torch.stack(rows)


def _torch_grad(x2: Tensor, t: Tensor, coef: Tensor, off: int, smooth: bool, cap: float = 0.0,
                cw: Optional[Tensor] = None) -> Tensor:
    """Reference of the grad kernel on an [M, W] shard (``coef`` [5, M]: m, l,
    a, b, c; the global lse is m + l)."""
    z = _capped(x2, cap)
    M, W = z.shape
    m, l, a, b, c = (r[:, None] for r in coef.to(z.dtype))
    cols = torch.arange(W, device=z.device) + off
    dz = torch.exp((z - m) - l) * a - torch.where(cols[None, :] == t[:, None], b, 0.0)
    if smooth:
        dz = dz - c * _shard_w(cw, off, W, z)[None, :]
    if cap > 0:
        dz = dz * (1 - (z / cap) ** 2)
    live = (a != 0) | (b != 0) | (c != 0)
    return torch.where(live, dz, 0.0).to(x2.dtype)


# Kernel launches planned per shard shape and options, kept across calls.
_LAUNCHERS = plan_cache()


def _launcher(kind: str, x: Tensor, t: Tensor, out: Optional[Tensor], off: int, vocab: int,
              ignore: int, smooth: bool, has_w: bool, cap: float):
    """The memoised launch of the stats (``out`` None) or gradient kernel for ``x``."""
    M, W = t.numel(), x.shape[-1]
    key = (kind, M, W, x.shape, x.stride(), None if out is None else out.stride(), t.stride(),
           x.dtype, x.device, off, vocab, ignore, smooth, has_w, cap, heuristics.generation())
    launch = _LAUNCHERS.get(key)
    if launch is None:
        _, rows = as_rows(x, x.dim() - 1)
        cfg = shard_config(M, W, x.element_size(), x.device, cap > 0 or (has_w and smooth))
        if kind == "stats":
            launch = K.stats_launcher(M, W, rows.inner, rows.strides, t.stride(0), off, vocab,
                                      ignore, smooth, has_w, cap, x.dtype, cfg)
        else:
            _, drows = as_rows(out, out.dim() - 1)
            launch = K.grad_launcher(M, W, rows.inner, rows.strides, drows.strides, t.stride(0),
                                     off, smooth, has_w, cap, x.dtype, cfg)
        remember(_LAUNCHERS, key, launch)
    return launch


def _shard_stats(x: Tensor, t: Tensor, off: int, vocab: int, ignore: int, smooth: bool,
                 cap: float = 0.0, cw: Optional[Tensor] = None):
    """(mx [M], st [k, M]) of the shard ``x`` ([..., W]) with flat targets ``t``
    (``cw``: the global [V] class weights in ACC, or None)."""
    M, W = t.numel(), x.shape[-1]
    if backend_for(x) != "triton":
        return _torch_stats(x.reshape(M, W), t, off, vocab, ignore, smooth, cap, cw)
    acc = _acc(x.dtype)
    mx = new_output((M,), acc, x.device)
    st = new_output((K.stats_rows(smooth), M), acc, x.device)
    if M == 0:
        return mx, st
    xv, _ = as_rows(x, x.dim() - 1)
    launch = _launcher("stats", xv, t, None, off, vocab, ignore, smooth, cw is not None, cap)
    launch_on(launch_device(x.device), launch, xv, t, cw if cw is not None else mx, mx, st)
    return mx, st


def _shard_grad(x: Tensor, t: Tensor, coef: Tensor, off: int, smooth: bool, cap: float = 0.0,
                cw: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """The gradient of the shard ``x`` ([..., W]) from the per-row terms
    ``coef`` ([5, M] ACC: m, l (the global lse m + l), a, b, c), written into ``out`` (a new
    tensor when None; may be ``x`` itself, which must then have a row view)."""
    M, W = t.numel(), x.shape[-1]
    if out is None:
        out = new_output(x.shape, x.dtype, x.device)
    if backend_for(x) != "triton":
        out.copy_(_torch_grad(x.reshape(M, W), t, coef, off, smooth, cap, cw).reshape(x.shape))
        return out
    if out.numel() == 0:
        return out
    xv, _ = as_rows(x, x.dim() - 1)
    if out is x and xv is not x:  # check_inplace_rows(dim=-1) rules this out
        raise RuntimeError("the shard has no in-place row view: its gradient cannot go over it")
    ov = xv if out is x else as_rows(out, out.dim() - 1)[0]
    coef = coef.contiguous()
    launch = _launcher("grad", xv, t, ov, off, 0, 0, smooth, cw is not None, cap)
    launch_on(launch_device(x.device), launch, xv, t, coef, cw if cw is not None else coef, ov)
    return out


# --- the loss of one call's rows ---------------------------------------------


class _ShardLoss:
    """One call's targets, options and layout: the mean's denominators (from
    ALL the targets, on the device), the stats of a block of rows, their
    collectives and row losses, and the gradient's per-row terms.

    With the kernels (``backend_for`` the targets: CUDA, or the interpreter)
    the denominators are one ``ce_denominators_kernel`` launch, each block's
    lse and row losses one ``vp_rows_kernel`` launch and its gradient terms
    one ``vp_coefs_kernel`` launch; the torch reference forms the same terms
    from torch ops. A group of one rank runs no collective: its shard's
    statistics are the rows' (bit for bit what the collectives would give,
    and lse -inf for a row of -inf logits).

    ``rows`` arguments are slices of the call's N rows (a chunk, or all)."""

    def __init__(self, t: Tensor, weight: Optional[Tensor], pg, layout: _Layout, opts: _Opts,
                 dtype: torch.dtype):
        self.pg, self.layout, self.opts = pg, layout, opts
        self.acc = acc = _acc(dtype)
        self.dtype = dtype
        V = layout.vocab
        self.smooth = opts.eps > 0
        self.cw = weight.to(acc).contiguous() if weight is not None else None
        # this shard's sum of class weights (the smoothing sum's shift to the global max)
        self.sw_shard = 0.0
        if self.smooth and not layout.alone:
            self.sw_shard = (float(layout.width) if self.cw is None else
                             _shard_w(self.cw, layout.off, layout.width, self.cw).sum())
        # the caller's target and class weight may be held by reference (no
        # copy): their versions now, checked before a backward reads them
        # (inference tensors have no version, and no backward)
        self.held = () if torch.compiler.is_compiling() else tuple(
            (name, v, v._version) for name, v in (("target", t), ("weight", self.cw))
            if v is not None and not v.is_inference())
        self.kernels = backend_for(t) == "triton"
        if self.kernels:
            self.t = t = t.contiguous()
            self.dev = launch_device(t.device)
            self.use_den = opts.reduction == "mean"
            self.den = None
            if self.use_den or (self.cw is not None and self.smooth):
                self.den = new_output((K.DEN_LEN,), acc, t.device)
                launch = _den_launcher(t.numel(), V, opts.ignore, self.cw is not None,
                                       self.smooth, self.use_den, dtype, t.device)
                launch_on(self.dev, launch, t, self.den if self.cw is None else self.cw,
                          self.den, self.den)
            return
        self.t = t
        self.kept = kept = t != opts.ignore
        inside = (t >= 0) & (t < V)
        if self.cw is None:
            self.w_t = kept.to(acc)
            self.sum_w = float(V)
        else:
            w_t = self.cw.gather(0, torch.where(kept & inside, t, 0))
            self.w_t = torch.where(kept & inside, w_t, 0.0)
            self.sum_w = self.cw.sum() if self.smooth else 0.0
        self.bad = kept & ~inside
        if opts.reduction == "mean":
            self.dz = kept.sum(dtype=acc)
            self.dl = self.dz if self.cw is None else self.w_t.sum()

    def check_unmodified(self) -> None:
        """Raise, as torch's backward does, when the target or the class weight
        given to the forward was modified in place since: the gradient reads
        them again and would silently use the new values."""
        if torch.compiler.is_compiling():
            return
        for name, v, version in self.held:
            if v._version != version:
                raise RuntimeError(
                    f"softmax_gpu vocab-parallel cross-entropy: the {name} given to the forward "
                    f"was modified in place before the backward (version {v._version}, "
                    f"expected {version}); the gradient needs its values: modify a clone")

    def stats(self, x: Tensor, rows: slice):
        """(mx, st) of the shard block ``x`` for the call's ``rows``."""
        lay, o = self.layout, self.opts
        return _shard_stats(x, self.t[rows], lay.off, lay.vocab, o.ignore, self.smooth, o.cap,
                            self.cw)

    def combine(self, mx: Tensor, st: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        """The two collectives, then (the global lse [2, n] in ACC as its max m
        and the log l of its sum, row losses [n] in ACC, the lse m + l in
        fp32: the caller's); for the mean each row is
        already divided by the denominators, so that the sum of the rows is
        the loss."""
        pg, o, V = self.pg, self.opts, self.layout.vocab
        if not self.layout.alone:
            mg = mx.clone()
            dist.all_reduce(mg, op=dist.ReduceOp.MAX, group=pg)
            # a row of -inf on every rank: d stays 0 (exp(-inf - -inf) would be NaN)
            st[0].mul_(torch.exp(mx - mg.clamp_min(torch.finfo(mg.dtype).min)))
            if self.smooth:  # sum of w (z - m_r) -> sum of w (z - m); the shifts as the kernels'
                st[2].add_(self.sw_shard * (_finite_max(mx) - _finite_max(mg)))
            dist.all_reduce(st, op=dist.ReduceOp.SUM, group=pg)
        else:
            mg = mx
        if self.kernels:
            n, dev = mx.shape[0], mx.device
            lse, loss = new_output((2, n), self.acc, dev), new_output((n,), self.acc, dev)
            lse32 = new_output((n,), torch.float32, dev)
            launch_on(self.dev, self._row_launch("rows", n), mg, st, self.t[rows],
                      mg if self.cw is None else self.cw, mg if self.den is None else self.den,
                      lse, lse32, loss)
            return lse, loss, lse32
        l = torch.log(st[0])
        lse = mg + l
        kept, w_t = self.kept[rows], self.w_t[rows]
        ce = w_t * (lse - st[1])
        if self.smooth:
            ce = (1.0 - o.eps) * ce + (o.eps / V) * (self.sum_w * l - st[2])
        ce = torch.where(kept, ce, 0.0)
        zl = torch.where(kept, o.z * lse * lse, 0.0) if o.z else None
        if o.reduction == "mean":  # an all-ignored batch gives 0 / 0 = NaN, as torch
            ce = ce / self.dl
            zl = zl / self.dz if zl is not None else None
        return torch.stack((mg, l)), ce if zl is None else ce + zl, lse.to(torch.float32)

    def reduce(self, rows: Tensor) -> Tensor:
        """The loss from all the row losses (already divided for the mean)."""
        if self.opts.reduction == "none":
            return rows
        loss = rows.sum()
        if self.opts.reduction == "mean" and rows.numel() == 0:
            loss = loss * math.nan  # the mean of no rows, as torch
        return loss

    def _row_launch(self, kind: str, n: int, has_g: bool = False, has_dlse: bool = False):
        """The memoised per-row launch (``vp_rows_kernel`` or ``vp_coefs_kernel``) for n rows."""
        o = self.opts
        key = (kind, n, self.layout.vocab, o.ignore, self.use_den, o.eps, o.z,
               self.cw is not None, has_g, has_dlse, self.dtype)
        launch = _LAUNCHERS.get(key)
        if launch is None:
            args = (n, 1, self.layout.vocab, o.ignore, self.use_den, o.eps, o.z,
                    self.cw is not None)
            launch = (K.rows_launcher(*args, self.dtype) if kind == "rows" else
                      K.coefs_launcher(*args, has_g, has_dlse, self.dtype))
            remember(_LAUNCHERS, key, launch)
        return launch

    def _scales(self, grad):
        """(g_l, g_z): the factors of the loss's terms (cross-entropy, z-loss)
        in each row's gradient, from the loss's grad_output; 0-d, or [N] for
        ``reduction="none"`` (torch reference)."""
        g = grad.to(self.acc)
        if self.opts.reduction == "none":
            g = g.reshape(-1)
            return g, g
        if self.opts.reduction == "sum":
            return g, g
        return g / self.dl, g / self.dz

    def coefs(self, lse: Tensor, rows: slice, grad: Optional[Tensor],
              dlse: Optional[Tensor]) -> Tensor:
        """The gradient kernel's per-row terms [5, n] (m, l, a, b, c) of
        ``sum_r (g_r loss_r + dlse_r lse_r)`` for the call's ``rows``, from
        ``lse`` [2, n] (m, l: the lse is m + l), so that dz = a sigma -
        b [c == t] - c w_c; ``grad``: the loss's grad_output
        (0-d, or [N] for ``reduction="none"``), or None when the loss has no
        gradient."""
        if self.kernels:
            n, dev = lse.shape[1], lse.device
            g = grad.reshape(-1)[rows] if grad is not None and grad.dim() else grad
            d = dlse.reshape(-1)[rows] if dlse is not None else None
            coef = new_output((K.COEF_ROWS, n), self.acc, dev)
            launch_on(self.dev, self._row_launch("coefs", n, g is not None, d is not None),
                      lse, self.t[rows], lse if self.cw is None else self.cw,
                      lse if self.den is None else self.den, lse if g is None else g,
                      lse if d is None else d, coef, g.stride(0) if g is not None and g.dim()
                      else 0, d.stride(0) if d is not None else 0)
            return coef
        o, V = self.opts, self.layout.vocab
        pick = (lambda v: v[rows] if v is not None and v.dim() else v)
        m, l = lse
        lse = m + l
        zero = torch.zeros_like(lse)
        if grad is None:
            a, b, c = zero, zero, zero
        else:
            g_l, g_z = (pick(v) for v in self._scales(grad))
            # 0 on ignored rows even where g_l is inf or NaN (an all-ignored mean)
            kept, w_t = self.kept[rows], self.w_t[rows]
            b = torch.where(kept, g_l * ((1.0 - o.eps) * w_t), 0.0)
            if self.smooth:
                c = torch.where(kept, g_l * (o.eps / V), 0.0)
                a = b + c * self.sum_w
            else:
                c, a = zero, b
            if o.z:
                a = a + torch.where(kept, g_z * ((2.0 * o.z) * lse), 0.0)
            a = torch.where(self.bad[rows], math.nan, a)
        if dlse is not None:
            a = a + pick(dlse.reshape(-1)).to(self.acc)
        return torch.stack((m, l, a, b, c))

    def grad_(self, z: Tensor, rows: slice, coef: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The gradient of the shard block ``z`` for the call's ``rows`` into ``out``."""
        return _shard_grad(z, self.t[rows], coef, self.layout.off, self.smooth, self.opts.cap,
                           self.cw, out)


def _den_launcher(M: int, V: int, ignore: int, has_weight: bool, smooth: bool, count: bool,
                  dtype: torch.dtype, device: torch.device):
    """The memoised ``ce_denominators_kernel`` launch of a call's M targets:
    DEN <- (sum of w_t, kept rows, sum of w, their reciprocals)."""
    key = ("den", M, V, ignore, has_weight, smooth, count, dtype, device,
           heuristics.generation())
    launch = _LAUNCHERS.get(key)
    if launch is None:
        launch = remember(_LAUNCHERS, key, denominators_plan(M, V, ignore, has_weight, smooth,
                                                             dtype, device, count=count))
    return launch


_ALL = slice(None)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: stats, collectives, losses. Backward: the shard's gradient
    (of the loss and of the returned lse) in one launch; no collective."""

    @staticmethod
    def forward(ctx, x, fn, inplace, loss_dtype):
        mx, st = fn.stats(x, _ALL)
        lse, rows, lse32 = fn.combine(mx, st, _ALL)
        anchor = anchor_output(ctx, x, lse)
        ctx.fn, ctx.inplace = fn, inplace
        ctx.set_materialize_grads(False)
        return fn.reduce(rows).to(loss_dtype), lse32, anchor

    @staticmethod
    @first_order
    def backward(ctx, d_loss, d_lse, d_anchor):
        if d_loss is None and d_lse is None:
            return None, None, None, None
        refuse_batched_backward("vocab_parallel_cross_entropy", grad_output=d_loss, grad_lse=d_lse)
        x, lse = saved(ctx)
        fn = ctx.fn
        fn.check_unmodified()
        coef = fn.coefs(lse, _ALL, d_loss, d_lse)
        # over the logits only when the graph is freed after this backward (a
        # retained one reads them again)
        in_place = ctx.inplace and not graph_kept()
        dx = fn.grad_(x, _ALL, coef, x if in_place else None)
        if in_place:
            torch.autograd.graph.increment_version(x)  # its values are now the gradient
        return dx, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    vocab_size: Optional[int] = None,
    loss_dtype: Optional[torch.dtype] = None,
):
    """Cross-entropy of logits sharded over the vocabulary across ``group``.

    Every rank of ``group`` calls it with its own shard and the same targets
    (and options), and gets the same loss, bit for bit: ``F.cross_entropy``
    (plus the z-loss term, after the softcap) of the logits concatenated over
    the ranks in rank order.

    Args:
        local_logits: this rank's [..., V_r] floating tensor (fp16, bf16, fp32,
            fp64; CUDA with NCCL, or CPU with gloo; any strides), the columns
            [offset, offset + V_r) of the [..., V] logits, the vocabulary last.
            Shards may be uneven (even empty); the offset is the sum of the
            widths of the lower ranks, gathered from the group.
        target: [...] integer global class ids in [0, V), or ``ignore_index``;
            the same on every rank (not checked: that would need a collective).
        group: the process group (default: the world).
        weight: [V] class weights over the GLOBAL vocabulary, the same full
            vector on every rank (any float dtype; V values are small beside
            the shard, and every rank needs the weight of every row's target,
            which a sharded vector would have to communicate). As torch: a
            row's loss is scaled by w_target, label smoothing weights each
            class, and the mean divides by the sum of w_target over the
            non-ignored rows. No gradient flows into it (one that requires grad
            is an error, as in torch).
        ignore_index: rows with this target contribute 0 to the loss and get a
            zero gradient, and are not counted by ``mean``.
        reduction: ``"mean"`` (over non-ignored rows, weighted; NaN when there
            are none, as torch), ``"sum"``, or ``"none"`` (a [...] tensor, 0 on
            ignored rows).
        label_smoothing: eps in [0, 1]; the row loss is
            (1 - eps) w_t (lse - z_t) + eps / V * sum_j w_j (lse - z_j), torch's.
        z_loss: coefficient z >= 0 of an auxiliary z * lse^2 added to each
            non-ignored row's loss (for the mean divided by the number of
            non-ignored rows, without class weights).
        softcap: the logits become z = softcap * tanh(x / softcap) before
            everything (the gradient gets the derivative); None: no softcap.
        return_lse: also return the per-row GLOBAL log-sum-exp of z, fp32,
            shaped like ``target`` (the same on every rank). It is
            differentiable: its gradient (sigma restricted to this shard) is
            added to the shard's gradient in the same backward launch, with no
            communication. It is returned for ignored rows too.
        inplace_backward: the backward writes the shard's gradient over
            ``local_logits`` (no extra shard-sized memory): their values are
            gone after the backward, nothing else may use them then (autograd
            raises if another op saved them), they must be writable in place
            (no expanded dims) and not a leaf that requires grad (nor a view
            of one). A backward that retains the graph writes a new tensor
            instead (a later backward reads the logits again).
        vocab_size: optional global vocabulary; when given it is checked
            against the sum of the gathered shard widths.
        loss_dtype: the returned loss's dtype (default: local_logits'); the
            arithmetic is fp32 (fp64 for fp64 logits), so ``torch.float32``
            returns per-token fp32 losses of bf16 shards without an fp32 copy.

    Returns:
        The loss in ``loss_dtype``: a 0-d tensor, or [...] for
        ``reduction="none"``; then the lse with ``return_lse``.
        Differentiable wrt ``local_logits``: the shard's gradient is written
        from the global lse without any gathered logits and without
        communication in the backward.

    Errors: no initialised process group -> RuntimeError; shard widths that do
    not add up to ``vocab_size``, or a ``weight`` that is not [V] -> ValueError
    on every rank. A target outside [0, V): on CPU tensors a ValueError (the
    targets are already on the host); on CUDA tensors there is no host sync,
    and that row's loss (hence a reduced loss) and gradient are NaN, as the
    single-GPU op does. Argument errors seen by one rank only leave the others
    waiting in the first collective, as with any torch.distributed code.

    Host syncs: one on the first call of a (group, local width, vocab_size)
    layout, to read the gathered widths; none after that. Collectives per
    call: an all-reduce MAX of N values and an all-reduce SUM of k x N
    (k = 2, or 3 with label smoothing); none in the backward. A group of one
    rank runs no collective and never syncs.
    """
    who = "vocab_parallel_cross_entropy"
    x = local_logits
    check_tensor(x, "local_logits")
    refuse_transformed(who, _COLLECTIVES, local_logits=x, target=target, weight=weight)
    check_float(x, "local_logits")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"local_logits must be a CUDA or CPU tensor, got device {x.device}")
    if x.dim() < 1:
        raise ValueError("local_logits must have at least one dim (the vocabulary shard, last)")
    _check_target(target, tuple(x.shape[:-1]), x, "local_logits")
    opts = _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_class_weight(weight, x, "local_logits")
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
        or vocab_size < 1
    ):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    vocab_size = None if vocab_size is None else int(vocab_size)
    check_loss_dtype(loss_dtype)
    need_grad = torch.is_grad_enabled() and x.requires_grad
    if inplace_backward and need_grad:
        check_inplace_rows(x, "local_logits", dim=-1)
        check_not_grad_leaf(local_logits, "local_logits")
    check_row_length(x.shape[-1], "local_logits' last dim")
    pg = _resolve_group(who, group)
    layout = _shard_layout(who, pg, x.shape[-1], vocab_size, x.device)
    _check_weight_shape(weight, layout.vocab)
    t = target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    _check_targets(t, layout.vocab, ignore_index)
    fn = _ShardLoss(t, weight, pg, layout, opts, x.dtype)
    loss, lse, _ = _VocabParallelCrossEntropy.apply(
        x, fn, bool(inplace_backward and need_grad), x.dtype if loss_dtype is None else loss_dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


# --- the linear version: lm_head sharded by vocabulary rows ------------------


def _slices(N: int, rows: int) -> list[slice]:
    return [slice(r, min(N, r + rows)) for r in range(0, N, rows)]


def _chunk_pass(x: Tensor, w: Tensor, b: Optional[Tensor], fn: _ShardLoss, rows: int,
                needs, loss: bool, lse: Optional[Tensor] = None, grad=None,
                dlse: Optional[Tensor] = None, acc32: bool = False,
                main_grad: Optional[Tensor] = None):
    """One pass over the chunks of tokens. Per chunk: the logits GEMM into a
    reused [rows, V_r] buffer; with ``loss``, the stats kernel and the two
    collectives (lse and row losses), else the forward's ``lse``; when
    gradients are asked (``needs``), the gradient of
    ``sum_r (g_l loss_r + g_z zloss_r + dlse_r lse_r)`` written over the
    buffer (``grad``: the loss's grad_output, or None; see
    :meth:`_ShardLoss.coefs`), then dX[chunk] = dlogits @ W_r and dW_r, db_r accumulated in
    place (dW_r in the weight's dtype, fp32 with ``acc32``, or added into
    ``main_grad``; as :func:`softmax_gpu.linear_cross_entropy`). dX is
    all-reduced over the group at the end (each rank's is its shard's part).
    Returns (lse [2, N] ACC: m, l, row losses [N] ACC or None, the gradient
    accumulators: ``_Grads``, None where not asked)."""
    N = x.shape[0]
    grads = _grad_buffers(x, w, b, needs, acc32, main_grad)
    want = any(needs)
    buf = x.new_empty((min(rows, N), w.shape[0]))
    lses, losses = [], []
    for i, sl in enumerate(_slices(N, rows)):
        z = _logits(x[sl], w, b, buf[: sl.stop - sl.start])
        if loss:
            lse_c, rows_c, _ = fn.combine(*fn.stats(z, sl), sl)
            lses.append(lse_c)
            losses.append(rows_c)
        else:
            lse_c = lse[:, sl].contiguous()  # [2, rows]: the kernels read rows m, l at n apart
        if want:
            fn.grad_(z, sl, fn.coefs(lse_c, sl, grad, dlse), z)
            if grads.dx is not None:
                torch.mm(z, w, out=grads.dx[sl])
            _backprop(z, x[sl], w, grads, first=i == 0)
    if grads.dx is not None and not fn.layout.alone:
        dist.all_reduce(grads.dx, op=dist.ReduceOp.SUM, group=fn.pg)
    if loss:
        empty = x.new_empty(0, dtype=fn.acc)
        lse = torch.cat(lses, 1) if lses else x.new_empty((2, 0), dtype=fn.acc)
        return lse, torch.cat(losses) if losses else empty, grads
    return lse, None, grads


class _VocabParallelLinearCE(torch.autograd.Function):
    """Forward: the chunks (with the gradients of mean / sum, not in fp16, as
    :func:`softmax_gpu.linear_cross_entropy`). Backward: mean / sum scale the
    saved gradients (in place the first time); ``reduction="none"``, a
    ``main_grad`` and a used lse recompute the chunks' logits (no stats, no
    collectives but dX's all-reduce)."""

    @staticmethod
    def forward(ctx, x, w, b, fn, rows, needs, keep_inputs, acc32, main_grad):
        # as softmax_gpu.linear_cross_entropy (fp16: formed at backward time)
        grad = any(needs) and _precomputes(fn.opts.reduction, main_grad, x.dtype)
        # the gradients for a grad_output of 1, scaled in the backward
        one = torch.ones((), dtype=fn.acc, device=x.device) if grad else None
        lse, losses, grads = _chunk_pass(x, w, b, fn, rows, needs if grad else (False,) * 3,
                                         True, grad=one, acc32=acc32)
        ctx.fn, ctx.rows, ctx.acc32, ctx.main_grad = fn, rows, acc32, main_grad
        ctx.needs = (needs[0], needs[1], needs[2] and b is not None)
        ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else x.dtype)
        ctx.precomputed = grad
        ctx.set_materialize_grads(False)
        inputs = (x, w, b, lse) if keep_inputs or not grad else (None,) * 4
        anchor = anchor_output(ctx, *inputs, *(grads[:3] if grad else (None,) * 3))
        return fn.reduce(losses), (lse[0] + lse[1]).to(torch.float32), anchor

    @staticmethod
    @first_order
    def backward(ctx, d_loss, d_lse, d_anchor):
        if (d_loss is None and d_lse is None) or not any(ctx.needs):
            return (None,) * 9
        refuse_batched_backward("vocab_parallel_linear_cross_entropy", grad_output=d_loss,
                                grad_lse=d_lse)
        x, w, b, lse, dx, dw, db = saved(ctx)
        fn = ctx.fn
        if d_lse is None and ctx.precomputed:
            out = _scale_out(ctx, dx, dw, db, d_loss)
        else:
            fn.check_unmodified()
            grads = _chunk_pass(x, w, b, fn, ctx.rows, ctx.needs, False, lse, d_loss, d_lse,
                                ctx.acc32, ctx.main_grad)[2]
            out = _hand_out(ctx, *grads[:3])
        return (*out, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    group=None,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    loss_dtype: Optional[torch.dtype] = None,
    options=None,
    main_grad: Optional[Tensor] = None,
):
    """:func:`softmax_gpu.linear_cross_entropy` with the lm_head sharded by
    vocabulary rows across ``group``; no [N, V] tensor is ever allocated or
    communicated.

    Every rank calls it with the same (replicated) ``input`` and ``target``
    and its own rows of the projection: rank r holds the rows
    [offset_r, offset_r + V_r) of the [V, D] weight (uneven shards allowed,
    even empty ones; offsets from the group's widths, in rank order). Every
    rank gets the same loss, bit for bit: the single-device
    ``linear_cross_entropy`` of the concatenated weight and bias up to the
    order of its fp32 sums (a few ulps), and the gradients of ``input`` (the full one, summed over the group: do not
    all-reduce it again), of its ``local_weight`` and of its ``linear_bias``.

    Args:
        input: (N, D) or (D,) hidden states, the same on every rank; fp16,
            bf16, fp32 or fp64, on CUDA (NCCL) or CPU (gloo).
        local_weight: (V_r, D) this rank's rows of the projection, the input's
            dtype and device.
        target: (N,) or () integer global class ids (or ``ignore_index``),
            the same on every rank.
        group: the process group (default: the world).
        linear_bias: (V_r,) this rank's slice of the bias, or None (on every
            rank alike).
        weight: (V,) class weights over the GLOBAL vocabulary, the same full
            vector on every rank (see :func:`vocab_parallel_cross_entropy`).
        reduction, ignore_index, label_smoothing, z_loss, softcap: as
            :func:`softmax_gpu.linear_cross_entropy`.
        return_lse: also return the per-row global log-sum-exp (of the
            softcapped logits), fp32, shaped like ``target``; differentiable
            (its gradient recomputes the chunks' logits in the backward).
        chunk_size: rows per chunk (default: planned as in
            ``linear_cross_entropy``, from a memory budget for the widest
            shard of the group, so that every rank cuts the same chunks).
        loss_dtype: dtype of the returned loss (default: the input's).
        options: as :func:`softmax_gpu.linear_cross_entropy`
            (``batch_chunk_size``, ``chunking_method``, ``acc_policy``);
            ``overlap`` does not apply (each chunk has collectives).
        main_grad: a [V_r, D] buffer into which the backward adds the
            gradient of ``local_weight`` (which then gets none), as
            ``main_grad`` of :func:`softmax_gpu.linear_cross_entropy`
            (every backward through the call adds into it).

    Returns:
        the loss, then the lse with ``return_lse``.

    Per chunk of n rows: the GEMM into a reused [n, V_r] buffer, the shard
    stats kernel, an all-reduce MAX of n values and an all-reduce SUM of
    k x n (k = 2, 3 with label smoothing), the row losses, and (when a
    gradient is needed, for mean / sum) the shard gradient written over the
    buffer, dX[chunk] = dlogits @ W_r, dW_r += dlogits^T @ X[chunk] in place
    in the returned gradient (as :func:`softmax_gpu.linear_cross_entropy`:
    the weight's dtype, fp32 with ``acc_policy="balanced"``, or into
    ``main_grad``). After the chunks, one all-reduce SUM of dX [N, D] in the
    input's dtype. The backward of mean / sum only scales the saved gradients
    by grad_output, in place the first time; ``reduction="none"``,
    ``main_grad`` and a differentiated lse recompute each chunk's logits from
    the saved lse (one GEMM, the gradient kernel, two GEMMs; the only
    collective is dX's all-reduce). No host sync (after the first call of a
    layout, as :func:`vocab_parallel_cross_entropy`). Memory beyond the
    returned gradients: one [chunk, V_r] buffer (192 MiB at most by
    default) and O(N + V_r) vectors.

    Errors: as :func:`softmax_gpu.linear_cross_entropy` (naming the argument)
    and :func:`vocab_parallel_cross_entropy` (process group, weight shape,
    targets outside [0, V): ValueError on CPU, NaN rows on CUDA).
    """
    who = "vocab_parallel_linear_cross_entropy"
    check_tensor(input, "input")
    refuse_transformed(who, _COLLECTIVES, input=input, local_weight=local_weight,
                       target=target, linear_bias=linear_bias, weight=weight)
    check_float(input, "input")
    if input.device.type not in ("cuda", "cpu"):
        raise ValueError(f"input must be a CUDA or CPU tensor, got device {input.device}")
    if input.dim() not in (1, 2):
        raise ValueError(f"input must have shape (N, D) or (D,), got {tuple(input.shape)}")
    D = input.shape[-1]
    check_tensor(local_weight, "local_weight")
    if local_weight.dim() != 2 or local_weight.shape[1] != D:
        raise ValueError(f"local_weight must have shape (V_r, {D}) (this rank's vocabulary rows "
                         f"of the projection), got {tuple(local_weight.shape)}")
    for t_, name in ((local_weight, "local_weight"), (linear_bias, "linear_bias")):
        if t_ is None:
            continue
        check_tensor(t_, name)
        if t_.device != input.device:
            raise ValueError(f"{name} is on {t_.device} but input is on {input.device}")
        if t_.dtype != input.dtype:
            raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t_.dtype}")
    Vr = local_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (Vr,):
        raise ValueError(f"linear_bias must have shape ({Vr},) (this rank's slice), got "
                         f"{tuple(linear_bias.shape)}")
    _check_target(target, tuple(input.shape[:-1]), input, "input")
    if ignore_index is None:
        ignore_index = -100  # torch's F.linear_cross_entropy default, as linear_cross_entropy
    opts = _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_class_weight(weight, input, "input")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    from_options, chunking, acc32, _ = _linear_options(options)
    if chunk_size and from_options and chunk_size != from_options:
        raise ValueError(f"chunk_size={chunk_size} and options.batch_chunk_size={from_options} "
                         "disagree; pass one")
    _check_main_grad(main_grad, local_weight)
    check_loss_dtype(loss_dtype)
    pg = _resolve_group(who, group)
    layout = _shard_layout(who, pg, Vr, None, input.device)
    _check_weight_shape(weight, layout.vocab)
    x = input if input.dim() == 2 else input.unsqueeze(0)
    t = target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    _check_targets(t, layout.vocab, ignore_index)
    N = x.shape[0]
    rows = plan_rows(N, max(layout.widths), x, chunk_size or from_options or 0, chunking)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and local_weight.requires_grad,
             grad_on and linear_bias is not None and linear_bias.requires_grad)
    fn = _ShardLoss(t, weight, pg, layout, opts, x.dtype)
    if any(needs):
        loss, lse, _ = _VocabParallelLinearCE.apply(x, local_weight, linear_bias, fn, rows, needs,
                                                    bool(return_lse), acc32,
                                                    main_grad if needs[1] else None)
    else:
        lse, losses, *_ = _chunk_pass(x, local_weight, linear_bias, fn, rows, (False,) * 3, True)
        loss, lse = fn.reduce(losses), (lse[0] + lse[1]).to(torch.float32)
    loss = loss.to(loss_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss
