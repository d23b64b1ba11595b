"""Static check: compile every kernel configuration the heuristics can pick for
Hopper (sm_90) on the CPU, and read registers, spills and shared memory with
the ``cuobjdump`` that ships in Triton's wheel. No GPU is needed.

    python -m perf.static            # table to stdout, CSV + markdown under perf/results/static/
    python -m perf.static --jobs 2   # compile in 2 processes

``tests/test_static_compile.py`` runs the same enumeration and asserts STACK 0
(no spills) for every variant. When a configuration spills, change the
heuristics, not the check.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGET = ("cuda", 90, 32)
DTYPE_STR = {2: "bf16", 4: "fp32", 8: "fp64"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled configuration: a kernel plus its specialisation."""

    module: str  # module under softmax_gpu.kernels, e.g. "softmax"
    kernel: str  # kernel name in that module
    dtype: str  # element type of the data pointers
    ptrs: tuple  # ((arg name, element type), ...) for pointer args
    constexprs: tuple  # ((name, value), ...); "ACC" given as "fp32"/"fp64"
    num_warps: int
    path: str  # heuristics path label (for the table)

    def label(self) -> str:
        c = dict(self.constexprs)
        keys = [k for k in ("LOG", "BLOCK_N", "ROWS", "BLOCK_S") if k in c]
        return f"{self.kernel}[{self.dtype}, " + ", ".join(f"{k}={c[k]}" for k in keys) + \
            f", warps={self.num_warps}]"


# Integer args that are 1 in the common layout (unit stride along the row,
# INNER = 1): Triton specialises an int argument equal to 1 into a constant,
# so the compiled code we ship for the common case is this one.
ONE_SPECIALISED = ("INNER", "sx_n", "sy_n", "sg_n")


def softmax_variants() -> list[Variant]:
    from softmax_gpu import heuristics
    from softmax_gpu.softmax import all_softmax_configs

    out = []
    for path, block_n, rows, warps, elem, live in all_softmax_configs():
        dt = DTYPE_STR[elem]
        acc = "fp64" if elem == 8 else "fp32"
        bs = heuristics.limits().max_splits  # BLOCK_S at its largest: the worst case
        # live_rows 1: softmax forward; 2: log-softmax forward and both backwards
        if path == "single":
            kernels = [("softmax_fwd_single_kernel", ("X", "Y"), dict(ROWS=rows), live == 2)]
            if live == 2:
                kernels += [("softmax_bwd_single_kernel", ("Y", "DY", "DX"), dict(ROWS=rows), log)
                            for log in (False, True)]
        elif path == "looped":
            kernels = [("softmax_fwd_looped_kernel", ("X", "Y"), {}, live == 2)]
            if live == 2:
                kernels += [("softmax_bwd_looped_kernel", ("Y", "DY", "DX"), {}, log)
                            for log in (False, True)]
        else:
            kernels = [("softmax_fwd_split_norm_kernel", ("X", "Y"), dict(BLOCK_S=bs), live == 2)]
            if live == 1:
                kernels += [("softmax_fwd_split_stats_kernel", ("X",), {}, None)]
            else:
                kernels += [(k, ptrs, extra, log)
                            for k, ptrs, extra in (
                                ("softmax_bwd_split_sum_kernel", ("Y", "DY"), {}),
                                ("softmax_bwd_split_apply_kernel", ("Y", "DY", "DX"), dict(BLOCK_S=bs)))
                            for log in (False, True)]
        for name, data_ptrs, extra, log in kernels:
            ws = tuple((p, acc) for p in ("PM", "PD", "PS"))
            cx = dict(ACC=acc, BLOCK_N=block_n, **extra)
            if log is not None:
                cx["LOG"] = log
            out.append(Variant(
                "softmax", name, dt, tuple((p, dt) for p in data_ptrs) + ws,
                tuple(sorted(cx.items())), warps, path,
            ))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label()))


def all_variants() -> list[Variant]:
    """Every variant of every kernel module that registers one here."""
    variants = softmax_variants()
    for extra in _EXTRA_ENUMERATORS:
        variants += extra()
    return variants


# Other kernel modules (cross-entropy, ...) append their enumerators here.
_EXTRA_ENUMERATORS: list = []


