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
