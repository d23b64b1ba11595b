"""Argument checks shared by the public functions: clear errors that name the
argument, raised before any kernel sees the tensor."""

from __future__ import annotations

import torch

from ._dispatch import check_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(t, name)


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; pass dtype= to cast it first"
        )


def wrap_dim(dim, ndim: int, name: str = "dim") -> int:
    """``dim`` wrapped into [0, max(ndim, 1)), as torch does (a 0-d tensor accepts 0 and -1)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"{name} out of range: got {dim} for a tensor of {ndim} dims "
            f"(expected to be in range [{-rank}, {rank - 1}])"
        )
    return dim % rank


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3)
# ----------------------------------------------------------------------------

_REDUCTIONS = ("none", "mean", "sum")


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    return float(v)


def check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap) -> bool:
    """Validate ``softmax_gpu.cross_entropy``'s arguments as torch does (plus
    the extras); return True for probability targets, False for class indices."""
    check_tensor(input, "input")
    check_float(input, "input")
    if input.dim() < 1:
        raise ValueError("input must have the classes in dim 1: shape (C,), (N, C) or "
                         "(N, C, d1, ..., dK); got a 0-d tensor")
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if C == 0:
        raise ValueError(f"input has no classes (shape {tuple(input.shape)})")
    check_tensor(target, "target")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    prob = target.shape == input.shape
    if prob:
        if not target.is_floating_point():
            raise TypeError(
                f"target has the input's shape {tuple(input.shape)}, so it is read as class "
                f"probabilities and must be floating, got {target.dtype}")
    else:
        batch = (input.shape[0], *input.shape[2:]) if input.dim() >= 2 else ()
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices of shape {tuple(batch)}, or "
                f"floating class probabilities of the input's shape {tuple(input.shape)}; "
                f"got {target.dtype} of shape {tuple(target.shape)}")
        if tuple(target.shape) != tuple(batch):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape "
                f"{tuple(input.shape)}: class indices need shape {tuple(batch)} "
                "(the input's shape without the class dim 1)")
    if weight is not None:
        check_tensor(weight, "weight")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
        if weight.dim() != 1 or weight.shape[0] != C:
            raise ValueError(f"weight must be 1-D with one value per class (C={C}), "
                             f"got shape {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if prob and ignore_index >= 0:
        raise ValueError("ignore_index is not supported with probability targets "
                         f"(got ignore_index={ignore_index}), as in torch")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    zl = _number(z_loss, "z_loss")
    if not (zl >= 0.0 and zl != float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        cap = _number(softcap, "softcap")
        if not (cap > 0.0 and cap != float("inf")):
            raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap}")
    return prob


def check_inplace_rows(input, name: str = "input") -> None:
    """The gradient can be written over ``input``: every row has an in-place
    view and no two logits share memory (no expanded, stride-0 dims)."""
    from ._layout import rows_view

    x = input if input.dim() >= 2 else input.unsqueeze(0)
    overlapping = any(st == 0 and s > 1 for s, st in zip(x.shape, x.stride()))
    if overlapping or rows_view(x, 1) is None:
        raise ValueError(
            f"{name} cannot take the gradient in place: its layout (shape {tuple(input.shape)}, "
            f"strides {tuple(input.stride())}) has expanded or non-collapsible dims; pass a "
            "contiguous tensor, or use inplace_backward=False / inplace=False")
