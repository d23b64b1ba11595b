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


# Narrowest tile: shorter rows are masked (a 16-wide tile of 2-byte values is
# one 32-byte sector).
MIN_BLOCK = 16


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _by_elem(elem_bytes: int, two: int, four: int, eight: int) -> int:
    """The limit for an element size: 2-byte, 4-byte or 8-byte dtypes."""
    return two if elem_bytes <= 2 else four if elem_bytes <= 4 else eight


def max_single(elem_bytes: int, live_rows: int = 1) -> int:
    """Longest on-chip row for a kernel holding ``live_rows`` row-sized arrays."""
    lim = _active
    cap = _by_elem(elem_bytes, lim.max_single_2byte, lim.max_single_4byte, lim.max_single_8byte)
    return max(1, cap // live_rows)


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


def softmax_config(
    M: int, N: int, elem_bytes: int, device: torch.device, live_rows: int = 1
) -> SoftmaxConfig:
    """Pick the path and launch parameters for an [M, N] row-wise reduction.

    Used for the softmax / log-softmax forward and backward alike (each reads
    the row for a reduction, then writes it once). ``live_rows``: row-sized
    arrays the on-chip kernel keeps in registers (softmax forward 1;
    log-softmax forward and both backwards 2).
    """
    lim = _active
    block = next_pow2(N)
    if block <= max_single(elem_bytes, live_rows):
        block = max(block, MIN_BLOCK)
        # Short rows: several rows per program, unless that would leave fewer
        # than ~2 programs per multiprocessor. Two choices only (1 or the
        # full count), which keeps the set of compiled variants small.
        rows = max(1, lim.target_program_elems // block)
        if rows > 1 and -(-M // rows) < 2 * sm_count(device):
            rows = 1
        return SoftmaxConfig(SINGLE, block, rows, warps_for(block * rows), 1, block)
    tile = min(lim.tile if elem_bytes <= 4 else max(1, lim.tile // 2), block)
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


def all_softmax_configs() -> list[tuple[str, int, int, int, int, int]]:
    """Every (path, block_n, rows_per_program, num_warps, elem_bytes, live_rows)
    the defaults can pick, for the static compile check. Enumerated from
    :func:`softmax_config` itself over all power-of-two row lengths and row
    counts, element sizes and live-row counts, so the check cannot drift from
    the heuristics."""
    seen = set()
    dev = torch.device("cpu")
    with override(sm_count=132):
        for elem in (2, 4, 8):
            for live in (1, 2):
                for logn in range(0, 21):
                    for logm in range(0, 25):
                        c = softmax_config(1 << logm, 1 << logn, elem, dev, live)
                        seen.add((c.path, c.block_n, c.rows_per_program, c.num_warps, elem, live))
    return sorted(seen)


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3)
# ----------------------------------------------------------------------------

__all__ += ["CrossEntropyConfig", "cross_entropy_config", "cross_entropy_scale_config",
            "all_cross_entropy_configs"]


@dataclasses.dataclass(frozen=True)
class CrossEntropyConfig:
    path: str  # SINGLE (row in registers) or LOOPED (online pass + gradient pass)
    block_n: int  # tile width in elements (a power of two; >= C on the single path)
    rows_per_program: int  # rows one program owns (SINGLE; else 1)
    num_warps: int


def ce_max_single(elem_bytes: int, extras: bool = False) -> int:
    """Longest (power-of-two) row the cross-entropy on-chip path takes.
    ``extras`` (probability targets, class weights, label smoothing or a
    softcap: more tiles live at once) halves it."""
    lim = _active
    n = _by_elem(elem_bytes, lim.ce_max_single_2byte, lim.ce_max_single_4byte,
                 lim.ce_max_single_8byte)
    if extras:
        n //= 2
    return max(1, min(n, max_single(elem_bytes)))


def _rows_per_program(M: int, block: int, device: torch.device, target: int) -> int:
    """Rows per program for short rows: about ``target`` elements a program,
    keeping at least ~2 programs per multiprocessor when M allows."""
    rows = max(1, target // block)
    programs_wanted = 2 * sm_count(device)
    while rows > 1 and -(-M // rows) < programs_wanted:
        rows //= 2
    return min(rows, next_pow2(M))


def _ce_single(M: int, block: int, elem_bytes: int, device: torch.device) -> CrossEntropyConfig:
    """Whole rows per program: at most 8 elements (4 for fp64) of a short row
    per thread, so that the per-row values a thread holds stay few; rows
    longer than 16 warps' worth take 16 warps."""
    ept = min(block, 8 if elem_bytes <= 4 else 4)
    target = min(_active.target_program_elems, max(block, 512 * ept))
    rows = _rows_per_program(M, block, device, target)
    warps = max(1, min(16, block * rows // (32 * ept)))
    return CrossEntropyConfig(SINGLE, block, rows, warps)


def cross_entropy_config(M: int, C: int, elem_bytes: int, device: torch.device,
                         extras: bool = False) -> CrossEntropyConfig:
    """Path and launch parameters of the fused cross-entropy over [M, C] logits.

    ``extras``: probability targets, class weights, label smoothing or a
    softcap (more live tiles: a shorter on-chip limit and looped tile).

    - single: a program owns ``rows`` whole rows (``_ce_single``).
    - looped: one program per row, 16 elements per thread per tile (8 with
      extras or fp64, on a halved tile).
    There is no split path: a few very long rows run one program each.
    All choices compile without spills at sm_90 (``python -m perf.static``).
    """
    lim = _active
    block = next_pow2(C)
    if block <= ce_max_single(elem_bytes, extras):
        return _ce_single(M, block, elem_bytes, device)
    heavy = extras or elem_bytes > 4
    tile = min(max(1, lim.tile // 2) if heavy else lim.tile, block)
    warps = max(1, min(16, tile // (32 * (8 if heavy else 16))))
    return CrossEntropyConfig(LOOPED, tile, 1, warps)


def cross_entropy_scale_config(M: int, C: int, elem_bytes: int,
                               device: torch.device) -> CrossEntropyConfig:
    """Launch parameters of the backward's rescale of the saved gradient:
    rows up to one tile are whole (several per program, as the on-chip
    path), longer rows are looped one per program."""
    lim = _active
    block = next_pow2(C)
    if block <= lim.tile:
        return _ce_single(M, block, elem_bytes, device)
    return CrossEntropyConfig(LOOPED, lim.tile, 1, warps_for(lim.tile))


def all_cross_entropy_configs() -> list[tuple[str, bool, str, int, int, int, int]]:
    """Every (kernel family, extras, path, block_n, rows_per_program,
    num_warps, elem bytes) the defaults can pick, for the static compile
    check; enumerated from the config functions themselves, like
    :func:`all_softmax_configs`. Families: "class" and "prob" (forward
    kernels; probability targets always count as extras) and "scale"."""
    seen = set()
    dev = torch.device("cpu")
    with override(sm_count=132):
        for elem in (2, 4, 8):
            for logn in range(0, 21):
                for M in (1, 64, 1 << 20):
                    for fam, extras in (("class", False), ("class", True), ("prob", True)):
                        c = cross_entropy_config(M, 1 << logn, elem, dev, extras)
                        seen.add((fam, extras, c.path, c.block_n, c.rows_per_program,
                                  c.num_warps, elem))
                    c = cross_entropy_scale_config(M, 1 << logn, elem, dev)
                    seen.add(("scale", False, c.path, c.block_n, c.rows_per_program,
                              c.num_warps, elem))
    return sorted(seen)
