"""Where a run happens: the device, the Triton-interpreter switch, versions.

Everything that ends up in the ``device, torch, triton, cuda, timestamp``
columns of the CSV is read here, once per run, so that one file never mixes
devices or versions. softmax_gpu is imported only inside the functions that
need it, after the device is chosen: on CPU it must see ``TRITON_INTERPRET``
first.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import signal
import sys

import torch

__all__ = ["RunInfo", "choose_device", "enable_interpreter_for_cpu", "run_info", "slug",
           "sigterm_interrupts"]


def choose_device(requested: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"``. ``auto`` picks CUDA when torch sees a GPU."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {requested!r}: expected auto, cuda or cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return requested


def enable_interpreter_for_cpu(device: str) -> str | None:
    """On CPU, set ``TRITON_INTERPRET=1`` unless the caller set it already.

    Must run before :mod:`softmax_gpu` is imported: its kernels are built for
    the interpreter or for the GPU when they are defined. Returns a warning
    to print, or None.
    """
    if device != "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return ("TRITON_INTERPRET=1 is set on a CUDA run: our kernels run in the "
                    "interpreter and their timings are meaningless")
        return None
    if "TRITON_INTERPRET" not in os.environ:
        if "softmax_gpu" in sys.modules:
            return ("softmax_gpu was imported before TRITON_INTERPRET could be set: "
                    "its CPU path may be the torch reference, not the Triton kernels")
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ["TRITON_INTERPRET"] != "1":
        return ("TRITON_INTERPRET is set to something other than 1: softmax_gpu runs "
                "its torch reference path on CPU, not the Triton kernels")
    return None


def sigterm_interrupts() -> None:
    """Turn the first SIGTERM (what ``timeout`` sends) into a
    KeyboardInterrupt, so that a run stops and writes what it measured; a
    second SIGTERM is ignored (the caller sets ``SIG_IGN`` itself around
    writing its files, and ``SIG_DFL`` after)."""

    def _stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)


def slug(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``
    (the same slug names the GPU's tuned table, ``softmax_gpu/tuned/<slug>.json``)."""
    from softmax_gpu.heuristics import device_slug  # not at import: see the module docstring

    return device_slug(name)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Facts about the run, written into every CSV row."""

    device: str  # "cuda" or "cpu": where the tensors live
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (Triton interpreter)"
    device_slug: str
    torch: str
    triton: str
    cuda: str
    timestamp: str  # ISO 8601, UTC, the start of the run
    date: str  # YYYY-MM-DD (UTC), used in file names
    interpreted: bool  # our kernels run in Triton's interpreter

    @property
    def meaningless_timings(self) -> bool:
        """True when the numbers say nothing about GPU performance."""
        return self.device != "cuda" or self.interpreted


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # pragma: no cover - triton is a dependency
        return f"unavailable ({type(exc).__name__})"


def run_info(device: str, now: datetime.datetime | None = None) -> RunInfo:
    """Read the device name and versions (call after :func:`enable_interpreter_for_cpu`)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cuda":
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        dev_slug = slug(name)
    else:
        cpu = platform.processor() or platform.machine() or "cpu"
        name = f"cpu {cpu}" + (" (Triton interpreter)" if interpreted else "")
        dev_slug = "cpu"
    return RunInfo(
        device=device,
        device_name=name,
        device_slug=dev_slug,
        torch=torch.__version__,
        triton=_triton_version(),
        cuda=torch.version.cuda or "none",
        timestamp=now.replace(microsecond=0).isoformat(),
        date=now.strftime("%Y-%m-%d"),
        interpreted=interpreted,
    )
