"""Public functions: drop-ins for ``torch.softmax`` and ``torch.log_softmax``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._checks import check_float, check_tensor, wrap_dim

__all__ = ["softmax", "log_softmax"]


def _softmax(input: Tensor, dim: int, dtype, log: bool) -> Tensor:
    check_tensor(input, "input")
    d = wrap_dim(dim, input.dim())
    if dtype is not None:
        input = input.to(dtype)
    check_float(input, "input")
    if input.dim() == 0:
        return ops.softmax_forward(input.reshape(1), 0, log).reshape(())
    return ops.softmax_forward(input, d, log)


def softmax(input: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """Softmax over ``dim``: ``exp(x) / exp(x).sum(dim, keepdim=True)``.

    Same semantics as :func:`torch.softmax`.

    Args:
        input: tensor of any shape (0-d and empty included), float16,
            bfloat16, float32 or float64, on CUDA or CPU.
        dim: the dim to normalise over; negative counts from the end.
        dtype: if given, ``input`` is cast to it before the op (integer
            inputs need it).

    Returns:
        A contiguous tensor of ``input``'s shape and (cast) dtype. Arithmetic
        is fp32 (fp64 for fp64). Rows that are entirely -inf give NaN, as in
        torch. Differentiable; the backward is ``y * (dy - sum(dy * y))``.
    """
    return _softmax(input, dim, dtype, log=False)


def log_softmax(input: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """Log-softmax over ``dim``: ``x - logsumexp(x, dim)``.

    Same semantics as :func:`torch.log_softmax`; arguments and result as in
    :func:`softmax`. The backward is ``dy - exp(y) * sum(dy)``.
    """
    return _softmax(input, dim, dtype, log=True)


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3)
# ----------------------------------------------------------------------------

from . import reference as _reference  # noqa: E402
from ._checks import check_cross_entropy, check_inplace_rows  # noqa: E402

__all__ += ["cross_entropy", "cross_entropy_with_grad"]


def _ce_prepare(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap):
    """Checked arguments, with (C,) input / () target seen as one row."""
    prob = check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                               z_loss, softcap)
    batch = (input.shape[0], *input.shape[2:]) if input.dim() >= 2 else ()
    x = input if input.dim() >= 2 else input.unsqueeze(0)
    t = target if input.dim() >= 2 else target.unsqueeze(0)
    cap = float(softcap) if softcap is not None else 0.0
    return prob, batch, x, t, float(label_smoothing), float(z_loss), cap


def _ce_reduce(rows: Tensor, reduction: str, batch, dtype) -> Tensor:
    """The row losses (already divided by the mean's denominators) reduced."""
    if reduction == "none":
        return rows.reshape(batch).to(dtype)
    total = rows.sum()
    if reduction == "mean" and rows.numel() == 0:
        total = total * float("nan")  # the mean of no rows, as torch
    return total.to(dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
):
    """Fused cross-entropy: a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Same semantics as torch for every case it accepts: input (C,), (N, C) or
    (N, C, d1..dK) with the classes in dim 1; integer class-index targets of
    the input's shape without dim 1 (any integer dtype), or floating class
    probabilities of the input's shape; ``weight``, ``ignore_index``,
    ``reduction`` ("none" | "mean" | "sum"), ``label_smoothing`` (torch's
    formula, weights included); the mean divides by the kept rows' total
    weight (NaN when every target is ignored; probability targets: by the
    number of rows); the result has the input's dtype. Arithmetic is fp32
    (fp64 for fp64 logits).

    One Triton launch reads the logits once and writes each row's loss and
    log-sum-exp; when autograd will need the input's gradient (grad mode on
    and ``input.requires_grad`` at the call) the same launch also writes
    sigma * sum(y) - y, scaled for the reduction, so the backward only
    rescales it by grad_output, and does nothing at all when grad_output is 1.
    Peak extra memory is one logits-sized gradient buffer (none with
    ``inplace_backward``). No host-device sync; capturable in a CUDA graph and
    traceable by ``torch.compile(fullgraph=True)``.

    Extras (keyword-only):
        z_loss: adds ``z_loss * lse**2`` per non-ignored row, reduced like the
            loss but, for the mean, over the number of non-ignored rows
            (no class weights).
        softcap: ``z = softcap * tanh(z / softcap)`` before everything, its
            derivative applied in the gradient. Must be > 0.
        return_lse: also return the per-row log-sum-exp (of the softcapped
            logits), fp32, shaped like the target's batch dims. It is not
            differentiable (detached).
        inplace_backward: the gradient is written over the logits in the
            forward (when a gradient is needed), so there is no extra
            logits-sized memory. The logits' values are then gone: nothing
            else may use them afterwards (autograd raises if another op saved
            them for its backward), and they must be writable in place (no
            expanded dims).

    Probability targets that require grad (distillation through both
    sides) take a differentiable torch composite instead of the fused op.
    The gradient is not itself differentiable (no double backward).

    Class indices outside [0, C) that are not ``ignore_index`` are never used
    as addresses: with the Triton kernels that row's loss and gradient are
    NaN (so a mean becomes NaN); the torch reference path raises IndexError as
    torch does. Rows whose target is ``ignore_index`` have zero loss and zero
    gradient.

    With fp16 logits the gradient is stored in fp16 at forward time, before
    grad_output is known: a mean over many rows can underflow fp16 there
    (torch keeps it in fp32 until grad_output is applied). Prefer bf16/fp32
    logits, or :func:`cross_entropy_with_grad` with the loss scale as
    ``grad_scale``.

    Returns:
        the loss, or ``(loss, lse)`` when ``return_lse``.
    """
    check_tensor(input, "input")
    prob, batch, x, t, eps, zl, cap = _ce_prepare(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    if prob and torch.is_grad_enabled() and target.requires_grad:
        # the fused op does not differentiate the targets: torch composite
        loss, lse = _reference.cross_entropy(x, t, weight, ignore_index, reduction, eps, zl, cap)
        if reduction == "none":
            loss = loss.reshape(batch)
        return (loss, lse.reshape(batch).detach()) if return_lse else loss
    if need_grad and inplace_backward:
        check_inplace_rows(input)
        rows, lse, state = ops.cross_entropy_forward_(
            x.detach(), t, weight, ignore_index, reduction, eps, zl, cap, 1.0)
        rows = ops.cross_entropy_attach_grad(x, rows, state)
    else:
        rows, lse, _, _ = ops.cross_entropy_forward(
            x, t, weight, ignore_index, reduction, eps, zl, cap, 1.0, need_grad)
    loss = _ce_reduce(rows, reduction, batch, input.dtype)
    if return_lse:
        return loss, lse.detach().reshape(batch)
    return loss


def cross_entropy_with_grad(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    grad_scale: float = 1.0,
    inplace: bool = False,
):
    """The loss and its gradient in one launch, for training code that runs
    its own backward.

    Arguments as :func:`cross_entropy`. Returns ``(loss, grad_input)`` (or
    ``(loss, grad_input, lse)`` with ``return_lse``): ``grad_input`` has the
    input's shape and dtype and holds ``grad_scale * d(loss)/d(input)`` (for
    ``reduction="none"``, the derivative of the sum of the row losses). The
    logits are read once where the row fits on chip. Nothing is recorded for
    autograd.

    ``inplace=True`` writes the gradient over ``input`` (no extra memory) and
    returns it as ``grad_input`` (a detached alias of ``input``); the logits
    are gone afterwards and must be writable in place.
    """
    check_tensor(input, "input")
    prob, batch, x, t, eps, zl, cap = _ce_prepare(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    gs = float(grad_scale) if not isinstance(grad_scale, bool) and isinstance(
        grad_scale, (int, float)) else None
    if gs is None:
        raise TypeError(f"grad_scale must be a number, got {type(grad_scale).__name__}")
    x, t = x.detach(), t.detach()
    w = weight.detach() if weight is not None else None
    if inplace:
        check_inplace_rows(input)
        rows, lse, _ = ops.cross_entropy_forward_(x, t, w, ignore_index, reduction, eps, zl, cap,
                                                  gs)
        grad = input.detach()
    else:
        rows, lse, grad, _ = ops.cross_entropy_forward(
            x, t, w, ignore_index, reduction, eps, zl, cap, gs, True)
        grad = grad.reshape(input.shape)
    loss = _ce_reduce(rows, reduction, batch, input.dtype)
    if return_lse:
        return loss, grad, lse.reshape(batch)
    return loss, grad