def vocab_parallel_variants() -> list[Variant]:
    """The shard kernels (softmax_gpu.kernels.vocab_parallel), for every
    configuration ``softmax_gpu.vocab_parallel.shard_config`` can pick: the stats
    kernel with and without the smoothing sum, and the gradient kernel."""
    import torch

    from softmax_gpu import heuristics
    from softmax_gpu.vocab_parallel import shard_config

    out = []
    dev = torch.device("cpu")
    with heuristics.override(sm_count=132):
        for elem in (2, 4, 8):
            dt = DTYPE_STR[elem]
            acc = "fp64" if elem == 8 else "fp32"
            ptrs = (("X", dt), ("DX", dt), ("T", "i64")) + tuple(
                (p, acc) for p in ("MX", "ST", "LSE", "G", "COEF"))
            for logn in range(0, 21):
                for M in (1, 64, 1 << 20):
                    c = shard_config(M, 1 << logn, elem, dev)
                    single = c.path == heuristics.SINGLE
                    stats = "vp_stats_single_kernel" if single else "vp_stats_looped_kernel"
                    for smooth in (False, True):
                        cx = dict(ACC=acc, BLOCK_N=c.block_n, SMOOTH=smooth)
                        if single:
                            cx["ROWS"] = c.rows_per_program
                        out.append(Variant("vocab_parallel", stats, dt, ptrs,
                                           tuple(sorted(cx.items())), c.num_warps, c.path))
                    grad = "vp_grad_single_kernel" if single else "vp_grad_looped_kernel"
                    cx = dict(ACC=acc, BLOCK_N=c.block_n, **({"ROWS": c.rows_per_program} if single else {}))
                    out.append(Variant("vocab_parallel", grad, dt, ptrs,
                                       tuple(sorted(cx.items())), c.num_warps, c.path))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label(), v.constexprs))


_EXTRA_ENUMERATORS.append(vocab_parallel_variants)


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found in Triton's wheel at {path}")
    return str(path)


