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

Tuned tables: ``python -m perf.tune`` times candidate limits on a GPU and
writes the winners per op and row length; ``python -m perf.tune --install``
commits them as ``softmax_gpu/tuned/<gpu-slug>.json``. The launch planning
asks :func:`limits_for`, which applies the running GPU's table to the
defaults. A table is read on the first launch on a device (never at import),
validated (a bad field is ignored with a :class:`TunedTableWarning`, never an
error), and ignored inside :func:`override`, on CPU, and where there is no
table for the GPU.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import os
import re
import warnings
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
    "COOP",
    "RESIDENT",
    "l2_bytes",
    "LongRows",
    "long_rows",
    "long_row_regs",
    "single_regs",
    "limits_for",
    "TUNED_OPS",
    "TUNED_DIR",
    "ELEMENT_FIELDS",
    "TunedTableWarning",
    "STAGE_CHOICES",
    "CE_EPT_CHOICES",
    "LONG_PATH_CHOICES",
    "device_slug",
    "tuned_path",
    "load_tuned",
    "clear_tuned",
]

# Path names, shared by the forward and backward launchers.
SINGLE = "single"  # the whole row is one tile in registers: 1 read + 1 write
LOOPED = "looped"  # one program per row, online (max, sum) pass then normalise
SPLIT = "split"  # a row is cut across programs; partials merge, then normalise
COOP = "coop"  # a row is cut into chunks shared by the programs of one persistent launch
RESIDENT = "resident"  # a row is cut into chunks held in registers, one program each


@dataclasses.dataclass(frozen=True)
class Limits:
    # Longest row (elements, padded to a power of two) kept on chip, by element
    # size, for a kernel that holds ONE row-sized fp32 array live. The budget:
    # 64 fp32 registers per thread for the tile at 16 warps (512 threads; the
    # cap is 128 registers per thread at that size) -> 32768 elements; fp64
    # takes two registers per value. A kernel that holds two row-sized arrays
    # (backward: y and dy) gets half, unless it can spread them over 32 warps
    # (``wide_single``). Static check (perf/results/static/): bf16 backward at
    # 32768 spilled 248 B of stack, and the fp32 forward at 32768 8 B (the
    # fp32 loads need more address registers than bf16's); at the limits
    # below nothing spills.
    max_single_2byte: int = 32768
    max_single_4byte: int = 16384
    max_single_8byte: int = 16384
    # The log-softmax forward and the backward may spread a row over 32 warps
    # (half the values a thread) and so stay on chip up to the limits above
    # with 2- and 4-byte elements (bf16 at 32768, no spill: the log-softmax
    # forward 63 registers, the backward 60 with y read twice, from L1 the
    # second time; fp64 spills). False: half the limits.
    wide_single: bool = True
    # Below those, the same kinds' longest 2-byte rows on 16 warps (half the
    # limit above: 16384) budget 64 registers a thread, so that two programs
    # share an SM, with the kernels' lean forms (bf16 16384, no spill: the
    # log-softmax forward 84 -> 64 registers, the backward 83 -> 62; the
    # forward there runs two programs per SM at 54, 0.95-0.98 of copy on
    # 2026-12-04, where one per SM at 32768 ran 0.82). Not fp32 at 8192: its
    # plain kernels already fit two (48-52 registers). False: one program per
    # SM, 128 registers, the plain forms.
    lean_single: bool = True
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
    # Long rows (longer than the on-chip limits) are read twice: a statistics
    # pass, then the normalise / gradient pass. The second read comes from L2
    # only while the data read between a row's two reads fits in it. Path for
    # long rows: "auto" (the plan of :func:`long_rows`); "looped" (one program
    # per row, the second read from L2 only by luck); "persistent" (the looped
    # kernels on a grid of programs_per_sm x SMs programs, each walking rows
    # pid, pid + G, ...: G rows in flight); "coop" (a row cut into chunks that
    # the programs of one persistent launch share, exchanging (max, sum)
    # through global memory: G chunks in flight); "split" (softmax only: two
    # launches, for few rows); "resident" (cross-entropy with class targets:
    # a row cut into chunks of resident_chunk columns, one program each, every
    # chunk kept in registers between its statistics and its write, one read;
    # elsewhere "auto").
    long_path: str = "auto"
    # Programs per multiprocessor of the persistent and cooperative grids.
    programs_per_sm: int = 4
    # Share of L2 that the data in flight between the two reads may fill.
    l2_fraction: float = 0.5
    # L2 bytes override (None: read from the device; CPU: 50 MiB).
    l2_bytes: int | None = None
    # Eviction hints on the two-read paths: evict_last on the first read,
    # evict_first on the second read and the stores.
    evict: bool = True
    # Chunks per row on the cooperative path (0: the fewest whose chunks in
    # flight fit the L2 share).
    coop_splits: int = 0
    # Warps of the long-row kernels (looped, persistent, cooperative, split;
    # 0: from the tile, 16 elements per thread per tile, 8 with extras or fp64).
    long_warps: int = 0
    # Tiles each long-row program keeps in flight: its tile loops software-
    # pipelined that deep (Triton's num_stages: the next tiles' loads go to
    # shared memory with cp.async while the current one is reduced); 1: none.
    # One of STAGE_CHOICES (the static check compiles those).
    long_stages: int = 1
    # Cross-entropy on-chip path: elements of a row each thread holds (2- and
    # 4-byte logits; fp64 half; extras half again); fewer warps per row with
    # more.
    ce_single_ept: int = 8
    # Resident path: columns per chunk (a power of two; 0: the op's on-chip
    # row limit; at most that and MAX_RESIDENT_CHUNK), and the polls a chunk's program waits for its row's other
    # chunks before leaving its write to the row's last arrival (which then
    # reads that chunk again; Triton's interpreter never waits).
    resident_chunk: int = 0
    resident_spin: int = 4096
    # The mean's denominators (one launch before a cross-entropy with class
    # targets): the steps of 1024 targets (or class weights) one program
    # walks alone, a memory round trip each; beyond, a program per step (at
    # most 1024), whose partials the last to finish adds up.
    den_serial_steps: int = 4


