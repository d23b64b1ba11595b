"""softmax_gpu.linear_cross_entropy / LinearCrossEntropyLoss: the chunked
LM-head loss against cross_entropy(F.linear(...)) in float64 and torch's own
F.linear_cross_entropy; the weight gradient accumulated in place chunk by
chunk (fp32 on request, or into main_grad); grad_output and
retained graphs; bad inputs; torch.compile; memory (no [N, V] tensor)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import softmax_gpu
from softmax_gpu import heuristics
from helpers import (DEVICE, Logged, assert_close, assert_not_twice_differentiable,
                     ce_reference, fx_functions, rand)

lce = softmax_gpu.linear_cross_entropy
# the module (softmax_gpu.linear_cross_entropy is the function of the same name)
lce_module = importlib.import_module("softmax_gpu.linear_cross_entropy")
N, D, V = 53, 16, 70  # chunk 8: six full chunks and an uneven last one of 5 rows
CHUNK = 8
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def problem(n=N, d=D, v=V, dtype=torch.float64, bias=True, ignore=(2, 17), seed=0):
    """Fresh leaves (input, linear_weight, linear_bias) and targets with some ignored rows."""
    g = torch.Generator().manual_seed(seed)
    x = rand(n, d, dtype=dtype, scale=1.0, generator=g).requires_grad_()
    w = rand(v, d, dtype=dtype, scale=0.7, generator=g).requires_grad_()
    b = rand(v, dtype=dtype, scale=0.5, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    for i in ignore:
        if i < n:
            t[i] = -100
    return x, w, b, t


def reference(x, w, t, b=None, **kw):
    """cross_entropy(F.linear(...)) in float64 (:func:`helpers.ce_reference`,
    every option); returns (loss, lse)."""
    z = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    return ce_reference(z, t, **kw)


def check(out, ref, **kw):
    """assert_close on detached tensors (float64 reference, per-dtype tolerance)."""
    assert_close(out.detach(), ref.detach(), **kw)


def grad_output(like, scale=1.0):
    """A random grad_output of ``like``'s shape (0-d included)."""
    return rand(max(1, like.numel()), dtype=like.dtype, scale=scale).reshape(like.shape)


def grads(out, params, go):
    return torch.autograd.grad((out * go).sum(), [p for p in params if p is not None],
                               retain_graph=True)


OPTIONS = {
    "plain": dict(),
    "weight_smoothing": dict(weight=True, label_smoothing=0.15),
    "zloss_softcap": dict(weight=True, z_loss=0.02, softcap=4.0),
}


def _options(name, dtype=torch.float64):
    kw = dict(OPTIONS[name])
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
                        + 0.5).to(DEVICE, dtype)
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_parity_fp64_many_chunks(reduction, opts):
    """Value and gradients (input, linear_weight, linear_bias) with 7 chunks,
    the last uneven, and an arbitrary grad_output; the fused kernel ran."""
    x, w, b, t = problem()
    kw = _options(opts)
    with softmax_gpu.record_launches() as names:
        loss = lce(x, w, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK, **kw)
        go = grad_output(loss)
        got = grads(loss, (x, w, b), go)
    chunks = -(-N // CHUNK)
    passes = 2 if reduction == "none" else 1  # "none" recomputes in the backward
    assert sum(n.startswith("ce_class") for n in names) == chunks * passes, names
    ref, _ = reference(x, w, t, b, reduction=reduction, **kw)
    want = grads(ref, (x, w, b), go)
    assert loss.dtype == torch.float64 and loss.shape == ref.shape
    check(loss, ref)
    for g, r in zip(got, want):
        check(g, r)


def test_parity_looped_kernel_path():
    """Rows longer than the on-chip limit: the looped kernel, in place."""
    x, w, b, t = problem()
    kw = _options("zloss_softcap")
    with heuristics.override(max_single=32, tile=16, sm_count=2):
        loss = lce(x, w, t, linear_bias=b, chunk_size=CHUNK, label_smoothing=0.1, **kw)
        got = grads(loss, (x, w, b), 1.0)
    ref, _ = reference(x, w, t, b, label_smoothing=0.1, **kw)
    check(loss, ref)
    for g, r in zip(got, grads(ref, (x, w, b), 1.0)):
        check(g, r)


def test_lse_is_returned_and_differentiable():
    """return_lse: the fp32 per-row lse of the softcapped logits; its gradient
    flows into input, linear_weight and linear_bias (with both reductions),
    fp64-accurate for fp64 input."""
    for reduction in ("mean", "none"):
        x, w, b, t = problem()
        loss, lse = lce(x, w, t, linear_bias=b, reduction=reduction, softcap=3.0,
                        return_lse=True, chunk_size=CHUNK)
        ref, ref_lse = reference(x, w, t, b, reduction=reduction, softcap=3.0)
        assert lse.dtype == torch.float32 and lse.shape == t.shape
        check(lse, ref_lse, dtype=torch.float32)
        gl = torch.arange(N, dtype=torch.float64, device=DEVICE) / 8 - 3
        got = torch.autograd.grad(loss.sum() + (lse * gl).sum(), (x, w, b))
        want = torch.autograd.grad(ref.sum() + (ref_lse * gl).sum(), (x, w, b))
        for g, r in zip(got, want):
            check(g, r)  # sigma = exp(z - lse), the forward's lse kept in fp64
    # the lse alone (no loss in the graph)
    x, w, b, t = problem()
    _, lse = lce(x, w, t, linear_bias=b, return_lse=True, chunk_size=CHUNK)
    (gw,) = torch.autograd.grad(lse.sum(), (w,))
    (want,) = torch.autograd.grad(reference(x, w, t, b)[1].sum(), (w,))
    check(gw, want)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="this torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_torch_linear_cross_entropy(reduction):
    """Same value and gradients as torch's F.linear_cross_entropy (reference
    path with weights and smoothing; its chunked path through options),
    ignore_index=None meaning -100 in both."""
    x, w, b, t = problem()
    cw = _options("weight_smoothing")["weight"]
    go = grad_output(t.double() if reduction == "none" else t.double().sum())
    cases = [
        dict(linear_bias=b, weight=cw, label_smoothing=0.1, ignore_index=None),
        dict(linear_bias=b, ignore_index=None,
             options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK)),
    ]
    for kw in cases:
        ours = lce(x, w, t, reduction=reduction, chunk_size=None if "options" in kw else CHUNK,
                   **kw)
        theirs = F.linear_cross_entropy(x, w, t, reduction=reduction, **kw)
        check(ours, theirs)
        for g, r in zip(grads(ours, (x, w, b), go), grads(theirs, (x, w, b), go)):
            check(g, r)


