"""Vocab-parallel cross-entropy over ``torch.distributed``: the host side
(the shard kernels are in ``softmax_gpu/kernels/vocab_parallel.py``); the
public names are re-exported by :mod:`softmax_gpu.distributed`.

When the output layer is sharded over tensor-parallel ranks, each rank holds
the logits of a slice of the vocabulary. The online-softmax state
(max, sum of e^(x - max)) merges associatively, so the loss and the gradient
need O(rows) communication, never the O(rows x vocab) logits.

Per forward, on every rank of ``group`` (NCCL for CUDA tensors, gloo for CPU
tensors: the collectives run on the logits' device):

1. shard widths: an all-gather of one int64 per rank gives this rank's column
   offset and the global vocabulary. It is cached per (group, local width,
   ``vocab_size``), so it runs (and syncs the host, to read the widths) on the
   first call of a layout only; see :func:`clear_width_cache`.
2. the stats kernel reads the shard once: per row its max m, sum d of
   e^(x - m), its target logit where this rank owns the target (else 0), and
   with label smoothing the sum of its logits;
3. ``all_reduce(MAX)`` of m (N values);
4. d is rescaled to the global max on the device, then one ``all_reduce(SUM)``
   of the stacked [k, N] tensor (d, target logit[, sum of logits]); k = 2, or 3
   with label smoothing. fp32, fp64 for fp64 logits.
5. The loss follows on the device from the global (max, sum): no host sync.

The backward needs no collective: each rank writes the gradient of its own
shard from the saved global lse, reading the shard once more. ``mean`` divides
by the number of non-ignored rows, which every rank counts alike since every
rank holds the same targets.

Communication per step: (1 + k) * N * 4 bytes in two all-reduces (8 bytes per
value for fp64), against N * V * itemsize for gathering the logits; see
``perf/vocab_parallel.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import heuristics
from ._checks import check_float, check_tensor
from ._dispatch import backend_for, device_guard, new_output, record
from ._layout import as_rows
from .kernels import vocab_parallel as K
from .softmax import SoftmaxConfig, softmax_config

__all__ = ["vocab_parallel_cross_entropy", "clear_width_cache", "shard_config"]

_REDUCTIONS = ("mean", "sum", "none")

# (group, local width, vocab_size or None) -> (offset, global vocab, all widths)
_WIDTHS: dict = {}


def clear_width_cache() -> None:
    """Forget the cached shard widths.

    The widths of a group are gathered once per (group, local width,
    ``vocab_size``). A program that uses one group for several vocabulary
    layouts in which some rank's width repeats while another's changes must
    pass ``vocab_size=`` (part of the key) or call this on every rank between
    layouts: otherwise that rank would skip the gather the others run.
    """
    _WIDTHS.clear()


def _shard_layout(pg, width: int, vocab_size, device: torch.device):
    """(this rank's column offset, global vocabulary, all widths) for ``pg``."""
    key = (pg, width, vocab_size)
    hit = _WIDTHS.get(key)
    if hit is None:
        world = dist.get_world_size(pg)
        mine = torch.full((1,), width, dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=pg)
        widths = tuple(int(w) for w in torch.cat(parts).tolist())  # host sync, first call only
        rank = dist.get_rank(pg)
        hit = (sum(widths[:rank]), sum(widths), widths)
        _WIDTHS[key] = hit
    offset, vocab, widths = hit
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(
            f"vocab_parallel_cross_entropy: the shard widths {list(widths)} of the group add up "
            f"to {vocab}, not vocab_size={vocab_size}"
        )
    return hit


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs an initialised process group: call "
            "torch.distributed.init_process_group() first (a single process can use "
            "world_size=1)"
        )
    pg = dist.group.WORLD if group is None else group
    if dist.get_rank(pg) < 0:
        raise ValueError("vocab_parallel_cross_entropy: this process is not a member of `group`")
    return pg


def _check_args(x, target, ignore_index, reduction, label_smoothing, z_loss, vocab_size):
    check_tensor(x, "local_logits")
    check_float(x, "local_logits")
    check_tensor(target, "target")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"local_logits must be a CUDA or CPU tensor, got device {x.device}")
    if x.dim() < 1:
        raise ValueError("local_logits must have at least one dim (the vocabulary shard, last)")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class ids (torch.long), got {target.dtype}; "
            "class probabilities are not supported"
        )
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but local_logits on {x.device}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must be local_logits' shape without its last "
            f"(vocabulary) dim, {tuple(x.shape[:-1])}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")


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


