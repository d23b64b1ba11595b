"""Checks only a GPU can make: ``python -m perf.gpu_checks`` (from the repo root).

1. **CUDA graphs.** softmax forward+backward and, when
   ``softmax_gpu.cross_entropy`` exists, cross_entropy forward+backward are
   captured in a ``torch.cuda.CUDAGraph`` (after a warm-up on a side stream,
   which also JIT-compiles the kernels), then replayed on fresh random data
   copied into the static inputs. The outputs are poisoned with NaN before
   each replay, and each replay is compared with an eager call of the same
   function and with torch in float32. Shapes cover the on-chip, looped and
   split-row paths.
   ``softmax_gpu.linear_cross_entropy`` (several chunks; reductions "mean"
   and "none", whose backward recomputes the logits) is captured the same
   way, its input and head gradients compared.
2. **Long rows at grad_output != 1, against float64.** The cross-entropy
   (mean, ``(loss * 2.5).backward()``, the in-place rescale of the saved
   gradient) and softmax forward+backward at LLM sizes on the default plan
   and on every long-row path (one program per row, the persistent grid,
   the cooperative path, the resident chunks with and without waiting), at
   the bf16 limit of one rounding (1e-2 on the norm); a failure prints
   which rows are wrong, by what scale, in which columns and, for the
   cross-entropy, what their target element holds. Each path runs twice:
   every path merges in a fixed order and forms each element one way, so a
   second run whose bits differ from the first is a race, reported by rows.
3. **The gradient written over the logits.** ``cross_entropy(...,
   inplace_backward=True)`` (the linear cross-entropy's chunks take the same
   kernels) on the one-program-per-row and looped paths, with targets in the
   first columns (where another warp's gradient store races the read of the
   target logit unless a barrier orders them): its row losses, lse and
   gradient bit for bit against the out-of-place call's, several runs.
4. **fp32 parameters under autocast.** ``linear_cross_entropy`` under bf16
   autocast over an fp32 head, ``chunking_method="lean"`` (the weight cast
   a slice at a time) against the default plan (cast whole): loss, dX and
   dW against float64 within the bf16 limit and within 1.1x the default's
   error, and on CUDA the peak allocated during the call at least the
   16-bit copy of the weight (2 V D bytes), less two slices, below the
   default's.
5. **No synchronisation.** A training step (linear -> softmax_gpu.log_softmax
   + gather / softmax_gpu.softmax / softmax_gpu.cross_entropy, and
   softmax_gpu.linear_cross_entropy on the hidden states -> backward ->
   SGD update) runs under ``torch.cuda.set_sync_debug_mode("error")``, so any
   op that synchronises the host raises. A deliberate ``.item()`` first
   proves the detector is armed.

They run in the order 5, 1, 4, 3, 2 (the long rows, the heaviest, last), and
each result is a row of one markdown table, printed as the check ends. After
a failure that left the CUDA context unusable (a kernel fault is sticky) the
remaining checks are not run, and the table says why.

Exit status 0 when every check passes, 1 otherwise. ``--device cpu`` runs the
same comparisons eagerly on CPU (no capture, no sync check) to test the
script itself without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import traceback

import torch

from perf import env, timing

__all__ = ["main"]

# [M, N] per check: on-chip rows, looped rows (N past the on-chip limit), and
# a few very long rows (split across programs). CPU sizes for --device cpu.
GPU_SHAPES = [(torch.bfloat16, 2048, 4096), (torch.bfloat16, 512, 65536),
              (torch.bfloat16, 4, 262144), (torch.float32, 1024, 8192)]
CPU_SHAPES = [(torch.float32, 8, 256), (torch.bfloat16, 4, 1024)]
# Long rows against float64 at grad_output != 1: (family, dtype, M, N) on
# every long-row path.
GPU_LONG = [("cross_entropy", torch.bfloat16, 2048, 256000),
            ("cross_entropy", torch.bfloat16, 4096, 128256),
            ("softmax", torch.bfloat16, 2048, 262144)]
CPU_LONG = [("cross_entropy", torch.bfloat16, 9, 300), ("softmax", torch.float32, 9, 300)]
# name -> Limits fields ("default": the plan a call gets, the tuned table's
# on a GPU that has one); "resident, no wait": every chunk but a row's last gives
# up at once (its write left to the row's last arrival, racing the others)
LONG_PATHS = {"default": {}, "looped": dict(long_path="looped"),
              "persistent": dict(long_path="persistent"), "coop": dict(long_path="coop"),
              "resident": dict(long_path="resident"),
              "resident, no wait": dict(long_path="resident", resident_spin=0)}
LONG_LIMIT = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
# runs per path: the first against float64, the others bit for bit against it
LONG_REPEATS = 2
GRAD_OUTPUT = 2.5
# The gradient written over the logits: (dtype, M, N), and the plans to force
GPU_INPLACE = [(torch.bfloat16, 4096, 4096), (torch.bfloat16, 512, 128256)]
CPU_INPLACE = [(torch.bfloat16, 6, 300)]
INPLACE_REPEATS = 3
# linear_cross_entropy: (dtype, tokens, hidden, vocabulary, chunk_size)
GPU_LINEAR_SHAPES = [(torch.bfloat16, 4096, 1024, 32000, 1024)]
CPU_LINEAR_SHAPES = [(torch.float32, 40, 16, 96, 16)]
# fp32 head under bf16 autocast: (tokens, hidden, vocabulary)
GPU_LEAN = (4096, 4096, 32000)
CPU_LEAN = (40, 16, 200)


class Results:
    """The checks' markdown table, a row printed as each check ends (a run cut
    short by its time limit keeps the rows it reached)."""

    HEAD = "| check | result | detail |\n|---|---|---|"

    def __init__(self):
        self.items: list[tuple[str, bool, str]] = []
        print(self.HEAD, flush=True)

    @staticmethod
    def _word(ok: bool | None) -> str:
        return "SKIP" if ok is None else ("PASS" if ok else "**FAIL**")

    def add(self, name: str, ok: bool | None, detail: str = "") -> None:
        """ok: True (pass), False (fail) or None (skipped, with the reason in detail)."""
        self.items.append((name, ok, detail))
        print(self._row(name, ok, detail), flush=True)

    def _row(self, name, ok, detail) -> str:
        return f"| {name} | {self._word(ok)} | {detail} |"

    def count(self, ok: bool | None) -> int:
        """How many checks passed (True), failed (False) or were skipped (None)."""
        return sum(o is ok for _, o, _ in self.items)

    def table(self) -> str:
        return "\n".join([self.HEAD] + [self._row(*item) for item in self.items])

    @property
    def ok(self) -> bool:
        return any(ok for _, ok, _ in self.items) and all(ok is not False for _, ok, _ in self.items)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    denom = float(b.norm())
    return float((a - b).norm()) / (denom if denom > 0 else 1.0)


def _capture(step, reset):
    """Run ``step`` three times on a side stream (JIT compile, allocator
    warm-up), then capture one call in a CUDA graph: (graph, its output).
    ``reset`` runs before each call (clears the gradients)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _verdict(res: Results, name: str, dtype, worst_ref: float, worst_eager: float) -> None:
    """PASS when the replays match torch within the harness tolerance and the
    eager call within a fifth of it."""
    from perf.ops import TOLERANCE

    tol = TOLERANCE[dtype]
    ok = worst_ref <= tol and worst_eager <= tol / 5
    res.add(name, ok, f"rel err vs torch {worst_ref:.2e} (limit {tol:g}), "
                      f"vs eager {worst_eager:.2e} (limit {tol / 5:g})")