def test_options_batch_chunk_size_is_honoured():
    class Options:  # any object with batch_chunk_size, like LinearCrossEntropyOptions
        batch_chunk_size = 10

    x, w, b, t = problem(ignore=())
    for kw in (dict(), dict(chunk_size=10)):
        with softmax_gpu.record_launches() as names:
            lce(x.detach(), w.detach(), t, options=Options(), **kw)
        assert sum(n.startswith("ce_class") for n in names) == -(-N // 10)
    with pytest.raises(ValueError, match="disagree"):
        lce(x, w, t, options=Options(), chunk_size=7)


def _dyadic_problem(n: int, d: int = 16, v: int = 64, seed: int = 1):
    """bf16 rows that are all the same hidden state (entries +-2^k) and the
    same target, and a head of small dyadic entries, so that the logits are
    exact and every row's product g^T x with its bf16 logits gradient g is
    exact in bf16: any difference in dW comes from how the chunks are added."""
    g = torch.Generator().manual_seed(seed)
    x0 = (2.0 ** torch.randint(-2, 2, (d,), generator=g)) * (torch.randint(0, 2, (d,), generator=g) * 2 - 1)
    x = x0.to(DEVICE, torch.bfloat16).expand(n, d).contiguous().requires_grad_()
    w = (torch.randint(-8, 9, (v, d), generator=g) / 8).to(DEVICE, torch.bfloat16).requires_grad_()
    t = torch.full((n,), 3, dtype=torch.long, device=DEVICE)
    return x, w, t


def test_bf16_weight_grad_accumulates_in_place_chunk_by_chunk():
    """Default: dW is accumulated in place in bf16, chunk after chunk in row
    order, each chunk's product (fp32 inside the GEMM) added and rounded
    once: bit for bit the sequence acc = round(acc + P_k). With
    acc_policy="balanced" the sum is fp32 and rounded once, and with
    main_grad it is added into the fp32 buffer chunk by chunk, in row order.
    16 chunks of 4 identical rows, each chunk its own target: every P_k is
    exact in bf16; their sums are not, and depend on the order (with one
    target for all, P_k = 4 P: the balanced sum 64 P is exact)."""
    n, chunk = 64, 4
    x, w, _ = _dyadic_problem(n)
    t = (torch.arange(n, device=DEVICE) // chunk) * 3 % w.shape[0]
    parts = [torch.autograd.grad(lce(x[k:k + chunk], w, t[k:k + chunk], reduction="sum"),
                                 (w,))[0].float() for k in range(0, n, chunk)]

    def in_order(ps, start=None):
        acc = ps[0].bfloat16() if start is None else start
        for p in ps[1:] if start is None else ps:
            acc = (acc.float() + p).bfloat16() if start is None else acc + p
        return acc

    (gw,) = torch.autograd.grad(lce(x, w, t, reduction="sum", chunk_size=chunk), (w,))
    acc = in_order(parts)
    assert gw.dtype == torch.bfloat16
    assert torch.equal(gw, acc)
    assert not torch.equal(acc, in_order(parts[::-1]))  # the test can tell the order
    # balanced, on one target for all rows (P_k = 4 P, and their sum 64 P
    # exact in bf16, so that the one rounding is no rounding at all)
    t0 = torch.full_like(t, 3)
    (p4,) = torch.autograd.grad(lce(x[:chunk], w, t0[:chunk], reduction="sum"), (w,))
    exact = (p4.float() * (n // chunk)).bfloat16()
    assert torch.equal(exact.float(), p4.float() * (n // chunk))
    opts = softmax_gpu.LinearCrossEntropyOptions(acc_policy="balanced")
    (g32,) = torch.autograd.grad(lce(x, w, t0, reduction="sum", chunk_size=chunk, options=opts),
                                 (w,))
    (g16,) = torch.autograd.grad(lce(x, w, t0, reduction="sum", chunk_size=chunk), (w,))
    assert not torch.equal(g16, exact)  # the test can tell the two apart
    assert g32.dtype == torch.bfloat16 and torch.equal(g32, exact)
    # main_grad: fp32 additions into the caller's buffer, in row order, and no .grad
    m0 = rand(*w.shape, dtype=torch.float32, scale=3.0)
    main = m0.clone()
    lce(x, w, t, reduction="sum", chunk_size=chunk, main_grad=main).backward()
    want = in_order(parts, start=m0.clone())
    assert not torch.equal(want, in_order(parts[::-1], start=m0.clone()))
    assert w.grad is None and torch.equal(main, want)


def test_bf16_weight_grad_precision_option():
    """Random bf16 data over 100 chunks: acc_policy="balanced" accumulates dW
    in fp32 and rounds once, so its error is that one rounding; the default
    (in place, one rounding per chunk) drifts several times further, so the
    option is observable. "One rounding" is the kernels' store's: round to
    nearest on a GPU, truncation in Triton's interpreter.

    Reference: the exact (float64) dW = G^T X of the bf16 logits gradient G
    the kernel writes (cross_entropy_with_grad on the bf16 logits of
    F.linear: the same per-row kernel)."""
    n, d, v = 200, 16, 64
    g = torch.Generator().manual_seed(1)
    x = rand(n, d, dtype=torch.bfloat16, scale=1.0, generator=g).requires_grad_()
    w = rand(v, d, dtype=torch.bfloat16, scale=0.7, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    _, G = softmax_gpu.cross_entropy_with_grad(F.linear(x, w).detach(), t, reduction="sum")
    ref = G.double().T @ x.detach().double()
    once = ref.bfloat16()  # the cast alone; the interpreter's stores truncate fp32 -> bf16
    interpreted = softmax_gpu.backend_for(x) == "triton" and x.device.type == "cpu"
    if interpreted:
        once = (ref.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()
    rounding = float((once.double() - ref).norm() / ref.norm())

    def rel_err(policy):
        opts = softmax_gpu.LinearCrossEntropyOptions(acc_policy=policy)
        (gw,) = torch.autograd.grad(lce(x, w, t, reduction="sum", chunk_size=2, options=opts),
                                    (w,))
        assert gw.dtype == torch.bfloat16
        return float((gw.double() - ref).norm() / ref.norm())

    fp32, default = rel_err("balanced"), rel_err("auto")
    print(f"bf16 dW relative error over 100 chunks: fp32 accumulator {fp32:.2e}, in place "
          f"{default:.2e}, one bf16 rounding of the exact dW {rounding:.2e}")
    assert fp32 <= 1.5 * rounding
    assert default > (2 if interpreted else 3) * rounding  # truncation: a larger "one rounding"


def test_options_are_checked_and_torch_names_honoured():
    """Options by torch's field names (any object): chunking_method,
    acc_policy, batch_chunk_size, overlap; bad values name the field."""
    x, w, b, t = problem(ignore=())
    O = softmax_gpu.LinearCrossEntropyOptions
    for bad, field in ((O(chunking_method="fast"), "chunking_method"),
                       (O(chunking_method="aspect_ratio:0"), "chunking_method"),
                       (O(acc_policy="fp32"), "acc_policy"),
                       (O(acc_policy=["balanced"]), "acc_policy"),
                       (O(overlap=1), "overlap"),
                       (O(batch_chunk_size=0), "batch_chunk_size")):
        with pytest.raises(ValueError, match=f"options.{field}"):
            lce(x, w, t, options=bad)
    # a dict, a list or a string would read as every default, silently
    for bad in ({"batch_chunk_size": 0, "acc_policy": "nonsense"}, "lean", [CHUNK]):
        with pytest.raises(TypeError, match="options must be a LinearCrossEntropyOptions"):
            lce(x, w, t, options=bad)

    class Named(NamedTuple):  # iterable, and with the fields: taken
        batch_chunk_size: int

    with pytest.raises(ValueError, match="options.batch_chunk_size"):
        lce(x, w, t, options=Named(0))

    class Torchlike:  # torch's own class has these names (and more, ignored)
        chunking_method = "aspect_ratio:2"
        acc_policy = "compact"
        acc_dtype = torch.float32

    rows = lce_module.aspect_rows(N, V, D, 2)
    with softmax_gpu.record_launches() as names:
        lce(x.detach(), w.detach(), t, options=Torchlike())
    assert sum(n.startswith("ce_class") for n in names) == -(-N // rows)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_output_and_retain_graph(reduction, backend, monkeypatch):
    """Backward twice over a retained graph, with different grad_outputs: each
    result is right, and results already returned never change; with the
    kernels and on the torch reference path (which scaled a saved gradient
    in place with a version bump, so that a second backward raised)."""
    if backend == "torch":
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    x, w, b, t = problem(n=20)
    loss = lce(x, w, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK, z_loss=0.01)
    ref, _ = reference(x, w, t, b, reduction=reduction, z_loss=0.01)
    go1 = torch.full(loss.shape, 1.0, dtype=torch.float64, device=DEVICE)
    go2 = grad_output(loss, scale=2.0)
    g1 = torch.autograd.grad(loss, (x, w, b), go1, retain_graph=True)
    kept = [g.clone() for g in g1]
    g2 = torch.autograd.grad(loss, (x, w, b), go2, retain_graph=True)
    g3 = torch.autograd.grad(loss, (x, w, b), go1, retain_graph=True)
    for a, k in zip(g1, kept):
        assert torch.equal(a, k)  # untouched by the later backward passes
    for a, c in zip(g1, g3):
        assert torch.equal(a, c) and a.data_ptr() != c.data_ptr()
    want = torch.autograd.grad(ref, (x, w, b), go2)
    for g, r in zip(g2, want):
        check(g, r, scale=4)
    loss.backward(go2, retain_graph=True)
    loss.backward(go2)
    for p, r in zip((x, w, b), want):
        check(p.grad, 2 * r, scale=8)


def test_only_some_parameters_require_grad():
    """Frozen head (only the input's gradient), frozen input (only the head's)."""
    x, w, b, t = problem()
    for leaves in ((x,), (w, b), (b,)):
        for p in (x, w, b):
            p.requires_grad_(any(p is q for q in leaves))
        loss = lce(x, w, t, linear_bias=b, chunk_size=CHUNK)
        got = torch.autograd.grad(loss, leaves)
        ref, _ = reference(x, w, t, b)
        for g, r in zip(got, torch.autograd.grad(ref, leaves)):
            check(g, r)
    with torch.no_grad():
        loss = lce(x, w, t, linear_bias=b, chunk_size=CHUNK)
    assert not loss.requires_grad
    check(loss, reference(x, w, t, b)[0])


def test_unbatched_input_and_loss_dtype():
    x, w, b, t = problem(n=1, ignore=())
    for reduction in ("mean", "none"):
        loss, lse = lce(x[0], w, t[0], linear_bias=b, reduction=reduction, return_lse=True)
        ref, ref_lse = reference(x[0:1], w, t[0:1], b, reduction=reduction)
        assert loss.shape == () and lse.shape == ()
        check(loss, ref.reshape(()))
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    assert lce(xb, wb, t).dtype == torch.bfloat16
    l32 = lce(xb, wb, t, loss_dtype=torch.float32)
    assert l32.dtype == torch.float32
    eager = F.cross_entropy(F.linear(xb, wb).float(), t)  # logits rounded to bf16 as here
    check(l32, eager, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_strided_input_int32_targets(dtype):
    """16-bit input given as a transposed view, int32 targets, bias and class
    weights: value and gradients against the float64 composite on the same
    16-bit values, within the dtype's tolerance."""
    x, w, b, t = problem(n=24)
    xs = x.detach().to(dtype).T.contiguous().T.requires_grad_()  # strides (1, 24)
    ws, bs = (p.detach().to(dtype).requires_grad_() for p in (w, b))
    cw = _options("weight_smoothing")["weight"].float()
    loss = lce(xs, ws, t.int(), linear_bias=bs, weight=cw, chunk_size=7, label_smoothing=0.1,
               loss_dtype=torch.float32)
    got = torch.autograd.grad(loss, (xs, ws, bs))
    ref, _ = reference(xs, ws, t, bs, weight=cw, label_smoothing=0.1)
    want = torch.autograd.grad(ref, (xs, ws, bs))
    check(loss, ref, dtype=dtype, scale=4)
    for g, r in zip(got, want):
        assert g.dtype == dtype
        check(g, r, dtype=dtype, scale=4 * max(1.0, float(r.abs().max())))


def test_all_ignored_and_empty_batches():
    """Mean over no kept rows is NaN (as torch) with zero gradients; sum is 0."""
    x, w, b, t = problem()
    t = torch.full_like(t, -100)
    for reduction in ("mean", "sum"):
        loss = lce(x, w, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK)
        ref, _ = reference(x, w, t, b, reduction=reduction)
        assert torch.equal(loss.isnan(), ref.isnan())
        got = torch.autograd.grad(loss, (x, w, b))
        for g in got:
            assert torch.equal(g, torch.zeros_like(g))
    x0, t0 = x[:0], t[:0]
    assert lce(x0, w, t0).isnan() and lce(x0, w, t0, reduction="sum") == 0
    assert lce(x0, w, t0, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_ignored_rows_stay_zero_under_any_grad_output(backend, monkeypatch):
    """As torch: an ignored row's input gradient is exactly 0 whatever
    grad_output is (inf, NaN), and with every row ignored, a sum divided by
    a token count of 0 gives zero gradients everywhere (a backward that
    retains the graph writes new tensors, the last one, which frees it,
    scales in place; fp32 accumulation into bf16)."""
    if backend == "torch":
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    x, w, b, t = problem(n=20)
    loss = lce(x, w, t, linear_bias=b, reduction="sum", chunk_size=CHUNK)
    for factor, keep in ((float("inf"), True), (float("nan"), False)):
        (dx,) = torch.autograd.grad(loss * factor, x, retain_graph=keep)
        assert torch.equal(dx[t == -100], torch.zeros_like(dx[t == -100]))
    t_none = torch.full_like(t, -100)
    for dtype, acc32 in ((torch.float64, False), (torch.bfloat16, True)):
        xs, ws, bs = (v.detach().to(dtype).requires_grad_() for v in (x, w, b))
        opts = softmax_gpu.LinearCrossEntropyOptions(
            batch_chunk_size=CHUNK, acc_policy="balanced" if acc32 else "auto")
        loss = lce(xs, ws, t_none, linear_bias=bs, reduction="sum", options=opts)
        # grad_output 0, NaN, then inf (retained, retained, freed: in place)
        for factor in (0.0, float("nan"), float("inf")):
            got = torch.autograd.grad(loss / factor, (xs, ws, bs),
                                      retain_graph=factor != float("inf"))
            for g in got:
                assert torch.equal(g, torch.zeros_like(g)), (dtype, factor)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_retained_backward_after_a_zero_grad_output_is_exact(backend, monkeypatch):
    """``(loss * 0).backward(retain_graph=True)`` leaves the forward's saved
    gradients as they are (a backward that retains the graph writes new
    tensors), so a later backward gets the right gradients."""
    if backend == "torch":
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    x, w, b, t = problem(n=12)
    loss = lce(x, w, t, linear_bias=b, reduction="sum", chunk_size=CHUNK)
    torch.autograd.grad(loss * 0.0, (x, w, b), retain_graph=True)
    got = torch.autograd.grad(loss, (x, w, b))
    ref, _ = reference(x, w, t, b, reduction="sum")
    want = torch.autograd.grad(ref, (x, w, b))
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_saved_tensor_hooks_that_copy_keep_every_backward_right(backend, monkeypatch):
    """Saved-tensor hooks that hand back a copy on every unpack (offloading,
    as ``save_on_cpu`` does for CUDA tensors, and non-reentrant activation
    checkpointing): each backward over the retained graph gets grad_output
    times the gradient (before, the first backward's in-place scale landed
    on a throw-away copy while its factor was recorded, and every later
    backward was divided by it: half the gradient here)."""
    if backend == "torch":
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    x, w, b, t = problem(n=12)
    with torch.autograd.graph.saved_tensors_hooks(lambda s: s.clone(), lambda s: s.clone()):
        loss = lce(x, w, t, linear_bias=b, reduction="mean", chunk_size=CHUNK)
    first = torch.autograd.grad(loss * 2.0, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w, b))
    ref, _ = reference(x, w, t, b, reduction="mean")
    want = torch.autograd.grad(ref, (x, w, b))
    for g1, g2, r in zip(first, second, want):
        assert_close(g1, 2.0 * r)
        assert_close(g2, r)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_batched_grad_output_is_refused_by_name(backend, monkeypatch):
    """is_grads_batched / jacobian(vectorize=True) hand the backward a batched
    grad_output, which the chunked passes cannot take: a clear error naming
    it (before: "Cannot access storage of BatchedTensorImpl" or a vmap
    error from deep inside), for the loss and for the returned lse."""
    if backend == "torch":
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    x, w, b, t = problem(n=12)
    for reduction in ("mean", "none"):
        loss, lse = lce(x, w, t, linear_bias=b, reduction=reduction, chunk_size=CHUNK,
                        return_lse=True)
        for out, name in ((loss, "grad_output"), (lse, "grad_lse")):
            go = torch.randn(3, *out.shape, dtype=out.dtype)
            with pytest.raises(RuntimeError, match=f"backward: {name} is .* batched by autograd"):
                torch.autograd.grad(out, (x, w), go, is_grads_batched=True, retain_graph=True)


def test_out_of_range_targets_give_nan_rows():
    """Never used as an address: those rows' loss is NaN (so is the mean),
    the other rows are untouched."""
    x, w, b, t = problem()
    bad_rows = {5: V, 9: -3, 20: 10**12}
    for r, v in bad_rows.items():
        t[r] = v
    loss = lce(x, w, t, linear_bias=b, reduction="none", chunk_size=CHUNK,
               weight=_options("weight_smoothing")["weight"])
    bad = torch.zeros(N, dtype=torch.bool)
    bad[list(bad_rows)] = True
    assert loss[bad].isnan().all() and not loss[~bad].isnan().any()
    assert lce(x, w, t, chunk_size=CHUNK).isnan()


def test_torch_reference_path(monkeypatch):
    """The CPU path without the interpreter (the torch reference of the chunk
    kernels, the lse's gradient included): same results, and IndexError for
    out-of-range targets as torch."""
    x, w, b, t = problem()
    kw = dict(linear_bias=b, chunk_size=CHUNK, label_smoothing=0.1, z_loss=0.01, softcap=5.0,
              return_lse=True, **{"weight": _options("weight_smoothing")["weight"]})

    def run(reduction):
        loss, lse = lce(x, w, t, reduction=reduction, **kw)
        return loss, grads(loss.sum() + 0.5 * lse.sum(), (x, w, b), 1.0)

    for reduction in ("mean", "none"):
        kernel, gk = run(reduction)
        monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
        with softmax_gpu.record_launches() as names:
            torch_path, gt = run(reduction)
        monkeypatch.undo()
        assert names == []
        check(torch_path, kernel)
        for a, c in zip(gt, gk):
            check(a, c)
    monkeypatch.setattr(lce_module, "backend_for", lambda tensor: "torch")
    t[3] = V
    with pytest.raises(IndexError, match="out of bounds"):
        lce(x, w, t, chunk_size=CHUNK)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_as_torch_reference_path(reduction):
    """Class-probability targets (torch's F.linear_cross_entropy takes them):
    the loss, the lse and every gradient as cross_entropy(F.linear(...)) in
    float64, with class weights, smoothing, z-loss and softcap; torch's own
    function agrees; what needs class indices is an error naming it."""
    x, w, b, _ = problem()
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1).to(DEVICE)
    kw = dict(_options("weight_smoothing"), reduction=reduction)
    extra = dict(z_loss=0.01, softcap=5.0)
    with softmax_gpu.poison_outputs():
        loss, lse = lce(x, w, p, linear_bias=b, return_lse=True, chunk_size=CHUNK, **kw, **extra)
    ref, ref_lse = reference(x, w, p, b, **kw, **extra)
    assert loss.shape == ref.shape and lse.shape == (N,) and lse.dtype == torch.float32
    check(loss, ref)
    check(lse, ref_lse, dtype=torch.float32)
    go = grad_output(loss)
    for a, r in zip(grads(loss, (x, w, b), go), grads(ref, (x, w, b), go)):
        check(a, r)
    if HAS_TORCH_LCE:
        theirs = F.linear_cross_entropy(x, w, p, linear_bias=b, **kw)
        check(lce(x, w, p, linear_bias=b, **kw), theirs.double())
    for bad, exc in ((dict(return_token_accuracy=True), ValueError),
                     (dict(main_grad=torch.zeros_like(w.detach())), ValueError)):
        with pytest.raises(exc, match=next(iter(bad))):
            lce(x, w, p, **bad)


def test_bad_arguments_name_the_argument():
    x, w, b, t = problem()
    cases = [
        (dict(input=x[None]), ValueError, "input"),
        (dict(input=x.long()), TypeError, "input"),
        (dict(linear_weight=w[:, :-1]), ValueError, "linear_weight"),
        (dict(linear_weight=w.float()), TypeError, "linear_weight"),
        (dict(linear_weight=w[None]), ValueError, "linear_weight"),
        (dict(linear_bias=b[:-1]), ValueError, "linear_bias"),
        (dict(linear_bias=b.float()), TypeError, "linear_bias"),
        (dict(target=t[:-1]), ValueError, "target"),
        (dict(target=torch.rand(N, V - 1, dtype=torch.float64)), ValueError, "target"),
        (dict(target=torch.rand(N, dtype=torch.float64)), ValueError, "target"),
        (dict(target=t.bool()), TypeError, "target"),
        (dict(weight=torch.ones(V - 1, dtype=torch.float64)), ValueError, "weight"),
        (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight"),
        (dict(weight=torch.ones(V, dtype=torch.float64, requires_grad=True)), RuntimeError,
         "weight requires grad"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(loss_dtype=torch.int32), TypeError, "loss_dtype"),
        (dict(input=[1.0]), TypeError, "input"),
    ]
    base = dict(input=x, linear_weight=w, target=t)
    for change, exc, name in cases:
        kw = dict(base, **change)
        args = [kw.pop(k) for k in ("input", "linear_weight", "target")]
        with pytest.raises(exc, match=name):
            lce(*args, **kw)
    # NumPy scalars are taken as torch takes them (before: a TypeError)
    np = pytest.importorskip("numpy")
    want = lce(x.detach(), w.detach(), t, ignore_index=-100, label_smoothing=0.25, chunk_size=8)
    got = lce(x.detach(), w.detach(), t, ignore_index=np.int64(-100),
              label_smoothing=np.float32(0.25), chunk_size=np.int32(8))
    assert torch.equal(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_main_grad_receives_the_weight_gradient(reduction):
    """main_grad: the backward adds d(loss, lse)/d(linear_weight), grad_output
    applied, into the caller's buffer; the weight gets no gradient; the
    input and bias gradients are as without it. Frozen weight or no grad:
    main_grad is left alone."""
    x, w, b, t = problem()
    m0 = rand(V, D, dtype=torch.float64, scale=2.0)
    main = m0.clone()
    kw = dict(linear_bias=b, reduction=reduction, chunk_size=CHUNK, label_smoothing=0.1,
              return_lse=True)
    loss, lse = lce(x, w, t, main_grad=main, **kw)
    go, gl = grad_output(loss), rand(N, dtype=torch.float32)
    torch.autograd.backward([loss, lse], [go, gl])
    ref, ref_lse = reference(x, w, t, b, reduction=reduction, label_smoothing=0.1)
    want = torch.autograd.grad((ref * go).sum() + (ref_lse * gl).sum(), (x, w, b),
                               retain_graph=True)
    assert w.grad is None
    check(main - m0, want[1], dtype=torch.float32)  # the lse's part: fp32 sigma
    check(x.grad, want[0], dtype=torch.float32)
    check(b.grad, want[2], dtype=torch.float32)
    # twice over a retained graph: added twice
    main = m0.clone()
    loss = lce(x, w, t, main_grad=main, **dict(kw, return_lse=False))
    loss.backward(go, retain_graph=True)
    loss.backward(go)
    (once,) = torch.autograd.grad((ref * go).sum(), (w,))
    check(main - m0, 2 * once, scale=2)
    # a frozen weight, or no gradient at all: main_grad untouched
    main = m0.clone()
    w.requires_grad_(False)
    lce(x, w, t, main_grad=main, **kw)[0].sum().backward()
    with torch.no_grad():
        lce(x, w, t, main_grad=main, **kw)
    assert torch.equal(main, m0)


def test_main_grad_errors_and_module():
    x, w, b, t = problem()
    V_, D_ = w.shape
    cases = [
        (torch.zeros(V_, D_ + 1, dtype=torch.float64), ValueError, "main_grad must have"),
        (torch.zeros(V_, D_, dtype=torch.int32), TypeError, "main_grad must be a floating"),
        (torch.zeros(D_, V_, dtype=torch.float64).t(), ValueError, "main_grad must be contiguous"),
        (torch.zeros(V_, D_, dtype=torch.float64, requires_grad=True), ValueError,
         "main_grad must not require grad"),
        ([0.0], TypeError, "main_grad must be a tensor"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lce(x, w, t, main_grad=bad)
    m = softmax_gpu.LinearCrossEntropyLoss(D, V, dtype=torch.float64, device=DEVICE,
                                           chunk_size=CHUNK, use_main_grad=True)
    with pytest.raises(ValueError, match="main_grad"):
        m(x, t)
    m.linear.weight.main_grad = torch.zeros(V, D, dtype=torch.float64)
    m(x, t).backward()
    assert m.linear.weight.grad is None and m.linear.weight.main_grad.abs().sum() > 0
    (want,) = torch.autograd.grad(reference(x, m.linear.weight, t)[0], (m.linear.weight,))
    check(m.linear.weight.main_grad, want)
    assert "use_main_grad=True" in repr(m)


def test_overlap_schedule(monkeypatch):
    """overlap=True: each chunk's cross-entropy runs in two halves on the
    side stream, each after its logits GEMM and before its dX GEMM, and the
    main stream waits for every half before the chunk's dW (then reuses the
    buffer). CUDA streams are replaced by a recorder (on CPU the real lanes
    run serially); results as without overlap."""
    log = []

    class Lanes(lce_module._Lanes):
        def __init__(self, device, overlap):
            self.on = overlap

        @contextlib.contextmanager
        def _side(self):
            log.append("side")
            yield
            log.append("/side")

        def cross_entropy(self):
            return self._side() if self.on else contextlib.nullcontext()

        def mark(self):
            if self.on:
                log.append("mark")
                return len(log)
            return None

        def wait(self, done):
            if done is not None:
                log.append("wait")

    def spy(name, fn):
        def run(*args, **kw):
            log.append(name)
            return fn(*args, **kw)
        monkeypatch.setattr(lce_module, name, run)

    x, w, b, t = problem(n=20)
    go = grad_output(torch.empty(()))
    want_loss = lce(x, w, t, linear_bias=b, chunk_size=8)
    want = grads(want_loss, (x, w, b), go)
    monkeypatch.setattr(lce_module, "_Lanes", Lanes)
    for name in ("_logits", "_input_grad", "_backprop"):
        spy(name, getattr(lce_module, name))
    opts = softmax_gpu.LinearCrossEntropyOptions(overlap=True)
    loss = lce(x, w, t, linear_bias=b, chunk_size=8, options=opts)
    got = grads(loss, (x, w, b), go)
    half = ["_logits", "side", "/side", "mark"]
    chunk = half + half + ["wait", "_input_grad", "wait", "_input_grad", "_backprop"]
    assert log == chunk * 3, log  # 8 + 8 + 4 rows
    check(loss, want_loss)
    for g_, r in zip(got, want):
        check(g_, r)


def test_chunk_plan():
    """Default chunks: as many rows as fit CHUNK_BYTES of logits (192 MiB),
    balanced and aligned to 64 rows (16 for budgets of few rows); "lean": the
    input's size, at least LEAN_BYTES (32 MiB); torch's aspect-ratio rule. The chunk of logits is what the call holds beyond its
    gradients, so it must stay within its budget at every LLM shape."""
    plan, budget, lean = lce_module.chunk_rows, lce_module.CHUNK_BYTES, lce_module.LEAN_BYTES
    assert budget == 192 << 20 and lean == 32 << 20
    assert plan(4096, 128256, 2) == 704  # 6 chunks (the last 576): 0.17 GiB of logits
    assert plan(16384, 128256, 2) == 768  # 22 chunks
    assert plan(4096, 128256, 2, lean) == 128  # 32 chunks: 31 MiB
    assert plan(4096, 128256, 4) == 384  # fp32 logits: half the rows
    assert plan(1000, 32000, 2) == 1000  # one chunk
    assert plan(5000, 32000, 2) == 2560  # two balanced chunks, not 3136 + 1864
    assert plan(0, 32000, 2) == 1
    assert plan(4096, 1 << 24, 2) == lce_module.MIN_ROWS  # never fewer rows
    for n in (4096, 16384):
        for d, v in ((4096, 128256), (3584, 152064), (2304, 256000), (8192, 128256)):
            for elem, cap in ((2, budget), (4, budget), (2, lean)):
                rows = plan(n, v, elem, cap)
                assert rows * v * elem <= cap and rows >= 64, (n, v, elem, rows)
                chunks = -(-n // rows)
                assert chunks * rows - n < rows  # balanced: no nearly empty chunk
    assert lce_module.aspect_rows(4096, 128256, 4096) == 128  # torch's / Liger's rule
    assert lce_module.aspect_rows(16384, 128256, 4096, 2) == 256
    x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    assert lce_module.plan_rows(4096, 128256, x) == 704
    assert lce_module.plan_rows(4096, 128256, x, 100) == 100
    assert lce_module.plan_rows(4096, 128256, x, 0, "lean") == 128  # |x| = 32 MiB
    x4 = torch.empty(16384, 4096, dtype=torch.bfloat16, device="meta")
    assert lce_module.plan_rows(16384, 128256, x4, 0, "lean") == 512  # |x| = 128 MiB
    assert plan(4096, 152064, 2, lean) == 96  # 110 fit: aligned to 16
    assert lce_module.plan_rows(4096, 128256, x, 0, "aspect_ratio:4") == 32


def test_compile_fullgraph_training_step():
    """torch.compile(fullgraph=True): a hidden layer, then the mean loss, the
    "none" loss scaled per row, and the lse (three chunked ops, one graph);
    same values and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D, dtype=torch.float64).to(DEVICE)
    head = torch.nn.Parameter(rand(V, D, dtype=torch.float64, scale=0.5))
    _, _, _, t = problem()
    x = rand(N, D, dtype=torch.float64, scale=1.0)
    scale = torch.arange(N, dtype=torch.float64, device=DEVICE) / N

    def step(x):
        h = torch.tanh(lin(x))
        mean, lse = lce(h, head, t, chunk_size=16, z_loss=1e-3, return_lse=True)
        rows = lce(h, head, t, reduction="none", chunk_size=16, label_smoothing=0.1)
        return mean + (rows * scale).sum() + 0.25 * lse.mean()

    params = [*lin.parameters(), head]
    compiled = torch.compile(step, fullgraph=True)
    out_c = compiled(x)
    got = torch.autograd.grad(out_c, params)
    out_e = step(x)
    want = torch.autograd.grad(out_e, params)
    check(out_c.detach(), out_e.detach())
    for g, r in zip(got, want):
        check(g, r)


def test_opcheck():
    x, w, b, t = problem(n=12)
    for want_hits in (False, True):
        args = (x.detach(), w.detach(), b.detach(), t, None, -100, "mean", 0.1, 0.01, 0.0, 5,
                True, True, True, want_hits)
        torch.library.opcheck(lce_module.linear_cross_entropy_forward, args,
                              test_utils=("test_schema", "test_faketensor"))
    bargs = (x.detach(), w.detach(), b.detach(), t, None, -100, "none", 0.0, 0.0, 3.0, 5,
             rand(12, dtype=torch.float64), rand(12), rand(12, dtype=torch.float64), True, True,
             True)
    torch.library.opcheck(lce_module.linear_cross_entropy_backward,
                          bargs + (None, None, "auto", False, False, None),
                          test_utils=("test_schema", "test_faketensor"))
    # acc32 into a fp32 dW, and main_grad (mutated: declared in the schema)
    for main in (None, torch.zeros(V, D, dtype=torch.float64)):
        torch.library.opcheck(lce_module.linear_cross_entropy_backward,
                              bargs + (None, None, "lean", True, False, main),
                              test_utils=("test_schema", "test_faketensor"))
    fargs = args[:-1] + (False, None, None, "auto", True, False, None)
    torch.library.opcheck(lce_module.linear_cross_entropy_forward, fargs,
                          test_utils=("test_schema", "test_faketensor"))
    # fp16: the forward computes the loss only (the backward forms the gradients)
    hargs = (x.detach().half(), w.detach().half(), b.detach().half()) + args[3:]
    torch.library.opcheck(lce_module.linear_cross_entropy_forward, hargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_with_a_number_divisor_that_changes():
    """torch.compile(fullgraph=True) with a Python int divisor (a token count)
    that changes from step to step: compile makes it symbolic, and the
    loss and gradients still match float64 torch."""
    x, w, b, t = problem(n=20, dtype=torch.float32)
    compiled = torch.compile(
        lambda x, w, n: lce(x, w, t, reduction="sum", chunk_size=CHUNK, divisor=n),
        fullgraph=True, backend="aot_eager")
    for n in (3, 5, 7):
        loss = compiled(x, w, n)
        got = torch.autograd.grad(loss, (x, w))
        ref, _ = reference(x, w, t, reduction="sum")
        want = torch.autograd.grad(ref / n, (x, w))
        check(loss, ref / n)
        for g, r in zip(got, want):
            check(g, r, scale=4)


def test_compile_main_grad_and_options():
    """torch.compile(fullgraph=True) with main_grad (mutated in the backward),
    the fp32-accumulation and lean options, the lse: same values, input
    gradient and main_grad as eager; the weight gets no gradient."""
    torch._dynamo.reset()
    x, w, _, t = problem(n=24, bias=False)
    main = torch.zeros(V, D, dtype=torch.float64, device=DEVICE)
    opts = softmax_gpu.LinearCrossEntropyOptions(acc_policy="balanced", chunking_method="lean")

    def step(x):
        mean, lse = lce(x, w, t, chunk_size=8, main_grad=main, return_lse=True, options=opts)
        rows = lce(x, w, t, reduction="none", chunk_size=8, main_grad=main)
        return 1.5 * mean + 0.1 * lse.mean() + rows.mean()

    out_c = torch.compile(step, fullgraph=True)(x)
    out_c.backward()
    got_x, got_main = x.grad, main.clone()
    x.grad = None
    main.zero_()
    out_e = step(x)
    out_e.backward()
    assert w.grad is None
    check(out_c.detach(), out_e.detach(), dtype=torch.float32)
    check(got_x, x.grad)
    check(got_main, main)


# --- memory -------------------------------------------------------------------------


def cpu_allocations(fn) -> tuple[int, int]:
    """(peak bytes held at once, largest single allocation) of the torch CPU
    allocations ``fn`` makes, from the profiler's memory events (every
    allocation and free, inside custom ops too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = largest = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
        largest = max(largest, nbytes)
    return peak, largest


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocation profile")
def test_memory_no_logits_sized_tensor():
    """Forward + backward with a small chunk: the peak of all CPU allocations
    is a small fraction of the eager composite's, and no allocation is
    anywhere near [N, V] (the eager one makes several)."""
    n, d, v = 256, 16, 300
    g = torch.Generator().manual_seed(2)
    x0 = rand(n, d, scale=1.0, generator=g)
    w0 = rand(v, d, scale=0.5, generator=g)
    t = torch.randint(0, v, (n,), generator=g)

    def measure(f):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        return cpu_allocations(lambda: f(x, w).backward())

    peak, largest = measure(lambda x, w: lce(x, w, t, chunk_size=16))
    peak_eager, largest_eager = measure(lambda x, w: F.cross_entropy(F.linear(x, w), t))
    logits_bytes = n * v * 4
    print(f"CPU allocations, forward+backward, N={n} D={d} V={v} fp32 chunk 16: peak "
          f"{peak} B (largest {largest} B) vs eager {peak_eager} B (largest {largest_eager} B); "
          f"ratio {peak / peak_eager:.3f}")
    assert largest_eager >= logits_bytes  # the measurement sees logits-sized tensors
    assert largest <= max(16 * v, v * d) * 4  # one chunk of logits / the fp32 dW accumulator
    assert peak < 0.2 * peak_eager


class LiveTensors:
    """Every tensor storage the torch ops inside the block create, with its
    shape and dtype, and the peak of their bytes alive at once (freed when
    the last tensor on a storage dies). Storages of ``known`` tensors (the
    inputs) and their views are not counted, nor the copies Triton's
    interpreter makes of a kernel's arguments while it runs one (not there
    on a GPU, and held by reference cycles until collected). The eager path runs under the mode (the traced path, which a
    dispatch mode would otherwise select, runs the same code inside an
    opaque op, where the mode sees nothing)."""

    def __init__(self, monkeypatch, *known):
        from torch.utils._python_dispatch import TorchDispatchMode

        monkeypatch.setattr(lce_module, "traced", lambda t: False)
        self.skip = {id(t.untyped_storage()) for t in known if t is not None}
        self.live, self.held, self.peak, self.made, self.kernel = {}, 0, 0, [], 0
        outer = self

        for name in ("launch_on", "_scale_"):
            def wrapped(*args, _f=getattr(lce_module, name), **kw):
                outer.kernel += 1
                try:
                    return _f(*args, **kw)
                finally:
                    outer.kernel -= 1
                    gc.collect()  # the interpreter's reference cycles hold the arguments

            monkeypatch.setattr(lce_module, name, wrapped)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not outer.kernel or func.overloadpacket.__name__ == "empty_like":
                    for t in torch.utils._pytree.tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            outer._add(t)
                return out

        self.mode = Mode()

    def _add(self, t):
        import weakref

        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        key = id(s)
        if key in self.skip or key in self.live:
            return
        self.live[key] = (s.nbytes(), weakref.ref(s, lambda _, k=key: self._free(k)))
        self.held += s.nbytes()
        self.peak = max(self.peak, self.held)
        self.made.append((tuple(t.shape), t.dtype, s.nbytes()))

    def _free(self, key):
        nbytes, _ = self.live.pop(key)
        self.held -= nbytes

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under a dispatch mode")
@pytest.mark.parametrize("how", ["default", "lean", "balanced", "main_grad", "none"])
def test_memory_beyond_gradients_is_one_chunk(monkeypatch, how):
    """bf16 forward + backward: no tensor is as large as the logits, no fp32
    [V, D] exists unless acc_policy="balanced" asks for one, and the bytes
    alive at once beyond the inputs never pass the returned gradients (dW
    [V, D] and dX [N, D] in bf16; none for the weight with main_grad) plus
    one chunk of logits and O(N + V) vectors. The eager composite, measured
    the same way, holds several logits-sized tensors."""
    n, d, v = 192, 32, 384
    chunk = 8 if how == "lean" else 24
    g = torch.Generator().manual_seed(2)
    x = rand(n, d, dtype=torch.bfloat16, scale=1.0, generator=g).requires_grad_()
    w = rand(v, d, dtype=torch.bfloat16, scale=0.5, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    main = torch.zeros(v, d) if how == "main_grad" else None
    opts = softmax_gpu.LinearCrossEntropyOptions(
        acc_policy="balanced" if how == "balanced" else "auto")
    with LiveTensors(monkeypatch, x, w, t, main) as live:
        loss = lce(x, w, t, chunk_size=chunk, options=opts, main_grad=main,
                   reduction="none" if how == "none" else "mean")
        (loss.float().mean() if how == "none" else loss).backward()
    logits, dw, dx = n * v * 2, v * d * 2, n * d * 2
    slack = 24 * (n + v)  # loss, lse, per-row scratch and states (fp32)
    expected = (0 if how == "main_grad" else dw) + dx + chunk * v * 2 + slack
    if how == "balanced":
        expected += 2 * dw  # the fp32 accumulator, and the bf16 result at the end
    if how in ("balanced", "main_grad"):  # into fp32 on CPU: the chunk's operands copied
        expected += chunk * (v + d) * 4
    biggest = max(nbytes for _, _, nbytes in live.made)
    fp32_vd = [m for m in live.made if m[1] == torch.float32 and math.prod(m[0]) == v * d]
    print(f"{how}: peak {live.peak} B (expected at most {expected}), largest {biggest} B, "
          f"logits {logits} B, fp32 [V, D] made: {len(fp32_vd)}")
    assert biggest < logits / 2
    assert bool(fp32_vd) == (how == "balanced")
    assert live.peak <= expected
    assert (w.grad is None) == (how == "main_grad")
    if how == "main_grad":
        assert all(math.prod(shape) < v * d for shape, _, _ in live.made)
    # the measurement sees an eager composite's logits (and their gradient)
    monkeypatch.undo()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with LiveTensors(monkeypatch, x2, w2, t) as eager:
        F.cross_entropy(F.linear(x2, w2), t).backward()
    assert eager.peak >= 2 * logits and max(b for _, _, b in eager.made) >= logits


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under a dispatch mode")
def test_lean_autocast_casts_an_fp32_weight_slice_by_slice(monkeypatch):
    """chunking_method="lean" under bf16 autocast over fp32 parameters: the
    weight is cast a slice of rows at a time (WEIGHT_SLICE_BYTES: 64 rows
    here, 5 slices), so no 16-bit tensor of more than a slice's rows
    exists, where the default plan casts the whole weight (as F.linear
    does); the loss as the default plan's, and the gradients as close to
    float64 (dX accumulated in fp32 over the slices)."""
    n, d, v = 48, 32, 320  # the input's [n, D] 16-bit copy: fewer rows than a slice
    g = torch.Generator().manual_seed(4)
    x0 = rand(n, d, scale=1.0, generator=g)
    w0 = rand(v, d, scale=0.5, generator=g)
    b0 = rand(v, scale=0.5, generator=g)
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)

    def run(how):
        x, w, b = (p.detach().clone().requires_grad_() for p in (x0, w0, b0))
        opts = softmax_gpu.LinearCrossEntropyOptions(
            chunking_method="lean" if how == "lean" else "auto")
        with LiveTensors(monkeypatch, x, w, b, t) as live:
            monkeypatch.setattr(lce_module, "WEIGHT_SLICE_BYTES", 64 * d * 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lce(x, w, t, linear_bias=b, options=opts)
            loss.backward()
        monkeypatch.undo()
        wide16 = [m for m in live.made
                  if m[1] == torch.bfloat16 and len(m[0]) == 2 and m[0][1] == d and m[0][0] > 64]
        return loss.detach(), (x.grad, w.grad, b.grad), wide16

    lean, lean_grads, lean16 = run("lean")
    auto, auto_grads, auto16 = run("auto")
    assert lean16 == [] and (v, d) in [m[0] for m in auto16]
    torch.testing.assert_close(lean, auto, rtol=1e-6, atol=0)
    x64, w64, b64 = (p.detach().to(torch.bfloat16).double().requires_grad_()
                     for p in (x0, w0, b0))
    F.cross_entropy(F.linear(x64, w64, b64), t).backward()
    for ours, theirs, ref in zip(lean_grads, auto_grads, (x64.grad, w64.grad, b64.grad)):
        assert ours.dtype == theirs.dtype == torch.float32
        e, e0 = (float((a.double() - ref).norm() / ref.norm()) for a in (ours, theirs))
        assert e <= 1.1 * e0 + 1e-7, (e, e0)


# --- module ----------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"),
                    reason="this torch has no nn.LinearCrossEntropyLoss")
def test_module_state_dict_matches_torch():
    cw = _options("weight_smoothing")["weight"]
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, bias=True, weight=cw, label_smoothing=0.1,
                                             dtype=torch.float64, device=DEVICE)
    ours = softmax_gpu.LinearCrossEntropyLoss(D, V, bias=True, weight=torch.zeros_like(cw),
                                              label_smoothing=0.1, dtype=torch.float64,
                                              device=DEVICE, chunk_size=CHUNK)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x, _, _, t = problem()
    check(ours(x, t), theirs(x, t))
    back = torch.nn.LinearCrossEntropyLoss(D, V, bias=True, weight=cw, dtype=torch.float64,
                                           device=DEVICE)
    back.load_state_dict(ours.state_dict())


def test_module_forward_and_errors():
    m = softmax_gpu.LinearCrossEntropyLoss(D, V, dtype=torch.float64, device=DEVICE,
                                           reduction="sum", z_loss=0.01, chunk_size=CHUNK,
                                           return_lse=True)
    x, _, _, t = problem()
    loss, lse = m(x, t)
    ref, ref_lse = reference(x, m.linear.weight, t, reduction="sum", z_loss=0.01)
    check(loss, ref)
    assert isinstance(m, torch.nn.Module) and "num_classes=70" in repr(m)
    loss.backward()
    assert m.linear.weight.grad is not None and m.linear.bias is None
    with pytest.raises(NotImplementedError, match="out_features"):
        softmax_gpu.LinearCrossEntropyLoss(D, V, out_features=(2,))
    with pytest.raises(ValueError, match="weight"):
        softmax_gpu.LinearCrossEntropyLoss(D, V, weight=torch.ones(3))
    assert "linear_cross_entropy" in softmax_gpu.__all__
    assert "LinearCrossEntropyLoss" in softmax_gpu.__all__
    assert not math.isnan(float(loss))


@pytest.mark.parametrize("path", ["single", "looped"])
def test_token_accuracy(path):
    """return_token_accuracy: the fraction of kept rows whose target is an
    argmax, from the loss kernel's own pass (no logits tensor), over many
    chunks, with and without a gradient, and under a softcap (monotone: the
    same argmax); 0 when every row is ignored."""
    x, w, b, t = problem(n=40)
    z = F.linear(x.detach(), w.detach(), b.detach())
    # make about half the rows correct: the target becomes the argmax
    t = t.clone()
    rows = torch.arange(0, 40, 2)
    t[rows] = z[rows].argmax(1)
    t[5] = -100
    kept = t != -100
    want = float((z.argmax(1)[kept] == t[kept]).double().mean())
    lim = dict(max_single=16, tile=8) if path == "looped" else {}
    with heuristics.override(**lim):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                loss, acc = softmax_gpu.linear_cross_entropy(
                    x, w, t, linear_bias=b, chunk_size=7, return_token_accuracy=True)
            assert acc.dtype == torch.float32 and acc.shape == () and not acc.requires_grad
            assert abs(float(acc) - want) < 1e-6, (float(acc), want)
            assert loss.requires_grad == grad
        loss, lse, acc = softmax_gpu.linear_cross_entropy(
            x, w, t, linear_bias=b, softcap=3.0, chunk_size=9, return_lse=True,
            return_token_accuracy=True)
        assert abs(float(acc) - want) < 1e-6 and lse.shape == t.shape
        none = torch.full_like(t, -100)
        _, acc = softmax_gpu.linear_cross_entropy(x, w, none, linear_bias=b,
                                                  return_token_accuracy=True)
        assert float(acc) == 0.0


def test_no_silent_double_backward():
    """As the cross-entropy: under create_graph=True the gradients are right
    and differentiating them raises instead of dropping the term."""
    x, w, b, t = problem(n=12, v=20)
    (gx, gw) = torch.autograd.grad(lce(x, w, t, linear_bias=b), (x, w), create_graph=True)
    (rx, rw) = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t), (x, w))
    assert_close(gx.detach(), rx, torch.float64)
    assert_close(gw.detach(), rw, torch.float64)
    if softmax_gpu.backend_for(x) == "torch":
        return
    for reduction in ("mean", "none"):  # the forward's gradients, and recomputed ones
        assert_not_twice_differentiable(
            lambda a, c: lce(a, c, t, linear_bias=b, reduction=reduction).sum(), (x, w))
    assert_not_twice_differentiable(
        lambda a: lce(a, w, t, return_lse=True)[1].sum(), (x,))


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", ["fp32", "amp"])
def test_autocast_follows_torch(amp, params):
    """Under torch.autocast, torch's policy for F.linear_cross_entropy (F.linear
    in the autocast dtype, the cross-entropy in fp32): an fp32 loss by default,
    the logits rounded as the autocast GEMM rounds them, every gradient in its
    parameter's dtype. fp32 parameters (autocast training): the GEMMs use
    their autocast-dtype copies and the weight's gradient is accumulated in
    fp32 (no rounding to the autocast dtype, unlike torch's, and no
    16-bit [V, D] gradient); 16-bit parameters: unchanged dtypes."""
    dev = DEVICE if DEVICE == "cuda" else "cpu"
    x, w, b, t = problem(n=21, dtype=torch.float32)
    if params == "amp":
        x, w, b = (p.detach().to(amp).requires_grad_() for p in (x, w, b))
    with torch.autocast(dev, dtype=amp):
        loss = lce(x, w, t, linear_bias=b, chunk_size=CHUNK, reduction="sum")
        assert lce(x, w, t, linear_bias=b, loss_dtype=amp).dtype == amp  # asked for
    assert loss.dtype == torch.float32
    loss.backward()
    z = F.linear(x.detach().to(amp), w.detach().to(amp), b.detach().to(amp))
    ref = F.cross_entropy(z.double(), t, reduction="sum")
    assert_close(loss.detach(), ref, torch.float32)
    xr, wr, br = (p.detach().to(amp).double().requires_grad_() for p in (x, w, b))
    F.cross_entropy(F.linear(xr, wr, br), t, reduction="sum").backward()
    xt, wt, bt = (p.detach().clone().requires_grad_() for p in (x, w, b))
    with torch.autocast(dev, dtype=amp):  # torch's own op, for its error
        F.cross_entropy(F.linear(xt, wt, bt), t, reduction="sum").backward()
    for p, r, o in ((x, xr, xt), (w, wr, wt), (b, br, bt)):
        assert p.grad.dtype == p.dtype == o.grad.dtype
        ours, theirs = ((g.double() - r.grad).norm() for g in (p.grad, o.grad))
        assert ours <= 2 * theirs + 1e-6 * r.grad.norm(), (ours, theirs)
    if params == "fp32":  # accumulated in fp32: not all representable in the autocast dtype
        assert not torch.equal(w.grad, w.grad.to(amp).float())


@pytest.mark.parametrize("amp", [False, True])
def test_fp16_loss_scale_known_at_backward(amp):
    """fp16 GEMMs (fp16 parameters, or fp16 autocast over fp32 ones) with a
    loss scale applied after the call (a GradScaler): the gradients are
    formed after grad_output, as torch's, so none of their small entries
    underflows: dX, dW and the cold classes' dW within 1.5x torch's own error
    against float64, and no element exactly zero where float64's is not
    (the cold classes: in the column without cancellation). Eight cold classes
    (logits near -9, never targets: softmax ~4e-7, over 256 rows ~2e-9,
    below fp16's range unless scaled first) have a weight gradient only if
    it is formed after the scale. (Before, with fp16 parameters: the
    forward formed them unscaled in fp16, ~13x torch's error.)"""
    g = torch.Generator().manual_seed(3)
    n, d, v, scale = 256, 32, 300, 65536.0 if amp else 1024.0
    x0 = rand(n, d, scale=1.0, generator=g)
    x0[:, 0] = 1.0  # a constant feature: the cold classes' logit offset
    w0 = rand(v, d, scale=0.05, generator=g)
    cold = torch.arange(v - 8, v)
    w0[cold, 0] = -9.0
    t = torch.randint(0, v - 8, (n,), generator=g).to(DEVICE)

    def grads(fn):
        dt = torch.float32 if amp else torch.float16
        x, w = (p.detach().clone().to(dt).requires_grad_() for p in (x0, w0))  # own leaves
        ctx = torch.autocast(x.device.type, dtype=torch.float16) if amp else \
            contextlib.nullcontext()
        with ctx:
            loss = fn(x, w, t)
        (loss.float() * scale).backward()
        return x, w, x.grad, w.grad

    x, w, gx, gw = grads(lce)
    _, _, tx, tw = grads(lambda a, b, c: F.cross_entropy(F.linear(a, b), c))
    x64, w64 = (p.detach().half().double().requires_grad_() for p in (x, w))
    (F.cross_entropy(F.linear(x64, w64), t) * scale).backward()

    def err(a, r):
        return float((a.double() - r).norm() / r.norm())

    cold = cold.to(DEVICE)
    warm = torch.arange(v - 8, device=DEVICE)
    for ours, theirs, ref in ((gx, tx, x64.grad), (gw, tw, w64.grad), (gw[cold], tw[cold],
                                                                        w64.grad[cold])):
        assert err(ours, ref) <= 1.5 * err(theirs, ref), (err(ours, ref), err(theirs, ref))
    for ours, ref in ((gx, x64.grad), (gw[warm], w64.grad[warm])):
        assert not bool(((ours == 0) & (ref != 0)).any())
    # the cold classes' gradient in the constant feature's column (256 rows
    # of one sign: no cancellation) is within range: torch's keeps it, ours too
    assert bool((w64.grad[cold, 0].to(tw.dtype) != 0).all())
    assert bool((tw[cold, 0] != 0).all()) and bool((gw[cold, 0] != 0).all())


@pytest.mark.parametrize("path", ["eager", "op"])
def test_fp16_per_row_grad_output_loses_nothing(path, monkeypatch):
    """reduction="none" with fp16 GEMMs and a per-row grad_output known only
    at backward (2^8..2^12): grad_output is applied to each row's gradient in
    fp32 before its single rounding, as torch's, so the classes whose softmax
    is below fp16's range (bias -17, never targets) keep their dW and db.
    Before, the chunk's gradient was rounded to fp16 and then scaled: 128 dW
    and 8 db entries of those classes were exactly zero. Chunks of 16 rows
    (three), with the weight gradient accumulated in fp32 ("balanced") so that
    the per-chunk rounding of the default policy is not what is measured;
    the eager autograd and the torch.library op's (as traced) alike."""
    if path == "op":
        monkeypatch.setattr(lce_module, "traced", lambda t: True)
    g = torch.Generator().manual_seed(5)
    n, d, v = 48, 16, 40
    x0 = torch.randn(n, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * 0.3
    b0 = torch.zeros(v)
    b0[8:] = -17.0
    t = torch.randint(0, 8, (n,), generator=g).to(DEVICE)
    go = (2.0 ** torch.randint(8, 13, (n,), generator=g)).to(DEVICE)
    opts = softmax_gpu.LinearCrossEntropyOptions(acc_policy="balanced")

    def grads(fn, dt):
        x, w, b = (p.to(DEVICE, dt).requires_grad_() for p in (x0, w0, b0))
        loss = fn(x, w, b)
        loss.backward(go.to(loss.dtype))
        return [p.grad.double() for p in (x, w, b)]

    ref = grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction="none"),
                torch.float64)
    theirs = grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b).float(), t,
                                                   reduction="none"), torch.float16)
    with softmax_gpu.record_launches() as names:
        ours = grads(lambda x, w, b: lce(x, w, t, linear_bias=b, reduction="none",
                                         chunk_size=16, options=opts), torch.float16)

    def err(a, r):
        return float((a - r).norm() / r.norm())

    for a, b, r in zip(ours, theirs, ref):
        assert not bool(((a == 0) & (r.half() != 0)).any())
        assert err(a, r) <= 1.5 * err(b, r), (err(a, r), err(b, r))
    assert names.count("ce_class_backward_kernel") == 3, names  # one pass per chunk


def test_meta_tensors_give_shapes():
    """Meta tensors (shape propagation, e.g. a model built on the meta device):
    forward and backward give meta results of torch's shapes (before: an
    unnamed '.item() cannot be called on meta tensors')."""
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    w = torch.empty(10, 8, device="meta", requires_grad=True)
    t = torch.zeros(4, dtype=torch.long, device="meta")
    for reduction in ("mean", "none"):
        loss = lce(x, w, t, reduction=reduction)
        assert loss.device.type == "meta"
        assert loss.shape == F.cross_entropy(torch.empty(4, 10, device="meta"), t,
                                             reduction=reduction).shape
        loss.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
        x.grad = w.grad = None


def test_subclass_override_and_fx_trace():
    """linear_cross_entropy takes part in __torch_function__ as torch's
    functions do: a Tensor subclass is handed the call, and
    torch.fx.symbolic_trace records it as a node."""
    h, w = rand(6, 8), rand(12, 8, scale=0.3)
    t = torch.randint(0, 12, (6,), device=DEVICE)
    want = lce(h, w, t)
    Logged.seen.clear()
    got = lce(h.as_subclass(Logged), w, t)
    assert Logged.seen[:1] == [lce] and type(got) is Logged
    assert torch.equal(got.as_subclass(torch.Tensor), want)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 12, bias=False).to(DEVICE)

        def forward(self, h, t):
            return lce(h, self.head.weight, t, reduction="sum")

    assert fx_functions(Head(), h, t) == [lce]
