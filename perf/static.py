"""Static check: compile every kernel configuration the heuristics can pick for
Hopper (sm_90) on the CPU, specialised as a real call specialises it, and read
registers and spills with the ``cuobjdump`` in Triton's wheel. No GPU needed.

    python -m perf.static               # CSV + markdown under perf/results/static/
    python -m perf.static --jobs 2      # compile in 2 processes (default)
    python -m perf.static --no-table    # check only: exit 1 on a compile error or spill

Exit status 1 on any compile error or any spill (cuobjdump STACK or LOCAL > 0).
``tests/test_static_compile.py`` asserts the same under the installed (newest)
Triton, and ``.ci/run`` runs that test file again under Triton 3.6, the floor.
When a configuration spills, change the kernel or the heuristics' limits, not
the check. Works from Triton 3.6 to the newest (``_compile`` is the one place
that touches the version-dependent compile API).

Specialisation. Triton's JIT compiles one binary per specialisation of the
arguments: a pointer 16-byte aligned, an int divisible by 16 (both
``tt.divisibility = 16``: loads vectorise, masks fold), an int equal to 1
(compiled as the constant 1). Every variant is compiled with what the common
call passes (``INT_SPEC``; a kernel argument missing there fails the check, so
a new argument needs a decision here):

- every pointer 16-byte aligned (torch allocations are);
- contiguous tensors reduced over their last dim: ``INNER`` = 1 and the unit
  strides along the row (``sx_n``, ``sy_n``, ``sg_n``, ``so_n``) are the
  constant 1; the outer strides equal the row length and the inner strides
  are 0 (``_layout`` gives 0 when there is no inner dim): divisible by 16;
- row lengths ``N`` / ``C`` / ``W`` (shard width) and row counts ``M``
  (batch x sequence) are multiples of 16 (hidden sizes; vocabularies 32000,
  128256, 151936, 256000), hence also ``CHUNK`` (a multiple of the tile),
  ``OFF`` (rank x shard width) and ``V``; the denominators' ``row_span`` and
  ``class_span`` are multiples of 1024;
- cross-entropy with ``reduction="mean"`` (the default): ``use_den`` = 1
  (constant), ``den_rows`` = M; its backward gets a broadcast scalar
  grad_output (``s_go`` = 0), the vocab-parallel gradient one scale for all
  rows (``s_g`` = 0); targets are contiguous (``s_t`` = 1), and so is the
  gradient of a returned lse (``s_dlse`` = 1);
- never specialised: ``ignore_index`` / ``IGNORE`` (-100), ``SPLITS`` and
  ``LAG`` (the cooperative path's chunk count and ticket lag), ``group``
  (the rescale's rows per program), the flags
  ``lse_all`` / ``use_div`` and the float bit patterns that the cross-entropy
  kernels mark ``do_not_specialize``;
- the long-row kernels walk unit-stride rows: ``VEC`` = 16 bytes / element
  size (rows not congruent modulo 16 bytes, or strided, get VEC = 1 and the
  masked-tile code of the old kernels; not compiled here).

Rows whose length or stride is not a multiple of 16 (vocabulary 50257) run a
differently specialised binary: ``--ints plain`` compiles that case (no int
marked divisible by 16; pointers aligned, the 1s still constant).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import datetime
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

TARGET = ("cuda", 90, 32)
DTYPE_STR = {2: "bf16", 4: "fp32", 8: "fp64"}

# Mixed-precision variants: (family, element bytes of the configuration) ->
# (label, {pointer: element type}) compiled besides the plain one. The
# softmax forward of fp16/bf16 input stores fp32 (torch.autocast on CUDA,
# dtype=torch.float32) and its backward reads that fp32 output and writes the
# input's dtype; fp16 cross-entropy with probability targets keeps its
# gradient in fp32 until the backward rescales it into fp16.
MIXED = {
    ("softmax_fwd", 2): ("bf16>fp32", {"Y": "fp32"}),
    ("softmax_bwd", 4): ("fp32>bf16", {"DX": "bf16"}),
    ("ce_prob", 2): ("fp16>fp32", {"X": "fp16", "Y": "fp16", "G": "fp32"}),
    ("ce_scale", 4): ("fp32>fp16", {"OUT": "fp16"}),
}


def _mixed(family: str, elem: int, v: "Variant", when: bool = True) -> list:
    """``v`` and, when ``MIXED`` has an entry for (family, elem) and ``when``,
    its mixed-precision twin (the same configuration, other pointer types)."""
    m = MIXED.get((family, elem)) if when else None
    if m is None:
        return [v]
    label, types = m
    return [v, dataclasses.replace(v, dtype=label,
                                   ptrs=tuple((p, types.get(p, t)) for p, t in v.ptrs))]

ONE, DIV16, PLAIN = "1", "D16", "-"
# Each int argument of every kernel: what the common call passes (module docstring).
INT_SPEC = {
    **dict.fromkeys(("INNER", "sx_n", "sy_n", "sg_n", "so_n", "use_den", "s_t", "s_dlse"), ONE),
    **dict.fromkeys(("M", "N", "C", "W", "sx_o", "sx_i", "sy_o", "sy_i", "sg_o", "sg_i", "so_o",
                     "so_i", "CHUNK", "OFF", "V", "den_rows", "s_go", "s_g", "row_span",
                     "class_span"), DIV16),
    **dict.fromkeys(("SPLITS", "LAG", "spin", "group", "lse_all", "use_div", "div_hi", "div_lo",
                     "ignore_index", "IGNORE", "eps_hi", "eps_lo", "zl_hi", "zl_lo",
                     "cap_hi", "cap_lo", "gs_hi", "gs_lo"), PLAIN),
}


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
    maxnreg: int = 0  # register budget as launched (0: none, ptxas's choice)

    def label(self) -> str:
        c = dict(self.constexprs)
        keys = [k for k in ("LOG", "BLOCK_N", "ROWS", "VEC", "EVICT", "COUNT", "DIV_PTR")
                if k in c]
        flags = "".join(k[0] for k in ("HAS_WEIGHT", "SMOOTH", "SOFTCAP", "WRITE_GRAD",
                                       "WRITE_HIT") if c.get(k))
        return f"{self.kernel}[{self.dtype}, " + ", ".join(f"{k}={c[k]}" for k in keys) + \
            (f", {flags}" if flags else "") + f", warps={self.num_warps}" + \
            (f", maxnreg={self.maxnreg}" if self.maxnreg else "") + "]"

    def compile_key(self) -> tuple:
        """Everything that reaches the compiler (not the path label)."""
        return (self.module, self.kernel, self.ptrs, self.constexprs, self.num_warps,
                self.maxnreg)


def config_functions() -> SimpleNamespace:
    """The heuristics' config functions and their enumerations of what they
    can pick: the one place in perf/ that names them. Each lives with its op:
    softmax_gpu.softmax (softmax_config, call_config, all_softmax_configs),
    softmax_gpu.cross_entropy (cross_entropy_config, all_cross_entropy_configs)
    and softmax_gpu.vocab_parallel (shard_config)."""
    from softmax_gpu.cross_entropy import all_cross_entropy_configs, cross_entropy_config
    from softmax_gpu.softmax import all_softmax_configs, call_config, softmax_config
    from softmax_gpu.vocab_parallel import shard_config

    return SimpleNamespace(
        softmax_config=softmax_config,
        call_config=call_config,
        all_softmax_configs=all_softmax_configs,
        cross_entropy_config=cross_entropy_config,
        all_cross_entropy_configs=all_cross_entropy_configs,
        shard_config=shard_config,
    )


# The softmax-family spaces of perf.tune (one enumeration of configurations).
SOFTMAX_TABLE_OPS = ("softmax", "log_softmax", "softmax_backward")


def tuner_fields(*table_ops: str) -> list[dict]:
    """The ``Limits`` overrides of every perf.tune candidate (not only the
    first ``max_candidates``) of the spaces ``table_ops`` at the tuner's GPU
    shapes, distinct and in order: the static check compiles whatever a
    tuning run can time."""
    import json

    from perf import tune

    cfg = tune.TuneConfig(device="cuda", spaces=[tune.SPACES[op] for op in table_ops])
    out = {}
    for space in cfg.spaces:
        for shape in cfg.shapes(space):
            for c in tune.candidates(space, shape, "cpu", {"sm_count": 132}):
                if c.fields:
                    out.setdefault(json.dumps(c.fields, sort_keys=True), c.fields)
    return list(out.values())


def softmax_variants() -> list[Variant]:
    from softmax_gpu.kernels.softmax import lean_forms

    out = []
    for path, block_n, rows, warps, elem, kind, regs in config_functions().all_softmax_configs(
            tuner_fields(*SOFTMAX_TABLE_OPS)):
        dt = DTYPE_STR[elem]
        acc = "fp64" if elem == 8 else "fp32"
        # long rows: unit-stride rows (VEC elements per 16 bytes), with and
        # without the eviction hints, and pipelined (tuning candidates)
        walk = _walks(path, elem)
        if kind == "bwd":
            logs = (False, True)
            names = {"single": [("softmax_bwd_single_kernel", ("Y", "DY", "DX"))],
                     "looped": [("softmax_bwd_looped_kernel", ("Y", "DY", "DX"))],
                     "coop": [("softmax_bwd_coop_kernel", ("Y", "DY", "DX", "PS", "SYNC"))],
                     "resident": [("softmax_bwd_resident_kernel",
                                   ("Y", "DY", "DX", "PS", "SYNC"))],
                     "split": [("softmax_bwd_split_sum_kernel", ("Y", "DY", "PS")),
                               ("softmax_bwd_split_apply_kernel", ("Y", "DY", "DX", "PS"))]}
        else:
            logs = (kind == "log_fwd",)
            names = {"single": [("softmax_fwd_single_kernel", ("X", "Y"))],
                     "looped": [("softmax_fwd_looped_kernel", ("X", "Y"))],
                     "coop": [("softmax_fwd_coop_kernel", ("X", "Y", "WS", "SYNC"))],
                     "resident": [("softmax_fwd_resident_kernel", ("X", "Y", "WS", "SYNC"))],
                     "split": [("softmax_fwd_split_norm_kernel", ("X", "Y", "PM", "PD"))] +
                              ([("softmax_fwd_split_stats_kernel", ("X", "PM", "PD"))]
                               if kind == "fwd" else [])}
        for name, ptrs in names[path]:
            if path == "single":
                extras = [dict(ROWS=rows, **({"LEAN": lean_forms(regs)}
                                             if "LEAN" in _constexpr_names(name) else {}))]
            else:
                extras = walk
            for extra in extras:
                for log in (logs if "LOG" in _constexpr_names(name) else (None,)):
                    cx = dict(ACC=acc, BLOCK_N=block_n, **extra)
                    if log is not None:
                        cx["LOG"] = log
                    types = tuple((p, ("i64" if path == "resident" else "i32") if p == "SYNC"
                                   else
                                   acc if p in ("PM", "PD", "PS", "WS") else dt) for p in ptrs)
                    out += _mixed("softmax_bwd" if kind == "bwd" else "softmax_fwd", elem,
                                  Variant("softmax", name, dt, types, tuple(sorted(cx.items())),
                                          warps, path, regs))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label()))


def _stage_choices(elem: int) -> tuple:
    """Pipelining depths of the long-row kernels for an element size: every
    choice for 2-byte rows (the tuned tables' dtype), none beyond 1 else."""
    from softmax_gpu.heuristics import STAGE_CHOICES

    return STAGE_CHOICES if elem == 2 else (1,)


def _long_walks(elem: int) -> list[dict]:
    """The long-row constexprs compiled per configuration: unit-stride rows
    (VEC elements per 16 bytes) with the eviction hints at every pipelining
    depth, and without the hints unpipelined."""
    return ([dict(VEC=16 // elem, EVICT=True, STAGES=s) for s in _stage_choices(elem)] +
            [dict(VEC=16 // elem, EVICT=False, STAGES=1)])


def _walks(path: str, elem: int) -> list[dict]:
    """The constexprs beyond the configuration's own that a long-row path
    compiles: the resident kernels hold their chunk in registers (unit-stride
    rows only: VEC), the others walk tiles (``_long_walks``)."""
    if path == "resident":
        return [dict(VEC=16 // elem)]
    return _long_walks(elem)


def _constexpr_names(kernel: str, module: str = "softmax") -> set:
    """The constexpr parameters of a kernel of softmax_gpu.kernels.<module>."""
    import importlib

    fn = getattr(importlib.import_module(f"softmax_gpu.kernels.{module}"), kernel)
    fn = getattr(fn, "fn", fn)
    import inspect

    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.annotation in ("tl.constexpr",) or "constexpr" in str(p.annotation)}


# Cross-entropy feature flags compiled per configuration. A configuration
# chosen without extras runs only the plain flags; one chosen with extras may
# run any subset of them, of which all-on is the heaviest. A configuration
# planned for statistics only (no gradient, no smoothing: "second pass"
# False) runs only the flag sets without them.
_CE_FLAGS = {
    ("class", False): (
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=True, WRITE_HIT=False),
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=True, WRITE_HIT=True),
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=False, WRITE_HIT=False),
        dict(HAS_WEIGHT=False, SMOOTH=False, SOFTCAP=False, WRITE_GRAD=False, WRITE_HIT=True),
    ),
    ("class", True): (
        dict(HAS_WEIGHT=True, SMOOTH=True, SOFTCAP=True, WRITE_GRAD=True, WRITE_HIT=True),
        dict(HAS_WEIGHT=True, SMOOTH=True, SOFTCAP=True, WRITE_GRAD=False, WRITE_HIT=False),
        dict(HAS_WEIGHT=True, SMOOTH=False, SOFTCAP=True, WRITE_GRAD=False, WRITE_HIT=True),
    ),
    ("prob", True): (
        dict(HAS_WEIGHT=False, SOFTCAP=False, WRITE_GRAD=True),
        dict(HAS_WEIGHT=True, SOFTCAP=True, WRITE_GRAD=True),
        dict(HAS_WEIGHT=True, SOFTCAP=True, WRITE_GRAD=False),
    ),
}


def _scale_check(num_warps: int) -> int:
    from softmax_gpu.kernels.cross_entropy import scale_check

    return scale_check(num_warps)


def _denominators_regs() -> int:
    from softmax_gpu.kernels.cross_entropy import DENOMINATORS_REGS

    return DENOMINATORS_REGS


def _ce_flag_sets(fam: str, extras: bool, second_pass: bool):
    sets = _CE_FLAGS[(fam, extras)]
    if second_pass:
        return sets
    return [f for f in sets if not f.get("WRITE_GRAD") and not f.get("SMOOTH")]


def cross_entropy_variants() -> list[Variant]:
    """Every cross-entropy kernel configuration the heuristics can pick, with
    the flag sets above; the row-wise backward kernels (rescale, lse
    gradient) on the "scale" configurations; the traced backward on the
    "backward" ones; the one-program denominators kernel in each of its
    modes. Long-row kernels (looped, coop) for unit-stride rows (VEC
    elements per 16 bytes), with and without the eviction hints."""
    out = []
    for elem in (2, 4, 8):
        acc = "fp64" if elem == 8 else "fp32"
        for has_w, smooth in ((False, False), (True, False), (True, True)):
            for count in (True, False):
                for div_ptr in (False, True):
                    out.append(Variant(
                        "cross_entropy", "ce_denominators_kernel", DTYPE_STR[elem],
                        (("T", "i64"), ("W", acc), ("DIV", acc), ("DEN", acc), ("WS", acc),
                         ("SYNC", "i32")),
                        tuple(sorted(dict(ACC=acc, BLOCK=1024, HAS_WEIGHT=has_w, SMOOTH=smooth,
                                          COUNT=count, DIV_PTR=div_ptr).items())), 4, "single",
                        _denominators_regs()))
    for fam, extras, path, block_n, rows, warps, elem, second, regs in \
            config_functions().all_cross_entropy_configs(tuner_fields("cross_entropy")):
        dt = DTYPE_STR[elem]
        acc = "fp64" if elem == 8 else "fp32"
        walks = [dict(ROWS=rows)] if path == "single" else _walks(path, elem)
        if fam == "scale":
            for in_place in (True, False):
                out += _mixed("ce_scale", elem, Variant(
                    "cross_entropy", "ce_grad_scale_kernel", dt,
                    (("G", dt), ("OUT", dt), ("STATE", acc), ("GO", acc)),
                    tuple(sorted(dict(ACC=acc, BLOCK_N=block_n, ROWS=rows, IN_PLACE=in_place,
                                      CHECK=_scale_check(warps)).items())), warps, path,
                    regs),
                    when=not in_place)
            for softcap in (False, True):
                out.append(Variant(
                    "cross_entropy", "ce_lse_grad_kernel", dt,
                    (("X", dt), ("LSE", acc), ("DLSE", acc), ("OUT", dt)),
                    tuple(sorted(dict(ACC=acc, BLOCK_N=block_n, ROWS=rows,
                                      SOFTCAP=softcap).items())), warps, path, regs))
            continue
        if fam == "backward":
            for on, stages in itertools.product((False, True) if extras else (False,),
                                                _stage_choices(elem)):
                out.append(Variant(
                    "cross_entropy", "ce_class_backward_kernel", dt,
                    (("X", dt), ("T", "i64"), ("W", acc), ("DEN", acc), ("LSE", acc),
                     ("GO", acc), ("OUT", dt)),
                    tuple(sorted(dict(ACC=acc, BLOCK_N=block_n, VEC=16 // elem, HAS_WEIGHT=on,
                                      SMOOTH=on, SOFTCAP=on, STAGES=stages).items())),
                    warps, path, regs))
            continue
        if fam == "class":
            ptrs = (("X", dt), ("T", "i64"), ("W", acc), ("DEN", acc),
                    ("G", dt), ("LOSS", acc), ("LSE", acc), ("STATE", acc), ("HIT", "i8"))
            if path in ("coop", "resident"):
                ptrs += (("WS", acc), ("SYNC", "i64" if path == "resident" else "i32"))
        else:
            ptrs = (("X", dt), ("Y", dt), ("W", acc), ("DEN", acc), ("G", dt), ("LOSS", acc),
                    ("LSE", acc), ("STATE", acc))
        for flags in _ce_flag_sets(fam, extras, second):
            for walk in walks:
                cx = dict(ACC=acc, BLOCK_N=block_n, **walk, **flags)
                out += _mixed(f"ce_{fam}", elem,
                              Variant("cross_entropy", f"ce_{fam}_{path}_kernel", dt, ptrs,
                                      tuple(sorted(cx.items())), warps, path, regs),
                              when=flags.get("WRITE_GRAD", False))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label(), v.constexprs))


# Vocab-parallel option flags compiled per configuration, for the stats and
# the gradient kernel alike. A configuration chosen without extras runs none
# or label smoothing alone; one chosen with extras (a softcap, or class
# weights with smoothing) may run any subset, of which every option on is the
# heaviest (weights are read only with smoothing).
_VP_FLAGS = {
    False: (dict(SMOOTH=False, HAS_WEIGHT=False, SOFTCAP=False),
            dict(SMOOTH=True, HAS_WEIGHT=False, SOFTCAP=False)),
    True: (dict(SMOOTH=True, HAS_WEIGHT=True, SOFTCAP=True),),
}


def vocab_parallel_variants() -> list[Variant]:
    """The shard kernels (softmax_gpu.kernels.vocab_parallel) for every
    configuration the shard config can pick (row counts from one row to a
    linear-CE chunk and beyond; with and without extras), each with the flag
    sets above; the per-row kernels (rows, coefs) with each option set."""
    import itertools

    import torch

    from softmax_gpu import heuristics

    shard_config = config_functions().shard_config
    out = []
    dev = torch.device("cpu")
    with heuristics.override(sm_count=132):
        for elem in (2, 4, 8):
            dt = DTYPE_STR[elem]
            acc = "fp64" if elem == 8 else "fp32"
            ptrs = (("X", dt), ("DX", dt), ("T", "i64")) + tuple(
                (p, acc) for p in ("CW", "MX", "ST", "COEF"))
            for logn in range(0, 21):
                for M, extras in itertools.product((1, 64, 4096, 1 << 20), (False, True)):
                    c = shard_config(M, 1 << logn, elem, dev, extras)
                    single = c.path == heuristics.SINGLE
                    rows = {"ROWS": c.rows_per_program} if single else {}
                    for kind in ("stats", "grad"):
                        name = f"vp_{kind}_{'single' if single else 'looped'}_kernel"
                        for flags in _VP_FLAGS[extras]:
                            cx = dict(ACC=acc, BLOCK_N=c.block_n, **rows, **flags)
                            out.append(Variant("vocab_parallel", name, dt, ptrs,
                                               tuple(sorted(cx.items())), c.num_warps, c.path,
                                               c.regs))
    from softmax_gpu.kernels.vocab_parallel import ROWS_BLOCK, ROWS_WARPS

    # The per-row kernels: no data pointer (their dtype is the accumulation's),
    # every option set they run with.
    for acc in ("fp32", "fp64"):
        for has_w, smooth in ((False, False), (False, True), (True, True)):
            cx = dict(ACC=acc, BLOCK=ROWS_BLOCK, HAS_WEIGHT=has_w, SMOOTH=smooth)
            ptrs = (("MG", acc), ("ST", acc), ("T", "i64"), ("CW", acc), ("DEN", acc),
                    ("LSE", acc), ("LSE32", "fp32"), ("LOSS", acc))
            out.append(Variant("vocab_parallel", "vp_rows_kernel", acc, ptrs,
                               tuple(sorted(cx.items())), ROWS_WARPS, "rows"))
            ptrs = (("LSE", acc), ("T", "i64"), ("CW", acc), ("DEN", acc),
                    ("G", "bf16" if acc == "fp32" else acc),
                    ("DLSE", "fp32"), ("COEF", acc))
            for has_g, has_dlse in ((True, False), (True, True), (False, True)):
                out.append(Variant("vocab_parallel", "vp_coefs_kernel", acc, ptrs,
                                   tuple(sorted(dict(cx, HAS_G=has_g,
                                                     HAS_DLSE=has_dlse).items())),
                                   ROWS_WARPS, "rows"))
    return sorted(set(out), key=lambda v: (v.kernel, v.dtype, v.label(), v.constexprs))


def all_variants() -> list[Variant]:
    """Every variant of every kernel module."""
    return softmax_variants() + cross_entropy_variants() + vocab_parallel_variants()


# ----------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------


def _triton_tool(name: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm) from Triton's wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in Triton's wheel at {path}")
    return str(path)


def _compile(fn, signature: dict, constants: dict, divisible16: list, num_warps: int,
             maxnreg: int = 0):
    """``triton.compile`` of the JIT function ``fn`` for sm_90 with the given
    specialisation, under Triton 3.6 up to the newest.

    ``signature``: every argument name -> "constexpr", "*<dtype>" or "i32";
    ``constants``: constexpr name -> value; ``divisible16``: names of the
    pointers and ints marked divisible by 16. The version differences are
    handled here: the interpreter's wrapper is unwrapped (the caller may have
    imported the kernels with TRITON_INTERPRET=1) and the divisibility
    attribute is built by the backend's own parser (``BaseBackend.parse_attr``,
    3.6+; keys are argument-index paths)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    from softmax_gpu.kernels.softmax import FP_FUSION

    if not hasattr(fn, "params"):
        raise TypeError(f"{fn!r} is not a JIT function (imported under TRITON_INTERPRET=1?)")
    names = [p.name for p in fn.params]
    attrs = {(names.index(n),): BaseBackend.parse_attr("D") for n in divisible16}
    src = ASTSource(fn, signature, constants, attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": FP_FUSION}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget(*TARGET), options=options)


def specialisation(v: Variant, fn, aligned_ints: bool = True):
    """(signature, constants, divisible16 names) of ``v`` for the JIT function ``fn``."""
    import triton.language as tl

    ptrs = dict(v.ptrs)
    cx = dict(v.constexprs)
    if "ACC" in cx:
        cx["ACC"] = tl.float64 if cx["ACC"] == "fp64" else tl.float32
    sig, div = {}, []
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in cx:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            div.append(name)
        elif name not in INT_SPEC:
            raise ValueError(f"{v.kernel}: int argument {name!r} has no entry in INT_SPEC")
        elif INT_SPEC[name] == ONE:
            sig[name] = "constexpr"
            cx[name] = 1
        else:
            sig[name] = "i32"
            if INT_SPEC[name] == DIV16 and aligned_ints:
                div.append(name)
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in cx]
    if missing:
        raise ValueError(f"{v.kernel}: no value for constexpr {missing}")
    return sig, cx, div


def compile_variant(v: Variant, aligned_ints: bool = True):
    """The compiled kernel of ``v`` for sm_90 (its cubin: ``.asm["cubin"]``)."""
    import importlib

    fn = getattr(importlib.import_module(f"softmax_gpu.kernels.{v.module}"), v.kernel)
    sig, cx, div = specialisation(v, fn, aligned_ints)
    return _compile(fn, sig, cx, div, v.num_warps, v.maxnreg)


def resource_usage(cubin: bytes, what: str = "kernel") -> dict:
    """Registers, spill stack, shared and local bytes of a cubin (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_triton_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"could not read resource usage for {what}:\n{text}")
    return dict(regs=int(usage["REG"]), stack=int(usage["STACK"]),
                shared=int(usage.get("SHARED", 0)), local=int(usage.get("LOCAL", 0)))


@contextlib.contextmanager
def _stderr_captured():
    """Collect what the compiler's C++ side prints to fd 2 (MLIR diagnostics)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(f.fileno(), 2)
        text = []
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read())


def _compile_one(job):
    """Worker: (variant, aligned_ints, analyse) -> analyse(asm, variant) (``asm``:
    the compiled kernel's ``.asm``, "cubin", "ptx", ...), or {"error": message}
    when the compile fails."""
    v, aligned_ints, analyse = job
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even under the test env
    with _stderr_captured() as err:
        try:
            asm = compile_variant(v, aligned_ints).asm
        except Exception as e:  # a compile error is a result of the check
            failure = f"{type(e).__name__}: {e}"
        else:
            return analyse(asm, v)
    diag = [ln for ln in err[0].splitlines() if "error" in ln]
    return {"error": "; ".join(diag[:3] + [failure])}


def _usage(asm: dict, v: Variant) -> dict:
    return resource_usage(asm["cubin"], v.label())


def run(jobs: int = 2, variants=None, aligned_ints: bool = True, analyse=_usage):
    """[(variant, result)] for ``variants`` (default: all): result is
    ``analyse(asm, variant)`` (default: the resource usage of ``asm["cubin"]``) or
    {"error": ...} for a variant that fails to compile.

    Compiled in ``jobs`` fresh (spawned) processes, so that the kernels are
    real JIT functions even when the caller runs under TRITON_INTERPRET=1;
    variants with the same compile key are compiled once. ``analyse`` must be
    a module-level function (it is sent to the workers)."""
    import multiprocessing

    variants = all_variants() if variants is None else variants
    first = {}
    for v in variants:
        first.setdefault(v.compile_key(), v)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, jobs), mp_context=ctx) as pool:
        out = dict(zip(first, pool.map(_compile_one,
                                       [(v, aligned_ints, analyse) for v in first.values()])))
    return [(v, out[v.compile_key()]) for v in variants]


def failures(results) -> list[str]:
    """One line per variant that failed to compile or spills."""
    out = []
    for v, u in results:
        if "error" in u:
            out.append(f"ERROR {v.label()}: {u['error']}")
        elif u["stack"] or u["local"]:
            out.append(f"SPILL {v.label()}: stack {u['stack']} B, local {u['local']} B")
    return out


def _int_spec_summary(v: Variant) -> str:
    """The int specialisation of ``v``'s kernel, e.g. "1: INNER sx_n; D16: M N"."""
    import importlib

    fn = getattr(importlib.import_module(f"softmax_gpu.kernels.{v.module}"), v.kernel)
    skip = dict(v.ptrs).keys() | dict(v.constexprs).keys()
    ints = [n for n in fn.arg_names if n in INT_SPEC and n not in skip]
    return "; ".join(f"{s}: {' '.join(n for n in ints if INT_SPEC[n] == s)}"
                     for s in (ONE, DIV16) if any(INT_SPEC[n] == s for n in ints))


def write_table(results, out_dir: Path, aligned_ints: bool = True) -> Path:
    import triton

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    ver = triton.__version__
    base = f"sm90_triton{ver}{'' if aligned_ints else '_plain-ints'}_{stamp}"
    fields = ["kernel", "path", "dtype", "constexprs", "num_warps", "maxnreg", "regs", "stack",
              "shared", "local", "error", "target", "triton"]
    csv_path = out_dir / f"{base}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for v, u in results:
            w.writerow(dict(kernel=v.kernel, path=v.path, dtype=v.dtype,
                            constexprs=" ".join(f"{k}={val}" for k, val in v.constexprs),
                            num_warps=v.num_warps, maxnreg=v.maxnreg or "", target="sm_90",
                            triton=ver, **u))
    kernels = {}
    for v, _ in results:
        kernels.setdefault(v.kernel, v)
    md = [f"# Static resource usage, sm_90 (compiled on CPU, Triton {ver}, {stamp})", "",
          "Specialisation (see perf/static.py): pointers 16-byte aligned; ints as below "
          f"({ONE}: the constant 1; {DIV16}: divisible by 16"
          f"{'' if aligned_ints else ', NOT marked in this table'}). "
          f"fp fusion: {_fp_fusion()}.", ""]
    md += [f"- {k}: {_int_spec_summary(v)}" for k, v in sorted(kernels.items())]
    md += ["", "| kernel | path | dtype | constexprs | warps | maxnreg | regs | stack (spill) | "
           "shared B |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for v, u in results:
        cx = " ".join(f"{k}={val}" for k, val in v.constexprs)
        if "error" in u:
            md.append(f"| {v.kernel} | {v.path} | {v.dtype} | {cx} | {v.num_warps} | "
                      f"{v.maxnreg or ''} | ERROR | | |")
        else:
            md.append(f"| {v.kernel} | {v.path} | {v.dtype} | {cx} | {v.num_warps} | "
                      f"{v.maxnreg or ''} | {u['regs']} | {u['stack']} | {u['shared']} |")
    (out_dir / f"{base}.md").write_text("\n".join(md) + "\n")
    return csv_path


def _fp_fusion() -> bool:
    from softmax_gpu.kernels.softmax import FP_FUSION

    return FP_FUSION


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "static")
    ap.add_argument("--no-table", action="store_true", help="check only, write no table")
    ap.add_argument("--ints", choices=("aligned", "plain"), default="aligned",
                    help="aligned (default): ints marked divisible by 16 as in the common "
                         "call; plain: none marked (rows not a multiple of 16)")
    args = ap.parse_args(argv)
    import triton

    aligned = args.ints == "aligned"
    results = run(args.jobs, aligned_ints=aligned)
    ok = [u for _, u in results if "error" not in u]
    bad = failures(results)
    print(f"{len(results)} variants compiled for sm_90 under Triton {triton.__version__} "
          f"({args.ints} ints); max regs {max((u['regs'] for u in ok), default=0)}; "
          f"{len(bad)} failing")
    for line in bad:
        print("  " + line)
    if not args.no_table:
        print(f"table: {write_table(results, args.out, aligned)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
