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
