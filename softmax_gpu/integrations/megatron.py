"""Megatron-core's ``vocab_parallel_cross_entropy`` on softmax_gpu's kernels.

A drop-in for ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``:
the same signature, shapes and per-token fp32 result, built on
:func:`softmax_gpu.distributed.vocab_parallel_cross_entropy` (the shards are
read once by a kernel; two all-reduces of O(tokens) values instead of
Megatron's three plus an fp32 copy and an exp of the logits shard).
Megatron itself is not needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import as_number
from ..distributed import vocab_parallel_cross_entropy as _vocab_parallel
from ..vocab_parallel import _resolve_group, _shard_layout

__all__ = ["vocab_parallel_cross_entropy"]

_WHO = "softmax_gpu.integrations.megatron.vocab_parallel_cross_entropy"


def _megatron_tp_group():
    """Megatron's tensor-parallel group when Megatron is importable and
    initialised, else None (the default group)."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor,
                                 label_smoothing: float = 0.0, tp_group=None) -> Tensor:
    """Cross-entropy of logits split evenly over the vocabulary across ``tp_group``.

    Args:
        vocab_parallel_logits: [s, b, V/tp] (any leading dims): this rank's
            contiguous slice ``[rank * V/tp, (rank + 1) * V/tp)`` of the
            vocabulary, fp16/bf16/fp32/fp64. Every rank's slice has the same width.
        target: [s, b] global token ids in [0, V), the same on every rank.
            A target of -100 gives a 0 loss and a zero gradient (Megatron
            masks such positions with its loss mask afterwards; its loss there
            is the lse, which the mask zeroes). Any other id outside [0, V) is
            an error (CPU tensors) or a NaN loss (CUDA tensors), never a
            silently wrong value.
        label_smoothing: alpha in [0, 1) (any real scalar, NumPy's
            included). Megatron's formula, with
            K = V / (V - 1) * alpha:
            ``loss = (1 - K) * nll - K * mean_j log p_j`` (mass alpha / (V - 1)
            on every wrong class), with the mean over the GLOBAL vocabulary.
            Megatron-core's own code takes that mean (and V) over each rank's
            shard only, so its ranks disagree whenever tp > 1; with tp = 1 the
            two agree. Needs K <= 1, i.e. alpha <= (V - 1) / V.
        tp_group: the tensor-parallel group; None: Megatron's
            tensor-model-parallel group when Megatron is initialised, else the
            default group.

    Returns:
        [s, b] fp32 per-token losses, the same on every rank, differentiable
        with respect to ``vocab_parallel_logits`` (the gradient has the
        logits' dtype). The backward runs no collective.
    """
    label_smoothing = as_number(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    group = tp_group if tp_group is not None else _megatron_tp_group()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs an initialised process group")
    if vocab_parallel_logits.dim() < 1:
        raise ValueError("vocab_parallel_logits must have the vocabulary shard as its last dim")
    # the group's widths: gathered on a layout's first call only, then cached,
    # and the same cache entry serves the call below (no vocab_size to check)
    widths = _shard_layout(_WHO, _resolve_group(_WHO, group), vocab_parallel_logits.shape[-1],
                           None, vocab_parallel_logits.device).widths
    if len(set(widths)) != 1:
        raise ValueError(
            f"{_WHO}: vocab_parallel_logits must have the same shard width on every rank "
            f"(Megatron pads the vocabulary to a multiple of the tensor-parallel size); the "
            f"group's widths are {list(widths)}. softmax_gpu.distributed."
            "vocab_parallel_cross_entropy takes uneven shards")
    vocab = sum(widths)
    eps = 0.0
    if label_smoothing > 0.0:
        if vocab < 2:
            raise ValueError("label_smoothing needs a vocabulary of at least 2 classes")
        eps = label_smoothing * vocab / (vocab - 1)
        if eps > 1.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} gives Megatron's K = alpha * V / (V - 1) = "
                f"{eps} > 1 for V={vocab}; use alpha <= {(vocab - 1) / vocab}")
    # per-token fp32 rows, straight from the kernels' fp32 arithmetic (no fp32 copy of the shard)
    return _vocab_parallel(vocab_parallel_logits, target, group=group, reduction="none",
                           label_smoothing=eps, loss_dtype=torch.float32)
