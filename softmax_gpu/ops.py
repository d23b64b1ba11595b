"""torch.library registrations (namespace ``softmax_gpu``).

``custom_op`` + ``register_fake`` + ``register_autograd`` rather than
``triton_op``: ``triton_op`` fails under ``torch.compile`` when the kernels run
in Triton's interpreter, whereas an opaque ``custom_op`` with a fake
implementation compiles on CPU and CUDA alike (tested in
tests/test_compile.py). The backward is an op of its own.

The ops take an already-validated floating tensor and a wrapped, non-negative
``dim``; argument checks live in :mod:`softmax_gpu.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import heuristics, reference
from ._dispatch import backend_for, device_guard, new_output, record
from ._layout import as_rows
from .kernels import softmax as K

__all__ = ["softmax_forward", "softmax_backward"]


def _triton_softmax_forward(x: Tensor, dim: int, log: bool) -> Tensor:
    y = new_output(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y
    x, rows = as_rows(x, dim)
    _, yrows = as_rows(y, dim)
    cfg = heuristics.softmax_config(rows.m, rows.n, x.element_size(), x.device, 2 if log else 1)
    with device_guard(x):
        record(K.launch_softmax_forward(
            x, y, rows.m, rows.n, rows.inner, rows.strides, yrows.strides, cfg, log))
    return y


def _triton_softmax_backward(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    dx = new_output(y.shape, y.dtype, y.device)
    if y.numel() == 0:
        return dx
    y, yrows = as_rows(y, dim)
    dy, grows = as_rows(dy, dim)
    _, xrows = as_rows(dx, dim)
    cfg = heuristics.softmax_config(yrows.m, yrows.n, y.element_size(), y.device, 2)
    with device_guard(y):
        record(K.launch_softmax_backward(
            y, dy, dx, yrows.m, yrows.n, yrows.inner,
            yrows.strides, grows.strides, xrows.strides, cfg, log))
    return dx


@torch.library.custom_op("softmax_gpu::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, dim: int, log: bool) -> Tensor:
    """softmax (log=False) or log-softmax (log=True) of ``x`` over ``dim``.

    x: floating tensor of at least one dim; dim in [0, x.dim()). Returns a
    contiguous tensor of x's shape and dtype.
    """
    if backend_for(x) == "triton":
        return _triton_softmax_forward(x, dim, log)
    return reference.softmax_forward(x, dim, log)


@softmax_forward.register_fake
def _(x: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("softmax_gpu::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient wrt the input of softmax (or log-softmax) whose output is ``y``,
    given the output gradient ``dy`` (same shape; any strides)."""
    if backend_for(y) == "triton":
        return _triton_softmax_backward(y, dy.to(y.dtype), dim, log)
    return reference.softmax_backward(y, dy, dim, log)


@softmax_backward.register_fake
def _(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output):
    _, dim, log = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log = dim, log


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return softmax_backward(y, grad, ctx.dim, ctx.log), None, None


softmax_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3)
#
# cross_entropy_forward      functional; one fused launch: row losses (already
#                            divided by the mean's denominators), lse and, when
#                            with_grad, the gradient, saved for the backward.
# cross_entropy_scale_grad_  mutates (grad, state): rows *= grad_output / state
#                            where they differ, state <- grad_output. The
#                            autograd backward: a no-op launch when
#                            grad_output is 1, and safe to repeat (retain_graph).
# cross_entropy_forward_     mutates input: the gradient is written over the
#                            logits (inplace_backward / inplace=True).
# cross_entropy_scaled_grad  functional twin of the rescale, for graphs traced by
#                            torch.compile (a new tensor, every row written).
# cross_entropy_attach_grad  functional; a copy of the row losses whose backward
#                            scales the gradient held in ``input`` and returns it.
#
# The inputs are validated by softmax_gpu.functional: input (N, C, *), target
# (N, *) of integer class indices or input-shaped probabilities.
# ----------------------------------------------------------------------------

from typing import Optional  # noqa: E402

from ._layout import rows_view  # noqa: E402
from .kernels import cross_entropy as CEK  # noqa: E402

__all__ += [
    "cross_entropy_forward",
    "cross_entropy_forward_",
    "cross_entropy_scale_grad_",
    "cross_entropy_scaled_grad",
    "cross_entropy_attach_grad",
]


def _ce_acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_rows(x: Tensor) -> int:
    """Rows of (N, C, *) logits: N * prod(*)."""
    m = x.shape[0]
    for s in x.shape[2:]:
        m = m * s
    return m


