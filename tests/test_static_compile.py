"""Static check: every kernel configuration the heuristics can pick compiles
for Hopper (sm_90) on the CPU, specialised as a real call specialises it, with
no register spills (cuobjdump STACK 0 and LOCAL 0), under the installed
Triton. ``.ci/run`` runs this file a second time under Triton 3.6 (the floor).

When a configuration spills, change the kernel or the heuristics' limits, not
this check.
"""

import inspect
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the perf/ folder (not installed)

import softmax_gpu  # noqa: E402
from perf import static  # noqa: E402
from softmax_gpu import heuristics  # noqa: E402
from softmax_gpu.kernels import cross_entropy as CEK  # noqa: E402
from softmax_gpu.kernels import softmax as SK  # noqa: E402
from softmax_gpu.kernels import vocab_parallel as VPK  # noqa: E402

CE_HOST = sys.modules["softmax_gpu.cross_entropy"]  # the module (the function shadows its name)


def _kernel_names(module) -> set:
    # JITFunction (compiled) and InterpretedFunction both carry .fn
    return {n for n, f in vars(module).items() if n.endswith("_kernel") and hasattr(f, "fn")}


def test_every_kernel_is_enumerated():
    """A kernel added to softmax_gpu.kernels without a static variant fails here."""
    import importlib
    import pkgutil

    import softmax_gpu.kernels as pkg

    variants = static.all_variants()
    covered = {(v.module, v.kernel) for v in variants}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"softmax_gpu.kernels.{info.name}")
        for name in _kernel_names(mod):
            assert (info.name, name) in covered, f"{info.name}.{name} has no static variant"


def _tuned_kernels(space, plan) -> list:
    """The forward kernels (name, constexprs to match) a perf.tune candidate
    of ``space`` with ``plan`` launches on bf16 rows."""
    cx = {"BLOCK_N": plan.block_n}
    if plan.path == heuristics.SINGLE:
        cx["ROWS"] = plan.rows_per_program
    elif getattr(plan, "stages", 1) != 1 and plan.path != "resident":
        cx["STAGES"] = plan.stages
    if space.table_op == "cross_entropy":
        return [(f"ce_class_{plan.path}_kernel", cx)]
    kind = "bwd" if space.table_op == "softmax_backward" else "fwd"
    if space.table_op != "softmax_backward" and "LOG" in static._constexpr_names(
            f"softmax_{kind}_{plan.path}_kernel" if plan.path != "split" else
            "softmax_fwd_split_norm_kernel"):
        cx["LOG"] = space.table_op == "log_softmax"
    name = {"split": {"fwd": "softmax_fwd_split_norm_kernel",
                      "bwd": "softmax_bwd_split_apply_kernel"}[kind]}.get(
        plan.path, f"softmax_{kind}_{plan.path}_kernel")
    return [(name, cx)]


def test_every_tuning_candidate_is_compiled():
    """Every plan a tuning run can time (each perf.tune candidate at its GPU
    shapes, on 132 multiprocessors and an H100's or an H200's L2) is among the
    variants the sm_90 check compiles: its kernel with that tile, rows,
    pipelining, warps and register budget."""
    from perf import tune

    compiled = {}
    for v in static.all_variants():
        if v.dtype == "bf16":
            compiled.setdefault((v.kernel, v.num_warps, v.maxnreg), []).append(dict(v.constexprs))
    missing = []
    for l2 in (50 << 20, 60 << 20):
        cfg = tune.TuneConfig(device="cuda", spaces=list(tune.SPACES.values()))
        for space in cfg.spaces:
            for shape in cfg.shapes(space):
                for c in tune.candidates(space, shape, "cpu", {"sm_count": 132, "l2_bytes": l2}):
                    with heuristics.override(sm_count=132, l2_bytes=l2), \
                            heuristics.override(op=space.table_op, **c.fields):
                        plan = space.plan(shape.M, shape.N, torch.device("cpu"))
                    for name, cx in _tuned_kernels(space, plan):
                        have = compiled.get((name, plan.num_warps, plan.regs), [])
                        if not any(h.items() >= cx.items() for h in have):
                            missing.append(f"{space.table_op} {shape.M}x{shape.N} {c.name}: "
                                           f"{name} {cx} warps={plan.num_warps} "
                                           f"maxnreg={plan.regs}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_no_compile_error_or_spill_on_sm90():
    jobs = max(1, min(os.cpu_count() or 1, 16))
    results = static.run(jobs)
    assert results, "no variants compiled"
    bad = static.failures(results)
    assert not bad, (f"Triton {triton.__version__}: {len(bad)} of {len(results)} variants "
                     "fail to compile or spill:\n" + "\n".join(bad))
    assert all(u["regs"] > 0 for _, u in results)


# ----------------------------------------------------------------------------
# The static specialisation is the one a real call gets
# ----------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel: records the launch arguments, launches nothing."""

    def __init__(self, name, fn, calls):
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, self.fn, args, kwargs))