def shard_config(M: int, W: int, elem_bytes: int, device: torch.device):
    """Launch parameters of both shard kernels for an [M, W] shard:
    :func:`softmax_gpu.softmax.softmax_config`'s choice, its split path run as looped (one
    program per row: a vocab shard has as many rows as there are tokens).

    ``live_rows=2``: on the single path the stats kernel keeps x and e^(x - m)
    (and with smoothing the sum of x), the gradient kernel x, its target mask
    and dx; at the one-row limits both spilled in the sm_90 static check
    (perf/static.py, ``vocab_parallel_variants``), at half of them neither does.
    """
    cfg = softmax_config(M, W, elem_bytes, device, live_rows=2)
    if cfg.path == heuristics.SPLIT:
        cfg = SoftmaxConfig(heuristics.LOOPED, cfg.block_n, 1, cfg.num_warps, 1, W)
    return cfg


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_stats(x2: Tensor, t: Tensor, off: int, vocab: int, ignore: int, smooth: bool):
    """Reference of the stats kernel on an [M, W] shard: (mx [M], st [k, M])."""
    xa = x2.to(_acc(x2.dtype))
    M, W = xa.shape
    m = xa.amax(1) if W else xa.new_full((M,), -math.inf)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
    d = torch.exp(xa - m_safe[:, None]).sum(1)
    valid = t != ignore
    local = valid & (t >= off) & (t < off + W)
    if W:
        col = torch.where(local, t - off, torch.zeros_like(t))
        tx = torch.where(local, xa.gather(1, col[:, None]).squeeze(1), torch.zeros_like(d))
    else:
        tx = torch.zeros_like(d)
    bad = valid & ((t < 0) | (t >= vocab))
    tx = torch.where(bad, torch.full_like(tx, math.nan), tx)
    rows = [d, tx] + ([xa.sum(1)] if smooth else [])
    return m, torch.stack(rows)


def _torch_grad(x2: Tensor, t: Tensor, lse: Tensor, g: Tensor, coef: Tensor, off: int,
                vocab: int, ignore: int) -> Tensor:
    """Reference of the grad kernel on an [M, W] shard (g: [M] scales)."""
    xa = x2.to(_acc(x2.dtype))
    M, W = xa.shape
    valid = t != ignore
    bad = valid & ((t < 0) | (t >= vocab))
    g = torch.where(bad, torch.full_like(g, math.nan), g)
    hit, uniform, two_z = coef[0], coef[1], coef[2]
    dx = torch.exp(xa - lse[:, None]) * (g * (1 + two_z * lse))[:, None] - (g * uniform)[:, None]
    cols = torch.arange(W, device=xa.device) + off
    dx = dx - torch.where(cols[None, :] == t[:, None], (g * hit)[:, None], torch.zeros_like(dx))
    dx = torch.where(valid[:, None], dx, torch.zeros_like(dx))
    return dx.to(x2.dtype)


def _shard_stats(x: Tensor, t: Tensor, off: int, vocab: int, ignore: int, smooth: bool):
    """(mx [M], st [k, M]) of the shard ``x`` ([..., W]) with flat targets ``t``."""
    M, W = t.numel(), x.shape[-1]
    if backend_for(x) != "triton":
        return _torch_stats(x.reshape(M, W), t, off, vocab, ignore, smooth)
    acc = _acc(x.dtype)
    mx = new_output((M,), acc, x.device)
    st = new_output((K.stats_rows(smooth), M), acc, x.device)
    if M == 0:
        return mx, st
    xv, rows = as_rows(x, x.dim() - 1)
    cfg = shard_config(M, W, xv.element_size(), xv.device)
    with device_guard(x):
        record(K.launch_vp_stats(xv, t, mx, st, M, W, rows.inner, rows.strides, t.stride(0),
                                 off, vocab, ignore, smooth, cfg))
    return mx, st


def _shard_grad(x: Tensor, t: Tensor, lse: Tensor, g: Tensor, coef: Tensor, off: int,
                vocab: int, ignore: int) -> Tensor:
    """Gradient of the loss wrt the shard ``x``; ``g`` is [M] or [1] (broadcast)."""
    M, W = t.numel(), x.shape[-1]
    if backend_for(x) != "triton":
        return _torch_grad(x.reshape(M, W), t, lse, g.expand(M), coef, off, vocab,
                           ignore).reshape(x.shape)
    dx = new_output(x.shape, x.dtype, x.device)
    if dx.numel() == 0:
        return dx
    xv, rows = as_rows(x, x.dim() - 1)
    _, drows = as_rows(dx, dx.dim() - 1)
    cfg = shard_config(M, W, xv.element_size(), xv.device)
    s_g = g.stride(0) if g.numel() > 1 else 0
    with device_guard(x):
        record(K.launch_vp_grad(xv, t, lse, g, s_g, coef, dx, M, W, rows.inner, rows.strides,
                                drows.strides, t.stride(0), off, vocab, ignore, cfg))
    return dx