def compile_variant(v: Variant) -> dict:
    """Compile ``v`` for sm_90 and return its resource usage."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = importlib.import_module(f"softmax_gpu.kernels.{v.module}").__dict__[v.kernel]
    ptrs = dict(v.ptrs)
    cx = dict(v.constexprs)
    if "ACC" in cx:
        cx["ACC"] = tl.float64 if cx["ACC"] == "fp64" else tl.float32
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in cx:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ONE_SPECIALISED:
            sig[name] = "constexpr"
            cx[name] = 1
        else:
            sig[name] = "i32"
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in cx]
    if missing:
        raise ValueError(f"{v.kernel}: no value for constexpr {missing}")
    k = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget(*TARGET),
                       options={"num_warps": v.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"could not read resource usage for {v.label()}:\n{text}")
    return dict(regs=int(usage["REG"]), stack=int(usage["STACK"]),
                shared=int(usage.get("SHARED", 0)), local=int(usage.get("LOCAL", 0)))


def _compile_one(v: Variant):
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even under the test env
    return v, compile_variant(v)


def run(jobs: int = 2, variants=None):
    """[(variant, usage)] for ``variants`` (default: all), compiled in ``jobs`` processes."""
    variants = all_variants() if variants is None else variants
    if jobs <= 1:
        return [_compile_one(v) for v in variants]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # kernels must be real JIT functions, not interpreted
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, variants))


def write_table(results, out_dir: Path) -> Path:
    import triton

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    csv_path = out_dir / f"sm90_{stamp}.csv"
    fields = ["kernel", "path", "dtype", "constexprs", "num_warps", "regs", "stack", "shared",
              "local", "target", "triton"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for v, u in results:
            w.writerow(dict(kernel=v.kernel, path=v.path, dtype=v.dtype,
                            constexprs=" ".join(f"{k}={val}" for k, val in v.constexprs),
                            num_warps=v.num_warps, target="sm_90", triton=triton.__version__, **u))
    md = [f"# Static resource usage, sm_90 (compiled on CPU, Triton {triton.__version__}, {stamp})",
          "", "| kernel | path | dtype | specialisation | warps | regs | stack (spill) | shared B |",
          "|---|---|---|---|---:|---:|---:|---:|"]
    for v, u in results:
        md.append(f"| {v.kernel} | {v.path} | {v.dtype} | "
                  f"{' '.join(f'{k}={val}' for k, val in v.constexprs)} | {v.num_warps} | "
                  f"{u['regs']} | {u['stack']} | {u['shared']} |")
    (out_dir / f"sm90_{stamp}.md").write_text("\n".join(md) + "\n")
    return csv_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "static")
    args = ap.parse_args(argv)
    results = run(args.jobs)
    path = write_table(results, args.out)
    spills = [(v, u) for v, u in results if u["stack"] or u["local"]]
    print(f"{len(results)} variants compiled for sm_90; max regs "
          f"{max(u['regs'] for _, u in results)}; {len(spills)} spill")
    for v, u in spills:
        print(f"  SPILL {v.label()}: stack {u['stack']} local {u['local']}")
    print(f"table: {path}")
    return 1 if spills else 0


# ----------------------------------------------------------------------------
# Cross-entropy (kernels/cross_entropy.py)
# ----------------------------------------------------------------------------

# Feature flags compiled per configuration. A configuration chosen without
# extras runs only the plain flags (with and without the gradient); one chosen
# with extras may run any subset of them, of which all-on is the heaviest.
_CE_FLAGS = {
    ("class", False): (
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=True, WRITE_HIT=False),
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=True, WRITE_HIT=True),
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=False, WRITE_HIT=False),
    ),
    ("class", True): (
        dict(HAS_WEIGHT=True, SMOOTH=True, SOFTCAP=True, WRITE_GRAD=True, WRITE_HIT=True),
        dict(HAS_WEIGHT=True, SMOOTH=True, SOFTCAP=True, WRITE_GRAD=False, WRITE_HIT=False),
    ),
    ("prob", True): (
        dict(HAS_WEIGHT=False, SOFTCAP=False, WRITE_GRAD=True),
        dict(HAS_WEIGHT=True, SOFTCAP=True, WRITE_GRAD=True),
        dict(HAS_WEIGHT=True, SOFTCAP=True, WRITE_GRAD=False),
    ),
}


def cross_entropy_variants() -> list[Variant]:
    """Every cross-entropy kernel configuration the heuristics can pick
    (``softmax_gpu.cross_entropy.all_cross_entropy_configs``), with the flag
    sets above; the row-wise backward kernels (rescale, lse gradient) on the
    "scale" configurations; the one-program denominators kernel."""
    from softmax_gpu.cross_entropy import all_cross_entropy_configs

    out = []
    for elem in (2, 4, 8):
        acc = "fp64" if elem == 8 else "fp32"
        for has_w, smooth in ((False, False), (True, False), (True, True)):
            out.append(Variant(
                "cross_entropy", "ce_denominators_kernel", DTYPE_STR[elem],
                (("T", "i64"), ("W", acc), ("DEN", acc)),
                tuple(sorted(dict(ACC=acc, BLOCK=1024, HAS_WEIGHT=has_w,
                                  SMOOTH=smooth).items())), 4, "single"))
    for fam, extras, path, block_n, rows, warps, elem in all_cross_entropy_configs():
        dt = DTYPE_STR[elem]
        acc = "fp64" if elem == 8 else "fp32"
        extra = dict(ROWS=rows) if path == "single" else {}
        if fam == "scale":
            for in_place in (True, False):
                out.append(Variant(
                    "cross_entropy", "ce_grad_scale_kernel", dt,
                    (("G", dt), ("OUT", dt), ("STATE", acc), ("GO", acc)),
                    tuple(sorted(dict(ACC=acc, BLOCK_N=block_n, ROWS=rows,
                                      IN_PLACE=in_place).items())), warps, path))
            for softcap in (False, True):
                out.append(Variant(
                    "cross_entropy", "ce_lse_grad_kernel", dt,
                    (("X", dt), ("LSE", "fp32"), ("DLSE", acc), ("OUT", dt)),
                    tuple(sorted(dict(ACC=acc, BLOCK_N=block_n, ROWS=rows,
                                      SOFTCAP=softcap).items())), warps, path))
            continue
        if fam == "class":
            ptrs = (("X", dt), ("T", "i64"), ("W", acc), ("DEN", acc),
                    ("G", dt), ("LOSS", acc), ("LSE", "fp32"), ("STATE", acc), ("HIT", "i8"))
        else:
            ptrs = (("X", dt), ("Y", dt), ("W", acc), ("G", dt), ("LOSS", acc), ("LSE", "fp32"),
                    ("STATE", acc))
        for flags in _CE_FLAGS[(fam, extras)]:
            cx = dict(ACC=acc, BLOCK_N=block_n, **extra, **flags)
            out.append(Variant("cross_entropy", f"ce_{fam}_{path}_kernel", dt, ptrs,
                               tuple(sorted(cx.items())), warps, path))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label(), v.constexprs))


_EXTRA_ENUMERATORS.append(cross_entropy_variants)


if __name__ == "__main__":
    sys.exit(main())