_DEFAULT = Limits()
_active = _DEFAULT
# Limits in force for one tuned-table op only (``override(op=...)``).
_per_op: dict = {}
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
def override(*, op: str | None = None, max_single: int | None = None,
             **kwargs) -> Iterator[Limits]:
    """Temporarily replace limits. ``max_single`` sets all three element sizes.

    ``op`` (one of :data:`TUNED_OPS`): the replaced limits apply to that op's
    launch plans only (:func:`limits_for`), as one entry of a tuned table
    would, on top of the limits in force when the block is entered; the other
    ops keep those. Inside any override no tuned table is read."""
    global _active, _per_op, _generation
    if max_single is not None:
        kwargs.update(
            max_single_2byte=max_single, max_single_4byte=max_single, max_single_8byte=max_single
        )
    previous, previous_ops = _active, _per_op
    if op is None:
        _active = dataclasses.replace(previous, **kwargs)
        new = _active
    else:
        if op not in TUNED_OPS:
            raise ValueError(f"override: op must be one of {TUNED_OPS}, got {op!r}")
        new = dataclasses.replace(previous_ops.get(op, previous), **kwargs)
        _per_op = {**previous_ops, op: new}
    _generation += 1
    try:
        yield new
    finally:
        _active, _per_op = previous, previous_ops
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


@functools.lru_cache(maxsize=None)
def _device_l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def l2_bytes(device: torch.device, lim: Limits | None = None) -> int:
    """L2 bytes of ``device`` (read once per device, never at import; CPU: 50 MiB)."""
    lim = _active if lim is None else lim
    if lim.l2_bytes is not None:
        return lim.l2_bytes
    if device.type == "cuda":
        return _device_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    return 50 << 20


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


# Register budgets (maxnreg) of the long-row kernels by weight class, for
# 2-/4-byte and 8-byte elements: 0 the light kernels (softmax forward,
# cross-entropy statistics without extras), 1 one more burden (a written
# gradient, the softmax backward, or the extras), 2 both (the 4-byte softmax
# backward, fp64 with extras). Without a budget ptxas 12.8 trades a few
# spilled bytes for one more program per SM; with one it allocates within it:
# the smallest budgets under which every long-row configuration compiles
# without a spill under Triton 3.6 and 3.9 (python -m perf.static; raised by
# 8-16 for the exact normaliser's counting branch and the pipelined loops,
# 2026-12-04). They also fix the occupancy the persistent grids are sized
# from.
LONG_ROW_REGS = {0: (80, 136), 1: (88, 168), 2: (96, 255)}
# The cooperative kernels' ticket counters and the cross-entropy's
# per-launch offsets (up to 3 x M x splits + grid) are int32: above this, long
# rows take the persistent grid instead.
MAX_COOP_COUNT = 1 << 31
REGISTERS_PER_SM = 65536


