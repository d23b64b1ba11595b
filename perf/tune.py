"""One-call tuning run: ``python -m perf.tune`` (from the repository root).

On the hot shapes, bf16:

- ``ce_fwd_bwd`` at 131072 rows x 4096 and 16384 rows x {32000, 50257,
  128256, 151936, 256000} (first: the op the library exists for);
- ``softmax_fwd`` at N in {4096, 16384, 32768, 65536, 262144}, M so that an
  input is 1 GiB (``--target-gib``), as the harness's grid;
- ``softmax_fwd_bwd`` (the backward's plans) and ``log_softmax_fwd`` at N =
  32768 (two rows held on chip: long rows there, where the softmax forward
  is on chip),

every candidate is timed against the others in the same run, with the
device-to-device copy bandwidth measured in the same run (``frac_copy_bw``).

A candidate is a dict of :class:`softmax_gpu.heuristics.Limits` fields, in
force for its table op's plans only, through ``heuristics.override(op=...,
**fields)``, for its whole measurement (as an installed table entry would be;
its launch plan is made once and memoised, as in a real run). The candidates of a
shape are its op's :class:`Space`: every path (the heuristic's own choice,
and each forced path that applies to the shape) alone and with each value of
each :class:`Axis` (one field at a time), deduplicated by the launch plan they
give (a field that does not change the plan at this shape is timed once),
the defaults first. Per candidate (:func:`perf.sweep.run_case`): one call on
fresh seeded inputs (the compile), its outputs against torch in float32 on a
fresh copy of the inputs, then ``do_bench`` (L2 flushed, median). A candidate
that fails to compile or raises is an ``error`` row, a wrong one has
``correct`` False: neither is ever chosen. The choice per shape is the
fastest correct candidate when it beats the defaults by more than
``--min-gain``, else the defaults (no overrides at that row length).

Outputs (in ``--out``, default ``perf/results/<gpu>/<date>/``):
``<gpu>_<date>_tune.csv`` (long format, the harness's conventions, the copy
roofline first), ``<gpu>_<date>_tune_<op>.png``, ``<gpu>_<date>_tune_summary.md``
and the chosen table ``tuned_<gpu>.json``. ``--install`` copies such a table
to ``softmax_gpu/tuned/<gpu>.json``, where :func:`heuristics.limits_for` finds
it; it refuses a CPU run's table and any table that fails validation.

Without a GPU the same code runs in Triton's interpreter on tiny shapes with
the element-count limits divided by :data:`CPU_SCALE` (and 2 "SMs"), so that
every path still occurs: the timings are MEANINGLESS, the table is marked
so, and it can never be installed.

Adding a tunable field (the launch planning reads it from ``Limits``): one
:class:`Axis` line in the op's :class:`Space` below; a new path: one
:class:`Path` line; a field counted in elements also goes into
``heuristics.ELEMENT_FIELDS`` (power-of-two check, CPU scaling).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path as FilePath
from typing import Callable

from perf import env

__all__ = ["Axis", "Path", "Space", "SPACES", "Candidate", "TuneConfig", "candidates", "run_tuning",
           "choose", "table_json", "install", "main", "TUNE_COLUMNS", "CPU_SCALE"]

ROOT = FilePath(__file__).resolve().parents[1]
INSTALL_DIR = ROOT / "softmax_gpu" / "tuned"

# Every hot shape is bf16; the fields below are the 2-byte ones.
DTYPE_NAME = "bf16"
ELEM = 2

SOFTMAX_N = (4096, 16384, 32768, 65536, 262144)
CE_ROWS = 16384
CE_VOCABS = (32000, 50257, 128256, 151936, 256000)
# short rows: (rows, vocabulary) with their own row count (the 1 GiB of the grid)
CE_SHORT = ((131072, 4096),)
# CPU (interpreter): tiny shapes, limits scaled down with them.
CPU_SCALE = 256
CPU_ROWS = 8
CPU_SOFTMAX_N = (64, 256)
CPU_CE_VOCABS = (100, 300)
CPU_CE_SHORT = ((8, 16),)
CPU_SM_COUNT = 2

TUNE_COLUMNS = [
    "op", "table_op", "dtype", "M", "N", "candidate", "fields", "plan", "kernels", "ms", "ms_p20",
    "ms_p80", "gbps", "frac_copy_bw", "vs_default", "chosen", "status", "correct", "max_rel_err",
    "off_target_rel_err", "peak_mem_bytes", "device", "torch", "triton", "cuda", "timestamp",
    "note", "bytes", "copy_gbps",
]
DEFAULT = "default"


# ----------------------------------------------------------------------------
# The candidates
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Axis:
    """One tunable Limits field and the values to try (element counts are GPU
    values; a CPU run divides them by :data:`CPU_SCALE`)."""

    field: str
    values: tuple


@dataclasses.dataclass(frozen=True)
class Path:
    """A way to force a path: ``fields(shape, limits)`` gives the Limits
    fields (None: not for this shape; ``limits``: those in force before the
    candidate, for limits relative to them). ``combine``: also tried with
    every axis value."""

    name: str
    fields: Callable
    combine: bool = True


@dataclasses.dataclass(frozen=True)
class Space:
    """The candidates of one tuned-table op, timed on ``perf_op``."""

    table_op: str  # heuristics.TUNED_OPS entry whose plans the candidates move
    perf_op: str  # perf.ops name of the timed op
    paths: tuple
    axes: tuple
    plan: Callable  # (M, N, device) -> the launch plan (for deduplication)
    lengths: tuple = ()  # softmax family: row lengths on a GPU (rows: the 1 GiB grid)
    cpu_lengths: tuple = ()  # the same on CPU (limits scaled by CPU_SCALE)
    upto: int = 0  # rows this long and longer plan with the defaults (an empty entry; 0: none)
    # (shape, limits) -> the fields that take a row the defaults keep on chip
    # off it, added to the forced long-row paths' (None: not at this shape)
    off_chip: Callable = lambda shape, lim: None
    # the forced paths also where the defaults keep rows on chip and
    # ``off_chip`` gives None (False: there the defaults and the axes only)
    forced_on_chip: bool = True


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _heuristic(shape, lim):
    return {}


def _softmax_looped(shape, lim):
    """Rows that fit on chip take the looped path instead."""
    return {"max_single_2byte": max(16, _pow2(shape.N) // 2)}


def _ce_on_chip(shape, lim):
    """The cross-entropy on-chip path for a row up to max_single (its default
    limit is lower: longer rows spilled, perf/results/static/); None where the
    defaults keep the row on chip already."""
    block = _pow2(shape.N)
    return ({"ce_max_single_2byte": block}
            if lim.ce_max_single_2byte < block <= lim.max_single_2byte else None)


def _ce_two_rows(shape, lim):
    """The on-chip cross-entropy with 32 elements per thread and two rows
    per program (8 warps at 4096 columns)."""
    return {"ce_single_ept": 32, "target_program_elems": 2 * _pow2(shape.N)}


def _long_path(name):
    """Rows longer than the on-chip limit walked by the ``long_path`` ``name``
    (shorter rows: the same plan as the defaults, deduplicated away)."""

    def fields(shape, lim):
        return {"long_path": name}

    fields.__name__ = f"_long_path_{name}"
    return fields


def _pipelined(name, stages):
    """A forced long-row path with its tile loops pipelined ``stages`` deep."""
    base = _long_path(name)

    def fields(shape, lim):
        return {**base(shape, lim), "long_stages": stages}

    fields.__name__ = f"_pipelined_{name}_{stages}"
    return fields


def _rowloop_warps(warps):
    """One program per row with ``warps`` warps per tile (4: 32 elements a
    thread of a 4096 tile)."""

    def fields(shape, lim):
        return {"long_path": "looped", "long_warps": warps}

    fields.__name__ = f"_rowloop_warps_{warps}"
    return fields


def _partition(shape, lim):
    """The cooperative two-pass path with the chunks in flight between a
    row's two reads at a quarter of L2 (half of one of Hopper's two L2
    partitions), so that they and the gradient written back meanwhile, about
    as many bytes, fit one partition (the default plans half of L2)."""
    return {"long_path": "coop", "l2_fraction": 0.25}


def _resident(chunk):
    """The resident path with chunks of ``chunk`` columns (at most the op's
    on-chip limit, so on a CPU run the scaled one)."""

    def fields(shape, lim):
        return {"long_path": "resident", "resident_chunk": chunk}

    fields.__name__ = f"_resident_{chunk}"
    return fields


# The forced long-row paths come first: with max_candidates they are the
# comparison a table most needs, before the one-field variations of the
# default plan: one program per row (the fastest on 2026-12-04 at most
# vocabularies, also with 32 elements a thread per tile, the fastest at 3 of
# 5), the persistent and cooperative grids, each also with its tile loads
# pipelined, the cooperative grid with its reads in flight sized to half an
# L2 partition, then chunks held in registers (one read; the default chunk
# and two smaller, more programs per multiprocessor). Those last never ran on a
# GPU: a fault there (sticky for the process) stops the run after the proven
# paths of the shape were measured.
LONG_PATHS = (
    Path("rowloop", _long_path("looped"), combine=False),
    Path("rowloop+warps=4", _rowloop_warps(4), combine=False),
    Path("rowloop+stages=3", _pipelined("looped", 3), combine=False),
    Path("coop+stages=3", _pipelined("coop", 3), combine=False),
    Path("persistent+stages=3", _pipelined("persistent", 3), combine=False),
    Path("persistent", _long_path("persistent"), combine=False),
    Path("coop", _long_path("coop"), combine=False),
    Path("coop+l2=1/4", _partition, combine=False),
    Path("resident", _long_path("resident"), combine=False),
    Path("resident+chunk=8192", _resident(8192), combine=False),
    Path("resident+chunk=4096", _resident(4096), combine=False),
)
# Fields of the long-row plan (the grid, the L2 share in flight, the hints).
LONG_AXES = (
    Axis("long_stages", (2, 3)),  # tiles in flight per program (software pipelining)
    Axis("long_warps", (4, 16)),  # warps of the long-row kernels (default: from the tile)
    Axis("programs_per_sm", (1, 2, 8)),  # persistent / cooperative grid per SM (capped by occupancy)
    Axis("l2_fraction", (0.125, 0.25)),  # data in flight between a row's two reads
    Axis("evict", (False,)),  # eviction hints on the two reads
    Axis("coop_splits", (2, 4)),  # chunks per row, cooperative path
)


def _softmax_plan(kind):
    """The launch plan of a softmax-family call of ``kind`` (``CALL_KINDS``)."""

    def plan(M, N, device):
        from softmax_gpu.softmax import call_config

        return call_config(kind, M, N, ELEM, device)

    plan.__name__ = f"_softmax_plan_{kind}"
    return plan


def _ce_plan(M, N, device):
    from softmax_gpu.cross_entropy import cross_entropy_config

    return cross_entropy_config(M, N, ELEM, device)


def _softmax_off_chip(shape, lim):
    """The forward at its on-chip limit (one 16-warp program per SM, 0.82 of
    copy at 32768 on 2026-12-04) off chip, so that the forced long-row paths
    run there too (resident: two chunks of half the row, two programs per SM)."""
    block = _pow2(shape.N)
    return {"max_single_2byte": block // 2} if block >= lim.max_single_2byte else None


def _wide_off_chip(shape, lim):
    """The 32-warp on-chip rows (``wide_single``, past half the forward's
    limit; the tuner's rows are bf16, ``ELEM``) of the log-softmax forward
    and the backward off chip: their long-row plans as before those
    (resident: chunks of half the forward's limit)."""
    return {"wide_single": False} if _pow2(shape.N) > lim.max_single_2byte // 2 else None


# One Axis line per tunable field, one Path line per forced path.
SOFTMAX_PATHS = LONG_PATHS + (
    Path("split", _long_path("split"), combine=False),
    Path("heuristic", _heuristic),
    Path("looped", _softmax_looped),
)
SOFTMAX_AXES = (
    Axis("tile", (2048, 4096, 8192, 16384)),  # looped / split tile (and its warps)
    Axis("target_program_elems", (4096, 8192, 16384)),  # rows per program, on chip
    Axis("split_programs_per_sm", (2, 4, 8, 16)),  # when few rows split across programs
) + LONG_AXES
SOFTMAX = Space(
    table_op="softmax", perf_op="softmax_fwd", paths=SOFTMAX_PATHS, axes=SOFTMAX_AXES,
    plan=_softmax_plan("fwd"), lengths=SOFTMAX_N, cpu_lengths=CPU_SOFTMAX_N,
    off_chip=_softmax_off_chip,
)
# The backward and the log-softmax forward keep two rows on chip: at 32768
# they were long rows where the softmax forward is not (2026-12-04: softmax
# fwd+bwd 0.79 against Liger's 0.91, log-softmax fwd 0.61 against torch's
# 0.72); now on chip on 32 warps, with those long-row plans as candidates.
# At 16384 they ran one 16-warp program per SM; now two (``lean_single``),
# with one as the only candidate there (no forced paths: the forward's
# space ranks those rows). The backward is timed as fwd+bwd; its
# candidates move the backward's plan only (the forward is the same in all).
# Tuned at 16384 and 32768 only, their entries end at 65536 (longer rows:
# the defaults).
TWO_ROW_AXES = SOFTMAX_AXES + (
    Axis("lean_single", (False,)),  # 16-warp rows: one program per SM, plain forms
)
SOFTMAX_BACKWARD = Space(
    table_op="softmax_backward", perf_op="softmax_fwd_bwd", paths=SOFTMAX_PATHS,
    axes=TWO_ROW_AXES, plan=_softmax_plan("bwd"), lengths=(16384, 32768),
    cpu_lengths=(64, 128), upto=65536, off_chip=_wide_off_chip, forced_on_chip=False,
)
LOG_SOFTMAX = Space(
    table_op="log_softmax", perf_op="log_softmax_fwd", paths=SOFTMAX_PATHS,
    axes=TWO_ROW_AXES, plan=_softmax_plan("log_fwd"), lengths=(16384, 32768),
    cpu_lengths=(64, 128), upto=65536, off_chip=_wide_off_chip, forced_on_chip=False,
)
CROSS_ENTROPY = Space(
    table_op="cross_entropy", perf_op="ce_fwd_bwd",
    paths=(Path("onchip", _ce_on_chip),) + LONG_PATHS + (
        Path("heuristic", _heuristic),
        Path("ept32+2rows", _ce_two_rows, combine=False),
    ),
    axes=(
        Axis("ce_single_ept", (16, 32)),  # on chip: elements per thread (fewer warps per row)
    ) + LONG_AXES + (
        Axis("target_program_elems", (8192, 16384)),  # rows per program, on chip
        Axis("tile", (2048, 8192, 16384)),  # looped tile (and its warps)
    ),
    plan=_ce_plan,
)
# The cross-entropy first, then the two kinds behind a peer: a run cut short
# by its time limit has measured them (the softmax forward is at copy speed
# up to 16384).
SPACES = {s.table_op: s for s in (CROSS_ENTROPY, SOFTMAX_BACKWARD, LOG_SOFTMAX, SOFTMAX)}


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    fields: dict
    plan: str = ""


def _scaled(field: str, value, scale: int):
    from softmax_gpu import heuristics

    # 0 stays 0: an element field's "automatic" (resident_chunk)
    if scale > 1 and field in heuristics.ELEMENT_FIELDS and isinstance(value, int) and value:
        return max(1, value // scale)
    return value


def _plan_text(plan) -> str:
    if dataclasses.is_dataclass(plan):
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(plan).items())
    return str(plan)


def candidates(space: Space, shape, device, base: dict | None = None, scale: int = 1,
               limit: int | None = None) -> list[Candidate]:
    """The candidates of ``space`` at ``shape``: the defaults first, then
    every path alone and with each axis value, one per distinct launch plan
    (``base``: overrides under all of them, the CPU run's scaled limits)."""
    import torch

    from softmax_gpu import heuristics

    dev = torch.device(device)
    raw = [Candidate(DEFAULT, {})]
    with heuristics.override(**(base or {})) as lim:
        with heuristics.override(op=space.table_op):
            on_chip = getattr(space.plan(shape.M, shape.N, dev), "path", "") == heuristics.SINGLE
        off = space.off_chip(shape, lim) if on_chip else None
        unforced = on_chip and off is None and not space.forced_on_chip
        for path in space.paths:
            pf = path.fields(shape, lim)
            if pf is None or (unforced and pf):
                continue
            if off and "long_path" in pf:  # forced long rows: also where on chip by default
                pf = {**pf, **off}
            if pf:
                raw.append(Candidate(path.name, dict(pf)))
            if not path.combine:
                continue
            for axis in space.axes:
                for v in axis.values:
                    v = _scaled(axis.field, v, scale)
                    name = f"{axis.field}={v}" if not pf else f"{path.name}+{axis.field}={v}"
                    raw.append(Candidate(name, {**pf, axis.field: v}))
        out, seen = [], set()
        for c in raw:
            try:
                with heuristics.override(op=space.table_op, **c.fields):
                    plan = space.plan(shape.M, shape.N, dev)
                text = _plan_text(plan)
            except Exception as exc:  # kept: its run records the failure
                text = f"unplanned ({type(exc).__name__}: {exc})"
                plan = ("unplanned", c.name)
            if repr(plan) in seen:
                continue
            seen.add(repr(plan))
            out.append(dataclasses.replace(c, plan=text))
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class TuneConfig:
    device: str
    spaces: list[Space]
    ns: tuple[int, ...] | None = None  # replaces the row lengths (softmax N, CE vocabularies)
    m: int | None = None  # fixes the row count
    target_bytes: int = 1 << 30  # softmax inputs: M so that one is this large
    seed: int = 0
    warmup_ms: float = 25
    rep_ms: float = 100
    min_gain: float = 0.02
    max_candidates: int | None = 11
    time_limit: float | None = None  # seconds; later candidates are recorded as skipped
    copy_bytes: int = 1 << 30

    @property
    def on_cpu(self) -> bool:
        return self.device != "cuda"

    @property
    def scale(self) -> int:
        return CPU_SCALE if self.on_cpu else 1

    def base(self) -> dict:
        """Overrides under every candidate: none on a GPU; on CPU the element
        limits scaled down with the shapes, and 2 multiprocessors."""
        if not self.on_cpu:
            return {}
        from softmax_gpu import heuristics

        d = heuristics.Limits()
        out = {f: _scaled(f, getattr(d, f), self.scale) for f in sorted(heuristics.ELEMENT_FIELDS)
               if hasattr(d, f)}
        out["sm_count"] = CPU_SM_COUNT
        return out

    def shapes(self, space: Space) -> list:
        from perf.sizes import Shape, grid_rows

        if space.table_op != "cross_entropy":
            ns = self.ns or (space.cpu_lengths if self.on_cpu else space.lengths)
            rows = (lambda n: self.m or (CPU_ROWS if self.on_cpu
                                         else grid_rows(n, ELEM, self.target_bytes)))
            return [Shape(rows(n), n, "grid") for n in ns]
        if self.ns:
            return [Shape(self.m or (CPU_ROWS if self.on_cpu else CE_ROWS), n, "llm")
                    for n in self.ns]
        short = CPU_CE_SHORT if self.on_cpu else CE_SHORT
        m = self.m or (CPU_ROWS if self.on_cpu else CE_ROWS)
        return ([Shape(self.m or rows, n, "grid") for rows, n in short] +
                [Shape(m, n, "llm") for n in (CPU_CE_VOCABS if self.on_cpu else CE_VOCABS)])


def _row_base(info, op: str, table_op: str, M: int, N: int, cand: Candidate | None) -> dict:
    row = {c: "" for c in TUNE_COLUMNS}
    row.update(op=op, table_op=table_op, dtype=DTYPE_NAME, M=M, N=N, device=info.device_name,
               torch=info.torch, triton=info.triton, cuda=info.cuda, timestamp=info.timestamp,
               chosen=False)
    for c in ("ms", "ms_p20", "ms_p80", "gbps", "frac_copy_bw", "vs_default", "max_rel_err",
              "off_target_rel_err", "peak_mem_bytes"):
        row[c] = math.nan
    if cand is not None:
        row.update(candidate=cand.name, fields=json.dumps(cand.fields, sort_keys=True),
                   plan=cand.plan)
    return row


def _measure(cfg: TuneConfig, info, space: Space, shape, cand: Candidate, provider,
             copy_gbps: float, seed: int) -> dict:
    """One candidate's row: perf.sweep.run_case (compile, check, time) with
    the candidate's limits in force, and the kernels it launched."""
    from perf import sweep
    from perf.ops import DTYPES, OPS
    from softmax_gpu import heuristics
    from softmax_gpu._dispatch import record_launches

    sweep_cfg = sweep.SweepConfig(device=cfg.device, ops=[], providers=[provider],
                                  dtypes=[DTYPES[DTYPE_NAME]], warmup_ms=cfg.warmup_ms,
                                  rep_ms=cfg.rep_ms)
    with heuristics.override(**cfg.base()), \
            heuristics.override(op=space.table_op, **cand.fields), record_launches() as names:
        got = sweep.run_case(sweep_cfg, info, OPS[space.perf_op], provider, DTYPES[DTYPE_NAME],
                             shape, seed, copy_gbps)
    row = _row_base(info, space.perf_op, space.table_op, shape.M, shape.N, cand)
    for k in ("ms", "ms_p20", "ms_p80", "gbps", "frac_copy_bw", "status", "correct",
              "max_rel_err", "off_target_rel_err", "peak_mem_bytes", "note", "bytes",
              "copy_gbps"):
        row[k] = got[k]
    row["kernels"] = " ".join(sorted(set(names)))
    return row


def _default_provider():
    from perf.providers import make_providers

    return make_providers(["softmax_gpu"])[0]


def run_tuning(cfg: TuneConfig, info, *, provider=None, log: Callable[[str], None] = print
               ) -> list[dict]:
    """Time every candidate of every hot shape; the rows, the copy roofline
    first, with ``chosen`` and ``vs_default`` filled in (:func:`choose`).

    A KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by :func:`main`)
    or ``cfg.time_limit`` stops the timing: the candidates not measured get
    ``skipped`` rows, and the choice is made among those measured."""
    from perf import timing

    provider = provider or _default_provider()
    t0 = time.perf_counter()
    copy_gbps, copy_ms, (cr, cc) = timing.measure_copy(cfg.device, cfg.copy_bytes,
                                                       warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    log(f"copy roofline: {copy_gbps:.1f} GB/s ({2 * cr * cc * 4 / 2**30:.2f} GiB read+written in "
        f"{copy_ms:.3f} ms)")
    copy = _row_base(info, "copy", "", cr, cc, None)
    copy.update(ms=copy_ms, gbps=copy_gbps, frac_copy_bw=1.0, copy_gbps=copy_gbps, status="ok",
                bytes=2 * cr * cc * 4, note="device-to-device copy: bytes read + written")
    rows = [copy]
    work = []
    for space in cfg.spaces:
        for shape in cfg.shapes(space):
            seed = cfg.seed * 1_000_003 + len(work)  # the same inputs for every candidate of a shape
            work.append((space, shape, seed, candidates(space, shape, cfg.device, cfg.base(),
                                                        cfg.scale, cfg.max_candidates)))
    stop = ""

    def skipped(space, shape, cand):
        row = _row_base(info, space.perf_op, space.table_op, shape.M, shape.N, cand)
        row.update(status="skipped", note=stop)
        return row

    done = set()  # (work index, candidate index) of every row appended
    try:  # (the inner handlers stop at a candidate; this one anywhere else)
        for wi, (space, shape, seed, cands) in enumerate(work):
            log(f"{space.perf_op} {DTYPE_NAME} {shape.M}x{shape.N}: {len(cands)} candidates")
            for ci, cand in enumerate(cands):
                if not stop and cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
                    stop = f"time limit ({cfg.time_limit:.0f} s) reached"
                row = None
                if not stop:
                    try:
                        row = _measure(cfg, info, space, shape, cand, provider, copy_gbps, seed)
                    except KeyboardInterrupt:
                        stop = "run interrupted"
                    except Exception as exc:  # e.g. override() rejecting a field: the candidate's fault
                        row = _row_base(info, space.perf_op, space.table_op, shape.M, shape.N, cand)
                        row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:400])
                        stop = timing.device_lost(cfg.device) or ""  # a fault: nothing later can run
                if row is None:
                    row = skipped(space, shape, cand)
                rows.append(row)
                done.add((wi, ci))
                if row["status"] != "skipped":
                    verdict = ("ERROR " + row["note"] if row["status"] == "error" else
                               "WRONG" if row["correct"] is False else "ok")
                    log(f"  {cand.name:40s} {row['ms']:9.4g} ms  {row['frac_copy_bw']:6.3g} of copy"
                        f"  {verdict}  [{cand.plan}]")
            try:
                gc.collect()
                if cfg.device == "cuda":
                    import torch

                    torch.cuda.empty_cache()
            except KeyboardInterrupt:
                stop = stop or "run interrupted"
    except KeyboardInterrupt:
        stop = stop or "run interrupted"
    for wi, (space, shape, _, cands) in enumerate(work):  # those an interrupt jumped over
        for ci, cand in enumerate(cands):
            if (wi, ci) not in done:
                rows.append(skipped(space, shape, cand))
    if stop:
        copy["note"] += f"; RUN CUT SHORT: {stop}"
        log(f"{stop}: the remaining candidates are recorded as skipped")
    choose(rows, cfg.min_gain)
    return rows


def _usable(r: dict) -> bool:
    return (r["status"] == "ok" and r["correct"] is True and isinstance(r["ms"], float)
            and math.isfinite(r["ms"]) and r["ms"] > 0)


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if r["op"] != "copy":
            out.setdefault((r["table_op"], r["op"], r["M"], r["N"]), []).append(r)
    return out


def _overlap(r: dict, default: dict) -> bool:
    """Whether ``r``'s timings reach into the default's: its 80th percentile
    not below the default's 20th (False where either is not known)."""
    hi, lo = r.get("ms_p80"), default.get("ms_p20")
    ok = all(isinstance(v, float) and math.isfinite(v) for v in (hi, lo))
    return ok and hi >= lo


def choose(rows: list[dict], min_gain: float) -> dict:
    """Mark the chosen row of every shape (``chosen``) and fill ``vs_default``
    (default ms / ms). The choice: the fastest correct candidate, unless the
    correct default is within ``min_gain`` of it or their timings overlap
    (the candidate's 80th percentile not below the default's 20th: one
    median each, the fastest of many, would otherwise pick noise); None where
    no candidate was correct. Returns ``{(table_op, op, M, N): chosen row or
    None}``."""
    picked = {}
    for key, group in _groups(rows).items():
        default = next((r for r in group if r["candidate"] == DEFAULT), None)
        good = [r for r in group if _usable(r)]
        for r in group:
            r["chosen"] = False
            if default is not None and _usable(default) and _usable(r):
                r["vs_default"] = default["ms"] / r["ms"]
        best = min(good, key=lambda r: r["ms"], default=None)
        if best is not None and default in good and (
                best["ms"] > default["ms"] * (1 - min_gain) or _overlap(best, default)):
            best = default
        if best is not None:
            best["chosen"] = True
        picked[key] = best
    return picked


def table_json(rows: list[dict], info, csv_name: str, min_gain: float) -> dict:
    """The tuned table (``softmax_gpu/tuned/<gpu>.json`` format, see
    :func:`softmax_gpu.heuristics.load_tuned`) of the chosen rows: per op,
    per element size, the overrides at each tuned row length (empty: the
    defaults won, or no candidate was correct)."""
    ops: dict = {}
    for (table_op, op, M, N), best in sorted(choose(rows, min_gain).items(),
                                             key=lambda kv: (kv[0][0], kv[0][3])):
        default = next((r for r in rows if r["op"] == op and r["M"] == M and r["N"] == N
                        and r["candidate"] == DEFAULT), None)
        entry = {"n": N, "limits": json.loads(best["fields"]) if best else {}}
        if best is None:
            entry["note"] = "no correct candidate was measured: the defaults"
        else:
            entry.update(candidate=best["candidate"], plan=best["plan"], ms=best["ms"],
                         frac_copy_bw=best["frac_copy_bw"])
        if default is not None and _usable(default):
            entry.update(default_ms=default["ms"], default_frac_copy_bw=default["frac_copy_bw"])
        entry.update(measured_at=f"{op} {DTYPE_NAME} {M}x{N}")
        ops.setdefault(table_op, {}).setdefault(str(ELEM), []).append(entry)
    for table_op, by_elem in ops.items():
        space, entries = SPACES.get(table_op), by_elem[str(ELEM)]
        if entries[0]["n"] > 1:  # the heuristics take an entry down to the next shorter one
            entries.insert(0, {"n": 1, "limits": {},
                               "note": "shorter than the tuned rows: the defaults"})
        if space is not None and space.upto and entries[-1]["n"] < space.upto:
            entries.append({"n": space.upto, "limits": {},
                            "note": "longer than the tuned rows: the defaults"})
    copy = next((r for r in rows if r["op"] == "copy"), None)
    return {
        "schema": 1,
        "slug": info.device_slug,
        "device": info.device_name,
        "meaningless": info.meaningless_timings,
        "torch": info.torch,
        "triton": info.triton,
        "cuda": info.cuda,
        "timestamp": info.timestamp,
        "copy_gbps": copy["gbps"] if copy else None,
        "min_gain": min_gain,
        "csv": csv_name,
        "note": ("Chosen by python -m perf.tune: per op and element size, the Limits overrides "
                 "at each tuned row length; heuristics.limits_for applies the entry of the "
                 "nearest tuned length at or below a row's; rows shorter than every tuned "
                 "length: the defaults, in the n = 1 entry."),
        "ops": ops,
    }


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------


def _ms_frac(r: dict | None) -> str:
    if r is None or not _usable(r):
        return "—" if r is None else ("ERROR" if r["status"] == "error" else
                                      "WRONG" if r["correct"] is False else r["status"])
    return f"{r['ms']:.4g} ms ({r['frac_copy_bw']:.3g})"


def summary_markdown(rows: list[dict], info, table_name: str) -> str:
    from perf.report import CPU_WARNING

    lines = [f"# softmax-gpu tuning: {info.device_name}, {info.date}", ""]
    if info.meaningless_timings:
        lines += [f"> **{CPU_WARNING}**", ""]
    copy = next((r for r in rows if r["op"] == "copy"), None)
    if copy and "CUT SHORT" in copy["note"]:
        lines += [f"> **{copy['note'].split('; ')[-1]}: the tables below are partial.**", ""]
    lines += [f"- device: {info.device_name}; torch {info.torch}; triton {info.triton}; "
              f"CUDA {info.cuda}; run {info.timestamp}",
              f"- roofline: device-to-device copy, {copy['gbps']:.1f} GB/s" if copy else "",
              "- cells: median ms (fraction of copy bandwidth); vs default = default ms / ms",
              f"- chosen table: `{table_name}`", ""]
    groups = _groups(rows)
    for table_op in dict.fromkeys(k[0] for k in groups):
        keys = [k for k in groups if k[0] == table_op]
        lines += [f"## {table_op} ({keys[0][1]} {DTYPE_NAME})", "",
                  "| M | N | default | fastest correct | chosen | vs default | candidates |",
                  "|---|---|---|---|---|---|---|"]
        for key in keys:
            group = groups[key]
            default = next((r for r in group if r["candidate"] == DEFAULT), None)
            good = [r for r in group if _usable(r)]
            best = min(good, key=lambda r: r["ms"], default=None)
            chosen = next((r for r in group if r["chosen"]), None)
            n_wrong = sum(r["correct"] is False for r in group)
            n_err = sum(r["status"] == "error" for r in group)
            n_skip = sum(r["status"] == "skipped" for r in group)
            gain = chosen["vs_default"] if chosen else math.nan
            lines.append(
                f"| {key[2]} | {key[3]} | {_ms_frac(default)} | "
                f"{(best['candidate'] + ': ' + _ms_frac(best)) if best else '—'} | "
                f"{chosen['candidate'] if chosen else 'none (defaults)'} | "
                f"{'—' if not math.isfinite(gain) else f'{gain:.3f}x'} | "
                f"{len(group)} ({n_wrong} wrong, {n_err} error, {n_skip} skipped) |")
        lines.append("")
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot(rows: list[dict], out_dir: str, stem: str, info) -> list[str]:
    """One PNG per tuned op: fraction of copy bandwidth per candidate at each
    shape (defaults black, the chosen one a star, wrong ones red crosses)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[perf]')")
        return []
    from perf.report import save_plot

    paths = []
    groups = _groups(rows)
    for table_op in dict.fromkeys(k[0] for k in groups):
        keys = [k for k in groups if k[0] == table_op]
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, key in enumerate(keys):
            for r in groups[key]:
                if r["status"] != "ok" or not math.isfinite(r["frac_copy_bw"]):
                    continue
                if r["correct"] is False:
                    ax.scatter(i, r["frac_copy_bw"], marker="x", color="red", s=80, zorder=4)
                elif r["candidate"] == DEFAULT:
                    ax.scatter(i, r["frac_copy_bw"], marker="o", color="black", s=50, zorder=3)
                else:
                    ax.scatter(i, r["frac_copy_bw"], marker=".", color="tab:blue", s=40, zorder=2)
                if r["chosen"]:
                    ax.scatter(i, r["frac_copy_bw"], marker="*", color="tab:orange", s=220, zorder=5)
                    ax.annotate(r["candidate"], (i, r["frac_copy_bw"]), fontsize=7,
                                xytext=(6, 4), textcoords="offset points")
        ax.set_xlim(-0.5, len(keys) - 0.5)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[2]}x{k[3]}" for k in keys], rotation=20, fontsize=8)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="device copy")
        for marker, color, label in (("o", "black", "defaults"), (".", "tab:blue", "candidate"),
                                     ("*", "tab:orange", "chosen"), ("x", "red", "WRONG")):
            ax.scatter([], [], marker=marker, color=color, label=label)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("fraction of copy bandwidth (minimal bytes / median time)")
        ax.set_xlabel(f"{keys[0][1]} {DTYPE_NAME}, M x N")
        paths.append(save_plot(fig, ax, f"tuning {table_op}", info,
                               os.path.join(out_dir, f"{stem}_{table_op}.png")))
    return paths


# ----------------------------------------------------------------------------
# Install
# ----------------------------------------------------------------------------


class InstallError(Exception):
    pass


def install(table: str, install_dir: str | os.PathLike = INSTALL_DIR) -> str:
    """Copy a tuning run's ``tuned_<gpu>.json`` to ``<install_dir>/<gpu>.json``
    after checking it: a GPU run's table (never a CPU run's), one that
    :func:`heuristics.load_tuned` reads without a single warning. Returns the
    installed path; raises :class:`InstallError` with the reason."""
    from softmax_gpu import heuristics

    try:
        with open(table) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read {table}: {exc}") from None
    if not isinstance(data, dict):
        raise InstallError(f"{table} is not a tuned table (not a JSON object)")
    slug = data.get("slug")
    if data.get("meaningless", True) or slug in (None, "cpu") or str(slug).startswith("cpu"):
        raise InstallError(f"{table} comes from a CPU run (device {data.get('device')!r}): its "
                           "timings are meaningless and it is never installed")
    if not isinstance(slug, str) or heuristics.device_slug(slug) != slug:
        raise InstallError(f"{table}: field 'slug' {slug!r} is not a device slug")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = heuristics.load_tuned(table, slug)
    problems = [str(w.message) for w in caught if issubclass(w.category, heuristics.TunedTableWarning)]
    if problems or not entries:
        raise InstallError(f"{table} fails validation:\n  " + "\n  ".join(problems or ["no entries"]))
    os.makedirs(install_dir, exist_ok=True)
    dest = os.path.join(install_dir, f"{slug}.json")
    shutil.copyfile(table, dest)
    return dest


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="default auto: CUDA if torch sees a GPU, else CPU (tiny shapes, interpreter)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default perf/results/<gpu-name>/<date>/)")
    p.add_argument("--ops", default=",".join(SPACES), metavar="LIST",
                   help=f"tuned-table ops to tune, in this order (default {','.join(SPACES)})")
    p.add_argument("--n", default=None, metavar="LIST",
                   help="replace the row lengths (softmax N, cross-entropy vocabularies), e.g. 4k,50257")
    p.add_argument("--m", type=int, default=None, help="fix the row count M")
    p.add_argument("--target-gib", type=float, default=1.0,
                   help="softmax inputs: M so that one is this many GiB (default 1)")
    p.add_argument("--warmup-ms", type=float, default=10, help="do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=50, help="do_bench repetition time (ms)")
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="a candidate replaces the defaults only when this much faster (default 0.02)")
    p.add_argument("--max-candidates", type=int, default=11, help="per shape (default 11)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop starting candidates after S seconds (the rest: skipped rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--install", default=None, metavar="TABLE",
                   help="copy a run's tuned_<gpu>.json to softmax_gpu/tuned/<gpu>.json and exit "
                        "(refused for a CPU run or a table that fails validation)")
    p.add_argument("--install-dir", default=str(INSTALL_DIR), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.install:
        device = env.choose_device("auto")
        env.enable_interpreter_for_cpu(device)
        try:
            dest = install(args.install, args.install_dir)
        except InstallError as exc:
            print(f"perf.tune --install: refused: {exc}", file=sys.stderr)
            return 2
        print(f"installed {dest}: commit it (git add {os.path.relpath(dest, ROOT)})")
        return 0

    device = env.choose_device(args.device)
    warning = env.enable_interpreter_for_cpu(device)

    from perf import report
    from perf.sizes import parse_size

    try:
        spaces = [SPACES[o.strip()] for o in args.ops.split(",") if o.strip()]
        ns = tuple(parse_size(n) for n in args.n.split(",") if n.strip()) if args.n else None
    except (KeyError, ValueError) as exc:
        parser.error(f"--ops / --n: {exc} (ops: {', '.join(SPACES)})")
    on_cpu = device != "cuda"
    cfg = TuneConfig(device=device, spaces=spaces, ns=ns, m=args.m,
                     target_bytes=int(args.target_gib * (1 << 30)), seed=args.seed,
                     warmup_ms=args.warmup_ms, rep_ms=min(args.rep_ms, 20) if on_cpu else args.rep_ms,
                     min_gain=args.min_gain, max_candidates=args.max_candidates,
                     time_limit=args.time_limit,
                     copy_bytes=(16 << 20) if on_cpu else (1 << 30))
    info = env.run_info(device)
    out_dir = args.out or os.path.join("perf", "results", info.device_slug, info.date)
    os.makedirs(out_dir, exist_ok=True)
    print(f"perf.tune: {info.device_name} | torch {info.torch} | triton {info.triton} | "
          f"CUDA {info.cuda} | out {out_dir}", flush=True)
    if warning:
        print(report.banner(warning))
    if info.meaningless_timings:
        print(report.banner(report.CPU_WARNING))

    env.sigterm_interrupts()  # `timeout`: stop and write what was measured
    t0 = time.perf_counter()
    rows = run_tuning(cfg, info, log=lambda s: print(s, flush=True))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # writing the files is not cut short

    stem = report.output_stem(out_dir, info, "tune")
    run_suffix = stem[len(f"{info.device_slug}_{info.date}_tune"):]  # "" or "_runK"
    csv_path = os.path.join(out_dir, stem + ".csv")
    table_path = os.path.join(out_dir, f"tuned_{info.device_slug}{run_suffix}.json")
    report.write_csv(rows, csv_path, TUNE_COLUMNS)
    with open(table_path, "w") as f:
        json.dump(table_json(rows, info, os.path.basename(csv_path), cfg.min_gain), f, indent=1)
        f.write("\n")
    summary = summary_markdown(rows, info, os.path.basename(table_path))
    md_path = os.path.join(out_dir, stem + "_summary.md")
    with open(md_path, "w") as f:
        f.write(summary)
    pngs = [] if args.no_plots else plot(rows, out_dir, stem, info)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print()
    print(summary)
    print(f"wrote {csv_path}, {table_path}, {md_path} and {len(pngs)} plot(s) in "
          f"{time.perf_counter() - t0:.1f} s")
    if info.meaningless_timings:
        print(report.banner(report.CPU_WARNING + " This table can never be installed."))
    else:
        print(f"to use it: python -m perf.tune --install {table_path}")
    if "run interrupted" in rows[0]["note"]:
        return 130  # cut short (Ctrl-C or SIGTERM); the files hold what was measured
    bad = [r for r in rows if r["candidate"] == DEFAULT and r["status"] != "skipped"
           and (r["status"] == "error" or r["correct"] is False)]
    if bad:
        print(f"the default limits gave a wrong result or an error at {len(bad)} shape(s): "
              + ", ".join(f"{r['op']} {r['M']}x{r['N']}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