def _vocab_parallel_shard_calls(x, t, off, vocab):
    """The shard kernels' host calls (private functions of the vocab-parallel
    module, called directly: no process group needed)."""
    import softmax_gpu.vocab_parallel as D

    D._shard_stats(x, t, off, vocab, -100, True)
    coef = torch.ones(5, t.numel())  # per-row terms: m, l, a, b, c
    D._shard_grad(x, t, coef, off, True)
    # the per-row kernels between them (one rank: no collective), the mean's
    # one grad_output and a returned lse's gradient
    W = x.shape[-1]
    fn = D._ShardLoss(t, None, None, D._Layout(0, W, (W,)), D._Opts(-100, "mean", 0.1, 0.0, 0.0),
                      x.dtype)
    mx, st = fn.stats(x, D._ALL)
    lse, _, _ = fn.combine(mx, st, D._ALL)
    fn.coefs(lse, D._ALL, torch.ones((), dtype=x.dtype), torch.ones(t.numel()))


def _typical_calls():
    """Contiguous bf16 rows with lengths and row counts that are multiples of
    16, cross-entropy with its default mean reduction: every path."""
    M, N = 64, 4096
    x = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, N, (M,))
    dy = torch.randn(M, N, dtype=torch.bfloat16)
    coop = dict(max_single=64, tile=256, long_path="coop", coop_splits=2)
    resident = dict(max_single=1024, tile=256, long_path="resident")  # chunks of 1024, 512
    for limits in ({}, dict(max_single=64, tile=256), dict(max_single=64, tile=256, sm_count=64),
                   coop, resident):
        # single, looped, split, cooperative and resident paths
        with heuristics.override(**limits):
            for fn in (softmax_gpu.softmax, softmax_gpu.log_softmax):
                fn(x, dim=-1).backward(dy)
            softmax_gpu.cross_entropy(x, t).backward()
            softmax_gpu.cross_entropy(x, t, label_smoothing=0.1, weight=torch.rand(N)).backward()
            softmax_gpu.cross_entropy(x, torch.softmax(dy.float(), -1)).backward()
            _, lse = softmax_gpu.cross_entropy(x, t, return_lse=True)
            (lse * lse).mean().backward()  # the lse's gradient: contiguous, as typical
            softmax_gpu.linear_cross_entropy(x[:, :64], x[:128, :64].detach(), t % 128,
                                             return_token_accuracy=True)[0].backward()
            _vocab_parallel_shard_calls(x.detach(), t, N, 2 * N)
            # the traced backward (one pass from the logits and the lse), called as its op
            CE_HOST.cross_entropy_backward(x.detach(), t, None, torch.zeros(M), torch.ones(()),
                                           -100, "mean", 0.0, 0.0, 0.0, 1.0)