def _scalars(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small device tensor of Python floats, written by fill kernels (no host-to-device
    copy from pageable memory, so no sync; full precision for fp64)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i] = v
    return out


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, pg, off, vocab, ignore, reduction, eps, z, loss_dtype):
        acc = _acc(x.dtype)
        smooth = eps > 0.0
        mx, st = _shard_stats(x, t, off, vocab, ignore, smooth)
        # global max, then the local sums rescaled to it, then one SUM of the stack
        mg = mx.clone()
        dist.all_reduce(mg, op=dist.ReduceOp.MAX, group=pg)
        st[0].mul_(torch.exp(mx - mg))
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=pg)
        lse = mg + torch.log(st[0])
        valid = t != ignore
        rows = lse - (1.0 - eps) * st[1]
        if smooth:
            rows = rows - (eps / vocab) * st[2]
        if z:
            rows = rows + z * lse * lse
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        count = valid.sum().to(acc)
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / count
        ctx.save_for_backward(x, t, lse, count)
        ctx.args = (off, vocab, ignore, reduction, eps, z)
        return loss.to(loss_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, t, lse, count = ctx.saved_tensors
        off, vocab, ignore, reduction, eps, z = ctx.args
        acc = lse.dtype
        grad = grad.to(acc)
        if reduction == "none":
            g = grad.reshape(-1)
        elif reduction == "sum":
            g = grad.reshape(1)
        else:
            g = (grad / count).reshape(1)
        coef = _scalars((1.0 - eps, eps / vocab, 2.0 * z), acc, x.device)
        dx = _shard_grad(x, t, lse, g, coef, off, vocab, ignore)
        return dx, None, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_size: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> Tensor:
    """Cross-entropy of logits sharded over the vocabulary across ``group``.

    Every rank of ``group`` calls it with its own shard and the same targets,
    and gets the same loss: ``F.cross_entropy`` (plus the z-loss term) of the
    logits concatenated over the ranks in rank order.

    Args:
        local_logits: this rank's [..., V_r] floating tensor (fp16, bf16, fp32,
            fp64; CUDA with NCCL, or CPU with gloo; any strides), the columns
            [offset, offset + V_r) of the [..., V] logits, the vocabulary last.
            Shards may be uneven (even empty); the offset is the sum of the
            widths of the lower ranks, gathered from the group.
        target: [...] integer global class ids in [0, V), or ``ignore_index``;
            the same on every rank (not checked: that would need a collective).
        group: the process group (default: the world).
        ignore_index: rows with this target contribute 0 to the loss and get a
            zero gradient, and are not counted by ``mean``.
        reduction: ``"mean"`` (over non-ignored rows; NaN when there are none,
            as torch), ``"sum"``, or ``"none"`` (a [...] tensor, 0 on ignored rows).
        label_smoothing: eps in [0, 1]; the row loss is
            lse - (1 - eps) x_target - eps / V * sum_j x_j, as in torch.
        z_loss: coefficient z >= 0 of an auxiliary z * lse^2 added to each
            non-ignored row's loss (reduced like the rest).
        vocab_size: optional global vocabulary; when given it is checked
            against the sum of the gathered shard widths.
        loss_dtype: the returned loss's dtype (default: local_logits'); the
            arithmetic is fp32 (fp64 for fp64), so ``torch.float32`` returns
            per-token fp32 losses of bf16 shards without an fp32 copy of them.

    Returns:
        The loss in ``loss_dtype`` (computed in fp32, fp64 for fp64): a
        0-d tensor, or [...] for ``reduction="none"``. Differentiable wrt
        ``local_logits``: the gradient of the shard is (sigma - y) restricted to
        it (with the smoothing and z-loss terms) times the reduction scale,
        written from the global lse without any gathered logits and without
        communication in the backward.

    Errors: no initialised process group -> RuntimeError; shard widths that do
    not add up to ``vocab_size`` -> ValueError on every rank. A target outside
    [0, V): on CPU tensors a ValueError (the targets are already on the host);
    on CUDA tensors there is no host sync, and that row's loss (hence a
    reduced loss) and gradient are NaN, as the single-GPU op does. Argument
    errors seen by one rank only leave the others waiting in the first
    collective, as with any torch.distributed code.

    Host syncs: one on the first call of a (group, local width, vocab_size)
    layout, to read the gathered widths; none after that. Collectives per
    call: an all-reduce MAX of N values and an all-reduce SUM of k x N
    (k = 2, or 3 with label smoothing); none in the backward.
    """
    _check_args(local_logits, target, ignore_index, reduction, label_smoothing, z_loss,
                vocab_size)
    pg = _resolve_group(group)
    off, vocab, _ = _shard_layout(pg, local_logits.shape[-1], vocab_size, local_logits.device)
    t = target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    _check_targets(t, vocab, ignore_index)
    loss = _VocabParallelCrossEntropy.apply(
        local_logits, t, pg, off, vocab, ignore_index, reduction, float(label_smoothing),
        float(z_loss), local_logits.dtype if loss_dtype is None else loss_dtype,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss
