"""Hardware counters of the hot kernels under Nsight Compute: ``python -m perf.profile``.

Explains a tuning run's numbers: for each hot shape, the plan a call gets
(``installed``: the library's tuned table for the GPU, if any), the
defaults' plan (``default``) and the plan the tuning run chose (``--table
tuned_<gpu>.json``), each distinct launch plan once, run under ``ncu
--clock-control none`` (the clocks as found: never locked), and every kernel
launch of those calls is recorded with

- DRAM bytes read and written (``dram__bytes_read.sum``, ``dram__bytes_write.sum``),
  beside the op's minimal bytes: their ratio says how often the logits were read;
- the L2 hit rate (``lts__t_sector_hit_rate.pct``): whether a second read hit L2;
- achieved occupancy (``sm__warps_active.avg.pct_of_peak_sustained_active``)
  and registers per thread (``launch__registers_per_thread``);
- the duration (``gpu__time_duration.sum``; under ncu's serialisation, so a
  guide, not the timing of record: the tuning run's do_bench is).

Values are read in base units (``--print-units base``: bytes, ns); a scaled
unit is converted, and an unknown one reads as NaN, never as a wrong number.

Two steps, so that ncu profiles only the cases, one ncu process per case
(most important first):

    python -m perf.profile --out DIR [--table tuned.json] [--time-budget-s S]  # runs ncu
    python -m perf.profile --cases --case I --manifest FILE [--table]          # what ncu runs

Writes ``<slug>_<date>_profile.csv`` (long format: one row per kernel launch:
case, plan, its launch plan, kernel, metric columns, the minimal bytes) in
``--out``, again after each case, so that a run stopped by its time limit
keeps the cases it finished; with ``--time-budget-s`` no case starts that
would end past it (judged by the last case's time). Without ncu or a GPU it
says so and exits 0 having written nothing: the profile is an explanation,
never a gate.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

METRICS = {
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "l2_hit_pct": "lts__t_sector_hit_rate.pct",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers": "launch__registers_per_thread",
    "duration_ns": "gpu__time_duration.sum",
}
# ncu's units (--print-units base asks for the first of each; a scaled one
# is converted): the factor to bytes, nanoseconds, percent, registers
UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
         "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30,
         "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
         "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "ns": 1, "us": 1e3, "\u00b5s": 1e3, "ms": 1e6, "s": 1e9,
         "%": 1, "pct": 1, "register/thread": 1, "register": 1, "": 1}
# (perf.ops name, tuned-table op, M, N): the hot shapes, bf16, most
# important first (each one is replayed by ncu pass by pass over GiB-sized
# buffers, in its own ncu process: a time limit keeps the first ones): the
# cross-entropy short and long rows and a vocabulary <= 32768, then the two
# kinds behind a peer on 2026-12-04 and the longest softmax rows
CASES = [
    ("ce_fwd_bwd", "cross_entropy", 131072, 4096),
    ("ce_fwd_bwd", "cross_entropy", 16384, 128256),
    ("ce_fwd_bwd", "cross_entropy", 16384, 32000),
    ("softmax_fwd_bwd", "softmax_backward", 16384, 32768),
    ("log_softmax_fwd", "log_softmax", 16384, 32768),
    ("softmax_fwd", "softmax", 2048, 262144),
]
COLUMNS = ["case", "op", "M", "N", "plan", "fields", "launch_plan", "launch", "kernel", *METRICS,
           "min_bytes", "dram_over_min", "call_dram_over_min", "device", "torch", "triton",
           "timestamp"]


def _tuned_fields(table: str | None, table_op: str, n: int) -> dict | None:
    """The fields the table chose for ``table_op`` at row length ``n`` (bf16), or None."""
    if not table or not os.path.exists(table):
        return None
    with open(table) as f:
        data = json.load(f)
    entries = sorted(data.get("ops", {}).get(table_op, {}).get("2", []),
                     key=lambda e: e.get("n", 0))
    best = entries[0] if entries else None  # as the heuristics: below every entry, the first
    for e in entries:
        if e.get("n", 0) <= n:
            best = e
    return dict(best["limits"]) if best and best.get("limits") else None


def _variants(table_op: str, M: int, N: int, table: str | None, device) -> list:
    """(name, fields, launch plan) of each distinct plan of a case:
    "installed", the plan a call gets (the library's tuned table for this GPU,
    if it has one; no override, which would bypass it); "default", the
    defaults (an override of no field reads no table); "tuned", the table
    this run's tuning step wrote."""
    from perf.tune import SPACES, _plan_text
    from softmax_gpu import heuristics

    out, seen = [], set()
    for name, fields in (("installed", None), ("default", {}),
                         ("tuned", _tuned_fields(table, table_op, N))):
        if name == "tuned" and not fields:
            continue
        with (heuristics.override(op=table_op, **fields) if fields is not None
              else contextlib.nullcontext()):
            plan = _plan_text(SPACES[table_op].plan(M, N, device))
        if plan not in seen:
            seen.add(plan)
            out.append((name, fields, plan))
    return out