# Longest chunk of the resident path (a chunk and its gradient or output in
# registers, and the re-read of a chunk left to a row's last arrival, in one
# kernel: the sm_90 static check found spills at 32768 and, beyond the
# on-chip limits, with the cross-entropy's extras).
MAX_RESIDENT_CHUNK = 16384


def resident_regs(chunk: int, num_warps: int, elem_bytes: int, heavy: bool) -> int:
    """Register budget of a resident kernel: 64 (two programs, two chunks'
    loads in flight, per multiprocessor at 16 warps) for 2-byte chunks of up
    to 16 elements a thread of a light kernel (no cross-entropy extras, not
    a backward), where ptxas fits it without a spill (static check: the
    others spilled 8-264 B at 64), else the on-chip budget (``single_regs``)."""
    if elem_bytes == 2 and not heavy and chunk <= 16 * 32 * num_warps:
        return min(64, single_regs(num_warps))
    return single_regs(num_warps)


def resident_splits(M: int, N: int, chunk: int, elem_bytes: int, slots: int,
                    max_splits: int) -> int | None:
    """Chunks per row of a resident plan: cdiv(N + VEC - 1, chunk) (a row's
    chunks start on its 16-byte boundaries, VEC elements apart), or None
    when that is more than ``max_splits`` (the meeting word's bits) or the
    ``slots`` x M x chunks workspace offsets overflow int32."""
    splits = -(-(N + max(1, 16 // elem_bytes) - 1) // chunk)
    if splits > max_splits or slots * M * splits + M >= MAX_COOP_COUNT:
        return None
    return splits


def resident_chunk(lim: Limits, on_chip: int) -> int:
    """Columns per chunk of the resident path: ``lim.resident_chunk`` (0: the
    op's on-chip row limit ``on_chip``), at most ``on_chip`` and
    MAX_RESIDENT_CHUNK."""
    return min(lim.resident_chunk or on_chip, on_chip, MAX_RESIDENT_CHUNK)


def single_regs(num_warps: int) -> int:
    """Register budget of an on-chip kernel of ``num_warps`` warps: the most
    one program can have (128 at 16 warps, 64 at 32, else 255). Without a budget
    ptxas 12.8 sometimes spills a few bytes to fit one more program per SM
    (the static check found such spills in 8- and 16-warp configurations);
    with one it allocates what the code needs (the light kernels' count
    does not change: 31 registers for the bf16 softmax forward at 4096)."""
    return min(255, REGISTERS_PER_SM // (32 * num_warps))


def long_row_regs(elem_bytes: int, weight: int) -> int:
    """The register budget of a long-row kernel of weight class ``weight``."""
    return LONG_ROW_REGS[min(2, max(0, weight))][1 if elem_bytes > 4 else 0]


# Warps of the long-row kernels the tuner tries (Limits.long_warps); the
# static check compiles them.
LONG_WARPS_CHOICES = (4, 16)
# The budget of a long-row kernel whose warps hold more elements a thread
# than its default plan (Limits.long_warps below the default: 4 warps on a
# 4096 tile hold 32), and the least one with more warps than the default:
# the budgets under which those compile without a spill at sm_90 (python -m
# perf.static, 2026-12-07; ptxas takes 96-166 of 160), where the default
# budgets (80-96) spilled 8-240 bytes. A budget is also capped at what the
# program's threads can have (65536 registers an SM).
WIDE_THREAD_REGS = 160
MANY_WARPS_REGS = 128


def long_row_budget(regs: int, tile: int, warps: int, ept: int) -> int:
    """``regs``, the budget of a long-row kernel planned at ``ept`` elements
    a thread, for ``warps`` warps on ``tile``: at least WIDE_THREAD_REGS
    when they hold more than ``ept`` each (fewer warps than the plan's, or a
    tile past 16 warps of ``ept``), at least MANY_WARPS_REGS when there are
    more of them than that plan's, at most 65536 / (32 warps)."""
    planned = max(1, min(16, tile // (32 * ept)))
    if tile > 32 * warps * ept:
        regs = max(regs, WIDE_THREAD_REGS)
    elif warps > planned:
        regs = max(regs, MANY_WARPS_REGS)
    return min(regs, REGISTERS_PER_SM // (32 * warps), 255)


@dataclasses.dataclass(frozen=True)
class LongRows:
    """How rows longer than the on-chip limit are walked (see :func:`long_rows`)."""

    path: str  # LOOPED (programs = 0: one per row; else a persistent grid), COOP or SPLIT
    programs: int  # grid of the persistent / cooperative launch (0: one program per row)
    splits: int  # chunks per row (COOP), else 1
    chunk: int  # columns per chunk, a multiple of the tile (COOP), else the row length
    lag: int  # COOP: first passes dealt ahead of the second passes (>= splits - 1)
    evict: bool  # eviction hints on the two reads
    regs: int  # register budget of the kernel (maxnreg)


def long_rows(M: int, N: int, tile: int, reread_bytes: int, device: torch.device,
              lim: Limits, coop: bool = True, warps: int = 8, regs: int = 64) -> LongRows:
    """The plan for M rows of N elements that are read twice (``reread_bytes``:
    bytes per row read by both passes, e.g. N x element size, twice that for
    the softmax backward's y and dy), by kernels of ``warps`` warps and a
    budget of ``regs`` registers per thread.

    "auto": G = P x SMs programs, P = programs_per_sm, or fewer when that
    many programs do not fit on a multiprocessor at that register budget;
    if the rows in flight between their two reads, min(M, G) x row bytes,
    fit in l2_fraction x L2, the looped kernels on min(M, G) programs
    (persistent when M > G); otherwise the cooperative path (``coop``; else
    the same persistent grid), with the fewest chunks per row whose G chunks
    in flight fit. ``lim.long_path`` forces a path ("split" and "resident"
    are the caller's; a caller without them gets one program per row)."""
    fit = max(1, REGISTERS_PER_SM // (regs * 32 * warps))
    grid = max(1, min(lim.programs_per_sm, fit) * sm_count(device))
    budget = lim.l2_fraction * l2_bytes(device, lim)
    path = lim.long_path
    if path == "auto":
        path = "persistent" if min(M, grid) * reread_bytes <= budget or not coop else COOP
    if path == COOP and coop:
        tiles = -(-N // tile)
        splits = lim.coop_splits or -(-grid * reread_bytes // max(1, int(budget)))
        splits = max(2, min(splits, tiles))
        chunk = -(-tiles // splits) * tile
        # whole tiles per chunk: take one more chunk while the rounding overshoots
        while not lim.coop_splits and splits < tiles and grid * chunk * reread_bytes > budget * N:
            splits += 1
            chunk = -(-tiles // splits) * tile
        splits = -(-N // chunk)
        # the kernels count tickets and offsets of the M x splits items in int32
        if splits > 1 and 3 * M * splits + grid < MAX_COOP_COUNT:
            return LongRows(COOP, grid, splits, chunk, grid // 2 + splits, lim.evict, regs)
        path = "persistent"
    if path == "persistent":
        return LongRows(LOOPED, min(M, grid), 1, N, 0, lim.evict, regs)
    return LongRows(LOOPED, 0, 1, N, 0, lim.evict, regs)

# ----------------------------------------------------------------------------
# Tuned tables: measured limits per GPU, op and row length
# ----------------------------------------------------------------------------

# The ops a table holds, each tuned on its own timed op: "softmax" applies to
# the softmax forward plans (and the vocabulary-parallel softmax pieces),
# "log_softmax" to the log-softmax forward's, "softmax_backward" to the
# backward's (softmax and log-softmax: two row tensors read), and
# "cross_entropy" to the cross-entropy plans.
TUNED_OPS = ("softmax", "log_softmax", "softmax_backward", "cross_entropy")
# softmax_gpu/tuned/<gpu-slug>.json, installed with the package.
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
TUNED_SCHEMA = 1

# Fields a table may not set: facts about the device, not choices.
_UNTUNABLE = frozenset({"sm_count"})
# Limits fields counted in elements (tile widths, on-chip row lengths,
# elements per program): powers of two, since they become tl.arange extents
# and row counts. A tuned table's values are checked against that, and
# ``perf.tune`` scales these fields down with its shapes for a CPU run. A new
# field of that kind is added here.
ELEMENT_FIELDS = frozenset({
    "max_single_2byte", "max_single_4byte", "max_single_8byte", "tile", "target_program_elems",
    "ce_max_single_2byte", "ce_max_single_4byte", "ce_max_single_8byte", "resident_chunk",
})
# Fields that must be powers of two (or 0: automatic): the element fields and
# the warp and per-thread counts, which are not scaled.
POW2_FIELDS = ELEMENT_FIELDS | {"long_warps", "ce_single_ept"}
# The pipelining depths a plan may use (``Limits.long_stages``): what the
# static sm_90 check compiles and a tuned table may set.
STAGE_CHOICES = (1, 2, 3)
# The per-thread element counts of the cross-entropy on-chip path a table may
# set (``Limits.ce_single_ept``), likewise.
CE_EPT_CHOICES = (8, 16, 32)
# The (long_path, resident_chunk) pairs a plan may force: what the static
# sm_90 check compiles (resident chunks: 0, the op's on-chip limit capped at
# MAX_RESIDENT_CHUNK, and two smaller, as the tuner forces them).
LONG_PATH_CHOICES = (("auto", 0), ("persistent", 0), ("coop", 0), ("resident", 0),
                     ("resident", 8192), ("resident", 4096))
_ANNOTATION_TYPES = {"int": int, "bool": bool, "float": float, "str": str, "None": type(None)}


class TunedTableWarning(UserWarning):
    """A tuned table (``softmax_gpu/tuned/*.json``) has a field or value that
    cannot be used; that part of the table is ignored."""


def device_slug(name: str) -> str:
    """File-name form of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-device"


def tuned_path(slug: str) -> str:
    """Where the table of the GPU with this slug is installed."""
    return os.path.join(TUNED_DIR, f"{slug}.json")


def _elem_key(elem_bytes: int) -> int:
    return by_elem(elem_bytes, 2, 4, 8)


def _field_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be the Limits field ``name``, or None."""
    fields = {f.name: f for f in dataclasses.fields(Limits)}
    if name not in fields:
        return "is not a Limits field"
    if name in _UNTUNABLE:
        return "is a fact about the device, not a tunable limit"
    f = fields[name]
    default = f.default
    tokens = [t.strip() for t in str(f.type).split("|")]
    if all(t in _ANNOTATION_TYPES for t in tokens):
        types = tuple(_ANNOTATION_TYPES[t] for t in tokens)
    else:  # an annotation this check cannot read: the default's type
        types = (type(default),)
    ok = (value is None and type(None) in types) or (
        isinstance(value, bool) and bool in types) or (
        isinstance(value, int) and not isinstance(value, bool) and int in types) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and float in types) or (
        isinstance(value, str) and str in types)
    if not ok:
        return f"has value {value!r}, not of type {f.type}"
    if isinstance(value, int) and not isinstance(value, bool):
        low = 1 if isinstance(default, int) and default >= 1 else 0
        if value < low:
            return f"has value {value!r}, below {low}"
        if name in POW2_FIELDS and value & (value - 1):
            return f"has value {value!r}, not a power of two"
        choices = {"long_stages": STAGE_CHOICES, "ce_single_ept": CE_EPT_CHOICES}.get(name)
        if choices and value not in choices:
            return f"has value {value!r}, not one of {choices} (what the static check compiles)"
    return None


def _parse_tuned(data, path: str, slug: str | None) -> tuple[dict, list[str]]:
    """Entries ``{(op, elem_bytes): [(n, fields), ...]}`` sorted by n, and
    the problems found (each names the file and the place). An entry with a
    bad field keeps its row length with no overrides (the defaults there)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return {}, [f"{path}: not a JSON object; table ignored"]
    if data.get("schema") != TUNED_SCHEMA:
        return {}, [f"{path}: schema {data.get('schema')!r}, expected {TUNED_SCHEMA}; table ignored"]
    if slug is not None and data.get("slug") != slug:
        return {}, [f"{path}: field 'slug' is {data.get('slug')!r}, not {slug!r} (a table of "
                    "another GPU?); table ignored"]
    ops = data.get("ops")
    if not isinstance(ops, dict):
        return {}, [f"{path}: field 'ops' is missing or not an object; table ignored"]
    out: dict = {}
    for op, by_size in ops.items():
        if op not in TUNED_OPS:
            problems.append(f"{path}: ops.{op} is not one of {TUNED_OPS}; ignored")
            continue
        if not isinstance(by_size, dict):
            problems.append(f"{path}: ops.{op} is not an object; ignored")
            continue
        for size, entries in by_size.items():
            where = f"ops.{op}.{size}"
            if size not in ("2", "4", "8") or not isinstance(entries, list):
                problems.append(f"{path}: {where}: expected an element size 2, 4 or 8 holding a "
                                "list of entries; ignored")
                continue
            rows: dict[int, dict] = {}
            for i, entry in enumerate(entries):
                n = entry.get("n") if isinstance(entry, dict) else None
                fields = entry.get("limits") if isinstance(entry, dict) else None
                if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(fields, dict):
                    problems.append(f"{path}: {where}[{i}]: expected {{'n': row length >= 1, "
                                    "'limits': {field: value}}; entry ignored")
                    continue
                bad = [(k, _field_problem(k, v)) for k, v in fields.items()]
                bad = [(k, why) for k, why in bad if why]
                if not bad:
                    try:
                        dataclasses.replace(_DEFAULT, **fields)
                    except Exception as exc:  # a check of Limits itself
                        bad = [(", ".join(fields), f"rejected by Limits: {exc}")]
                for k, why in bad:
                    problems.append(f"{path}: {where} n={n}: field {k!r} {why}; the defaults are "
                                    "used at this row length")
                rows[n] = {} if bad else dict(fields)
            if rows:
                out[(op, int(size))] = sorted(rows.items())
    return out, problems


def load_tuned(path: str, slug: str | None = None) -> dict | None:
    """Read and validate a tuned table: ``{(op, elem_bytes): [(n, fields), ...]}``
    (None when the file cannot be used at all). Every problem is reported as
    a :class:`TunedTableWarning` naming the file and the field; the bad part
    is ignored. ``slug``: the GPU the table must be for."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        warnings.warn(f"softmax_gpu: cannot read tuned table {path}: {exc}; ignored",
                      TunedTableWarning, stacklevel=2)
        return None
    entries, problems = _parse_tuned(data, path, slug)
    for p in problems:
        warnings.warn(f"softmax_gpu: tuned table {p}", TunedTableWarning, stacklevel=2)
    return entries if entries else None


def installed_overrides(*ops: str) -> list[tuple[int, dict]]:
    """(element size, Limits fields) of every entry for ``ops`` in every
    table installed in :data:`TUNED_DIR`: the configurations a tuned GPU can
    pick, for the static compile check."""
    out = []
    for name in sorted(os.listdir(TUNED_DIR)):
        if name.endswith(".json"):
            entries = load_tuned(os.path.join(TUNED_DIR, name)) or {}
            for (op, elem), rows in sorted(entries.items()):
                if op in ops:
                    out.extend((elem, fields) for _, fields in rows if fields)
    return out


def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _tuned_for_device(index: int) -> dict | None:
    """The installed table of CUDA device ``index`` as
    ``{(op, elem_bytes): (row lengths, Limits)}``; read once per device."""
    try:
        slug = device_slug(_device_name(index))
        path = tuned_path(slug)
        if not os.path.exists(path):
            return None
        entries = load_tuned(path, slug)
    except Exception as exc:  # never fail a launch over a table
        warnings.warn(f"softmax_gpu: tuned table lookup failed ({type(exc).__name__}: {exc}); "
                      "using the default limits", TunedTableWarning, stacklevel=3)
        return None
    if not entries:
        return None
    return {key: (tuple(n for n, _ in rows),
                  tuple(dataclasses.replace(_DEFAULT, **fields) for _, fields in rows))
            for key, rows in entries.items()}


def clear_tuned() -> None:
    """Forget the tables read so far (they are read again on next use)."""
    _tuned_for_device.cache_clear()


def limits_for(op: str, device: torch.device, elem_bytes: int, n: int) -> Limits:
    """The limits to plan one launch with: :func:`limits` with the running
    GPU's tuned overrides for ``op`` (one of :data:`TUNED_OPS`), the element
    size and row length ``n`` applied (the entry of the nearest tuned row
    length at or below ``n``, else the smallest).

    Inside :func:`override` (tests, sweeps and the tuner keep control) the
    limits it put in force for ``op``, without any table; plain
    :func:`limits` for non-CUDA devices, and where the GPU has no table, no
    entry for this op and element size, or an entry that failed validation.
    """
    if op not in TUNED_OPS:
        raise ValueError(f"limits_for: op must be one of {TUNED_OPS}, got {op!r}")
    lim = _per_op.get(op, _active)
    if _active is not _DEFAULT or _per_op:
        return lim
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return lim
    table = _tuned_for_device(device.index if device.index is not None
                              else torch.cuda.current_device())
    found = table.get((op, _elem_key(elem_bytes))) if table else None
    if found is None:
        return lim
    ns, lims = found
    return lims[max(0, bisect.bisect_right(ns, n) - 1)]