def _graph_check(res: Results, family: str, device: str, shapes) -> None:
    """Capture forward+backward of ``family`` once per shape, replay twice."""
    import softmax_gpu

    from perf.ops import CHECK_GRAD_OUTPUT, OPS, dtype_name

    op = OPS["softmax_fwd_bwd" if family == "softmax" else "ce_fwd_bwd"]
    fn = (lambda x: softmax_gpu.softmax(x, -1)) if family == "softmax" else \
        softmax_gpu.cross_entropy
    key = "y" if family == "softmax" else "loss"

    def step(inp):
        out = op.call(fn, inp)
        if family == "softmax":
            out.backward(inp.dy)
        else:
            (out * CHECK_GRAD_OUTPUT).backward()  # as op.run_once and op.error
        return out

    for dtype, M, N in shapes:
        how = "cuda graph" if device == "cuda" else "eager dry run (cpu)"
        name = f"{how} {family} fwd+bwd {dtype_name(dtype)} {M}x{N}"
        try:
            static = op.make_inputs(M, N, dtype, device, seed=1)
            static.x.requires_grad_(True)
            graph = None
            if device == "cuda":
                graph, out = _capture(lambda: step(static), lambda: setattr(static.x, "grad", None))
                grad = static.x.grad
            worst_ref, worst_eager = 0.0, 0.0
            for trial in range(2):
                fresh = op.make_inputs(M, N, dtype, device, seed=100 + trial)
                with torch.no_grad():
                    static.x.copy_(fresh.x)
                    for attr in ("dy", "target"):
                        if getattr(fresh, attr) is not None:
                            getattr(static, attr).copy_(getattr(fresh, attr))
                if graph is not None:
                    out.detach().fill_(math.nan)  # poison: replay must write every element
                    grad.fill_(math.nan)
                    graph.replay()
                    torch.cuda.synchronize()
                else:  # --device cpu: no capture, exercise the comparisons only
                    static.x.grad = None
                    out = step(static)
                    grad = static.x.grad
                eager = op.run_once(fn, op.make_inputs(M, N, dtype, device, seed=100 + trial))
                worst_eager = max(worst_eager, _rel(out, eager[key]), _rel(grad, eager["dx"]))
                worst_ref = max(worst_ref, op.error({key: out.detach(), "dx": grad}, fresh))
            _verdict(res, name, dtype, worst_ref, worst_eager)
            graph = static = None  # free the captured graph's pool
        except Exception as exc:
            traceback.print_exc()
            res.add(name, False, f"{type(exc).__name__}: {exc}")


