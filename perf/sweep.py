"""The sweep: every (op, dtype, shape) case for every provider, as CSV rows.

For each case and provider, in this order:

1. the provider's function for the op's family (or a ``not_implemented`` row);
2. one call on fresh seeded inputs (this is also the compile / JIT warm-up);
3. its outputs against torch in float32 on a fresh copy of the same inputs
   (``max_rel_err``, the cross-entropy's ``off_target_rel_err``, ``correct``:
   ``perf.ops.verdict``): a provider that writes into its inputs
   cannot fool the check, and a wrong provider is flagged, not silently timed:
   its row's status is ``wrong``, with its time but no GB/s, fraction or
   speedup (a timing floor, which computes no loss, is left unchecked:
   ``correct`` empty);
4. peak extra memory of one more call (a warm-up call as well);
5. the timing (do_bench on CUDA; the op's own ``bench``: for the linear op a
   fixed number of calls after untimed warm-ups, see ``timing.bench_calls``).

Each error the op reports goes into its own column (the linear op: loss, dX
and dW against float64). With ``time_budget_s``, runs not started when it is
spent are recorded as skipped, with the reason.

Any exception becomes an ``error`` row with the message; the sweep goes on.
A provider that cannot run here gives ``skipped`` rows with the reason.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from typing import Callable

import torch

from perf import timing
from perf.env import RunInfo
from perf.ops import OpSpec, dtype_name, verdict, wrong_note
from perf.providers import NotImplementedForOp, Provider, ProviderContext
from perf.sizes import TARGET_INPUT_BYTES, Shape, shapes_for

__all__ = ["COLUMNS", "SweepConfig", "run_sweep", "run_case", "fill_speedups", "fill_floor_ratios",
           "case_key",
           "STATUS", "INTERRUPTED", "FLOOR"]

# The CSV's columns, in order. The required ones, then the rest.
COLUMNS = [
    "op", "provider", "dtype", "M", "N", "ms", "ms_p20", "ms_p80", "gbps", "frac_copy_bw",
    "speedup_vs_torch", "peak_mem_bytes", "device", "torch", "triton", "cuda", "timestamp",
    "status", "correct", "max_rel_err", "note", "bytes", "copy_gbps", "shape_kind",
    "D", "vs_floor", "loss_rel_err", "dx_rel_err", "dw_rel_err", "off_target_rel_err",
    "dw_off_target_rel_err", "rounding_err", "off_target_rounding_err",
]

STATUS = ("ok", "wrong", "skipped", "not_implemented", "error")

BASELINE = "torch"  # speedup_vs_torch is measured against this provider
FLOOR = "gemm_floor"  # vs_floor = ms / this provider's ms (ops with a GEMM floor)
INTERRUPTED = "RUN INTERRUPTED"  # marks the copy row's note of a cut-short run


@dataclasses.dataclass
class SweepConfig:
    """What to run. ``unavailable`` forces providers to be skipped (name -> reason)."""

    device: str
    ops: list[OpSpec]
    providers: list[Provider]
    dtypes: list[torch.dtype]
    quick: bool = False
    shape_set: str = "all"
    ns: tuple[int, ...] | None = None
    m: int | None = None
    target_bytes: int = TARGET_INPUT_BYTES
    seed: int = 0
    warmup_ms: float = 25
    rep_ms: float = 100
    copy_bytes: int = 1 << 30
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    time_budget_s: float | None = None  # runs not started by then are recorded as skipped

    def shapes(self, dtype: torch.dtype, op: OpSpec | None = None) -> list[Shape]:
        """The shapes of ``op`` (default: the [M, N] grid / LLM sets) for ``dtype``."""
        elem = torch.empty((), dtype=dtype).element_size()
        kwargs = dict(device=self.device, quick=self.quick, which=self.shape_set, ns=self.ns,
                      m=self.m, target_bytes=self.target_bytes)
        if op is None:
            return shapes_for(elem, **kwargs)
        return op.shapes(elem, **kwargs)

    def cases(self) -> list[tuple[OpSpec, torch.dtype, Shape]]:
        return [(op, dt, sh) for dt in self.dtypes for op in self.ops for sh in self.shapes(dt, op)]


def _base_row(info: RunInfo, op: str, provider: str, dtype: str, M: int, N: int, kind: str) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(op=op, provider=provider, dtype=dtype, M=M, N=N, shape_kind=kind,
               device=info.device_name, torch=info.torch, triton=info.triton, cuda=info.cuda,
               timestamp=info.timestamp)
    for c in ("ms", "ms_p20", "ms_p80", "gbps", "frac_copy_bw", "speedup_vs_torch",
              "peak_mem_bytes", "max_rel_err", "vs_floor", "loss_rel_err", "dx_rel_err",
              "dw_rel_err", "off_target_rel_err", "dw_off_target_rel_err", "rounding_err",
              "off_target_rounding_err"):
        row[c] = math.nan
    return row


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_case(cfg: SweepConfig, info: RunInfo, op: OpSpec, provider: Provider, dtype: torch.dtype,
             shape: Shape, seed: int, copy_gbps: float) -> dict:
    """One row: run, check and time ``provider`` on one case."""
    M, N = shape.M, shape.N
    row = _base_row(info, op.name, provider.name, dtype_name(dtype), M, N, shape.kind)
    row["D"] = shape.D or ""
    elem = torch.empty((), dtype=dtype).element_size()
    row["bytes"] = op.shape_bytes(shape, elem)
    row["copy_gbps"] = copy_gbps
    note = ""
    try:
        note = provider.case_note(op.family, M, N, cfg.device)
        provider.prepare_case()
        fn = provider.function(op.family)
    except NotImplementedForOp as exc:
        row.update(status="not_implemented", note=_join(str(exc), note))
        return row
    except Exception as exc:
        row.update(status="error", note=_join(f"{type(exc).__name__}: {exc}"[:400], note))
        return row
    try:
        row.update(_measure(cfg, op, fn, dtype, shape, seed))
    except Exception as exc:  # OOM, a cuDNN status, a provider's own failure...
        row.update(status="error", note=_join(f"{type(exc).__name__}: {exc}"[:400], note))
    if row["status"] == "error":
        _free_memory(cfg.device)  # after the except block: the failed frame is gone
        return row
    if row["correct"] is False:  # timed, but never reported as a speed
        row["status"], row["note"] = "wrong", _join(wrong_note(row, dtype), note)
        return row
    row["status"], row["note"] = "ok", note
    row["gbps"] = timing.gbps(row["bytes"], row["ms"])
    row["frac_copy_bw"] = timing.fraction(row["gbps"], copy_gbps)
    return row


def _measure(cfg: SweepConfig, op: OpSpec, fn: Callable, dtype: torch.dtype, shape: Shape,
             seed: int) -> dict:
    """Steps 2-5 of the module docstring; the tensors die with this frame."""
    inputs = op.shape_inputs(shape, dtype, cfg.device, seed)
    outputs = op.run_once(fn, inputs)
    del inputs  # the provider may have written into them
    inputs = op.shape_inputs(shape, dtype, cfg.device, seed)
    errors = op.errors(outputs, inputs)
    del outputs
    call, grads = op.closure(fn, inputs)
    peak = timing.peak_extra_memory(call, cfg.device)  # also a warm-up call
    ms, p20, p80 = op.bench(call, cfg.device, grads, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    correct = verdict(errors, dtype)  # "": not checked
    return {**errors, "correct": correct, "peak_mem_bytes": peak,
            "ms": ms, "ms_p20": p20, "ms_p80": p80}


def case_key(r: dict) -> tuple:
    """What makes rows the same case: op, dtype, M, N and D (the linear ops'
    hidden size, "" elsewhere), as this run's rows or a CSV read back give it."""
    d = r.get("D", "")
    if isinstance(d, float):
        d = "" if math.isnan(d) else int(d)
    elif isinstance(d, str) and d:
        d = int(float(d))
    return (r["op"], r["dtype"], r["M"], r["N"], d)


