"""softmax_gpu.linear_cross_entropy / LinearCrossEntropyLoss: the chunked
LM-head loss against cross_entropy(F.linear(...)) in float64 and torch's own
F.linear_cross_entropy; fp32 weight-gradient accumulation; grad_output and
retained graphs; bad inputs; torch.compile; memory (no [N, V] tensor)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import softmax_gpu
from softmax_gpu import heuristics
from helpers import DEVICE, assert_close, ce_reference, rand

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
    flows into input, linear_weight and linear_bias (with both reductions)."""
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
            check(g, r, dtype=torch.float32)  # sigma = exp(z - lse), lse in fp32
    # the lse alone (no loss in the graph)
    x, w, b, t = problem()
    _, lse = lce(x, w, t, linear_bias=b, return_lse=True, chunk_size=CHUNK)
    (gw,) = torch.autograd.grad(lse.sum(), (w,))
    (want,) = torch.autograd.grad(reference(x, w, t, b)[1].sum(), (w,))
    check(gw, want, dtype=torch.float32)


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


def test_bf16_weight_grad_accumulates_in_fp32(monkeypatch):
    """bf16 over 100 chunks: dW accumulates in fp32 and is rounded once, so
    its error is that one rounding. The same run with a bf16 accumulator
    (what drifts) is several times worse, so this test can fail.

    Reference: the exact (float64) dW = G^T X of the bf16 logits gradient G
    the kernel writes (cross_entropy_with_grad on the bf16 logits of
    F.linear: the same per-row kernel), so only the accumulation and the
    final cast differ."""
    n, d, v = 200, 16, 64
    g = torch.Generator().manual_seed(1)
    x = rand(n, d, dtype=torch.bfloat16, scale=1.0, generator=g).requires_grad_()
    w = rand(v, d, dtype=torch.bfloat16, scale=0.7, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    _, G = softmax_gpu.cross_entropy_with_grad(F.linear(x, w).detach(), t, reduction="sum")
    ref = G.double().T @ x.detach().double()
    rounding = float((ref.bfloat16().double() - ref).norm() / ref.norm())  # the cast alone

    def rel_err():
        (gw,) = torch.autograd.grad(lce(x, w, t, reduction="sum", chunk_size=2), (w,))
        assert gw.dtype == torch.bfloat16
        return float((gw.double() - ref).norm() / ref.norm())

    ours = rel_err()

    def bf16_accumulator(acc, a, b, add):
        # the accumulator rounded to bf16 after each chunk
        acc.copy_(acc.to(a.dtype).addmm_(a, b) if add else a @ b)

    monkeypatch.setattr(lce_module, "_accumulate", bf16_accumulator)
    drifting = rel_err()
    print(f"bf16 dW relative error over 100 chunks: fp32 accumulator {ours:.2e}, bf16 "
          f"accumulator {drifting:.2e}, one bf16 rounding of the exact dW {rounding:.2e}")
    assert ours <= 1.5 * rounding
    assert drifting > 3 * rounding


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_output_and_retain_graph(reduction):
    """Backward twice over a retained graph, with different grad_outputs: each
    result is right, and results already returned never change."""
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
        (dict(target=t.double()), TypeError, "target"),
        (dict(target=torch.rand(N, V, dtype=torch.float64)), TypeError, "target"),
        (dict(weight=torch.ones(V - 1, dtype=torch.float64)), ValueError, "weight"),
        (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight"),
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


def test_chunk_plan():
    """Default chunks: 4096 rows at LLM shapes, fewer when a chunk of logits
    would pass the memory budget, never below 8 rows per SM, balanced."""
    plan = lce_module.chunk_rows
    assert plan(16384, 128256, 2, 132) == 4096
    assert plan(16384, 151936, 2, 132) == 4096
    assert plan(16384, 1 << 20, 2, 132) == 1024  # 2 GiB / (2 MiB per row)
    assert plan(3168, 1 << 24, 2, 132) == 1088  # the per-SM floor (1056) wins, then aligned
    assert plan(1000, 32000, 2, 132) == 1000  # one chunk
    assert plan(5000, 32000, 2, 132) == 2560  # two balanced chunks, not 4096 + 904
    assert plan(0, 32000, 2, 132) == 1


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
    torch.library.opcheck(lce_module.linear_cross_entropy_backward, bargs,
                          test_utils=("test_schema", "test_faketensor"))


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