def _linear_graph_check(res: Results, device: str, shapes) -> None:
    """Capture linear_cross_entropy forward+backward (input and head
    gradients, at grad_output CHECK_GRAD_OUTPUT: the in-place rescale) once
    per shape, reduction and stream plan (``overlap``: each chunk's
    cross-entropy on a side stream), replay twice on fresh data."""
    import softmax_gpu

    from perf.ops import CHECK_GRAD_OUTPUT, OPS, dtype_name
    from perf.sizes import Shape

    op = OPS["linear_ce_fwd_bwd"]
    plans = [("mean", False), ("none", False), ("mean", True), ("none", True)]
    if not hasattr(softmax_gpu, "LinearCrossEntropyOptions"):
        plans = plans[:2]
    for dtype, M, D, V, chunk in shapes:
        for reduction, overlap in plans:
            options = softmax_gpu.LinearCrossEntropyOptions(overlap=True) if overlap else None

            def fn(x, w, t, reduction=reduction, options=options):
                loss = softmax_gpu.linear_cross_entropy(x, w, t, reduction=reduction,
                                                        chunk_size=chunk, options=options)
                return loss if reduction == "mean" else loss.float().mean()

            how = "cuda graph" if device == "cuda" else "eager dry run (cpu)"
            name = (f"{how} linear_cross_entropy ({reduction}{', overlap' if overlap else ''}) "
                    f"fwd+bwd {dtype_name(dtype)} {M}x{D}x{V}, chunks of {chunk}")
            shape = Shape(M, V, "custom", D)
            try:
                static = op.shape_inputs(shape, dtype, device, seed=1)
                params = (static.x, static.w)
                for p in params:
                    p.requires_grad_(True)

                def step():
                    out = op.call(fn, static)
                    (out * CHECK_GRAD_OUTPUT).backward()  # as op.run_once
                    return out

                def reset():
                    static.x.grad = static.w.grad = None

                graph = None
                if device == "cuda":
                    graph, out = _capture(step, reset)
                    gx, gw = static.x.grad, static.w.grad
                worst_ref, worst_eager = 0.0, 0.0
                for trial in range(2):
                    fresh = op.shape_inputs(shape, dtype, device, seed=100 + trial)
                    with torch.no_grad():
                        for attr in ("x", "w", "target"):
                            getattr(static, attr).copy_(getattr(fresh, attr))
                    if graph is not None:
                        for buf in (out.detach(), gx, gw):
                            buf.fill_(math.nan)  # replay must write every element
                        graph.replay()
                        torch.cuda.synchronize()
                    else:
                        reset()
                        out = step()
                        gx, gw = static.x.grad, static.w.grad
                    got = {"loss": out.detach(), "dx": gx, "dw": gw}
                    eager = op.run_once(fn, op.shape_inputs(shape, dtype, device, seed=100 + trial))
                    worst_eager = max(worst_eager, *(_rel(got[k], eager[k]) for k in got))
                    worst_ref = max(worst_ref, op.error(got, fresh))  # "none": its mean is checked
                _verdict(res, name, dtype, worst_ref, worst_eager)
                graph = static = None  # free the captured graph's pool
            except Exception as exc:
                traceback.print_exc()
                res.add(name, False, f"{type(exc).__name__}: {exc}")