def ce_denominators(t: Tensor, weight: Optional[Tensor], ignore_index: int, C: int,
                    acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """The class-index mean's denominators as 0-d device tensors, computed with
    torch ops and no host sync: (sum of w_t over kept rows, number of kept
    rows). Out-of-range targets are clamped for the gather only (their rows'
    loss is NaN anyway)."""
    kept = t != ignore_index
    count = kept.sum(dtype=acc)
    if weight is None:
        return count, count
    wt = weight.to(acc).gather(0, t.long().clamp(0, C - 1))
    return torch.where(kept, wt, 0).sum(), count


def _ce_triton(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
               reduction: str, eps: float, z_loss: float, cap: float, grad_scale: float,
               grad: Optional[Tensor]):
    """Launch the fused kernel; ``grad``: None (no gradient), a fresh buffer, or
    ``x`` itself (in place; its rows must have an in-place view)."""
    acc = _ce_acc(x.dtype)
    C = x.shape[1]
    M = _ce_rows(x)
    loss = new_output((M,), acc, x.device)
    lse = new_output((M,), torch.float32, x.device)
    state = new_output((M,), acc, x.device) if grad is not None else loss
    if M == 0:
        return loss, lse, state
    write = grad is not None
    prob = target.is_floating_point()
    extras = prob or weight is not None or eps > 0 or cap > 0
    g = grad if write else x
    grows = rows_view(g, 1)
    assert grows is not None, "the gradient buffer must have an in-place row view"
    x, rows = as_rows(x, 1)
    cfg = heuristics.cross_entropy_config(M, C, x.element_size(), x.device, extras)
    w = weight.to(acc).contiguous() if weight is not None else loss
    with device_guard(x):
        if prob:
            y, yrows = as_rows(target, 1)
            names = CEK.launch_cross_entropy_prob(
                x, y, w, g, loss, lse, state, M, C, rows.inner, rows.strides, yrows.strides,
                grows.strides, M if reduction == "mean" else 1, eps, z_loss, cap, grad_scale,
                weight is not None, write, cfg)
        else:
            t = target.reshape(-1).contiguous()
            if reduction == "mean":
                dl, dz = ce_denominators(t, weight, ignore_index, C, acc)
            else:
                dl = dz = loss
            sw = w.sum() if weight is not None and eps > 0 else loss
            names = CEK.launch_cross_entropy_class(
                x, t, w, sw, dl, dz, g, loss, lse, state, M, C, rows.inner, rows.strides,
                grows.strides, ignore_index, reduction == "mean", eps, z_loss, cap, grad_scale,
                weight is not None, write, cfg)
        record(names)
    return loss, lse, state


@torch.library.custom_op("softmax_gpu::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float, grad_scale: float, with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused cross-entropy of (N, C, *) logits over dim 1.

    Returns ``(loss, lse, grad, state)``: ``loss`` [M] (fp32; fp64 for fp64)
    per row, already divided by the reduction's denominators so that its sum
    is the reduced loss; ``lse`` [M] fp32; when ``with_grad``, ``grad`` of the
    input's shape and dtype holding grad_scale * d(loss.sum())/d(input), and
    ``state`` [M] (ones, the factor applied so far); else both are empty.
    ``softcap`` 0 means none.
    """
    if backend_for(input) == "triton":
        grad = new_output(input.shape, input.dtype, input.device) if with_grad else None
        loss, lse, state = _ce_triton(input, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, grad_scale, grad)
        if not with_grad:
            return loss, lse, input.new_empty(0), loss.new_empty(0)
        return loss, lse, grad, state
    return reference.cross_entropy_forward(input, target, weight, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap, grad_scale,
                                           with_grad)


@cross_entropy_forward.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      grad_scale, with_grad):
    M = _ce_rows(input)
    acc = _ce_acc(input.dtype)
    loss = input.new_empty((M,), dtype=acc)
    lse = input.new_empty((M,), dtype=torch.float32)
    if with_grad:
        return loss, lse, torch.empty(input.shape, dtype=input.dtype, device=input.device), \
            input.new_empty((M,), dtype=acc)
    return loss, lse, input.new_empty(0), input.new_empty(0, dtype=acc)


def _launch_grad_scale(grad, rows, out, out_strides, state, go, M):
    """out <- grad rows times go / state (the in-place op passes out = grad)."""
    cfg = heuristics.cross_entropy_scale_config(M, rows.n, grad.element_size(), grad.device)
    with device_guard(grad):
        record(CEK.launch_cross_entropy_grad_scale(
            grad, out, state, go, M, rows.n, rows.inner, rows.strides, out_strides,
            go.stride(0), cfg))


@torch.library.custom_op("softmax_gpu::cross_entropy_scale_grad_", mutates_args=("grad", "state"))
def cross_entropy_scale_grad_(grad: Tensor, state: Tensor, grad_output: Tensor) -> None:
    """Per row r of ``grad`` ((N, C, *), rows over dim 1): where grad_output[r]
    differs from state[r] (the factor the row holds), multiply the row by
    grad_output[r] / state[r] and set state[r] = grad_output[r]. Rows whose
    factor is already right are not touched: the usual backward (grad_output
    1) is a launch that reads two scalars per row and returns. A row whose
    state is 0 cannot be rescaled (it becomes NaN)."""
    M = _ce_rows(grad)
    go = grad_output.reshape(-1)
    if M == 0:
        return
    if backend_for(grad) == "triton":
        rows = rows_view(grad, 1)
        if rows is None:  # no in-place row view: scale a copy, then copy back
            tmp = grad.contiguous()
            cross_entropy_scale_grad_(tmp, state, grad_output)
            grad.copy_(tmp)
            return
        _launch_grad_scale(grad, rows, grad, rows.strides, state, go, M)
        return
    reference.cross_entropy_scale_grad_(grad, state, go)


@cross_entropy_scale_grad_.register_fake
def _(grad, state, grad_output):
    return None


@torch.library.custom_op("softmax_gpu::cross_entropy_scaled_grad", mutates_args=())
def cross_entropy_scaled_grad(grad: Tensor, state: Tensor, grad_output: Tensor) -> Tensor:
    """Out-of-place twin of :func:`cross_entropy_scale_grad_`: a new contiguous
    tensor holding each row of ``grad`` times grad_output / state (every row
    written). The backward uses it while AOTAutograd traces a graph
    (torch.compile), where mutating a saved tensor would cost a copy anyway."""
    out = new_output(grad.shape, grad.dtype, grad.device)
    M = _ce_rows(grad)
    go = grad_output.reshape(-1)
    if M == 0:
        return out
    if backend_for(grad) == "triton":
        g, rows = as_rows(grad, 1)
        _launch_grad_scale(g, rows, out, rows_view(out, 1).strides, state, go, M)
        return out
    out.copy_(grad)
    reference.cross_entropy_scale_grad_(out, state.clone(), go)
    return out


@cross_entropy_scaled_grad.register_fake
def _(grad, state, grad_output):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _traced(t: Tensor) -> bool:
    """True while a graph is being traced (AOTAutograd / make_fx under
    torch.compile, opcheck): fake or functional tensors."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or torch._is_functional_tensor(t) or is_fake(t)


def _ce_scaled(grad: Tensor, state: Tensor, d_loss: Tensor) -> Tensor:
    """The backward's gradient: the saved ``grad`` rescaled by ``d_loss``.

    Eager: in place (the rescale is relative to what the buffer holds, so a
    second backward over a retained graph is exact, and a no-op launch when
    d_loss is 1). ``.data``: an alias with its own version counter, so that
    this intended mutation does not trip autograd's check on saved tensors
    when the graph is retained. Traced: out of place (a functional graph
    cannot mutate a saved tensor without copying it first)."""
    if _traced(grad):
        return cross_entropy_scaled_grad(grad, state, d_loss)
    cross_entropy_scale_grad_(grad.data, state.data, d_loss)
    return grad


def _ce_setup_context(ctx, inputs, output):
    _, lse, grad, state = output
    ctx.with_grad = inputs[-1]
    ctx.mark_non_differentiable(lse, grad, state)
    ctx.save_for_backward(grad, state)


def _ce_backward(ctx, d_loss, d_lse, d_grad, d_state):
    if d_loss is None:
        return (None,) * 10
    if not ctx.with_grad:
        raise RuntimeError(
            "softmax_gpu.cross_entropy: the forward ran without a gradient (grad mode off or "
            "input.requires_grad False at the call), so there is none to backpropagate")
    grad, state = ctx.saved_tensors
    return (_ce_scaled(grad, state, d_loss),) + (None,) * 9


cross_entropy_forward.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("softmax_gpu::cross_entropy_forward_", mutates_args=("input",))
def cross_entropy_forward_(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float, grad_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_entropy_forward` with the gradient written over ``input``
    (whose rows must have an in-place view). Returns ``(loss, lse, state)``."""
    if backend_for(input) == "triton":
        return _ce_triton(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap, grad_scale, input)
    loss, lse, grad, state = reference.cross_entropy_forward(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        grad_scale, True)
    input.copy_(grad)
    return loss, lse, state


@cross_entropy_forward_.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      grad_scale):
    M = _ce_rows(input)
    acc = _ce_acc(input.dtype)
    return (input.new_empty((M,), dtype=acc), input.new_empty((M,), dtype=torch.float32),
            input.new_empty((M,), dtype=acc))


@torch.library.custom_op("softmax_gpu::cross_entropy_attach_grad", mutates_args=())
def cross_entropy_attach_grad(input: Tensor, loss: Tensor, state: Tensor) -> Tensor:
    """A copy of ``loss`` (the row losses of :func:`cross_entropy_forward_`)
    whose backward rescales ``input`` (which holds the gradient) by
    grad_output, as :func:`cross_entropy_scale_grad_` does, and returns it as
    the input's gradient: the autograd link of ``inplace_backward``."""
    return loss.clone()


@cross_entropy_attach_grad.register_fake
def _(input, loss, state):
    return torch.empty_like(loss)


def _attach_setup_context(ctx, inputs, output):
    input, _, state = inputs
    ctx.save_for_backward(input, state)


def _attach_backward(ctx, d_loss):
    grad, state = ctx.saved_tensors
    return _ce_scaled(grad, state, d_loss), None, None


cross_entropy_attach_grad.register_autograd(_attach_backward, setup_context=_attach_setup_context)
