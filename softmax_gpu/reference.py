"""Reference implementations in torch: the CPU path when the kernels are not
interpreted, and the ground truth the kernels are tested against.

Same semantics as the kernels: arithmetic in fp32 (fp64 for fp64 tensors),
result cast to the input dtype, output contiguous.
"""

from __future__ import annotations

import torch

__all__ = ["acc_dtype", "softmax_forward", "softmax_backward"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """softmax (or log-softmax) of ``x`` over ``dim``."""
    xa = x.to(acc_dtype(x.dtype))
    y = torch.log_softmax(xa, dim) if log else torch.softmax(xa, dim)
    return y.to(x.dtype).contiguous()


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Vector-Jacobian product at forward output ``y``:
    softmax dx = y * (dy - sum(dy * y)); log-softmax dx = dy - exp(y) * sum(dy)."""
    acc = acc_dtype(y.dtype)
    ya, ga = y.to(acc), dy.to(acc)
    if log:
        dx = ga - torch.exp(ya) * ga.sum(dim, keepdim=True)
    else:
        dx = ya * (ga - (ga * ya).sum(dim, keepdim=True))
    return dx.to(y.dtype).contiguous()