def _lean_autocast_check(res: Results, device: str, shape) -> None:
    """linear_cross_entropy under bf16 autocast over an fp32 head: "lean"
    (the weight cast a slice at a time) against the default plan."""
    import softmax_gpu
    from softmax_gpu import linear_cross_entropy as lce_fn

    lce_module = sys.modules["softmax_gpu.linear_cross_entropy"]
    N, D, V = shape
    name = f"linear_cross_entropy lean, bf16 autocast over fp32 {N}x{D}x{V}"
    try:
        g = torch.Generator().manual_seed(7)
        x0 = torch.randn(N, D, generator=g).to(device)
        w0 = (torch.randn(V, D, generator=g) * 0.02).to(device)
        t = torch.randint(0, V, (N,), generator=g).to(device)
        x64, w64 = (p.to(torch.bfloat16).double().requires_grad_() for p in (x0, w0))
        ref_loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x64, w64), t)
        ref_loss.backward()
        ref = {"loss": ref_loss.detach(), "dx": x64.grad, "dw": w64.grad}
        slice_bytes = lce_module.WEIGHT_SLICE_BYTES if device == "cuda" else 64 * D * 2
        got, peaks = {}, {}
        for how in ("auto", "lean"):
            x, w = (p.clone().requires_grad_() for p in (x0, w0))
            opts = softmax_gpu.LinearCrossEntropyOptions(chunking_method=how)
            saved = lce_module.WEIGHT_SLICE_BYTES
            lce_module.WEIGHT_SLICE_BYTES = slice_bytes
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = lce_fn(x, w, t, options=opts)
                loss.backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                    peaks[how] = torch.cuda.max_memory_allocated() - base
            finally:
                lce_module.WEIGHT_SLICE_BYTES = saved
            got[how] = {"loss": loss.detach(), "dx": x.grad, "dw": w.grad}
        errs = {how: max(_rel(got[how][k], ref[k]) for k in ref) for how in got}
        ok = errs["lean"] <= max(LONG_LIMIT[torch.bfloat16], 1.1 * errs["auto"])
        detail = f"worst rel err vs float64: lean {errs['lean']:.2e}, default {errs['auto']:.2e}"
        if peaks:
            copy = V * D * 2
            ok = ok and peaks["lean"] <= peaks["auto"] - copy + 2 * slice_bytes
            detail += (f"; peak during the call {peaks['lean'] / 2**30:.3f} GiB against "
                       f"{peaks['auto'] / 2**30:.3f} (16-bit weight {copy / 2**30:.3f})")
        res.add(name, ok, detail)
    except Exception as exc:
        traceback.print_exc()
        res.add(name, False, f"{type(exc).__name__}: {exc}")


