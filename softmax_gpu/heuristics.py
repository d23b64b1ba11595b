"""Heuristics primitives shared by every op's launch planning.

Each op plans its own launches in its host module (``softmax_gpu.softmax``,
``softmax_gpu.cross_entropy``, ``softmax_gpu.vocab_parallel``); this module
holds what they share: the tunable :class:`Limits` and :func:`override`, the
multiprocessor count, the path names and small helpers (powers of two, warps
per tile, the on-chip row limit by element size).

Nothing here touches the device at import. The multiprocessor count is read
lazily, at the first launch on a CUDA device, and cached per device.

Tests (and tuning sweeps) shrink the limits with :func:`override` so that the
looped and split paths run at interpreter-sized shapes::

    with heuristics.override(max_single=64, tile=16, sm_count=2):
        softmax_gpu.softmax(x)   # rows longer than 64 take the looped path

The numbers below are first choices made from the register budget (see
``perf/results/static/`` for the compiled registers and spills per
configuration); each is to be replaced by a measured value, with the
measurement written beside it, by the GPU tuning pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import torch

__all__ = [
    "Limits",
    "override",
    "limits",
    "generation",
    "sm_count",
    "next_pow2",
    "max_single",
    "warps_for",
    "SINGLE",
    "LOOPED",
    "SPLIT",
]

# Path names, shared by the forward and backward launchers.
SINGLE = "single"  # the whole row is one tile in registers: 1 read + 1 write
LOOPED = "looped"  # one program per row, online (max, sum) pass then normalise
SPLIT = "split"  # a row is cut across programs; partials merge, then normalise


@dataclasses.dataclass(frozen=True)
class Limits:
    # Longest row (elements, padded to a power of two) kept on chip, by element
    # size, for a kernel that holds ONE row-sized fp32 array live. The budget:
    # 64 fp32 registers per thread for the tile at 16 warps (512 threads; the
    # cap is 128 registers per thread at that size) -> 32768 elements; fp64
    # takes two registers per value. A kernel that holds two row-sized arrays
    # (log-softmax forward: x and e; backward: y and dy) gets half.
    # Static check (perf/results/static/): bf16 backward at 32768 spilled 248 B
    # of stack, log-softmax forward at 32768 40 B, and the fp32 forward at
    # 32768 8 B (the fp32 loads need more address registers than bf16's);
    # at the limits below nothing spills.
    max_single_2byte: int = 32768
    max_single_4byte: int = 16384
    max_single_8byte: int = 16384
    # Tile (elements) of the looped and split paths.
    tile: int = 4096
    # Elements a program of the on-chip path should own when rows are short:
    # rows per program = TARGET_PROGRAM_ELEMS // BLOCK_N.
    target_program_elems: int = 4096
    # The split path is taken when rows are longer than max_single and there
    # are fewer rows than this many programs per multiprocessor could occupy.
    split_programs_per_sm: int = 4
    # Multiprocessor count override (None: read from the device; CPU: 8).
    sm_count: int | None = None
    # Upper bound on the number of pieces a row is split into.
    max_splits: int = 1024
    # Cross-entropy: longest row (elements, padded to a power of two) its
    # on-chip path keeps in registers, by logits element size, for plain
    # class-index targets; with extras (probability targets, class weights,
    # label smoothing, softcap: more live tiles) half. Also capped by
    # max_single_* above (so override(max_single=...) moves the cross-entropy
    # paths too). From the sm_90 static check: the largest powers of two that
    # compile without spills (bf16 at 32768 spilled 168 B; with every extra on,
    # 16384 spilled 56 B; fp64 with extras at 8192, 152 B).
    ce_max_single_2byte: int = 16384
    ce_max_single_4byte: int = 16384
    ce_max_single_8byte: int = 8192


_DEFAULT = Limits()
_active = _DEFAULT
# Bumped whenever the limits in force change: the ops memoise their launch
# plans per call signature and include this number in the key.
_generation = 0


def limits() -> Limits:
    """The limits in force (the defaults unless inside :func:`override`)."""
    return _active


def generation() -> int:
    """A number that changes whenever :func:`override` changes the limits."""
    return _generation


@contextlib.contextmanager
def override(*, max_single: int | None = None, **kwargs) -> Iterator[Limits]:
    """Temporarily replace limits. ``max_single`` sets all three element sizes."""
    global _active, _generation
    if max_single is not None:
        kwargs.update(
            max_single_2byte=max_single, max_single_4byte=max_single, max_single_8byte=max_single
        )
    previous = _active
    _active = dataclasses.replace(previous, **kwargs)
    _generation += 1
    try:
        yield _active
    finally:
        _active = previous
        _generation += 1


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (read once per device, never at import)."""
    lim = _active
    if lim.sm_count is not None:
        return lim.sm_count
    if device.type == "cuda":
        return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


# Narrowest tile: shorter rows are masked (a 16-wide tile of 2-byte values is
# one 32-byte sector).
MIN_BLOCK = 16


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def by_elem(elem_bytes: int, two: int, four: int, eight: int) -> int:
    """The limit for an element size: 2-byte, 4-byte or 8-byte dtypes."""
    return two if elem_bytes <= 2 else four if elem_bytes <= 4 else eight


def max_single(elem_bytes: int, live_rows: int = 1) -> int:
    """Longest on-chip row for a kernel holding ``live_rows`` row-sized arrays."""
    lim = _active
    cap = by_elem(elem_bytes, lim.max_single_2byte, lim.max_single_4byte, lim.max_single_8byte)
    return max(1, cap // live_rows)


def warps_for(tile_elems: int) -> int:
    """num_warps for a tile: about 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, next_pow2(tile_elems) // 512))
