"""Which path a call takes, and a recorder of the kernels it launched.

CUDA tensors run the compiled Triton kernels. CPU tensors run the same kernels
in Triton's interpreter when the kernels were defined with
``TRITON_INTERPRET=1`` in the environment (set it before importing
softmax_gpu), and otherwise the torch reference implementation, which has
identical semantics.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .kernels import softmax as _softmax_kernels

__all__ = ["backend_for", "interpreted", "record_launches", "poison_outputs", "new_output", "device_guard"]

_SUPPORTED_DEVICES = ("cuda", "cpu", "meta")


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter."""
    fn = _softmax_kernels.softmax_fwd_single_kernel
    return type(fn).__name__ == "InterpretedFunction"


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path a call on ``tensor`` takes.

    - CUDA tensors: ``"triton"`` (compiled kernels).
    - CPU tensors with ``TRITON_INTERPRET=1`` set before import: ``"triton"``
      (the same kernels, run by Triton's interpreter).
    - Any other CPU tensor: ``"torch"``, a reference implementation.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    dev = tensor.device.type
    if dev == "cuda":
        return "triton"
    if dev == "cpu":
        return "triton" if interpreted() else "torch"
    if dev == "meta":
        return "torch"
    raise ValueError(
        f"unsupported device {tensor.device}: softmax_gpu runs on CUDA or CPU tensors"
    )


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(
            f"{name} is on unsupported device {t.device}: softmax_gpu runs on CUDA or CPU tensors"
        )


_recorder: list[str] | None = None


def record(names) -> None:
    """Called by the host after each launch with the kernel names it ran."""
    if _recorder is not None:
        _recorder.extend(names)


@contextlib.contextmanager
def record_launches() -> Iterator[list[str]]:
    """Collect the names of the Triton kernels launched inside the block.

    The test-suite uses it to fail when a path silently falls back to torch.
    """
    global _recorder
    previous = _recorder
    _recorder = [] if previous is None else previous
    start = len(_recorder)
    view: list[str] = []
    try:
        yield view
    finally:
        view.extend(_recorder[start:])
        _recorder = previous


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launch (no-op on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every output buffer with NaN (integers: -1) before a kernel writes it,
    so that an element a kernel leaves unwritten shows in tests."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (poisoned inside :func:`poison_outputs`)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