def _spec_of(value, do_not_specialize: bool) -> str:
    """How Triton's JIT specialises an int argument (its own rules)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kind, attr = native_specialize_impl(BaseBackend, value, False, not do_not_specialize, True)[:2]
    if kind == "constexpr":
        return static.ONE if value == 1 else f"constexpr {value}"
    return static.DIV16 if attr and "D" in attr else static.PLAIN


def test_static_specialisation_is_a_real_calls(monkeypatch):
    """Record the launch arguments of typical calls (nothing is launched) and
    check that Triton would specialise each int exactly as perf/static.py
    compiles it (``INT_SPEC``), that every pointer is 16-byte aligned, and
    that each launch sets enable_fp_fusion."""
    from softmax_gpu import _dispatch

    monkeypatch.setattr(_dispatch, "_INTERPRETED", True)  # CPU tensors take the kernels
    calls = []
    for mod in (SK, CEK, VPK):
        for name in _kernel_names(mod):
            monkeypatch.setattr(mod, name, _Recorder(name, getattr(mod, name), calls))
    _dispatch.clear_plans()  # the memoised plans hold the real launchers
    try:
        _typical_calls()
    finally:
        _dispatch.clear_plans()
    seen = {name for name, *_ in calls}
    assert seen == set().union(*(_kernel_names(m) for m in (SK, CEK, VPK))), \
        f"kernels the typical calls did not reach: {sorted(set(_kernel_names(SK)) - seen)}"
    mismatches = []
    for name, fn, args, kwargs in calls:
        assert kwargs.get("enable_fp_fusion") is SK.FP_FUSION, f"{name}: enable_fp_fusion not set"
        params = inspect.signature(fn.fn).parameters
        bound = inspect.signature(fn.fn).bind_partial(
            *args, **{k: v for k, v in kwargs.items() if k in params})
        skip = set(getattr(fn, "kwargs", {}).get("do_not_specialize") or ())
        for arg, value in bound.arguments.items():
            if params[arg].annotation in (triton.language.constexpr, "tl.constexpr"):
                continue
            if isinstance(value, torch.Tensor):
                if value.data_ptr() % 16:
                    mismatches.append(f"{name}.{arg}: pointer not 16-byte aligned")
            elif isinstance(value, int):
                got, want = _spec_of(value, arg in skip), static.INT_SPEC.get(arg)
                if got != want:
                    mismatches.append(f"{name}.{arg} = {value}: a real call gets {got!r}, "
                                      f"perf/static.py compiles {want!r}")
    assert not mismatches, "\n".join(sorted(set(mismatches)))


def test_sass_counter_finds_the_tile_loops():
    """perf/sass.py on one looped kernel (one compile): both tile loops found,
    each with instructions, exps and 16-byte loads per element."""
    from perf import sass

    (hot, v), = [(h, v) for h, v in sass.hot_variants() if v.kernel == "softmax_fwd_looped_kernel"]
    (_, a), = static.run(1, [v], analyse=sass.analyse)
    assert "error" not in a, a
    assert a["kind"] == "loop" and a["loops_found"] == 2, a
    for part in a["parts"]:
        assert part["instr_per_elem"] > 0 and part["elems_per_thread"] == 16, part
        # bf16 rows read 16 bytes at a time (with an eviction hint: LDG.E.EL.128, .EF.128)
        assert any(op.endswith(".128") for op in part["ldg"]), part
        assert part["mufu"].get("MUFU.EX2", 0) >= 16, part  # one exp per element



# ----------------------------------------------------------------------------
# In-place writes: every warp's read before any warp's overwrite
# ----------------------------------------------------------------------------

# kernel -> (a constexpr flag that must hold, [(a statement, a later
# statement whose stores may overwrite what the first read or wrote)]):
# within one program, a value that every thread reads and other threads then
# overwrite (the target logit under an in-place gradient, the rescale's
# per-row factor), or an element one thread writes and another then
# overwrites (the target's own gradient element over its row's), needs a
# CTA barrier in between. The interpreter runs a program as whole-array
# steps, so only the compiled code shows a missing one.
_ORDERED = {
    "ce_class_single_kernel": ("WRITE_GRAD", [
        ("zt = load_logits(X, xb + t * sx_n", "tl.store(G + gb[:, None]"),
        ("tl.store(G + gb[:, None]", "tl.store(G + gb + t * sg_n")]),
    "ce_class_looped_kernel": ("WRITE_GRAD", [
        ("zt = load_logits(X, xb + t * sx_n", "smooth_sum = class_row_pass(")]),
    "ce_grad_scale_kernel": ("IN_PLACE", [
        ("done = tl.load(STATE + rows", "tl.store(STATE + rows, go"),
        ("have = tl.load(STATE + r", "tl.store(STATE + rows, go")]),
}


def _lines_of(fn, text: str) -> str:
    """"file.py:first-last": the lines of the one statement of ``fn`` that
    starts with the line holding ``text``."""
    import ast
    import textwrap

    lines, start = inspect.getsourcelines(fn.fn)
    (i,), = [[i for i, line in enumerate(lines) if text in line]]
    (node,) = [n for n in ast.walk(ast.parse(textwrap.dedent("".join(lines))))
               if isinstance(n, ast.stmt) and n.lineno == i + 1]
    return f"{Path(inspect.getsourcefile(fn.fn)).name}:{start + i}-{start + node.end_lineno - 1}"


def test_reads_are_ordered_before_in_place_writes():
    """One variant of each kernel that overwrites what its other warps read
    or wrote: in its sm_90 PTX, every path from the first statement's global
    accesses to a store of the second passes a bar.sync (a path through the
    row loop's back edge too)."""
    import functools

    from perf import sass

    where, variants = {}, []
    for kernel, (flag, pairs) in _ORDERED.items():
        fn = getattr(CEK, kernel)
        where[kernel] = [(_lines_of(fn, a), _lines_of(fn, b)) for a, b in pairs]
        variants.append(max((v for v in static.all_variants()
                             if v.kernel == kernel and dict(v.constexprs).get(flag) is True),
                            key=lambda v: dict(v.constexprs)["BLOCK_N"]))
    results = static.run(2, variants, analyse=functools.partial(sass.barrier_between,
                                                                 where=where))
    for v, pairs in results:
        assert "error" not in pairs, (v.label(), pairs)
        for r in pairs:
            assert r["accesses"] and r["stores"], (v.label(), r)
            assert not r["unguarded"], (f"{v.label()}: a path from {r['first']} to the store "
                                        f"at {r['then']} with no CTA barrier "
                                        f"(PTX lines {r['unguarded']})")
