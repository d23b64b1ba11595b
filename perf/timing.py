"""Timing, peak memory, the copy roofline, and the GB/s arithmetic.

On CUDA: ``triton.testing.do_bench`` (CUDA events; the L2 is flushed before
every run, which do_bench does by default), quantiles 0.5 / 0.2 / 0.8, and
``grad_to_none`` for backward runs. On CPU: a wall-clock loop with the same
interface, whose numbers are only there to exercise the harness.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

__all__ = [
    "device_lost",
    "QUANTILES",
    "bench",
    "bench_calls",
    "peak_extra_memory",
    "measure_copy",
    "gbps",
    "fraction",
    "speedup",
]

QUANTILES = (0.5, 0.2, 0.8)


def device_lost(device: str) -> str | None:
    """After an error: on CUDA, why the process's CUDA context is unusable (a
    kernel fault or a device-side assert is sticky: every later call in the
    process fails the same way), else None. A run stops at the first such
    error instead of recording every later case as failed."""
    if device != "cuda":
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).cpu()
    except Exception as exc:  # torch.AcceleratorError, RuntimeError("CUDA error: ...")
        return f"CUDA context lost: {type(exc).__name__}: {exc}"[:300]
    return None


def gbps(nbytes: float, ms: float) -> float:
    """Bytes moved per second, in GB/s (10**9 bytes), from a time in ms."""
    if not (ms > 0) or not math.isfinite(ms):
        return math.nan
    return nbytes / (ms * 1e-3) / 1e9


def fraction(value: float, ceiling: float) -> float:
    """``value / ceiling`` (NaN when either is missing or the ceiling is not positive)."""
    if not (ceiling > 0) or not math.isfinite(value) or not math.isfinite(ceiling):
        return math.nan
    return value / ceiling


def speedup(baseline_ms: float, ms: float) -> float:
    """How many times faster than the baseline: ``baseline_ms / ms``."""
    if not (ms > 0) or not (baseline_ms > 0) or not math.isfinite(ms) or not math.isfinite(baseline_ms):
        return math.nan
    return baseline_ms / ms


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (as numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _wall_clock(fn: Callable[[], object], grad_to_none, rep_ms: float,
                min_reps: int = 3, max_reps: int = 50) -> tuple[float, float, float]:
    """CPU fallback: one warm-up call, then repeat until ``rep_ms`` or ``max_reps``."""

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    reset()
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < rep_ms * 1e-3 and len(times) < max_reps):
        reset()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    times.sort()
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def bench(fn: Callable[[], object], device: str, *, grad_to_none: list[torch.Tensor] | None = None,
          warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``."""
    if device == "cuda":
        from triton.testing import do_bench

        res = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                       quantiles=list(QUANTILES))
        return float(res[0]), float(res[1]), float(res[2])
    return _wall_clock(fn, grad_to_none, rep_ms)


def bench_calls(fn: Callable[[], object], device: str, *,
                grad_to_none: list[torch.Tensor] | None = None, rep_ms: float = 100,
                warmup: int = 2, min_reps: int = 3, max_reps: int = 20
                ) -> tuple[float, float, float]:
    """(median, p20, p80) ms of single calls of ``fn``, for calls of tens of
    milliseconds: ``warmup`` untimed calls first (the last one timed only to
    size the run), then as many timed calls as fit ``rep_ms`` (within
    [min_reps, max_reps]), each between CUDA events, the L2 flushed and the
    ``grad_to_none`` gradients reset before each, outside the events. Unlike
    do_bench, a slow first call (autotuning, compiling) runs in the warm-up
    and cannot shrink the run to one sample. CPU: the wall-clock loop."""
    if device != "cuda":
        return _wall_clock(fn, grad_to_none, rep_ms, min_reps=min_reps, max_reps=max_reps)

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # more than any L2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(max(1, warmup)):
        reset()
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, rep_ms // estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        reset()
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in events)
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def peak_extra_memory(fn: Callable[[], object], device: str) -> float:
    """Bytes allocated by one call of ``fn`` beyond what was allocated before
    it (its outputs and temporaries). NaN on CPU."""
    if device != "cuda":
        return math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def measure_copy(device: str, nbytes: int, *, warmup_ms: float = 25, rep_ms: float = 100
                 ) -> tuple[float, float, tuple[int, int]]:
    """A device-to-device copy of ``nbytes``: (GB/s counting bytes read plus
    written, median ms, the [rows, cols] fp32 shape used)."""
    n = max(1, nbytes // 4)
    cols = 1 << 14 if n >= (1 << 14) else n
    rows = max(1, n // cols)
    src = torch.randn((rows, cols), device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms, _, _ = bench(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    moved = 2 * src.numel() * src.element_size()
    return gbps(moved, ms), ms, (rows, cols)