def run_cases(manifest: str, table: str | None, cases=None) -> None:
    """Each case of ``cases`` (indices into ``CASES``; None: all) once per
    distinct plan (``_variants``); the kernels each call launched, in launch
    order, to ``manifest`` (CSV)."""
    import torch

    import softmax_gpu
    from softmax_gpu import heuristics
    from perf.ops import DTYPES, OPS
    from perf.providers import make_providers

    ours = make_providers(["softmax_gpu"])[0]
    rows = []
    for name, table_op, M, N in (CASES[i] for i in (cases or range(len(CASES)))):
        op = OPS[name]
        for plan, fields, launch_plan in _variants(table_op, M, N, table, torch.device("cuda")):
            inp = op.make_inputs(M, N, DTYPES["bf16"], "cuda", seed=0)
            over = (heuristics.override(op=table_op, **fields) if fields is not None
                    else contextlib.nullcontext())
            with over, softmax_gpu.record_launches() as names:
                call, _ = op.closure(ours.function(op.family), inp)
                call()
                torch.cuda.synchronize()
            for k in names:
                rows.append(dict(case=f"{name} {M}x{N}", op=name, M=M, N=N, plan=plan,
                                 fields=json.dumps(fields or {}, sort_keys=True),
                                 launch_plan=launch_plan, kernel=k,
                                 min_bytes=op.min_bytes(M, N, 2)))
            del inp
            torch.cuda.empty_cache()
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)


def _ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    import glob

    hits = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") +
                  glob.glob("/usr/local/cuda*/bin/ncu"))
    return hits[-1] if hits else None


def _number(text: str, unit: str = "") -> float:
    """ncu's value in base units (bytes, ns, %): NaN for an unknown unit."""
    factor = UNITS.get(str(unit).strip().lower())
    try:
        value = float(str(text).replace(",", ""))
    except ValueError:
        return float("nan")
    return value * factor if factor is not None else float("nan")


