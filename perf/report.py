"""Outputs of a run: the long-format CSV, one PNG per op and dtype, and the
markdown summary. One run is one device, so a file never mixes devices.

File names share one stem, ``<device-slug>_<YYYY-MM-DD>`` (plus ``_<tag>``
with ``--tag``; ``_run2``, ``_run3``... when an earlier run of the same day is
already in the folder):

- ``<stem>.csv``
- ``<stem>_<op>_<dtype>.png``
- ``<stem>_summary.md``
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict

from perf.env import RunInfo
from perf.ops import DTYPES, LCE_REF_CLASSES, LCE_REF_ROWS, OFF_TARGET_TOLERANCE, TOLERANCE
from perf.sizes import lce_model, size_label
from perf.sweep import BASELINE, COLUMNS, INTERRUPTED, case_key

__all__ = ["output_stem", "write_csv", "read_csv", "plot_all", "save_plot", "summary_markdown",
           "banner", "CPU_WARNING", "implausible", "previous_run", "IMPLAUSIBLE_FRACTION",
           "IMPLAUSIBLE_RATIO"]

CPU_WARNING = ("NO GPU: these timings are MEANINGLESS. Our kernels ran in Triton's interpreter on "
               "CPU and torch ran on CPU, at toy sizes; this run only proves the harness works.")


def output_stem(out_dir: str, info: RunInfo, tag: str = "") -> str:
    """``<slug>_<date>[_<tag>]``, or ``..._runK`` if that CSV already exists in ``out_dir``."""
    stem = f"{info.device_slug}_{info.date}" + (f"_{tag}" if tag else "")
    k = 1
    candidate = stem
    while os.path.exists(os.path.join(out_dir, candidate + ".csv")):
        k += 1
        candidate = f"{stem}_run{k}"
    return candidate


# A memory-bound result below this fraction of the copy bandwidth, or a time
# more than this factor away from the same provider's in the previous run of
# the same kind on the same GPU, is flagged in the summary: a measurement to
# explain before it is believed (a harness fault looks like this).
IMPLAUSIBLE_FRACTION = 0.05
IMPLAUSIBLE_RATIO = 3.0


def _run_kind(name: str, slug: str) -> tuple[str, str] | None:
    """(date, tag) of a run CSV named ``<slug>_<date>[_<tag>][_runK].csv``, or None."""
    m = re.fullmatch(re.escape(slug) + r"_(\d{4}-\d{2}-\d{2})(.*?)(?:_run\d+)?\.csv", name)
    if not m or (m.group(2) and not m.group(2).startswith("_")):
        return None
    return m.group(1), m.group(2)[1:]


def previous_run(results_dir: str, slug: str, tag: str = "", exclude: str | None = None
                 ) -> tuple[str, list[dict]] | None:
    """The newest earlier run of this kind (same GPU slug and ``tag``) under
    ``results_dir/<slug>/*/``: (its path, its rows), or None. ``exclude``: the
    file just written."""
    import glob

    found = []
    for path in glob.glob(os.path.join(results_dir, slug, "*", f"{slug}_*.csv")):
        if exclude and os.path.abspath(path) == os.path.abspath(exclude):
            continue
        name = os.path.basename(path)
        kind = _run_kind(name, slug)
        if kind is not None and kind[1] == tag:
            run = re.search(r"_run(\d+)\.csv$", name)
            found.append((kind[0], int(run.group(1)) if run else 1, os.path.getmtime(path), path))
    if not found:
        return None
    path = max(found)[-1]
    rows = read_csv(path)
    for r in rows:
        for k in ("M", "N"):
            r[k] = int(r[k]) if str(r.get(k, "")).isdigit() else r.get(k)
        try:
            r["ms"] = float(r["ms"])
        except (TypeError, ValueError):
            r["ms"] = math.nan
    return path, rows


def _flag_key(r: dict) -> tuple:
    """(op, provider, dtype, M, N, D) of a row, this run's or a previous CSV's
    (heads of one vocabulary and token count differ by D)."""
    op, *rest = case_key(r)
    return (op, r["provider"], *rest)


def implausible(rows: list[dict], previous: tuple[str, list[dict]] | None = None
                ) -> dict[tuple, str]:
    """{(op, provider, dtype, M, N, D): why} for the results that look wrong as
    measurements: a memory-bound row under IMPLAUSIBLE_FRACTION of the copy
    bandwidth, or a time more than IMPLAUSIBLE_RATIO away (either way) from
    the same case's in ``previous`` (:func:`previous_run`)."""
    prev = {}
    if previous is not None:
        prev = {_flag_key(r): r["ms"]
                for r in previous[1] if r.get("status") == "ok" and math.isfinite(r["ms"])}
    out = {}
    for r in rows:
        if r["op"] == "copy" or r["status"] != "ok":
            continue
        key = _flag_key(r)
        why = []
        bound = isinstance(r.get("vs_floor"), float) and math.isfinite(r["vs_floor"])
        if not bound and r["frac_copy_bw"] < IMPLAUSIBLE_FRACTION:
            why.append(f"{100 * r['frac_copy_bw']:.1f}% of the copy bandwidth")
        before = prev.get(key)
        if before and math.isfinite(r["ms"]) and before > 0:
            ratio = r["ms"] / before
            if ratio > IMPLAUSIBLE_RATIO or ratio < 1 / IMPLAUSIBLE_RATIO:
                why.append(f"{ratio:.2g}x its time in {os.path.basename(previous[0])} "
                           f"({before:.4g} ms)")
        if why:
            out[key] = "; ".join(why)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(rows: list[dict], path: str, columns: list[str] = COLUMNS) -> None:
    """Long format, one row per (op, provider, dtype, M, N), columns :data:`COLUMNS`
    (or ``columns``)."""
    devices = {r["device"] for r in rows}
    if len(devices) > 1:
        raise ValueError(f"refusing to mix devices in one file: {sorted(devices)}")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def read_csv(path: str) -> list[dict]:
    """Rows back as strings (for tests and later reports)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _provider_order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["op"] != "copy" and r["provider"] not in seen:
            seen.append(r["provider"])
    return seen


def _cases(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(op, dtype) -> rows, in first-seen order."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["op"] != "copy":
            out[(r["op"], r["dtype"])].append(r)
    return out


def _copy_gbps(rows: list[dict]) -> float:
    for r in rows:
        if r["op"] == "copy":
            return float(r["gbps"])
    return math.nan


def _has_floor(case_rows: list[dict]) -> bool:
    """The rows of a GEMM-bound op, judged by ``vs_floor`` rather than GB/s."""
    return any(isinstance(r.get("vs_floor"), float) and math.isfinite(r["vs_floor"])
               for r in case_rows)


def plot_all(rows: list[dict], out_dir: str, stem: str, info: RunInfo) -> list[str]:
    """One PNG per (op, dtype): GB/s against N per provider, log-x, with the
    copy bandwidth as a horizontal line (GEMM-bound ops: time over the GEMM
    floor, with the floor at 1). Returns the paths written ([] without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[perf]')")
        return []
    copy = _copy_gbps(rows)
    providers = _provider_order(rows)
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    paths = []
    for (op, dtype), case_rows in _cases(rows).items():
        fig, ax = plt.subplots(figsize=(9, 5.5))
        ns: set[int] = set()
        metric = "vs_floor" if _has_floor(case_rows) else "gbps"
        for p in providers:
            mine = [r for r in case_rows if r["provider"] == p]
            ok = sorted((r for r in mine if r["status"] == "ok" and math.isfinite(r[metric])),
                        key=lambda r: r["N"])
            if not ok:
                statuses = sorted({r["status"] for r in mine}) or ["not run"]
                ax.plot([], [], " ", label=f"{p}: {', '.join(statuses)}")
                continue
            ns.update(r["N"] for r in ok)
            line = [r for r in ok if r["shape_kind"] != "llm"]
            llm = [r for r in ok if r["shape_kind"] == "llm"]
            if line:
                ax.plot([r["N"] for r in line], [r[metric] for r in line], marker="o", color=colors[p],
                        label=p)
            if llm:
                ms = sorted({r["M"] for r in llm})
                ax.scatter([r["N"] for r in llm], [r[metric] for r in llm], marker="D",
                           facecolors="none", edgecolors=[colors[p]], s=60,
                           label=f"{p} (LLM shapes, M={'/'.join(map(str, ms))})" if not line else None)
            wrong = sorted({r["N"] for r in mine if r["status"] == "wrong"})
            if wrong:  # no speed to draw: named in the legend
                ax.plot([], [], "x", color="red",
                        label=f"{p}: WRONG result at N={', '.join(map(str, wrong))}")
        if not ns:  # nothing measured (a run cut short): no plot, not a crash
            plt.close(fig)
            continue
        if metric == "vs_floor":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="three-GEMM floor")
        elif math.isfinite(copy):
            ax.axhline(copy, color="black", linestyle="--", linewidth=1.2,
                       label=f"device copy {copy:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        llm_ns = sorted({r["N"] for r in case_rows if r["shape_kind"] == "llm"} & ns)
        grid_ns = sorted(ns - set(llm_ns))
        bottom = grid_ns or llm_ns
        if bottom:
            ax.set_xticks(bottom)
            ax.set_xticklabels([size_label(n) for n in bottom], rotation=45)
        if grid_ns and llm_ns:  # LLM vocabularies on the top axis: no clash with the grid labels
            top = ax.secondary_xaxis("top")
            top.set_xticks(llm_ns)
            top.set_xticklabels([str(n) for n in llm_ns], rotation=45, fontsize=7, ha="left")
            top.set_xlabel("LLM shapes (hollow diamonds): vocabulary, 16k tokens", fontsize=8)
        ax.set_xlabel("N (row length; vocabulary for linear ops)")
        ax.set_ylabel("time / three-GEMM floor" if metric == "vs_floor"
                      else "GB/s (minimal bytes / median time)")
        ax.set_ylim(bottom=0)
        path = os.path.join(out_dir, f"{stem}_{op}_{dtype}.png")
        paths.append(save_plot(fig, ax, f"{op}  {dtype}", info, path))
    return paths


def save_plot(fig, ax, what: str, info: RunInfo, path: str) -> str:
    """Title (``what`` on the device, versions, date; MEANINGLESS in red for
    a CPU run), grid and legend, then write ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    title = f"{what}  on {info.device_name}\ntorch {info.torch}, triton {info.triton}, {info.date}"
    if info.meaningless_timings:
        title += "\nNO GPU: TIMINGS MEANINGLESS"
    fig.suptitle(title, fontsize=10, color="red" if info.meaningless_timings else "black")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def banner(text: str) -> str:
    """``text`` framed in exclamation marks, for warnings a reader must not miss."""
    bar = "!" * min(100, len(text) + 8)
    return f"{bar}\n!!! {text} !!!\n{bar}"


def _gb(value: float) -> str:
    """GB/s for a table: whole numbers on a GPU, three digits for CPU toys."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cell(r: dict | None, flagged: bool = False) -> str:
    if r is None:
        return "—"
    s = r["status"]
    if s == "skipped":
        return "skip"
    if s == "not_implemented":
        return "n/i"
    if s == "error":
        return "ERROR"
    if s == "wrong":  # timed, but not a speed
        return "**WRONG**"
    if isinstance(r.get("vs_floor"), float) and math.isfinite(r["vs_floor"]):
        text = f"{r['ms']:.3g} ms ({r['vs_floor']:.2f}x floor"
        peak = r.get("peak_mem_bytes")
        if isinstance(peak, float) and math.isfinite(peak):
            text += f", {peak / 2**30:.2f} GiB"
        errs = [f"{k} {r[c]:.1e}" for k, c in (("dX", "dx_rel_err"), ("dW", "dw_rel_err"),
                                               ("dW off target", "dw_off_target_rel_err"))
                if isinstance(r.get(c), float) and not math.isnan(r[c])]
        if errs:
            text += "; " + ", ".join(errs)
        text += ")"
    else:
        text = f"{_gb(r['gbps'])} ({100 * r['frac_copy_bw']:.0f}%)"
    if r["correct"] is False:
        text = f"**WRONG** {text}"
    if flagged:
        text = f"**IMPLAUSIBLE** {text}"
    return text


def _short_reason(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_markdown(rows: list[dict], info: RunInfo, ours: str = "softmax_gpu",
                     previous: tuple[str, list[dict]] | None = None) -> str:
    """The run as markdown: one table per op (GB/s and % of copy per provider);
    results that look implausible (:func:`implausible`, GPU runs only;
    ``previous``: the earlier run to compare with) are marked and listed."""
    flags = {} if info.meaningless_timings else implausible(rows, previous)
    lines: list[str] = [f"# softmax-gpu perf: {info.device_name}, {info.date}", ""]
    if info.meaningless_timings:
        lines += [f"> **{CPU_WARNING}**", ""]
    copy = _copy_gbps(rows)
    cut = [r["note"] for r in rows if r["op"] == "copy" and INTERRUPTED in r["note"]]
    if cut:
        lines += [f"> **{cut[0].split('; ')[-1]}: the tables below are partial.**", ""]
    lines += [
        f"- device: {info.device_name}; torch {info.torch}; triton {info.triton}; "
        f"CUDA {info.cuda}; run {info.timestamp}",
        f"- roofline: device-to-device copy, **{_gb(copy)} GB/s** (bytes read + written)",
        "- cells: GB/s of the minimal bytes (% of copy bandwidth); for GEMM-bound ops, median ms "
        "(time over the three-GEMM floor, peak extra memory); `n/i` not implemented, "
        "`skip` provider unavailable, `ERROR` see notes, **WRONG** failed the check against torch",
        "",
    ]
    providers = _provider_order(rows)
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["op"] != "copy":
            by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        lines += [f"## {op}", ""]
        hidden = sorted({r["D"] for r in op_rows if r.get("D")})
        if hidden:
            lines += [f"Hidden size D = {', '.join(map(str, hidden))}; N is the vocabulary. "
                      "Cells: median ms (time over the three GEMMs alone, peak memory beyond "
                      "the inputs including the returned dX and dW; relative errors of dX "
                      "and dW against float64).", ""]
        header = ["dtype", "M", "N"] + (["D"] if hidden else []) + providers + \
            [f"{ours} vs {BASELINE}"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        keys: list[tuple] = []
        for r in op_rows:
            k = (r["dtype"], r["M"], r["N"], r.get("D", ""))
            if k not in keys:
                keys.append(k)
        for k in keys:
            cells = {r["provider"]: r for r in op_rows
                     if (r["dtype"], r["M"], r["N"], r.get("D", "")) == k}
            mine = cells.get(ours)
            sp = mine["speedup_vs_torch"] if mine and mine["status"] == "ok" else math.nan
            row = [k[0], str(k[1]), str(k[2])]
            if hidden:
                model = lce_model(k[2], k[3]) if k[3] != "" else ""
                row.append(f"{k[3]} ({model})" if model else str(k[3]))
            row += [_cell(c, c is not None and _flag_key(c) in flags)
                    for c in map(cells.get, providers)]
            row.append("—" if not math.isfinite(sp) else f"{sp:.2f}x")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if flags:
        lines += ["## Implausible results", "",
                  "Measurements to explain before they are believed (under "
                  f"{100 * IMPLAUSIBLE_FRACTION:.0f}% of copy, or over {IMPLAUSIBLE_RATIO:g}x "
                  "away from the previous run):", ""]
        lines += [f"- `{p}` {op} {dt} {M}x{N}{f' (D {D})' if D != '' else ''}: {why}"
                  for (op, p, dt, M, N, D), why in flags.items()]
        lines.append("")
    lines += _goal_section(rows, info, ours)
    lines += _linear_goal_section(rows, info, ours)
    lines += _notes_section(rows)
    return "\n".join(lines).rstrip() + "\n"


def _goal_section(rows: list[dict], info: RunInfo, ours: str) -> list[str]:
    """Issue 4's goal, read off the rows: our bf16 softmax_fwd at N >= 4096
    at >= 90% of copy and ahead of every other provider."""
    if info.meaningless_timings:
        return []
    mine = [r for r in rows if r["op"] == "softmax_fwd" and r["dtype"] == "bf16" and r["N"] >= 4096
            and r["provider"] == ours and r["status"] == "ok"]
    if not mine:
        return []
    out = ["## Goal: bf16 softmax_fwd, N >= 4096: >= 90% of copy and ahead of every provider", ""]
    for r in sorted(mine, key=lambda r: r["N"]):
        others = [o for o in rows if o["op"] == r["op"] and o["dtype"] == r["dtype"] and o["M"] == r["M"]
                  and o["N"] == r["N"] and o["provider"] != ours and o["status"] == "ok"
                  and o["correct"] is not False]
        best = min(others, key=lambda o: o["ms"], default=None)
        ahead = best is None or r["ms"] < best["ms"]
        frac_ok = r["frac_copy_bw"] >= 0.9
        verdict = "met" if (frac_ok and ahead and r["correct"] is not False) else "MISSED"
        vs = (f"{best['ms'] / r['ms']:.2f}x the speed of the best other ({best['provider']})"
              if best else "no other provider")
        out.append(f"- N={r['N']} (M={r['M']}): {100 * r['frac_copy_bw']:.1f}% of copy, {vs}: **{verdict}**")
    return out + [""]


def _linear_goal_section(rows: list[dict], info: RunInfo, ours: str) -> list[str]:
    """The fused linear cross-entropy's goal, read off the rows: bf16, within
    1.03x the three-GEMM floor of the same run, at a peak of at most
    dW + dX + 0.25 GiB (1.25 / 1.35 GiB for Llama-3-8B at 4096 / 16384
    tokens), and a dW error no worse than Liger's, on the whole and off the
    targets."""
    if info.meaningless_timings:
        return []
    mine = [r for r in rows if r["op"] == "linear_ce_fwd_bwd" and r["dtype"] == "bf16"
            and r["provider"] == ours and r["status"] == "ok"]
    if not mine:
        return []
    out = ["## Goal: linear_ce_fwd_bwd bf16: <= 1.03x the floor, peak <= dW + dX + 0.25 GiB, "
           "dW error <= Liger's (whole and off the targets)", ""]
    for r in mine:
        D = int(r["D"]) if r.get("D") not in ("", None) else 0
        budget = 2 * (r["N"] + r["M"]) * D + (1 << 28)
        peak = r.get("peak_mem_bytes", math.nan)
        liger = next((o for o in rows if o["provider"] == "liger" and o["status"] == "ok"
                      and (o["op"], o["dtype"], o["M"], o["N"], o.get("D")) ==
                      (r["op"], r["dtype"], r["M"], r["N"], r.get("D"))), None)
        time_ok = math.isfinite(r["vs_floor"]) and r["vs_floor"] <= 1.03
        mem_ok = math.isfinite(peak) and peak <= budget
        # dW's error on the whole and on the rows no token targets (the
        # softmax part alone, which the targeted rows' -x hide in the whole)
        errs = ("dw_rel_err", "dw_off_target_rel_err")
        err_ok = liger is None or not any(r.get(c, math.nan) > liger.get(c, math.nan)
                                          for c in errs)
        verdict = "met" if time_ok and mem_ok and err_ok and r["correct"] is not False else \
            "MISSED"
        vs = (f"dW error {r['dw_rel_err']:.2e} vs Liger's {liger['dw_rel_err']:.2e}, off "
              f"target {r.get('dw_off_target_rel_err', math.nan):.2e} vs "
              f"{liger.get('dw_off_target_rel_err', math.nan):.2e}" if liger else "no Liger row")
        model = lce_model(r["N"], D)
        out.append(f"- {r['M']} x {D} x {r['N']}{f' ({model})' if model else ''}: "
                   f"{r['vs_floor']:.3f}x the floor, peak {peak / 2**30:.2f} GiB "
                   f"(budget {budget / 2**30:.2f}), {vs}: **{verdict}**")
    return out + [""]


def _notes_section(rows: list[dict]) -> list[str]:
    """Skip reasons once per provider, then every other note once."""
    out: list[str] = []
    skipped: dict[str, str] = {}
    other: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        if r["op"] == "copy" or not r["note"]:
            continue
        if r["status"] == "skipped":
            skipped.setdefault(r["provider"], r["note"])
        else:
            other[(r["provider"], f"{r['status']}: {_short_reason(r['note'])}")].append(
                f"{r['op']}/{r['dtype']}/{size_label(r['N'])}")
    if skipped or other:
        out += ["## Notes", ""]
    for p, reason in skipped.items():
        out.append(f"- `{p}` skipped: {_short_reason(reason)}")
    for (p, text), where in other.items():
        where_text = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
        out.append(f"- `{p}` {text} ({where_text})")
    tol = ", ".join(f"{k} {TOLERANCE[v]:g}" for k, v in DTYPES.items())
    off = ", ".join(f"{k} {OFF_TARGET_TOLERANCE[v]:g}" for k, v in DTYPES.items())
    out += ["", f"Correctness: ||out - ref|| / ||ref|| against torch in float32 on the same inputs, "
            f"once per case and provider; limits {tol}. The cross-entropy's gradient off its "
            f"targets also on its own (the targets carry most of the norm at long rows); "
            f"limits {off}. Each limit is raised to twice the error of the reference rounded "
            f"once to the dtype where that is larger (columns rounding_err, "
            f"off_target_rounding_err)."]
    if any(r["op"] == "linear_ce_fwd_bwd" for r in rows):
        out += ["The linear op is checked against float64 instead: the loss, dX on "
                f"{LCE_REF_ROWS} rows and dW on {LCE_REF_CLASSES} vocabulary rows, evenly "
                "spaced (one float64 pass over all the logits gives every row's lse)."]
    out += [""]
    return out
