"""Argument checks shared by the ops: clear errors that name the argument,
raised before any kernel sees the tensor. Op-specific checks live in the
op's own module."""

from __future__ import annotations

import numbers

import torch

from ._dispatch import check_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Longest row the kernels address with int32 column indices, less one tile
# of 2^16 (more than any loop's step): a loop's last step over a row must not
# wrap its int32 counter past 2^31 - 1.
MAX_ROW = (1 << 31) - (1 << 16)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(t, name)


STRIDED = torch.strided


def check_strided(who: str, **tensors) -> None:
    """TypeError naming the first of ``tensors`` that is a nested tensor
    (``torch.nested``, jagged or strided) or not strided (sparse, mkldnn),
    which the ops do not take. The hot paths call it only when a tensor's
    ``layout is not STRIDED or is_nested`` (a call with keywords costs
    0.3-0.7 us, the test ~0.1 us a tensor)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_nested:
            raise TypeError(f"{who}: {name} is a nested tensor (torch.nested), which "
                            f"softmax_gpu does not support; pass a padded tensor "
                            f"(to_padded_tensor) or its values()")
        if t.layout != torch.strided:
            raise TypeError(f"{who}: {name} has layout {t.layout}, which softmax_gpu does not "
                            f"support; pass a dense (strided) tensor (to_dense())")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; pass dtype= to cast it first"
        )


def check_weight_takes_no_grad(weight, op: str) -> None:
    """Class weights get no gradient with class-index targets (torch's
    cross-entropy refuses them too): a ``weight`` that requires grad while
    grad is enabled is an error that names it, not a silently missing
    gradient."""
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"weight requires grad, but {op} with class indices is not differentiable with "
            "respect to the class weights (as torch's cross-entropy); pass weight.detach()")


def check_not_grad_leaf(tensor: torch.Tensor, name: str) -> None:
    """``tensor`` may be overwritten by an op that autograd records (its
    ``inplace_backward`` writes the gradient over it): it is not a leaf that
    requires grad, nor a view of one. That is torch's rule for in-place ops:
    a parameter's values, and the ``.grad`` it later gets, would otherwise
    hold the gradient, silently."""
    if not tensor.requires_grad:
        return
    base = tensor._base
    if tensor.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "a leaf" if tensor.is_leaf else "a view of a leaf"
        raise RuntimeError(
            f"{name} is {what} tensor that requires grad, and inplace_backward=True would "
            "write the gradient over it (torch's in-place ops refuse such a tensor too); "
            "pass inplace_backward=False")


def check_loss_dtype(loss_dtype) -> None:
    """``loss_dtype``: None or a floating dtype."""
    if loss_dtype is not None and loss_dtype not in FLOAT_DTYPES:
        raise TypeError(f"loss_dtype must be a floating dtype or None, got {loss_dtype}")


def check_row_length(n: int, what: str) -> None:
    """Rows the kernels reduce over hold at most 2^31 - 2^16 elements (their
    column indices and loop counters are int32); ``what`` names the argument
    and the dim."""
    if n > MAX_ROW:
        raise ValueError(f"{what} has {n} elements; rows of at most 2^31 - 2^16 "
                         f"({MAX_ROW}) are supported")


def as_int(value, name: str) -> int:
    """An integer argument as torch takes it: an int, any integral scalar
    (numpy's included) or a 0-d integer tensor (read on the host, as torch
    reads it); not a bool, a bool tensor or an array. Returned as an int."""
    if value.__class__ is int:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.dtype.is_floating_point and \
                not value.dtype.is_complex and value.dtype != torch.bool:
            return int(value)
    elif not isinstance(value, bool) and isinstance(value, numbers.Integral):
        return int(value)
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def as_number(value, name: str) -> float:
    """A real argument as torch takes it: an int, a float or any real scalar
    (numpy's included), not a bool; returned as a float."""
    if value.__class__ is float or value.__class__ is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def wrap_dim(dim, ndim: int, name: str = "dim") -> int:
    """``dim`` wrapped into [0, max(ndim, 1)), as torch does (a 0-d tensor accepts 0 and -1)."""
    dim = as_int(dim, name)
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"{name} out of range: got {dim} for a tensor of {ndim} dims "
            f"(expected to be in range [{-rank}, {rank - 1}])"
        )
    return dim % rank
