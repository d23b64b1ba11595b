"""Launch parameters: the one place that picks block sizes, rows per program,
num_warps and the path (on-chip / looped online / split row) for every kernel.

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
    "SoftmaxConfig",
    "softmax_config",
    "all_softmax_configs",
    "override",
    "limits",
    "sm_count",
]

# Path names, shared by the forward and backward launchers.
SINGLE = "single"  # the whole row is one tile in registers: 1 read + 1 write
LOOPED = "looped"  # one program per row, online (max, sum) pass then normalise
SPLIT = "split"  # a row is cut across programs; partials merge, then normalise


@dataclasses.dataclass(frozen=True)
class Limits:
    # Longest row (elements, padded to a power of two) kept on chip, by element
    # size. fp32 accumulation holds BLOCK/threads values per thread: 32768
    # elements over 16 warps is 64 fp32 registers for the tile.
    max_single_2byte: int = 32768
    max_single_4byte: int = 16384
    max_single_8byte: int = 8192
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


_DEFAULT = Limits()
_active = _DEFAULT


def limits() -> Limits:
    """The limits in force (the defaults unless inside :func:`override`)."""
    return _active


@contextlib.contextmanager
def override(*, max_single: int | None = None, **kwargs) -> Iterator[Limits]:
    """Temporarily replace limits. ``max_single`` sets all three element sizes."""
    global _active
    if max_single is not None:
        kwargs.update(
            max_single_2byte=max_single, max_single_4byte=max_single, max_single_8byte=max_single
        )
    previous = _active
    _active = dataclasses.replace(previous, **kwargs)
    try:
        yield _active
    finally:
        _active = previous


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


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def max_single(elem_bytes: int) -> int:
    lim = _active
    if elem_bytes <= 2:
        return lim.max_single_2byte
    if elem_bytes <= 4:
        return lim.max_single_4byte
    return lim.max_single_8byte


def warps_for(tile_elems: int) -> int:
    """num_warps for a tile: about 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, next_pow2(tile_elems) // 512))


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    path: str  # SINGLE, LOOPED or SPLIT
    block_n: int  # tile width in elements (a power of two)
    rows_per_program: int  # rows one program owns (SINGLE only; else 1)
    num_warps: int
    splits: int  # programs per row (SPLIT only; else 1)
    chunk: int  # columns per split program, a multiple of block_n (SPLIT only)


def softmax_config(M: int, N: int, elem_bytes: int, device: torch.device) -> SoftmaxConfig:
    """Pick the path and launch parameters for an [M, N] row-wise reduction.

    Used for the softmax / log-softmax forward and backward alike (both read
    the row for a reduction, then write it once).
    """
    lim = _active
    block = next_pow2(N)
    if block <= max_single(elem_bytes):
        rows = max(1, lim.target_program_elems // block)
        # keep at least ~2 programs per multiprocessor when M allows
        programs_wanted = 2 * sm_count(device)
        while rows > 1 and -(-M // rows) < programs_wanted:
            rows //= 2
        rows = min(rows, next_pow2(M))
        return SoftmaxConfig(SINGLE, block, rows, warps_for(block * rows), 1, block)
    tile = min(lim.tile, block)
    warps = warps_for(tile)
    programs = lim.split_programs_per_sm * sm_count(device)
    if M < programs:
        tiles = -(-N // tile)
        splits = min(tiles, -(-programs // M), lim.max_splits)
        if splits > 1:
            chunk = -(-tiles // splits) * tile
            splits = -(-N // chunk)
            return SoftmaxConfig(SPLIT, tile, 1, warps, splits, chunk)
    return SoftmaxConfig(LOOPED, tile, 1, warps, 1, N)


def all_softmax_configs() -> list[tuple[str, int, int, int]]:
    """Every (path, block_n, rows_per_program, num_warps) the defaults can pick,
    for the static compile check. Enumerated from :func:`softmax_config` itself
    over all power-of-two row lengths, element sizes and row counts, so the
    check cannot drift from the heuristics."""
    seen = set()
    dev = torch.device("cpu")
    with override(sm_count=132):
        for elem in (2, 4, 8):
            for logn in range(0, 21):
                for M in (1, 64, 1 << 20):
                    c = softmax_config(M, 1 << logn, elem, dev)
                    seen.add((c.path, c.block_n, c.rows_per_program, c.num_warps, elem))
    return sorted(seen)
