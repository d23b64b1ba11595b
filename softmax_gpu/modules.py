"""``nn.Module`` drop-ins for ``torch.nn.Softmax`` and ``torch.nn.LogSoftmax``."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F

__all__ = ["Softmax", "LogSoftmax"]


class Softmax(nn.Module):
    """Applies :func:`softmax_gpu.softmax` over ``dim`` (default -1)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(nn.Module):
    """Applies :func:`softmax_gpu.log_softmax` over ``dim`` (default -1)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3)
# ----------------------------------------------------------------------------

__all__ += ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` running
    :func:`softmax_gpu.cross_entropy`, with torch's arguments (the deprecated
    ``size_average``/``reduce`` are mapped to ``reduction`` as torch does) plus
    the keyword-only extras ``z_loss``, ``softcap``, ``return_lse`` and
    ``inplace_backward``. ``weight`` is a buffer, as in torch."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 inplace_backward: bool = False) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor):
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, return_lse=self.return_lse,
            inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)