def _row_report(got: torch.Tensor, ref: torch.Tensor, target: torch.Tensor | None = None,
                shown: int = 4) -> str:
    """Which rows of ``got`` are off from ``ref`` (relative row norms over 5e-2),
    and how, for the first ``shown`` of them: the row's scale against ``ref``
    (<got, ref> / <ref, ref>: 0.40 at grad_output 2.5 is a row left unscaled,
    2.5 one scaled twice), the columns that differ (first, last and how many:
    a cooperative or resident chunk shows as one aligned range), and with
    ``target`` (class indices) the target element's ratio got / ref."""
    got, ref = got.detach().double(), ref.detach().double()
    diff = (got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    bad = (diff > 5e-2) | ~torch.isfinite(diff)
    n = int(bad.sum())
    if not n:
        return f"worst row {float(diff.max()):.2e}"
    rows = bad.nonzero().flatten()
    parts = []
    for r in rows[:shown].tolist():
        g, f = got[r], ref[r]
        scale = float((g * f).sum() / (f * f).sum().clamp_min(1e-300))
        off = ((g - f).abs() > 2e-2 * f.abs() + 1e-3 * float(f.abs().max())) | ~torch.isfinite(g)
        cols = off.nonzero().flatten()
        where = (f"cols {int(cols[0])}..{int(cols[-1])} ({cols.numel()} off)" if cols.numel()
                 else "no column off")
        part = f"row {r}: {float(diff[r]):.2e}, scale {scale:.3g}, {where}"
        if target is not None:
            t = int(target[r])
            part += f", target {t}: {float(g[t]):.4g} / {float(f[t]):.4g}"
        parts.append(part)
    return (f"{n} of {got.shape[0]} rows off by > 5e-2 (rows {rows[:8].tolist()}); "
            + "; ".join(parts))


def _long_row_check(res: Results, device: str, cases, repeats: int = LONG_REPEATS) -> None:
    """Every long-row path, forward+backward at grad_output != 1 against float64,
    with every kernel output poisoned with NaN first (a row or an element a
    kernel leaves unwritten, e.g. a row's loss or its gradient factor, shows
    as NaN instead of a stale buffer's value). ``repeats`` runs per path: the
    first against float64, the others against it bit for bit."""
    import softmax_gpu
    from perf.ops import off_target
    from softmax_gpu import heuristics
    from softmax_gpu._dispatch import poison_outputs

    small = {} if device == "cuda" else dict(max_single=64, tile=16, sm_count=2)
    for family, dtype, M, N in cases:
        g = torch.Generator(device=device).manual_seed(7)
        x = (torch.randn(M, N, device=device, generator=g) * 3).to(dtype)
        x64 = x.double().requires_grad_()
        if family == "cross_entropy":
            t = torch.randint(0, N, (M,), device=device, generator=g)
            ref = torch.nn.functional.cross_entropy(x64, t)
            (ref * GRAD_OUTPUT).backward()
        else:
            dy = torch.randn(M, N, device=device, generator=g).to(dtype)
            ref = torch.softmax(x64, -1)
            ref.backward(dy.double())
        for path in LONG_PATHS:
            name = (f"long rows, {path}: {family} fwd+bwd {str(dtype)[6:]} {M}x{N}, "
                    f"grad_output {GRAD_OUTPUT if family == 'cross_entropy' else 'random'}")
            try:
                # the default plan as a call gets it: with the GPU's tuned table
                fields = {**LONG_PATHS[path], **small}
                limit = LONG_LIMIT[dtype]
                first, ok, detail = None, True, ""
                for k in range(1, repeats + 1):
                    xs = x.clone().requires_grad_()
                    plan = heuristics.override(**fields) if fields else contextlib.nullcontext()
                    with plan, poison_outputs():
                        if family == "cross_entropy":
                            out = softmax_gpu.cross_entropy(xs, t)
                            (out * GRAD_OUTPUT).backward()
                        else:
                            out = softmax_gpu.softmax(xs, -1)
                            out.backward(dy)
                    out, grad = out.detach(), xs.grad
                    del xs
                    if first is None:
                        first = (out, grad)
                        e_out, e_dx = _rel(out, ref), _rel(grad, x64.grad)
                        e_off = (_rel(off_target(grad, t), off_target(x64.grad, t))
                                 if family == "cross_entropy" else 0.0)
                        ok = all(e <= limit for e in (e_out, e_dx, e_off))  # NaN fails
                        detail = (f"rel err vs float64: out {e_out:.2e}, grad {e_dx:.2e}"
                                  + (f", grad off target {e_off:.2e}"
                                     if family == "cross_entropy" else "")
                                  + f" (limit {limit:g})")
                        if not ok:
                            detail += "; grad " + _row_report(
                                grad, x64.grad, t if family == "cross_entropy" else None)
                        continue
                    # every path merges in a fixed order and forms each
                    # element one way: a run whose bits differ shows a race
                    differs = _bits_differ(*first, out, grad)
                    if differs:
                        ok = False
                        detail += f"; run {k} of {repeats} differs from run 1: {differs}"
                    del out, grad
                res.add(name, ok, detail)
                del first
            except Exception as exc:
                traceback.print_exc()
                res.add(name, False, f"{type(exc).__name__}: {exc}")
        del x, x64, ref


def _inplace_paths(N: int, device: str) -> dict:
    """name -> Limits fields for rows of N: the plan a call gets, the row on
    chip in one program (N <= 16384), the looped pass over tiles."""
    small = {} if device == "cuda" else dict(tile=16, sm_count=2)
    pow2 = 1 << (N - 1).bit_length()
    paths = {"default": {}}
    if N <= 16384:
        paths["one program per row"] = dict(max_single=pow2, **small)
    paths["looped"] = dict(max_single=pow2 // 4, long_path="looped", **small)
    return paths


def _inplace_check(res: Results, device: str, cases, repeats: int = INPLACE_REPEATS) -> None:
    """``cross_entropy(..., reduction="none", inplace_backward=True)`` against
    the same call out of place, bit for bit (row losses, lse, gradient), on
    every plan of ``_inplace_paths``, with targets in the first 64 columns;
    ``repeats`` runs, each from fresh logits."""
    import softmax_gpu
    from softmax_gpu import heuristics
    from softmax_gpu._dispatch import poison_outputs

    for dtype, M, N in cases:
        g = torch.Generator(device=device).manual_seed(11)
        x = (torch.randn(M, N, device=device, generator=g) * 3).to(dtype)
        t = torch.randint(0, min(N, 64), (M,), device=device, generator=g)
        for path, fields in _inplace_paths(N, device).items():
            name = f"in place, {path}: cross_entropy {str(dtype)[6:]} {M}x{N}, targets < 64"
            try:
                plan = heuristics.override(**fields) if fields else contextlib.nullcontext()
                detail, ok = "", True
                with plan, poison_outputs():
                    xs = x.clone().requires_grad_()
                    loss, lse = softmax_gpu.cross_entropy(xs, t, reduction="none",
                                                          return_lse=True)
                    loss.backward(torch.ones_like(loss))
                    want = (loss.detach(), lse.detach(), xs.grad)
                    for k in range(1, repeats + 1):
                        logits = x.clone().requires_grad_() * 1
                        got_loss, got_lse = softmax_gpu.cross_entropy(
                            logits, t, reduction="none", return_lse=True,
                            inplace_backward=True)
                        (grad,) = torch.autograd.grad(got_loss, logits,
                                                      torch.ones_like(got_loss))
                        bad = [f"{what} {int((~((a == b) | (a.isnan() & b.isnan()))).sum())}"
                               for what, a, b in (("losses", got_loss.detach(), want[0]),
                                                  ("lse", got_lse.detach(), want[1]),
                                                  ("gradient", grad, want[2]))
                               if not torch.equal(a.isnan(), b.isnan())
                               or not torch.equal(a.nan_to_num(), b.nan_to_num())]
                        if bad:
                            ok = False
                            detail = f"run {k}: elements differing from out of place: " \
                                + ", ".join(bad)
                            break
                if ok:
                    detail = f"{repeats} runs bit for bit as out of place"
                res.add(name, ok, detail)
            except Exception as exc:
                traceback.print_exc()
                res.add(name, False, f"{type(exc).__name__}: {exc}")


def _bits_differ(out_a, grad_a, out_b, grad_b) -> str:
    """'' when two runs' outputs and gradients are the same bits (NaN where
    NaN), else how many elements and which rows of the gradient differ."""
    def same(a, b):
        return (a == b) | (torch.isnan(a) & torch.isnan(b))

    bad = ~same(grad_a, grad_b)
    n, rows = int(bad.sum()), bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten()
    out_n = int((~same(out_a, out_b)).sum())
    if not n and not out_n:
        return ""
    return (f"{out_n} output and {n} gradient elements, gradient rows {rows[:8].tolist()}"
            f"{' ...' if rows.numel() > 8 else ''}")


def _sync_check(res: Results) -> None:
    """A training step under set_sync_debug_mode("error") for each loss."""
    import softmax_gpu

    # The detector must be armed: a deliberate .item() has to raise.
    probe = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        probe.sum().item()
        armed = False
    except RuntimeError:
        armed = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    res.add("sync debug detector armed (.item() raises)", armed)
    if not armed:
        return

    M, K, N = 2048, 1024, 32000
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, N, (M,), device="cuda")
    w = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    losses = {
        "log_softmax + gather": lambda z: -softmax_gpu.log_softmax(z, -1).gather(1, t[:, None]).float().mean(),
        "softmax + weighted sum": lambda z: (softmax_gpu.softmax(z, -1) * w).float().sum(),
    }
    if hasattr(softmax_gpu, "cross_entropy"):
        losses["cross_entropy"] = lambda z: softmax_gpu.cross_entropy(z, t)
    else:
        res.add("no-sync training step: cross_entropy", None,
                "skipped: softmax_gpu.cross_entropy does not exist (yet)")

    # every loss as a function of the hidden states h (the logits are lin(h))
    steps = {name: (lambda f: lambda hidden: f(lin(hidden)))(f) for name, f in losses.items()}
    if hasattr(softmax_gpu, "linear_cross_entropy"):
        for red in ("mean", "none"):
            steps[f"linear_cross_entropy ({red})"] = (
                lambda hidden, red=red: softmax_gpu.linear_cross_entropy(
                    hidden, lin.weight, t, reduction=red, chunk_size=512).float().mean())
        if hasattr(softmax_gpu, "LinearCrossEntropyOptions"):
            over = softmax_gpu.LinearCrossEntropyOptions(overlap=True)
            steps["linear_cross_entropy (mean, overlap)"] = (
                lambda hidden: softmax_gpu.linear_cross_entropy(
                    hidden, lin.weight, t, chunk_size=512, options=over) * 2.5)

    def train_step(loss_fn):
        loss = loss_fn(h)
        loss.backward()
        with torch.no_grad():
            lin.weight.add_(lin.weight.grad, alpha=-1e-3)
        lin.weight.grad = None
        h.grad = None
        return loss

    for name, loss_fn in steps.items():
        label = f"no-sync training step: {name}"
        try:
            train_step(loss_fn)  # warm-up: compile outside the check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = train_step(loss_fn)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            value = float(loss)
            res.add(label, math.isfinite(value), f"loss {value:.4f}")
        except Exception as exc:
            traceback.print_exc()
            res.add(label, False, f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu_checks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = p.parse_args(argv)
    device = env.choose_device(args.device)
    env.enable_interpreter_for_cpu(device)
    import softmax_gpu

    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    print(f"gpu_checks on {device}: torch {torch.__version__}, "
          f"cross_entropy {'present' if hasattr(softmax_gpu, 'cross_entropy') else 'absent'}", flush=True)
    res = Results()
    # The quick checks first and the long rows (the heaviest, and paths that
    # never ran on a GPU) last: a run cut by its time limit has the rest.
    checks = []
    if device == "cuda":
        checks.append(lambda: _sync_check(res))
    checks.append(lambda: _graph_check(res, "softmax", device, shapes))
    if hasattr(softmax_gpu, "cross_entropy"):
        checks.append(lambda: _graph_check(res, "cross_entropy", device, shapes))
    else:
        res.add("cuda graph cross_entropy", None, "skipped: softmax_gpu.cross_entropy does not exist (yet)")
    if hasattr(softmax_gpu, "linear_cross_entropy"):
        checks.append(lambda: _linear_graph_check(
            res, device, GPU_LINEAR_SHAPES if device == "cuda" else CPU_LINEAR_SHAPES))
    else:
        res.add("cuda graph linear_cross_entropy", None,
                "skipped: softmax_gpu.linear_cross_entropy does not exist (yet)")
    if hasattr(softmax_gpu, "LinearCrossEntropyOptions"):
        checks.append(lambda: _lean_autocast_check(res, device,
                                                   GPU_LEAN if device == "cuda" else CPU_LEAN))
    if hasattr(softmax_gpu, "cross_entropy"):
        checks.append(lambda: _inplace_check(
            res, device, GPU_INPLACE if device == "cuda" else CPU_INPLACE))
    checks.append(lambda: _long_row_check(res, device, GPU_LONG if device == "cuda" else CPU_LONG))
    for check in checks:
        before = res.count(False)
        check()
        lost = timing.device_lost(device) if res.count(False) > before else None
        if lost:  # sticky: every later check would fail the same way
            res.add("the checks after this one", False, f"not run: {lost}")
            break
    if device != "cuda":
        print("(--device cpu: no CUDA graph capture and no sync check; comparisons only)")
    print(f"{res.count(True)} passed, {res.count(False)} failed, {res.count(None)} skipped")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