def fill_speedups(rows: list[dict], baseline: str = BASELINE) -> None:
    """``speedup_vs_torch`` = baseline ms / ms for rows of the same case."""
    base = {case_key(r): r["ms"]
            for r in rows if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_torch"] = timing.speedup(base.get(case_key(r), math.nan), r["ms"])


def fill_floor_ratios(rows: list[dict], floor: str = FLOOR) -> None:
    """``vs_floor`` = ms / the floor provider's ms for rows of the same case
    (ops that have a floor row: the GEMM-bound linear ops)."""
    base = {case_key(r): r["ms"]
            for r in rows if r["provider"] == floor and r["status"] == "ok"}
    for r in rows:
        key = case_key(r)
        if r["status"] == "ok" and key in base:
            r["vs_floor"] = timing.speedup(r["ms"], base[key])


class _PlainProgress:
    """Progress for logs (no terminal, or no tqdm): one line per finished case."""

    def __init__(self, total: int, per_case: int, disable: bool = False):
        self.total, self.per_case, self.n, self.disable, self.desc = total, max(1, per_case), 0, disable, ""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.disable and self.n % self.per_case == 0:
            case = " ".join(self.desc.split()[:3])
            print(f"[{self.n // self.per_case}/{self.total // self.per_case}] {case}",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, per_case: int, disable: bool):
    """tqdm on a terminal; plain lines in logs or without tqdm."""
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, disable=disable, unit="run", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    return _PlainProgress(total, per_case, disable)


def run_sweep(cfg: SweepConfig, info: RunInfo, *, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run everything; returns the rows (the copy roofline first).

    A KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the command
    line) stops the sweep early: the rows measured so far are returned and the
    copy row's note says the run was interrupted.
    """
    ctx = ProviderContext(device=cfg.device, quick=cfg.quick)
    reasons: dict[str, str | None] = {}
    for p in cfg.providers:
        reasons[p.name] = cfg.unavailable.get(p.name) or p.availability(ctx)
        if reasons[p.name]:
            log(f"  skip {p.name}: {reasons[p.name]}")

    copy_gbps, copy_ms, (cr, cc) = timing.measure_copy(cfg.device, cfg.copy_bytes,
                                                       warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    log(f"  copy roofline: {copy_gbps:.1f} GB/s ({2 * cr * cc * 4 / 2**30:.2f} GiB read+written "
        f"in {copy_ms:.3f} ms)")
    copy_row = _base_row(info, "copy", BASELINE, "fp32", cr, cc, "roofline")
    copy_row.update(ms=copy_ms, ms_p20=math.nan, ms_p80=math.nan, bytes=2 * cr * cc * 4,
                    gbps=copy_gbps, frac_copy_bw=1.0, copy_gbps=copy_gbps, status="ok",
                    note="device-to-device copy: bytes read + written")
    rows = [copy_row]

    cases = cfg.cases()
    total = len(cases) * len(cfg.providers)
    bar = _progress(total, len(cfg.providers), disable=not progress)
    started = time.perf_counter()
    lost = None  # why the device became unusable (every later run is skipped)
    try:
        for index, (op, dtype, shape) in enumerate(cases):
            seed = cfg.seed * 1_000_003 + index  # the same inputs for every provider of a case
            for p in cfg.providers:
                bar.set_description(f"{op.name} {dtype_name(dtype)} {shape.M}x{shape.N} {p.name}")
                over = (cfg.time_budget_s is not None
                        and time.perf_counter() - started > cfg.time_budget_s)
                if reasons[p.name] or over or lost:
                    row = _base_row(info, op.name, p.name, dtype_name(dtype), shape.M, shape.N, shape.kind)
                    row["D"] = shape.D or ""
                    row.update(status="skipped", note=reasons[p.name] or lost or
                               f"time budget of {cfg.time_budget_s:g} s spent before this run")
                else:
                    row = run_case(cfg, info, op, p, dtype, shape, seed, copy_gbps)
                    if row["status"] == "error":
                        bar.write(f"  ERROR {p.name} {op.name} {row['dtype']} {shape.M}x{shape.N}: {row['note']}")
                        lost = timing.device_lost(cfg.device)
                        if lost:
                            copy_row["note"] = _join(copy_row["note"], f"RUN CUT SHORT: {lost}")
                            bar.write(f"  {lost}: every later run is skipped")
                    elif row["correct"] is False:
                        bar.write(f"  {p.name} {op.name} {row['dtype']} {shape.M}x{shape.N}: "
                                  f"{wrong_note(row, dtype)}")
                rows.append(row)
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `timeout` (see perf.cli)
        done = len(rows) - 1
        copy_row["note"] = _join(copy_row["note"], f"{INTERRUPTED} after {done} of {total} runs")
        log(f"  {INTERRUPTED} after {done} of {total} runs: writing what was measured")
    finally:
        bar.close()
    fill_speedups(rows)
    fill_floor_ratios(rows)
    return rows
