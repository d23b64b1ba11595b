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
    cfg = heuristics.softmax_config(rows.m, rows.n, x.element_size(), x.device)
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
    cfg = heuristics.softmax_config(yrows.m, yrows.n, y.element_size(), y.device)
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
