"""Command line of ``python -m perf`` (run from the repository root)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from perf import env

DESCRIPTION = """\
Benchmark softmax_gpu against torch eager, torch.compile, cuDNN (ctypes),
Liger and QuACK (when importable), with the device-to-device copy bandwidth
measured in the same run as the roofline.

For every op, dtype, shape and provider it checks the result once against
torch (float32 reference; column `correct`), records peak extra memory, and
times the call with triton.testing.do_bench (L2 flushed, median and 20/80%
quantiles; a wall-clock loop on CPU). GB/s counts the op's minimal bytes:
softmax fwd 2*M*N*elem, fwd+bwd 5*M*N*elem; cross-entropy fwd M*N*elem,
fwd+bwd 2*M*N*elem, plus 8 bytes of target and 4 of output per row.

Sizes: N in {256, 1k, 4k, 8k, 16k, 32k, 64k, 128k, 256k} with M so that an
input is ~1 GiB, and the LLM shapes 16k tokens x {32000, 50257, 128256,
151936, 256000}; dtypes bf16, fp16, fp32. --quick runs a subset: on a GPU,
bf16 at N in {4k, 32k} and 16k x 128256 (under 3 minutes); on CPU, M=64 and
N in {256, 1k}. The fused linear + cross-entropy (linear_ce_fwd_bwd) runs
the LM heads of Llama-3-8B (4096 x 128256), Qwen2-7B (3584 x 152064),
Gemma-2-2B (2304 x 256000) and Llama-3-70B (8192 x 128256) at 4096 and
16384 tokens (--quick: Llama-3-8B's), on hidden states of unit RMS and a
head of std 0.02, with the peak memory and the loss / dX / dW errors
against float64 of every provider, and the time over the three GEMMs alone
(gemm_floor).

Without a GPU everything runs on CPU: our Triton kernels in Triton's
interpreter (TRITON_INTERPRET=1 is set before softmax_gpu is imported, unless
you set it) and torch; the numbers are meaningless, the files are written
all the same.

Outputs (in --out, default perf/results/<gpu>/<date>/): <gpu>_<date>.csv
(long format), <gpu>_<date>_<op>_<dtype>.png, <gpu>_<date>_summary.md (also
printed). Exit status: 0; 1 when softmax_gpu gave a wrong result or an
error on some case; 130 when the run was interrupted (Ctrl-C, or SIGTERM from
`timeout`), after writing the files for what was measured.
"""

EPILOG = """\
examples:
  python -m perf --quick
  python -m perf --ops softmax_fwd,ce_fwd_bwd --dtypes bf16 --shapes grid
  python -m perf --providers softmax_gpu,torch,cudnn --n 4k,32k --m 8192
  python -m perf --list
  python -m perf --quick --ops linear_ce_fwd_bwd --rep-ms 200 --time-budget-s 60 \
      --providers gemm_floor,softmax_gpu,softmax_gpu_overlap,softmax_gpu_lean,torch,liger,cce
"""


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from perf.ops import DTYPES, OPS
    from perf.providers import PROVIDERS

    p = argparse.ArgumentParser(prog="python -m perf", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small subset: under 3 minutes on a GPU, well under one on CPU")
    p.add_argument("--ops", type=_csv_list, default=None, metavar="LIST",
                   help=f"comma-separated ops (default all: {','.join(OPS)})")
    p.add_argument("--providers", type=_csv_list, default=None, metavar="LIST",
                   help=f"comma-separated providers (default all: {','.join(PROVIDERS)}); "
                        "ones that cannot run here are recorded as skipped, with the reason")
    p.add_argument("--dtypes", type=_csv_list, default=None, metavar="LIST",
                   help=f"comma-separated dtypes from {','.join(DTYPES)} (default bf16,fp16,fp32; "
                        "--quick: bf16 on a GPU, fp32,bf16 on CPU)")
    p.add_argument("--shapes", choices=("all", "grid", "llm"), default="all",
                   help="the N grid, the named LLM shapes, or both (default)")
    p.add_argument("--n", type=_csv_list, default=None, metavar="LIST",
                   help="replace the shapes by these row lengths, e.g. 4k,32k,50257")
    p.add_argument("--m", type=int, default=None,
                   help="fix the row count M (default: M so that an input is --target-gib)")
    p.add_argument("--target-gib", type=float, default=1.0,
                   help="input size that picks M for grid shapes (default 1 GiB)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="default auto: CUDA if torch sees a GPU, else CPU")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default perf/results/<gpu-name>/<date>/)")
    p.add_argument("--tag", default="", metavar="WORD",
                   help="add _WORD to the output file names (<gpu>_<date>_WORD.csv, ...)")
    p.add_argument("--unavailable", type=_csv_list, default=[], metavar="LIST",
                   help="treat these providers as unavailable (recorded as skipped)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--time-budget-s", type=float, default=None, metavar="S",
                   help="start no run after S seconds of the sweep: the rest are recorded as "
                        "skipped (the files are written as usual)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list ops and providers (with availability here) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    # Device first: on CPU the interpreter must be on before softmax_gpu is imported.
    device = env.choose_device(args.device)
    warning = env.enable_interpreter_for_cpu(device)

    from perf import report
    from perf.ops import DTYPES, get_ops
    from perf.providers import ProviderContext, make_providers
    from perf.sizes import parse_size
    from perf.sweep import SweepConfig, run_sweep

    if args.list:
        ctx = ProviderContext(device=device, quick=args.quick)
        for op in get_ops():
            print(f"op       {op.name:18s} {op.description}")
        for prov in make_providers():
            reason = prov.availability(ctx)
            print(f"provider {prov.name:18s} {prov.description}: "
                  f"{'available' if reason is None else 'skipped: ' + reason}")
        return 0

    if args.tag and not all(c.isalnum() or c in "_-" for c in args.tag):
        parser.error(f"--tag {args.tag!r}: letters, digits, '_' and '-' only (it goes into file names)")
    try:
        ops = get_ops(args.ops)
        providers = make_providers(args.providers)
        dtype_names = args.dtypes or (["bf16", "fp16", "fp32"] if not args.quick
                                      else (["bf16"] if device == "cuda" else ["fp32", "bf16"]))
        unknown = [d for d in dtype_names if d not in DTYPES]
        if unknown:
            raise KeyError(f"unknown dtype(s) {unknown}; known: {list(DTYPES)}")
        ns = tuple(parse_size(n) for n in args.n) if args.n else None
        unknown = [u for u in args.unavailable if u not in {p.name for p in providers}]
        if unknown:
            raise KeyError(f"--unavailable names provider(s) not in the run: {unknown}")
    except (KeyError, ValueError) as exc:
        parser.error(str(exc.args[0]) if exc.args else str(exc))

    info = env.run_info(device)
    out_dir = args.out or os.path.join("perf", "results", info.device_slug, info.date)
    os.makedirs(out_dir, exist_ok=True)

    print(f"perf: {info.device_name} | torch {info.torch} | triton {info.triton} | CUDA {info.cuda}")
    if warning:
        print(report.banner(warning))
    if info.meaningless_timings:
        print(report.banner(report.CPU_WARNING))
    on_cpu = device != "cuda"
    cfg = SweepConfig(
        device=device,
        ops=ops,
        providers=providers,
        dtypes=[DTYPES[d] for d in dtype_names],
        quick=args.quick,
        shape_set=args.shapes,
        ns=ns,
        m=args.m,
        target_bytes=int(args.target_gib * (1 << 30)),
        seed=args.seed,
        warmup_ms=args.warmup_ms,
        rep_ms=min(args.rep_ms, 20) if on_cpu else args.rep_ms,
        copy_bytes=(16 << 20) if on_cpu else (1 << 30),
        unavailable={u: "forced unavailable (--unavailable)" for u in args.unavailable},
        time_budget_s=args.time_budget_s,
    )
    n_cases = len(cfg.cases())
    print(f"ops {','.join(o.name for o in ops)} | providers {','.join(p.name for p in providers)} | "
          f"dtypes {','.join(dtype_names)} | {n_cases} cases | out {out_dir}")

    env.sigterm_interrupts()  # `timeout`: stop and write what was measured
    t0 = time.perf_counter()
    rows = run_sweep(cfg, info, progress=not args.no_progress)
    # Writing the files must not be cut by a second SIGTERM (`timeout --kill-after` still can).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elapsed = time.perf_counter() - t0

    stem = report.output_stem(out_dir, info, args.tag)
    csv_path = os.path.join(out_dir, stem + ".csv")
    report.write_csv(rows, csv_path)
    previous = None
    if not info.meaningless_timings:
        previous = report.previous_run(os.path.join("perf", "results"), info.device_slug,
                                       args.tag, exclude=csv_path)
    summary = report.summary_markdown(rows, info, previous=previous)
    md_path = os.path.join(out_dir, stem + "_summary.md")
    with open(md_path, "w") as f:
        f.write(summary)
    pngs = [] if args.no_plots else report.plot_all(rows, out_dir, stem, info)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print()
    print(summary)
    print(f"wrote {csv_path}, {md_path} and {len(pngs)} plot(s) in {elapsed:.1f} s")
    if info.meaningless_timings:
        print(report.banner(report.CPU_WARNING))
    from perf.sweep import INTERRUPTED

    if any(r["op"] == "copy" and INTERRUPTED in r["note"] for r in rows):
        return 130  # cut short (Ctrl-C or SIGTERM); the files hold what was measured
    ours_bad = [r for r in rows if r["provider"] == "softmax_gpu"
                and (r["status"] == "error" or r["correct"] is False)]
    if ours_bad:
        print(f"softmax_gpu: {len(ours_bad)} case(s) wrong or failed (see the notes)", file=sys.stderr)
        return 1
    return 0