def merge(manifest: str, ncu_csv: str, info) -> list[dict]:
    """One row per profiled launch: the manifest's case and plan beside ncu's
    metrics (ncu's raw CSV: one line per (launch, metric))."""
    with open(manifest, newline="") as f:
        cases = list(csv.DictReader(f))
    with open(ncu_csv, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints banners before the CSV
    launches: dict[int, dict] = {}
    for r in csv.DictReader(lines):
        i = int(r["ID"])
        entry = launches.setdefault(i, {"kernel": r.get("Kernel Name", "")})
        for col, metric in METRICS.items():
            if r.get("Metric Name") == metric:
                entry[col] = _number(r.get("Metric Value", ""), r.get("Metric Unit", ""))
    out = []
    for i, case in enumerate(cases):
        got = launches.get(i, {})
        row = dict(case, launch=i, device=info.device_name, torch=info.torch,
                   triton=info.triton, timestamp=info.timestamp)
        for col in METRICS:
            row[col] = got.get(col, float("nan"))
        if got.get("kernel") and not got["kernel"].startswith(case["kernel"][:20]):
            row["kernel"] = f"{case['kernel']} (ncu: {got['kernel']})"  # order mismatch: say so
        moved = row["dram_read_bytes"] + row["dram_write_bytes"]
        row["dram_over_min"] = moved / float(case["min_bytes"]) if float(case["min_bytes"]) else ""
        out.append(row)
    # the whole call's DRAM traffic over its minimal bytes: the sum over its
    # launches (an op of two kernels shows 0.5 and 0.6 per launch, 1.1 here)
    total: dict = {}
    for row in out:
        key = (row["case"], row["plan"])
        if isinstance(row["dram_over_min"], float):
            total[key] = total.get(key, 0.0) + row["dram_over_min"]
    for row in out:
        row["call_dram_over_min"] = total.get((row["case"], row["plan"]), "")
    return out


def _table(rows: list[dict]) -> None:
    print("| case | plan | kernel | DRAM bytes / minimal | L2 hit % | occupancy % | registers "
          "| µs (under ncu) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["dram_over_min"]
        print(f"| {r['case']} | {r['plan']} | {r['kernel']} | "
              f"{'' if ratio == '' else format(ratio, '.2f')} | {r['l2_hit_pct']:.1f} | "
              f"{r['occupancy_pct']:.1f} | {r['registers']:.0f} | {r['duration_ns'] / 1e3:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder of the profile CSV")
    p.add_argument("--table", default=None, help="tuned table of the run (tuned_<gpu>.json)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no case that would end past this many seconds")
    p.add_argument("--cases", action="store_true", help="(internal) run the cases once each")
    p.add_argument("--case", type=int, action="append", default=None,
                   help="(internal) with --cases: this index of CASES only (repeatable)")
    p.add_argument("--manifest", default=None, help="(internal) where --cases writes the launches")
    args = p.parse_args(argv)
    if args.cases:
        run_cases(args.manifest, args.table, args.case)
        return 0
    import torch

    from perf import env
    from perf.report import output_stem, write_csv

    ncu = _ncu()
    if not torch.cuda.is_available() or ncu is None:
        print("perf.profile: no GPU or no ncu here: nothing profiled")
        return 0
    os.makedirs(args.out, exist_ok=True)
    info = env.run_info("cuda")
    # the per-case files outside --out: a case killed by the step's time
    # limit leaves nothing there but the CSV of the cases before it
    scratch = tempfile.mkdtemp(prefix="perf_profile_")
    manifest = os.path.join(scratch, "manifest.csv")
    raw = os.path.join(scratch, "ncu_raw.csv")
    path = os.path.join(args.out, output_stem(args.out, info, "profile") + ".csv")
    start, last, rows, rc = time.monotonic(), 0.0, [], 0
    for i, (name, _, M, N) in enumerate(CASES):
        if args.time_budget_s is not None and time.monotonic() - start + last > args.time_budget_s:
            print(f"perf.profile: time budget: {len(CASES) - i} cases left unprofiled, "
                  f"from {name} {M}x{N}", flush=True)
            break
        t0 = time.monotonic()
        cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--csv",
               "--print-units", "base",
               "--kernel-name", "regex:^(ce_|softmax_|vp_)",
               "--metrics", ",".join(METRICS.values()), "--log-file", raw,
               sys.executable, "-m", "perf.profile", "--cases", "--case", str(i),
               "--manifest", manifest]
        if args.table:
            cmd += ["--table", args.table]
        print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not os.path.exists(manifest) or not os.path.exists(raw):
            # a fault is the case's own process: the next case still runs
            print(f"perf.profile: {name} {M}x{N}: ncu exited with {proc.returncode}",
                  file=sys.stderr, flush=True)
            rc = rc or proc.returncode or 1
        else:
            got = merge(manifest, raw, info)
            rows += got
            write_csv([dict(r, device=info.device_name) for r in rows], path, COLUMNS)
            _table(got)
        for name_ in (manifest, raw):
            if os.path.exists(name_):
                os.remove(name_)
        last = time.monotonic() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    if rows:
        print(f"wrote {path}")
    return 0 if rows else rc


if __name__ == "__main__":
    sys.exit(main())
