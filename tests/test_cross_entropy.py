"""softmax_gpu.cross_entropy against float64 torch, on both paths; gradients
that never change once returned, torch's call binding, the differentiable
lse, the torch.library ops and torch.compile.

Paths: "single" (the row in registers, several rows per program) at the
default limits, "looped" (online pass + gradient pass) forced with
helpers.forced("looped") on rows longer than 64. Every output buffer starts
as NaN (conftest), so an unwritten element fails.
"""

import dataclasses
import inspect
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import softmax_gpu
from softmax_gpu import heuristics
from softmax_gpu.kernels.cross_entropy import softcap_tanh
from helpers import (DEVICE, FLOAT_DTYPES, LONG, Logged, assert_close,
                     assert_not_twice_differentiable, ce_reference, expect_launches, forced,
                     fx_functions, long_kernel, rand, run_python)

CE = sys.modules["softmax_gpu.cross_entropy"]  # the module (its name is shadowed by the function)

PATHS = ["single", "looped"]
C_FOR = {"single": 37, "looped": 100}  # looped: rows longer than PATHS' max_single=64
FWD = {("single", False): "ce_class_single", ("looped", False): "ce_class_looped",
       ("single", True): "ce_prob_single", ("looped", True): "ce_prob_looped"}
BWD = "ce_grad_scale"
DEN = "ce_denominators"


def fwd_launches(path, prob, reduction="mean", weight=None, label_smoothing=0.0, **_):
    """The kernels one forward launches: the denominators first when the
    class-index mean (or class weights with smoothing) needs them."""
    main = FWD[(path, prob)]
    if not prob and (reduction == "mean" or (weight is not None and label_smoothing > 0)):
        return (DEN, main)
    return (main,)


def bwd_launches(dtype, prob, reduction="mean", weight=None, label_smoothing=0.0,
                 divisor=None, **_):
    """The kernels one backward launches: the rescale of the forward's
    gradient, but for fp16 logits with class targets the denominators (as
    the forward needs them, or for a divisor) and the pass over the logits."""
    if dtype != torch.float16 or prob:
        return (BWD,)
    den = reduction == "mean" or divisor is not None or \
        (weight is not None and label_smoothing > 0)
    return (DEN, "ce_class_backward") if den else ("ce_class_backward",)


def torch_ref(x, target, weight=None, **kw):
    """The float64 loss of :func:`helpers.ce_reference`."""
    return ce_reference(x, target, weight, **kw)[0]


def check(x, target, path="single", dtype=None, grad_output=None, grad_scale_tol=4.0, **kw):
    """Loss and input gradient of softmax_gpu.cross_entropy against torch_ref
    (float64 autograd), with the forward and backward kernels of ``path``."""
    dtype = dtype or x.dtype
    xs = x.detach().to(dtype).requires_grad_()
    prob = target.is_floating_point()
    with forced(path):
        with expect_launches(*fwd_launches(path, prob, **kw)):
            out = softmax_gpu.cross_entropy(xs, target, **kw)
        g = torch.ones_like(out) if grad_output is None else grad_output.to(out.dtype)
        with expect_launches(*bwd_launches(dtype, prob, **kw)):
            (dx,) = torch.autograd.grad(out, xs, g)
    x64 = xs.detach().double().requires_grad_()
    ref = torch_ref(x64, target, **kw)
    (dx_ref,) = torch.autograd.grad(ref, x64, g.double())
    ref = ref.detach()
    # probability targets promote the loss's dtype, as torch's
    assert out.dtype == (torch.promote_types(dtype, target.dtype) if prob else dtype)
    assert out.shape == ref.shape
    assert dx.dtype == dtype and dx.shape == xs.shape
    assert_close(out, ref, dtype)
    assert_close(dx, dx_ref, dtype, scale=grad_scale_tol * max(1.0, float(g.abs().max())))
    return out, dx


def targets(n, C, ignore=(), ignore_index=-100, generator=None, shape=None):
    t = torch.randint(0, C, shape or (n,), generator=generator)
    flat = t.view(-1)
    for i in ignore:
        flat[i] = ignore_index
    return t.to(DEVICE)


# --- torch semantics ----------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "default", "in-range"])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_argument_combination(weighted, ignore, reduction, label_smoothing):
    """weights x ignore_index x reduction x label smoothing, torch's exact formulas
    (the smoothing term weighted by w_c; the mean over the kept rows' weight)."""
    C = 37
    ignore_index = {"none": -100, "default": -100, "in-range": 5}[ignore]
    t = targets(9, C, ignore=() if ignore == "none" else (1, 4, 8), ignore_index=ignore_index)
    w = (torch.rand(C, dtype=torch.float64) + 0.2).to(DEVICE) if weighted else None
    check(rand(9, C), t, weight=w, ignore_index=ignore_index, reduction=reduction,
          label_smoothing=label_smoothing)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("divisor", [None, 3.0, "tensor"])
@pytest.mark.parametrize("weighted, smooth", [(False, False), (True, False), (True, True)])
def test_denominators_split_over_programs(weighted, smooth, divisor, acc):
    """The denominators launch (kept rows, their weight, the sum of the class
    weights, times the divisor, and the two reciprocals) spread over several
    programs (more steps of 1024 targets or weights than ``serial_steps``)
    against one program and float64: counts exact, sums to ACC's rounding,
    reciprocals correctly rounded (``recip_rn``), the same bits run to run."""
    from softmax_gpu.kernels import cross_entropy as K

    M, C = 5000, 3000  # 5 and 3 steps
    t = targets(M, C, ignore=range(0, M, 7))
    w = (torch.rand(C, dtype=torch.float64) + 0.2).to(device=DEVICE, dtype=acc)
    div_t = torch.tensor([3.0], dtype=acc, device=DEVICE)
    div = 1.0 if divisor is None else 3.0
    kept = (t != -100).cpu()
    for count in (True, False):
        runs = []
        for steps in (1 << 30, 1, 1):
            den = torch.full((K.DEN_LEN,), float("nan"), dtype=acc, device=DEVICE)
            launch = K.denominators_launcher(M, C, -100, weighted, smooth, acc, count=count,
                                             divisor=divisor, serial_steps=steps)
            launch(t, w if weighted else den, div_t if divisor == "tensor" else den, den)
            runs.append(den.cpu())
        one, split, again = runs
        torch.testing.assert_close(split, again, rtol=0, atol=0, equal_nan=True)
        n = float(kept.sum()) if count else 1.0
        wt = float((w.double().cpu()[t.cpu().clamp(min=0)] * kept).sum()) if count and weighted \
            else n
        for den in (one, split):
            assert float(den[1]) == n * div  # an integer count, exact
            assert math.isclose(float(den[0]), wt * div, rel_tol=4 * torch.finfo(acc).eps)
            if acc == torch.float32:  # correctly rounded reciprocals (fp64: within an ulp)
                assert torch.equal(den[3:5], 1.0 / den[0:2])
            else:
                assert torch.allclose(den[3:5], 1.0 / den[0:2], rtol=2 * torch.finfo(acc).eps,
                                      atol=0)
            if weighted and smooth:
                assert math.isclose(float(den[2]), float(w.double().sum()),
                                    rel_tol=4 * torch.finfo(acc).eps)


def test_mean_with_denominators_from_several_programs():
    """A weighted, smoothed mean whose denominators several programs add up
    (den_serial_steps=1: 1500 rows and 1100 classes are two steps each)
    against float64 torch, forward and backward."""
    M, C = 1500, 1100
    w = (torch.rand(C, dtype=torch.float64) + 0.2).to(DEVICE)
    with heuristics.override(den_serial_steps=1):
        check(rand(M, C), targets(M, C, ignore=range(0, M, 5)), weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_dtypes_and_paths(path, dtype):
    """fp16/bf16/fp32/fp64 logits (fp32 arithmetic, fp64 for fp64); output dtype = input dtype."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(9, C, ignore=(3,))
    check(rand(9, C), t, path, dtype, weight=w, label_smoothing=0.05)
    check(rand(9, C), t, path, dtype, reduction="none")


@pytest.mark.parametrize("path", PATHS)
def test_k_dim_inputs(path):
    """(N, C, d1, ..., dK): classes in dim 1, read in place with an inner stride."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    x = rand(2, C, 3, 2)
    t = targets(0, C, shape=(2, 3, 2), ignore=(0, 7))
    for reduction in ("mean", "sum", "none"):
        check(x, t, path, weight=w, reduction=reduction, label_smoothing=0.2)
    check(rand(3, C, 4), targets(0, C, shape=(3, 4)), path, reduction="none")


def test_one_dim_input(monkeypatch):
    """(C,) logits with a 0-d target (and (C,) probabilities): one row, 0-d results,
    also through the differentiable composite (probabilities that require grad)
    and the torch reference path, which returned (1,) for reduction="none"."""
    x = rand(11)
    t = torch.tensor(4, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        out, _ = check(x, t, reduction=reduction, label_smoothing=0.1)
        assert out.shape == ()
    p = torch.softmax(rand(11), 0)
    out, _ = check(x, p, reduction="none")
    assert out.shape == ()
    assert torch.isnan(softmax_gpu.cross_entropy(x, torch.tensor(-100, device=DEVICE)))
    # a (1,) class index is taken as (), as torch does
    for reduction in ("mean", "sum", "none"):
        ours = softmax_gpu.cross_entropy(x, t.reshape(1), reduction=reduction)
        ref = F.cross_entropy(x.double(), t.reshape(1), reduction=reduction)
        assert ours.shape == ref.shape == ()
        assert_close(ours, ref)
    for backend in ("as is", "torch"):
        if backend == "torch":
            monkeypatch.setattr(CE, "backend_for", lambda tensor: "torch")
        for target in (t, p, p.clone().requires_grad_()):
            for reduction in ("mean", "none"):
                ours = softmax_gpu.cross_entropy(x, target, reduction=reduction)
                ref = F.cross_entropy(x, target, reduction=reduction)
                assert ours.shape == ref.shape == (), (backend, target.dtype, reduction)
                assert_close(ours.detach(), ref.detach(), x.dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(path, weighted):
    """Probability targets of the input's shape; the general sigma * sum(y) - y
    (targets that do not sum to 1 too); the mean divides by the number of rows."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE) if weighted else None
    p = torch.softmax(rand(7, C), -1)
    unnormalised = torch.rand(7, C, dtype=torch.float64).to(DEVICE) * 0.3
    for reduction in ("mean", "sum", "none"):
        check(rand(7, C), p, path, weight=w, reduction=reduction, label_smoothing=0.1)
        check(rand(7, C), unnormalised, path, weight=w, reduction=reduction)
    # K-dim probabilities read with their own (non-contiguous) strides
    x = rand(2, C, 3)
    pk = torch.softmax(rand(2, 3, C), -1).permute(0, 2, 1)
    check(x, pk, path, weight=w, reduction="none")


def test_probability_targets_requiring_grad_fall_back_to_torch():
    """Soft targets that require grad are differentiated too (torch composite)."""
    x = rand(5, 13).requires_grad_()
    p = torch.softmax(rand(5, 13), -1).requires_grad_()
    out = softmax_gpu.cross_entropy(x, p, label_smoothing=0.1)
    dx, dp = torch.autograd.grad(out, (x, p))
    x64, p64 = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, p64, label_smoothing=0.1)
    dx_ref, dp_ref = torch.autograd.grad(ref, (x64, p64))
    assert_close(out, ref)
    assert_close(dx, dx_ref)
    assert_close(dp, dp_ref)


@pytest.mark.parametrize("path", PATHS)
def test_all_ignored_batch(path):
    """Every target ignored: mean is NaN (0/0), sum 0, none zeros; zero
    gradient; under a finite poison too (the kernels' own NaN)."""
    C = C_FOR[path]
    x = rand(4, C)
    t = torch.full((4,), -100, device=DEVICE)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1), dict(z_loss=1e-3)):
        for reduction, poison in (("mean", math.nan), ("mean", -12345.0), ("sum", math.nan),
                                  ("none", -12345.0)):
            xs = x.clone().requires_grad_()
            with forced(path), softmax_gpu.poison_outputs(value=poison):
                out = softmax_gpu.cross_entropy(xs, t, reduction=reduction, **kw)
                out.sum().backward()
            ref = torch_ref(x, t, reduction=reduction, **kw)
            assert torch.equal(out.isnan().cpu(), ref.isnan().cpu()), (reduction, kw)
            assert bool(out.isnan().all()) == (reduction == "mean")
            assert torch.equal(xs.grad, torch.zeros_like(x))


def test_empty_batch():
    x = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    t = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert torch.isnan(softmax_gpu.cross_entropy(x, t))
    assert softmax_gpu.cross_entropy(x, t, reduction="sum").item() == 0
    out = softmax_gpu.cross_entropy(x, t, reduction="none")
    assert out.shape == (0,)
    softmax_gpu.cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 7)
    # no rows and no classes either: torch's results, not "no classes"
    for shape, tshape in (((0, 0), (0,)), ((0, 0, 3), (0, 3))):
        for reduction in ("mean", "sum", "none"):
            x = torch.empty(shape, device=DEVICE, requires_grad=True)
            t = torch.empty(tshape, dtype=torch.long, device=DEVICE)
            out = softmax_gpu.cross_entropy(x, t, reduction=reduction)
            want = F.cross_entropy(x, t, reduction=reduction)
            assert out.shape == want.shape and torch.equal(out.isnan(), want.isnan())
            assert torch.equal(out.nan_to_num(), want.nan_to_num())
            out.sum().backward()
            assert x.grad.shape == shape
    with pytest.raises(ValueError, match="input has no classes"):
        softmax_gpu.cross_entropy(torch.empty(2, 0, device=DEVICE), targets(2, 1))


@pytest.mark.parametrize("backend", ["as is", "torch"])
def test_empty_batch_compiled(backend, monkeypatch):
    """An empty batch through torch.compile(fullgraph=True), forward and
    backward, every reduction, as torch: the backward's per-row grad_output
    has no element (it was taken for one value, and reshaped to ())."""
    torch._dynamo.reset()
    if backend == "torch":
        monkeypatch.setattr(CE, "backend_for", lambda tensor, name="tensor": "torch")
    for reduction in ("mean", "sum", "none"):
        x = torch.empty(0, 7, device=DEVICE, requires_grad=True)
        t = torch.empty(0, dtype=torch.long, device=DEVICE)
        f = torch.compile(lambda x, t: softmax_gpu.cross_entropy(x, t, reduction=reduction),
                          fullgraph=True)
        out = f(x, t)
        ref = F.cross_entropy(x, t, reduction=reduction)
        assert out.shape == ref.shape and torch.equal(out.isnan(), ref.isnan()), reduction
        out.sum().backward()
        assert x.grad.shape == (0, 7), reduction


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_logits(path):
    """Row-strided (padded-vocabulary) and transposed logits, read in place."""
    C = C_FOR[path]
    base = rand(6, C + 9)
    padded = base[:, :C]
    t = targets(6, C, ignore=(2,))
    check(padded, t, path, label_smoothing=0.1)
    check(rand(C, 6).t(), t, path, reduction="sum")
    with forced(path), expect_launches(DEN, FWD[(path, False)]):
        softmax_gpu.cross_entropy(padded, t)  # no copy kernel before the loss kernel


def test_integer_target_dtypes():
    x = rand(6, 10)
    t = targets(6, 10)
    ref = torch_ref(x, t)
    for dt in (torch.int64, torch.int32, torch.int16, torch.uint8):
        assert_close(softmax_gpu.cross_entropy(x, t.to(dt)), ref)


# --- gradient precision and the backward ---------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_true_class_gradient_at_p_0999_bf16(path):
    """sigma_t - 1 is formed in fp32 before the cast: at p(target) = 0.999 the
    bf16 gradient is about -0.001 * scale, not 0 (sigma_t rounds to 1 in bf16)."""
    C = C_FOR[path]
    a = math.log(0.999 * (C - 1) / 0.001)
    x = torch.zeros(4, C, dtype=torch.float64)
    t = torch.tensor([0, 5, 17, C - 1])
    x[torch.arange(4), t] = a
    x = x.to(DEVICE, torch.bfloat16)
    t = t.to(DEVICE)
    p = torch.softmax(x.double(), -1).cpu()[torch.arange(4), t.cpu()]
    assert torch.allclose(p, torch.full_like(p, 0.999), atol=2e-4)  # bf16-rounded logits
    assert torch.equal(p.to(torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
    for reduction, scale in (("sum", 1.0), ("mean", 0.25)):
        xs = x.clone().requires_grad_()
        with forced(path):
            (dx,) = torch.autograd.grad(softmax_gpu.cross_entropy(xs, t, reduction=reduction), xs)
        gt = dx[torch.arange(4), t].double().cpu()
        expect = (p - 1) * scale
        assert (gt != 0).all() and (gt < 0).all()
        torch.testing.assert_close(gt, expect, rtol=1.6e-2, atol=0)
        torch.testing.assert_close(gt, torch.full_like(gt, -0.001 * scale), rtol=0.25, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_retain_graph_twice(path):
    """A retained graph backpropagated twice gives the same gradient each time,
    for grad_output 1, for another one, and for a different one the second time."""
    C = C_FOR[path]
    t = targets(5, C, ignore=(1,))
    for inplace in (False, True):
        x = rand(5, C).requires_grad_()
        h = x * 1.0  # non-leaf logits (their buffer may take the gradient in place)
        with forced(path):
            loss = softmax_gpu.cross_entropy(h, t, label_smoothing=0.1, inplace_backward=inplace)
            (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g3,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
            (g4,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
            (g5,) = torch.autograd.grad(loss * -0.5, x, retain_graph=True)
            x.grad = None
            loss.backward(retain_graph=True)
            loss.backward()
        x64 = x.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(torch_ref(x64, t, label_smoothing=0.1), x64)
        assert torch.equal(g1, g2)
        assert torch.equal(g3, g4)
        assert_close(g1, ref, scale=4)
        assert_close(g3, 3 * ref, scale=12)
        assert_close(g5, -0.5 * ref, scale=4)
        assert_close(x.grad, 2 * ref, scale=8)


@pytest.mark.parametrize("path", PATHS)
def test_non_uniform_grad_output_reduction_none(path):
    """reduction="none": every row's gradient scaled by its own grad_output,
    including negative, zero and expanded (stride-0) ones."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(6, C, ignore=(2,))
    g = rand(6, scale=2.0)
    g[4] = 0.0
    check(rand(6, C), t, path, reduction="none", grad_output=g, weight=w, label_smoothing=0.1,
          z_loss=1e-2)
    check(rand(6, C), t, path, reduction="none", grad_output=torch.tensor(2.5, device=DEVICE).expand(6))
    tk = targets(0, C, shape=(2, 3))
    check(rand(2, C, 3), tk, path, reduction="none", grad_output=rand(2, 3))
    check(rand(6, C), torch.softmax(rand(6, C), -1), path, reduction="none", grad_output=g)


@pytest.mark.parametrize("path", PATHS)
def test_ignored_rows_stay_zero_under_any_grad_output(path):
    """An ignored row's gradient is exactly 0 whatever its grad_output is, inf
    and NaN included, as torch's: a sum divided by a token count of 0, a NaN
    factor over a retained graph, and reduction="none" with NaN / inf on the
    ignored rows (the kept rows against float64 with those entries 0); every
    dtype (fp16: the deferred backward), new buffer and in place."""
    C = C_FOR[path]
    t = targets(6, C, ignore=(1, 4))
    ign = t == -100
    for dtype in FLOAT_DTYPES:
        for inplace in (False, True):
            x = rand(6, C, dtype=dtype).requires_grad_()
            with forced(path):
                loss = softmax_gpu.cross_entropy(x * 1.0, t, reduction="sum",
                                                 label_smoothing=0.1, inplace_backward=inplace)
                (g_inf,) = torch.autograd.grad(loss / 0.0, x, retain_graph=True)
                (g_nan,) = torch.autograd.grad(loss * float("nan"), x)
            for g in (g_inf, g_nan):
                assert torch.equal(g[ign], torch.zeros_like(g[ign])), (dtype, inplace)
            go = rand(6, dtype=dtype)
            go[1], go[4] = float("nan"), float("inf")
            with forced(path):
                loss = softmax_gpu.cross_entropy(x * 1.0, t, reduction="none",
                                                 label_smoothing=0.1, inplace_backward=inplace)
                (g,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
            x64 = x.detach().double().requires_grad_()
            ref = torch_ref(x64, t, reduction="none", label_smoothing=0.1)
            (want,) = torch.autograd.grad(ref, x64, torch.where(ign, 0.0, go.double()))
            assert torch.equal(g[ign], torch.zeros_like(g[ign])), (dtype, inplace)
            assert_close(g, want, scale=8)


@pytest.mark.parametrize("path", ["single", "looped"])
def test_retained_backward_after_a_zero_grad_output_is_exact(path):
    """A first backward with grad_output 0 on some rows, retaining the graph,
    leaves the saved gradient as the forward wrote it (it writes a new
    tensor), so a later backward is right in every row, in place or not."""
    C = C_FOR[path]
    t = targets(4, C, ignore=())
    x = rand(4, C).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(torch_ref(x64, t, reduction="sum"), x64)
    for inplace in (False, True):
        with forced(path):
            loss = softmax_gpu.cross_entropy(x * 1.0, t, reduction="none",
                                             inplace_backward=inplace)
            (g0,) = torch.autograd.grad(loss, x, torch.tensor([1.0, 0.0, 1.0, 0.0]),
                                        retain_graph=True)
            (g,) = torch.autograd.grad(loss, x, torch.ones(4))
        assert_close(g, want)
        assert_close(g0[0::2], want[0::2])
        assert torch.equal(g0[1::2], torch.zeros_like(g0[1::2]))


@pytest.mark.parametrize("path", PATHS)
def test_none_loss_can_be_modified_in_place(path):
    """The per-row losses are a plain output, not a view that autograd locks:
    ``loss *= mask`` and ``loss[ignored] = 0`` work as on torch's, with the
    right gradient (fp32 logits, and bf16 ones with an fp32 loss, where the
    loss was the accumulator itself; 2-d and (N, C, d) logits)."""
    C = C_FOR[path]
    for dtype, loss_dtype, shape in ((torch.float32, None, (6, C)),
                                     (torch.bfloat16, torch.float32, (3, C, 2))):
        x = rand(*shape, dtype=dtype).requires_grad_()
        t = targets(6, C).reshape(shape[0], *shape[2:])
        mask = (torch.arange(6, device=DEVICE) % 2).to(torch.float32).reshape(t.shape)
        with forced(path):
            loss = softmax_gpu.cross_entropy(x * 1, t, reduction="none", loss_dtype=loss_dtype)
            loss *= mask
            loss[t == t.reshape(-1)[0]] = 0.0
            (dx,) = torch.autograd.grad(loss.sum(), x)
        x64 = x.detach().double().requires_grad_()
        ref = torch_ref(x64, t, reduction="none") * mask.double()
        ref[t == t.reshape(-1)[0]] = 0.0
        (want,) = torch.autograd.grad(ref.sum(), x64)
        assert_close(loss, ref, loss.dtype)
        assert_close(dx, want, dtype, scale=4)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_retained_backwards_are_independent_of_what_the_caller_does(dtype, inplace):
    """Over a retained graph, each backward's gradient is grad_output times
    the gradient, whatever the caller did in between: edited the gradient
    handed out before (``g.zero_()``), or scaled the buffer it passes as
    grad_output (``go.mul_(2)``, the same tensor every step). Before, the
    fp16 in-place path kept the caller's grad_output tensor itself as the
    factor the logits held, and an edited gradient was the saved one."""
    C = 37
    x = rand(6, C, dtype=dtype).requires_grad_()
    t = targets(6, C, ignore=(2,))
    go = torch.rand(6, device=DEVICE) + 0.5
    x64 = x.detach().double().requires_grad_()
    (unit,) = torch.autograd.grad(torch_ref(x64, t, reduction="none"), x64,
                                  torch.ones(6, dtype=torch.float64, device=DEVICE))
    logits = x * 1  # the gradient with respect to them is the op's own
    loss = softmax_gpu.cross_entropy(logits, t, reduction="none", inplace_backward=inplace,
                                     loss_dtype=torch.float32)
    for step in range(3):
        want = unit * go.double()[:, None]
        (g,) = torch.autograd.grad(loss, logits, go, retain_graph=step < 2)
        assert_close(g, want, dtype, scale=4 * float(go.max()))
        g.zero_()
        go.mul_(2.0)


@pytest.mark.parametrize("late", [None, 1, 319, 320, 599])
@pytest.mark.parametrize("sms", [1, 2])
def test_rescale_checks_whole_groups_of_rows(sms, late):
    """The in-place rescale's programs each take a contiguous group of rows
    (here 1 program of all 600 rows, or 2 of 320 and 280; tiles of 32 rows,
    one warp, so a program's check reads 128 rows' factors a step, 5 or 3
    steps): a group with nothing to do is left alone, and one differing row
    anywhere is found and rescaled by itself, its factor recorded."""
    M, C = 600, 8
    g = rand(M, C)
    state = torch.ones(M, device=DEVICE)
    state[::7] = 0.0  # 0 / 0 would make these rows NaN if they were touched
    go = state.clone()
    if late is not None:
        go[late] = 2.5
    buf = g.clone()
    with heuristics.override(sm_count=sms, programs_per_sm=1, target_program_elems=256):
        with expect_launches(BWD):
            CE._scale_(buf, state, go)
    rest = torch.ones(M, dtype=torch.bool)
    if late is not None:
        rest[late] = False
        assert_close(buf[late], g[late].double() * 2.5)
    assert torch.equal(buf[rest.to(DEVICE)], g[rest.to(DEVICE)])
    assert torch.equal(state, go)


def test_backward_skips_rows_whose_factor_is_right():
    """The rescale reads grad_output and the factor already applied and does
    nothing where they agree: rows with state == grad_output are not touched
    (0/0 would make them NaN if they were), the others are rescaled."""
    g = rand(6, 50)
    state = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 4.0], device=DEVICE)
    go = torch.tensor([0.0, 1.0, 3.0, 0.0, 1.0, 2.0], device=DEVICE)
    buf = g.clone()
    with expect_launches(BWD):
        CE._scale_(buf, state, go)
    assert torch.equal(buf[[0, 1, 3, 4]], g[[0, 1, 3, 4]])
    assert_close(buf[2], g[2].double() * 1.5)
    assert_close(buf[5], g[5].double() * 0.5)
    assert torch.equal(state, go)
    # looped rows (tile 16), and the out-of-place twin writes every row
    with forced("looped"):
        buf = g.clone()
        CE._scale_(buf, torch.ones(6, device=DEVICE), torch.ones(6, device=DEVICE))
        assert torch.equal(buf, g)
        out = CE.cross_entropy_scaled_grad(g, torch.full((6,), 2.0, device=DEVICE), go)
    assert_close(out, g.double() * (go.double() / 2)[:, None])


@pytest.mark.parametrize("path", PATHS)
def test_inplace_backward(path):
    """The gradient is written over the logits in the forward: no extra buffer;
    the backward returns that buffer (rescaled when grad_output is not 1)."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(6, C, ignore=(0,))
    x = rand(6, C, dtype=torch.bfloat16).requires_grad_()
    logits = x * 1  # a non-leaf activation, as in a model
    ptr = logits.data_ptr()
    with forced(path):
        with expect_launches(DEN, FWD[(path, False)]):
            loss = softmax_gpu.cross_entropy(logits, t, weight=w, label_smoothing=0.1,
                                             inplace_backward=True)
        (dlogits,) = torch.autograd.grad(loss * 2.0, logits)
    assert dlogits.data_ptr() == ptr  # the gradient lives in the logits' storage
    x64 = x.detach().double().requires_grad_()
    ref = torch_ref(x64, t, weight=w, label_smoothing=0.1)
    (dref,) = torch.autograd.grad(ref * 2.0, x64)
    assert_close(loss, ref)
    assert_close(dlogits, dref, scale=8)
    assert_close(logits.detach(), dref, scale=8)  # the logits are gone: they hold the gradient
    # a leaf that requires grad (a parameter), or a view of one, is refused
    # as torch's in-place ops refuse it: its values, and the .grad it would
    # get, would both be the gradient; untouched
    leaf = rand(6, C).requires_grad_()
    before = leaf.detach().clone()
    with forced(path):
        for bad, what in ((leaf, "a leaf"), (leaf[1:], "a view of a leaf")):
            with pytest.raises(RuntimeError, match=f"input is {what} tensor that requires grad"):
                softmax_gpu.cross_entropy(bad, t[:bad.shape[0]], inplace_backward=True)
        # a leaf that needs no gradient, or no grad mode: nothing to write, untouched
        kept = rand(6, C)
        kept_before = kept.clone()
        softmax_gpu.cross_entropy(kept, t, inplace_backward=True)
        with torch.no_grad():
            softmax_gpu.cross_entropy(leaf, t, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    assert torch.equal(kept, kept_before)
    # rows that share memory (expanded; overlapping strides, where one row's
    # gradient would overwrite the next row's logits before they are read)
    source = rand(4 * C).requires_grad_() * 1
    for bad in (source[:C].expand(4, C), source.as_strided((4, C), (2, 1))):
        with pytest.raises(ValueError, match="input cannot take the gradient in place"):
            softmax_gpu.cross_entropy(bad, t[:4], inplace_backward=True)
        with pytest.raises(ValueError, match="input cannot take the gradient in place"):
            softmax_gpu.cross_entropy_with_grad(bad.detach(), t[:4], inplace=True)


@pytest.mark.parametrize("path", PATHS)
def test_cross_entropy_with_grad(path):
    """One launch, loss and grad_scale * dloss/dinput; in place into the logits."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(6, C, ignore=(3,))
    x = rand(6, C)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    for reduction in ("mean", "sum", "none"):
        x64 = x.double().requires_grad_()
        ref = torch_ref(x64, t, reduction=reduction, **kw)
        (dref,) = torch.autograd.grad(ref.sum(), x64)
        with forced(path), expect_launches(DEN, FWD[(path, False)]):
            loss, grad = softmax_gpu.cross_entropy_with_grad(x, t, reduction=reduction,
                                                             grad_scale=0.5, **kw)
        assert loss.dtype == x.dtype and grad.shape == x.shape and grad.grad_fn is None
        assert_close(loss, ref)
        assert_close(grad, 0.5 * dref, scale=4)
    xi = x.clone()
    with forced(path), expect_launches(DEN, FWD[(path, False)]):
        loss, grad, lse = softmax_gpu.cross_entropy_with_grad(xi, t, inplace=True, grad_scale=3.0,
                                                              return_lse=True)
    x64 = x.double().requires_grad_()
    ref = torch_ref(x64, t)
    (dref,) = torch.autograd.grad(ref, x64)
    assert grad.data_ptr() == xi.data_ptr()
    assert_close(loss, ref)
    assert_close(grad, 3 * dref, scale=12)
    assert_close(lse, torch.logsumexp(x.double(), -1))
    # probability targets and a (C,) input
    p = torch.softmax(rand(6, C), -1)
    with forced(path):
        loss, grad = softmax_gpu.cross_entropy_with_grad(x, p, reduction="sum")
    x64 = x.double().requires_grad_()
    (dref,) = torch.autograd.grad(torch_ref(x64, p, reduction="sum"), x64)
    assert_close(grad, dref, scale=4)
    loss, grad = softmax_gpu.cross_entropy_with_grad(x[0], t[0])
    assert loss.shape == () and grad.shape == (C,)


# --- extras ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_z_loss_and_softcap(path):
    """z_loss * lse^2 per kept row (mean over kept rows, no weights) and
    z = cap * tanh(z / cap) first, against the float64 torch formula."""
    C = C_FOR[path]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(7, C, ignore=(2, 5))
    x = rand(7, C, scale=8.0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for reduction in ("mean", "sum", "none"):
            check(x, t, path, dtype, weight=w, reduction=reduction, label_smoothing=0.1,
                  z_loss=1e-2, softcap=6.0)
        check(x, t, path, dtype, z_loss=0.3)
        check(x, t, path, dtype, softcap=2.5, reduction="sum")
        check(x, torch.softmax(rand(7, C), -1), path, dtype, weight=w, z_loss=1e-2, softcap=6.0)


@pytest.mark.parametrize("path", PATHS)
def test_return_lse(path):
    """Per-row lse (of the softcapped logits), fp32, shaped like the target's batch dims."""
    C = C_FOR[path]
    x = rand(2, C, 3, dtype=torch.bfloat16)
    t = targets(0, C, shape=(2, 3), ignore=(1,))
    with forced(path):
        loss, lse = softmax_gpu.cross_entropy(x, t, return_lse=True)
        loss_c, lse_c = softmax_gpu.cross_entropy(x, t, softcap=3.0, return_lse=True)
        _, lse_1 = softmax_gpu.cross_entropy(x[0, :, 0], t[0, 0], return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3) and lse_1.shape == ()
    assert_close(lse, torch.logsumexp(x.double(), 1), torch.float32)
    assert_close(lse_c, torch.logsumexp(3.0 * torch.tanh(x.double() / 3.0), 1), torch.float32)
    assert_close(lse_1, torch.logsumexp(x[0, :, 0].double(), 0), torch.float32)
    assert_close(loss, torch_ref(x, t))
    assert not lse.requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(path):
    C = 6 if path == "single" else 70
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    t = targets(3, C, ignore=(1,))
    x = rand(3, C, dtype=torch.float64, scale=1.0).requires_grad_()
    p = torch.softmax(rand(3, C, dtype=torch.float64), -1)
    with forced(path):
        assert torch.autograd.gradcheck(
            lambda z: softmax_gpu.cross_entropy(z, t, weight=w, label_smoothing=0.2, z_loss=0.1,
                                                softcap=3.0, reduction="none"), (x,), fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda z: softmax_gpu.cross_entropy(z, p, weight=w, label_smoothing=0.2, z_loss=0.1),
            (x,), fast_mode=True)


# --- robustness --------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_target(path):
    """A class index outside [0, C) that is not ignore_index is never used as an
    address: its row's loss and gradient are NaN, the other rows are right. The
    torch reference path raises IndexError, as torch does."""
    C = C_FOR[path]
    x = rand(5, C)
    t = targets(5, C, ignore=(4,))
    bad = t.clone()
    bad[1] = C
    bad[3] = -7
    xs = x.clone().requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    with forced(path):
        out = softmax_gpu.cross_entropy(xs, bad, weight=w, reduction="none", label_smoothing=0.1)
        out.sum().backward()
        assert torch.isnan(softmax_gpu.cross_entropy(x, bad))
    good = [0, 2, 4]
    ref = torch_ref(x[good], t[good], weight=w, reduction="none", label_smoothing=0.1)
    assert out[[1, 3]].isnan().all() and xs.grad[[1, 3]].isnan().all()
    assert_close(out[good], ref)
    x64 = x[good].double().requires_grad_()
    (dref,) = torch.autograd.grad(torch_ref(x64, t[good], weight=w, reduction="none",
                                            label_smoothing=0.1).sum(), x64)
    assert_close(xs.grad[good], dref, scale=4)
    # the torch reference (the CPU path) raises IndexError, as torch does on
    # the CPU; on CUDA torch fires a device-side assert instead, which would
    # poison this process's CUDA context: the references run on CPU copies
    for target in (bad.cpu(), torch.tensor([1, 2, -3])):
        xc = x[: len(target)].cpu()
        with pytest.raises(IndexError, match="out of bounds"):
            CE.reference_forward(xc, target, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, False)
        with pytest.raises(IndexError, match="out of bounds"):
            F.cross_entropy(xc, target)


def test_bad_arguments():
    x = rand(4, 6)
    t = targets(4, 6)
    ce = softmax_gpu.cross_entropy
    with pytest.raises(ValueError, match="target shape .* does not match input shape"):
        ce(x, targets(5, 6))
    with pytest.raises(ValueError, match="target shape"):
        ce(rand(4, 6, 3), targets(4, 6))
    with pytest.raises(ValueError, match="weight must be 1-D with one value per class"):
        ce(x, t, weight=torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        ce(x, t, weight=torch.ones(6, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        ce(x, t, weight=[1.0] * 6)  # before, on the kernels' path: an AttributeError
    with pytest.raises(ValueError, match="reduction must be one of"):
        ce(x, t, reduction="avg")
    for ls in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
            ce(x, t, label_smoothing=ls)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        ce(x, t.float())
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        ce(x, t.bool())
    with pytest.raises(TypeError, match="target has the input's shape .* must be floating"):
        ce(x, torch.zeros(4, 6, dtype=torch.long, device=DEVICE))
    for cap in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            ce(x, t, softcap=cap)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
        ce(x, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="ignore_index is not supported with probability targets"):
        ce(x, torch.softmax(x, -1), ignore_index=0)
    with pytest.raises(TypeError, match="input must be a floating tensor"):
        ce(t, t)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ce([1.0, 2.0], t)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        ce(x, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="input must have the classes in dim 1"):
        ce(torch.tensor(1.0, device=DEVICE), torch.tensor(0, device=DEVICE))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ce(x, t, ignore_index=1.5)
    for big in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            ce(x, t, ignore_index=big)
    with pytest.raises(TypeError, match="grad_scale must be a number"):
        softmax_gpu.cross_entropy_with_grad(x, t, grad_scale="2")
    for bad in (torch.int32, torch.bool, torch.complex64):  # before: a truncated loss
        with pytest.raises(TypeError, match="loss_dtype must be a floating dtype"):
            ce(x, t, loss_dtype=bad)


def test_class_weights_that_require_grad():
    """As torch: with class indices a weight that requires grad is an error
    (before: it silently got no gradient, on the kernels' path; the CPU
    reference gave it one), and fine without grad; with probability targets
    it gets torch's gradient (the differentiable composite)."""
    x = rand(6, 9, dtype=torch.float64).requires_grad_()
    t = targets(6, 9)
    w = (torch.rand(9, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_()
    for fn in (lambda: softmax_gpu.cross_entropy(x, t, weight=w),
               lambda: softmax_gpu.CrossEntropyLoss(weight=w)(x, t)):
        with pytest.raises(RuntimeError, match="weight requires grad"):
            fn()
        with torch.no_grad():
            assert_close(fn(), F.cross_entropy(x, t, weight=w))
    p = torch.softmax(rand(6, 9, dtype=torch.float64), -1)
    ours = torch.autograd.grad(softmax_gpu.cross_entropy(x, p, weight=w), (x, w))
    want = torch.autograd.grad(F.cross_entropy(x, p, weight=w), (x, w))
    for g, r in zip(ours, want):
        assert_close(g, r)


def test_numpy_scalars_as_torch_takes_them():
    """NumPy integer and real scalars (read from a config, np.argmax) are
    taken where torch takes them: the same result as the Python scalar
    (before: a TypeError for np.int64 and np.float32)."""
    np = pytest.importorskip("numpy")
    x = rand(6, 9, dtype=torch.float64)
    t = targets(6, 9)
    ce = softmax_gpu.cross_entropy
    pairs = [
        (lambda v: ce(x, t, ignore_index=v), np.int64(3), 3),
        (lambda v: ce(x, t, label_smoothing=v), np.float32(0.25), 0.25),
        (lambda v: ce(x, t, z_loss=v, softcap=v * 40), np.float32(0.125), 0.125),
        (lambda v: ce(x, t, divisor=v), np.int32(4), 4),
        (lambda v: softmax_gpu.CrossEntropyLoss(ignore_index=v)(x, t), np.int16(2), 2),
        (lambda v: softmax_gpu.cross_entropy_with_grad(x.clone(), t, grad_scale=v)[1],
         np.float32(0.5), 0.5),
    ]
    for f, numpy_value, value in pairs:
        assert torch.equal(f(numpy_value), f(value))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ce(x, t, ignore_index=np.float64(3.0))


def test_int64_offsets_in_a_subprocess():
    """Rows that start beyond element 2**31 of a row-strided view (a padded
    vocabulary), read, and written in place (inplace + a rescale), on the
    on-chip path and every long-row candidate; and targets near +-2**40,
    which would fault if a load used them."""
    code = r"""
import torch, torch.nn.functional as F
import softmax_gpu
from softmax_gpu import heuristics
from helpers import DEVICE, LONG
S = 2**30 + 64                      # row stride: row 2 starts at 2**31 + 128


class Alias(torch.autograd.Function):
    # the logits as a model's output: a non-leaf in the same storage (a leaf
    # that requires grad may not take the gradient in place)
    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return g


PATHS = [("single", 40, {}, "single")] + [
    (name, 100, LONG[name], "looped" if name == "persistent" else name)
    for name in ("looped", "persistent", "coop", "resident")]
for path, C, lim, family in PATHS:
    base = torch.empty(3, S, dtype=torch.bfloat16, device=DEVICE)   # untouched pages cost nothing
    vals = (torch.randn(3, C, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    logits = base[:, :C]
    logits.copy_(vals.to(DEVICE))
    t = torch.tensor([1, C - 1, 7], device=DEVICE)
    x64 = vals.double().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), reduction="none", label_smoothing=0.1)
    (dref,) = torch.autograd.grad(ref, x64, torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    with heuristics.override(**lim), softmax_gpu.record_launches() as names:
        loss, grad = softmax_gpu.cross_entropy_with_grad(logits, t, reduction="none", label_smoothing=0.1)
        assert torch.allclose(loss.double().cpu(), ref.detach(), rtol=2e-2, atol=2e-2), (loss, ref)
        leaf = logits.requires_grad_()
        h = leaf * 1
        assert h.is_contiguous()
        view = Alias.apply(base[:, :C].detach().requires_grad_())
        out = softmax_gpu.cross_entropy(view, t, reduction="none", label_smoothing=0.1,
                                        inplace_backward=True)
        (g,) = torch.autograd.grad(out, view, torch.tensor([1.0, 2.0, -3.0], device=DEVICE))
    assert any(f"ce_class_{family}" in n for n in names), (path, names)
    assert g.data_ptr() == base.data_ptr()
    assert torch.allclose(g.double().cpu(), dref, rtol=2e-2, atol=2e-3), (g, dref)
    assert torch.equal(base[2, :C].cpu(), g[2].cpu())
    del base, logits, leaf, h, view, g
    # targets far outside [0, C): an unmasked load at X + t or W + t would fault
    w = torch.rand(C, device=DEVICE) + 0.5
    x = (torch.randn(3, C) * 3).to(DEVICE)
    far = torch.tensor([2**40, -2**40, 3], device=DEVICE)
    with heuristics.override(**lim):
        loss, grad = softmax_gpu.cross_entropy_with_grad(x, far, w, reduction="none", label_smoothing=0.1)
        loss2, grad2 = softmax_gpu.cross_entropy_with_grad(x, far, reduction="none")
    for l, g in ((loss, grad), (loss2, grad2)):
        assert l[:2].isnan().all() and g[:2].isnan().all() and l[2].isfinite() and g[2].isfinite().all()
print("ok")
"""
    assert run_python(code).strip().endswith("ok")


# --- module, compile, custom ops ---------------------------------------------------


def test_module_matches_torch():
    w = (torch.rand(9, dtype=torch.float64) + 0.5).to(DEVICE)
    x = rand(6, 9)
    t = targets(6, 9, ignore=(2,), ignore_index=3)
    mod = softmax_gpu.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.2)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.2)
    assert_close(mod(x, t), ref(x.double(), t))
    assert "weight" in dict(mod.named_buffers())
    assert mod.state_dict().keys() == ref.state_dict().keys()
    # a subclass of torch's module: code that checks isinstance treats it as torch's
    assert isinstance(mod, torch.nn.CrossEntropyLoss)
    legacy = softmax_gpu.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    mod = softmax_gpu.CrossEntropyLoss(z_loss=1e-2, softcap=4.0, return_lse=True)
    loss, lse = mod(x, t)
    assert_close(loss, torch_ref(x, t, z_loss=1e-2, softcap=4.0))
    assert lse.shape == (6,)
    assert "softcap=4.0" in repr(mod)


def test_meta_tensors_give_shapes():
    x = torch.empty(4, 10, 3, device="meta", dtype=torch.bfloat16)
    t = torch.empty(4, 3, device="meta", dtype=torch.long)
    out = softmax_gpu.cross_entropy(x, t, reduction="none")
    assert out.shape == (4, 3) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    loss, grad = softmax_gpu.cross_entropy_with_grad(x, t)
    assert loss.shape == () and grad.shape == x.shape


def test_torch_compile_training_step():
    """torch.compile(fullgraph=True) of Linear -> cross_entropy (weights, label
    smoothing, ignored rows, z-loss), backward through the compiled graph,
    against eager torch; also with inplace_backward and a loss scale."""
    torch.manual_seed(0)
    C = 40
    lin = torch.nn.Linear(8, C).to(DEVICE)
    ref = torch.nn.Linear(8, C).to(DEVICE)
    ref.load_state_dict(lin.state_dict())
    w = (torch.rand(C, dtype=torch.float64) + 0.5).float().to(DEVICE)
    x = rand(6, 8)
    t = targets(6, C, ignore=(1,))

    def step(model, x, t, inplace):
        loss = softmax_gpu.cross_entropy(model(x), t, w, label_smoothing=0.1, z_loss=1e-3,
                                         inplace_backward=inplace)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True)
    for inplace in (False, True):
        lin.zero_grad()
        ref.zero_grad()
        loss = compiled(lin, x, t, inplace)
        loss.backward()
        loss_ref = torch_ref(ref(x), t, w, label_smoothing=0.1, z_loss=1e-3) * 2.0
        loss_ref.backward()
        assert_close(loss, loss_ref.detach())
        torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=1e-6, rtol=1e-5)


def test_torch_compile_dynamic_shapes():
    """torch.compile(fullgraph=True, dynamic=True): two batch sizes through
    one graph, with the gradient in place or not, and
    cross_entropy_with_grad in place, against float64 torch. (The in-place
    layout check once sorted symbolic strides, which dynamo refuses.)"""
    torch._dynamo.reset()
    C = 37

    def step(x, t, inplace):
        return softmax_gpu.cross_entropy(x * 1.0, t, label_smoothing=0.1,
                                         inplace_backward=inplace)

    def with_grad(x, t):
        return softmax_gpu.cross_entropy_with_grad(x * 1.0, t, inplace=True)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled_wg = torch.compile(with_grad, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (4, 7):
        t = targets(n, C, ignore=(1,))
        x0 = rand(n, C)
        ref_x = x0.double().requires_grad_()
        ref = torch_ref(ref_x, t, label_smoothing=0.1)
        ref.backward()
        for inplace in (False, True):
            x = x0.clone().requires_grad_()
            loss = compiled(x, t, inplace)
            loss.backward()
            assert_close(loss.detach(), ref.detach())
            assert_close(x.grad, ref_x.grad)
        loss, grad = compiled_wg(x0.clone(), t)
        plain = torch_ref(x0.double(), t)
        assert_close(loss, plain)
        xp = x0.double().requires_grad_()
        torch_ref(xp, t).backward()
        assert_close(grad, xp.grad)


def test_opcheck():
    x = rand(5, 12)
    t = targets(5, 12, ignore=(2,))
    w = torch.rand(12, device=DEVICE) + 0.5
    p = torch.softmax(rand(5, 12), -1)
    xg = x.clone().requires_grad_()
    cases = [
        (CE.cross_entropy_forward, (xg, t, w, -100, "mean", 0.1, 1e-2, 0.0, 1.0, True)),
        (CE.cross_entropy_forward, (xg, p, None, -100, "none", 0.0, 0.0, 4.0, 2.0, True)),
        (CE.cross_entropy_forward, (x, t, None, -100, "sum", 0.0, 0.0, 0.0, 1.0, False)),
        (CE.cross_entropy_scaled_grad, (rand(5, 12), torch.ones(5, device=DEVICE), rand(5))),
        (CE.cross_entropy_forward_, (x.clone(), t, w, -100, "mean", 0.1, 0.0, 0.0, 1.0)),
        (CE.cross_entropy_attach_grad, (x.clone().requires_grad_(), rand(5),
                                        torch.ones(5, device=DEVICE))),
        (CE.cross_entropy_lse, (x.clone().requires_grad_(), rand(5), 3.0)),
        (CE.cross_entropy_lse_backward, (x, rand(5), rand(5), 0.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_no_host_reads_of_device_values(monkeypatch):
    """The mean's denominator stays on the device: forward and backward never
    read a tensor's value on the host (.item(), bool(), .tolist(), nonzero...),
    the CPU-side proxy for "no host-device sync" (and CUDA-graph capturable),
    on each path."""
    data = {}
    for path in PATHS:
        C = C_FOR[path]
        data[path] = (rand(6, C), targets(6, C, ignore=(1,)), torch.rand(C, device=DEVICE) + 0.5,
                      torch.softmax(rand(6, C), -1))

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return f

    for name in ("item", "__bool__", "tolist", "nonzero", "__int__", "__float__", "masked_select"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    for path in PATHS:
        x, t, w, p = data[path]
        with forced(path):
            for target, kw in ((t, dict(weight=w, label_smoothing=0.1, z_loss=1e-3)), (p, {})):
                xs = x.clone().requires_grad_()
                (softmax_gpu.cross_entropy(xs, target, **kw) * 2.0).backward()
                h = x.clone().requires_grad_() * 1
                softmax_gpu.cross_entropy(h, target, inplace_backward=True, **kw).backward()
                softmax_gpu.cross_entropy_with_grad(x, target, grad_scale=2.0, **kw)
    monkeypatch.undo()
    assert xs.grad.isfinite().all()


# --- gradients never change once returned -------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_returned_gradient_is_never_changed(path, inplace):
    """torch.autograd.grad with retain_graph=True, then more grad/backward calls
    with other grad_outputs: every gradient handed out earlier keeps its values
    (a backward that retains the graph writes a new tensor; the last one,
    which frees it, scales the saved buffer in place)."""
    C = C_FOR[path]
    x = rand(4, C).requires_grad_()
    t = targets(4, C)
    with forced(path):
        h = x * 1.0
        loss = softmax_gpu.cross_entropy(h, t, inplace_backward=inplace)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        keep = g1.clone()
        (g3,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
        (g4,) = torch.autograd.grad(loss * -1.3, x, retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
    assert torch.equal(g1, keep)
    assert g3.data_ptr() != g1.data_ptr() and g4.data_ptr() != g3.data_ptr()
    assert torch.equal(g3, keep * 3.0)
    assert_close(g4, keep.double() * -1.3)
    assert torch.equal(x.grad, 2 * keep)  # two backwards accumulate exactly


def test_issue_example_gradients_do_not_alias():
    """The user report: g1 from a retained graph must survive a later grad call."""
    x = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 7, (4,), device=DEVICE)
    loss = softmax_gpu.cross_entropy(x, t)
    g1 = torch.autograd.grad(loss, x, retain_graph=True)[0]
    keep = g1.clone()
    g3 = torch.autograd.grad(loss * 3.0, x, retain_graph=True)[0]
    assert torch.equal(g1, keep)
    assert torch.equal(g3, 3.0 * keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_scaled_grad_output_is_exact(path, dtype):
    """A power-of-two grad_output (1/k of gradient accumulation, a 65536 loss
    scale) gives exactly the scaled gradient, on the first backward and on a
    retained graph's later ones, and matches float64 torch."""
    C = C_FOR[path]
    x = rand(6, C, dtype=dtype)
    t = targets(6, C, ignore=(2,))
    x64 = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(torch_ref(x64, t), x64)
    with forced(path):
        xs = x.clone().requires_grad_()
        (g_one,) = torch.autograd.grad(softmax_gpu.cross_entropy(xs, t), xs)
        for scale in (1.0 / 8, 65536.0):
            loss = softmax_gpu.cross_entropy(xs, t)
            (first,) = torch.autograd.grad(loss * scale, xs, retain_graph=True)
            (again,) = torch.autograd.grad(loss * scale, xs)
            assert torch.equal(first, g_one * scale)
            assert torch.equal(again, g_one * scale)
            assert_close(first, ref * scale, dtype, scale=4 * scale)


# --- the differentiable lse --------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_lse_is_differentiable(path):
    """return_lse's lse carries d lse / d z = sigma (through the softcap), so a
    z-loss or distillation term built from it backpropagates; with
    inplace_backward (the logits overwritten) a backward through it raises."""
    C = C_FOR[path]
    t = targets(5, C, ignore=(1,))
    for softcap in (None, 4.0):
        x = rand(5, C, dtype=torch.float64).requires_grad_()
        with forced(path):
            loss, lse = softmax_gpu.cross_entropy(x, t, softcap=softcap, return_lse=True)
            total = loss + 1e-2 * (lse * lse).mean() + 0.3 * lse[0]
            (dx,) = torch.autograd.grad(total, x)
        x64 = x.detach().clone().requires_grad_()
        z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
        lse64 = torch.logsumexp(z, 1)
        ref = torch_ref(x64, t, softcap=softcap) + 1e-2 * (lse64 * lse64).mean() + 0.3 * lse64[0]
        (dref,) = torch.autograd.grad(ref, x64)
        assert lse.requires_grad and lse.dtype == torch.float32
        assert_close(total, ref.detach(), torch.float32)
        assert_close(dx, dref, torch.float32, scale=4)
        # only the lse is used
        with forced(path):
            _, lse = softmax_gpu.cross_entropy(x, t, softcap=softcap, return_lse=True)
            with expect_launches("ce_lse_grad"):
                (dx,) = torch.autograd.grad(lse.sum(), x)
        z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
        (dref,) = torch.autograd.grad(torch.logsumexp(z, 1).sum(), x64)
        assert_close(dx, dref, torch.float32, scale=4)
    # in place: the logits are gone, so a term built from the lse is an
    # error at backward (never silently left out); the loss alone, and a
    # detached lse, train as usual
    for dtype in (torch.float32, torch.float16):  # the fp16 path defers the gradient
        x = rand(5, C, dtype=dtype)
        with forced(path):
            loss, lse = softmax_gpu.cross_entropy(x.clone().requires_grad_() * 1, t,
                                                  return_lse=True, inplace_backward=True)
            assert lse.dtype == torch.float32
            with pytest.raises(RuntimeError, match="lse has no gradient"):
                (loss + 1e-2 * (lse * lse).mean()).backward()
            h = x.clone().requires_grad_()
            loss, lse = softmax_gpu.cross_entropy(h * 1, t, return_lse=True,
                                                  inplace_backward=True)
            (loss + 0 * lse.detach().mean()).backward()
        x64 = x.double().requires_grad_()
        torch_ref(x64, t).backward()
        assert_close(h.grad, x64.grad, dtype)
        assert_close(lse, torch.logsumexp(x.double(), 1), torch.float32)


# --- torch's call binding, loss_dtype ------------------------------------------------


def test_binding_matches_torch():
    """Every positional slot binds as in F.cross_entropy / nn.CrossEntropyLoss;
    size_average / reduce map to reduction with torch's deprecation warning."""
    ours = list(inspect.signature(softmax_gpu.cross_entropy).parameters.values())
    theirs = list(inspect.signature(F.cross_entropy).parameters.values())
    assert [p.name for p in ours[:len(theirs)]] == [p.name for p in theirs]
    assert [p.default for p in ours[:len(theirs)]] == [p.default for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs):])
    mo = list(inspect.signature(softmax_gpu.CrossEntropyLoss.__init__).parameters)
    mt = list(inspect.signature(torch.nn.CrossEntropyLoss.__init__).parameters)
    assert mo[:len(mt)] == mt

    C = 9
    x = rand(6, C, dtype=torch.float64)
    t = targets(6, C, ignore=(1,), ignore_index=3)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    calls = [
        ((x, t), {}),
        ((x, t, w), {}),
        ((x, t, None, None, 3), {}),  # ignore_index in torch's 5th slot
        ((x, t, w, None, 3, None, "sum"), {}),
        ((x, t, w, None, 3, None, "none", 0.2), {}),
        ((x, t, None, False), {}),  # size_average=False: sum
        ((x, t, None, None, -100, False), {}),  # reduce=False: none
        ((x, t), dict(size_average=True, reduce=True)),
    ]
    for args, kw in calls:
        with warnings.catch_warnings(record=True) as ours_w:
            warnings.simplefilter("always")
            out = softmax_gpu.cross_entropy(*args, **kw)
        with warnings.catch_warnings(record=True) as theirs_w:
            warnings.simplefilter("always")
            ref = F.cross_entropy(*args, **kw)
        assert_close(out, ref)
        legacy = [[str(w.message) for w in ws if "size_average" in str(w.message)]
                  for ws in (ours_w, theirs_w)]
        assert legacy[0] == legacy[1], (args, kw)
        margs = [a for a in args[2:]]
        mod = softmax_gpu.CrossEntropyLoss(*margs, **kw) if margs or kw else \
            softmax_gpu.CrossEntropyLoss()
        tmod = torch.nn.CrossEntropyLoss(*margs, **kw) if margs or kw else \
            torch.nn.CrossEntropyLoss()
        assert mod.reduction == tmod.reduction and mod.ignore_index == tmod.ignore_index
        assert_close(mod(x, t), tmod(x, t))
        assert mod.state_dict().keys() == tmod.state_dict().keys()


def test_loss_dtype():
    """loss_dtype=torch.float32 returns the fp32 result of bf16 logits (the
    reduced loss and reduction="none" rows), differentiable."""
    x = rand(64, 40, dtype=torch.bfloat16).requires_grad_()
    t = targets(64, 40, ignore=(3,))
    ref = torch_ref(x.detach(), t)
    loss = softmax_gpu.cross_entropy(x, t, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all()
    rows = softmax_gpu.cross_entropy(x.detach(), t, reduction="none", loss_dtype=torch.float32)
    assert rows.dtype == torch.float32
    assert_close(rows, torch_ref(x.detach(), t, reduction="none"), torch.float32, scale=4)


# --- long rows: persistent, cooperative, unaligned rows, ignored rows ---------------

# LONG, long_kernel: the forced long-row candidates (helpers).


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("candidate", list(LONG))
def test_long_row_candidates(candidate, dtype):
    """Every long-row path a tuner can force (Limits fields), on unaligned
    rows (101 classes: head, aligned body and tail), with ignored rows,
    plain and with every extra, against float64; the loss, gradient and lse
    of the forward-with-gradient launch."""
    C = 101
    x = rand(9, C, dtype=dtype)
    t = targets(9, C, ignore=(1, 5))
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    kern = f"ce_class_{long_kernel(candidate, dtype)}"
    for kw in ({}, dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
                        reduction="sum")):
        xs = x.clone().requires_grad_()
        with heuristics.override(**LONG[candidate]):
            with expect_launches(*(((DEN,) if kw.get("reduction", "mean") == "mean" or kw
                                    else ()) + (kern,))):
                loss, lse = softmax_gpu.cross_entropy(xs, t, return_lse=True, **kw)
            (dx,) = torch.autograd.grad(loss, xs)
        x64 = x.double().requires_grad_()
        ref = torch_ref(x64, t, **kw)
        (dx_ref,) = torch.autograd.grad(ref, x64)
        z64 = x.double() if "softcap" not in kw else 4.0 * torch.tanh(x.double() / 4.0)
        assert_close(loss, ref.detach(), dtype)
        assert_close(dx, dx_ref, dtype, scale=4.0)
        assert_close(lse, torch.logsumexp(z64, 1), torch.float32)


@pytest.mark.parametrize("candidate", ["persistent", "coop", "resident"])
def test_long_rows_in_place_and_token_hits(candidate):
    """In place (the gradient written over the logits: a coop second pass
    must not overwrite what another chunk's first pass reads, and the target
    logit is taken before) and linear_cross_entropy's token accuracy, which
    uses the same kernels' HIT output, on the long-row paths."""
    C = 150
    x = rand(8, C)
    t = targets(8, C, ignore=(3,))
    with heuristics.override(**LONG[candidate]):
        h = x.clone().requires_grad_()
        loss = softmax_gpu.cross_entropy(h * 1, t, inplace_backward=True)
        loss.backward()
        x64 = x.double().requires_grad_()
        (dx_ref,) = torch.autograd.grad(torch_ref(x64, t), x64)
        assert_close(h.grad, dx_ref, scale=4.0)
        inp = rand(8, 16)
        lw = rand(C, 16) * 0.5
        tt = targets(8, C, ignore=(3,))
        _, acc = softmax_gpu.linear_cross_entropy(inp, lw, tt, return_token_accuracy=True)
    logits = inp.double() @ lw.double().t()
    kept = tt != -100
    want = (logits.argmax(1) == tt)[kept].double().mean()
    assert abs(float(acc) - float(want)) < 1e-6


@pytest.mark.parametrize("path", ["single", "looped", "coop", "resident"])
def test_ignored_rows_are_never_read(path):
    """Logits of ignored rows are never read: NaN there changes nothing (loss,
    gradient, the other rows' lse), their gradient rows are written as
    zeros, and their internal lse is 0 unless every row's lse is asked for
    (return_lse), when they are read (and the lse is NaN, as torch's)."""
    C = 37 if path == "single" else 120
    lim = {} if path == "single" else LONG[path if path in ("coop", "resident") else "persistent"]
    x = rand(7, C)
    t = targets(7, C, ignore=(0, 4))
    poisoned = x.clone()
    poisoned[0] = float("nan")
    poisoned[4] = float("nan")
    with heuristics.override(**lim):
        xs = poisoned.clone().requires_grad_()
        loss = softmax_gpu.cross_entropy(xs, t)
        loss.backward()
        _, lse, _, _ = CE.cross_entropy_forward(poisoned, t, None, -100, "mean", 0.0, 0.0, 0.0,
                                                1.0, False, None, None, False)
        _, lse_all = softmax_gpu.cross_entropy(poisoned, t, return_lse=True)
        # read for their lse, ignored rows holding NaN and +inf still get zeros
        read = poisoned.clone()
        read[4] = float("inf")
        read.requires_grad_()
        softmax_gpu.cross_entropy(read, t, return_lse=True)[0].backward()
    x64 = x.double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(torch_ref(x64, t), x64)
    assert_close(loss, torch_ref(x.double(), t))
    assert torch.equal(xs.grad[[0, 4]], torch.zeros_like(xs.grad[[0, 4]]))
    assert_close(xs.grad, dx_ref, scale=4.0)
    assert torch.equal(read.grad[[0, 4]], torch.zeros_like(read.grad[[0, 4]]))
    assert_close(read.grad, dx_ref, scale=4.0)
    assert torch.equal(lse[[0, 4]].cpu(), torch.zeros(2, dtype=lse.dtype))
    assert lse_all[[0, 4]].isnan().all() and lse_all[[1, 2, 3, 5, 6]].isfinite().all()


# --- divisor: the backward's scale stated ahead --------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("path", PATHS)
def test_divisor(path, kind, reduction):
    """divisor: the returned loss and the gradient written in the forward are
    divided by it (a float, or a 0-d device tensor read on the device); the
    backward of grad_output 1 is then nothing but the no-op launch, and the
    gradient equals float64 torch of loss / divisor."""
    C = C_FOR[path]
    x = rand(6, C)
    t = targets(6, C, ignore=(2,))
    div = 3.7 if kind == "float" else torch.tensor(3.7, device=DEVICE)
    with forced(path):
        xs = x.clone().requires_grad_()
        loss = softmax_gpu.cross_entropy(xs, t, reduction=reduction, divisor=div)
        with expect_launches(BWD):
            loss.backward(torch.ones_like(loss))
        loss2, grad2 = softmax_gpu.cross_entropy_with_grad(x, t, reduction=reduction,
                                                           divisor=div, grad_scale=2.0)
    x64 = x.double().requires_grad_()
    ref = torch_ref(x64, t, reduction=reduction) / 3.7
    (dx_ref,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    assert_close(loss, ref.detach())
    assert_close(loss2, ref.detach())
    assert_close(xs.grad, dx_ref, scale=4.0)
    assert_close(grad2, 2.0 * dx_ref, scale=8.0)


def test_compile_with_a_number_divisor_that_changes():
    """torch.compile(fullgraph=True) of a sum divided by a token count that
    changes from step to step, given as a Python int (which compile makes
    symbolic at the first change) or float, against float64 torch."""
    C = 13
    t = targets(6, C, ignore=(2,))
    compiled = torch.compile(
        lambda x, n: softmax_gpu.cross_entropy(x, t, reduction="sum", divisor=n),
        fullgraph=True, backend="aot_eager")
    for n in (3, 5, 7, 2.5):
        x = rand(6, C).requires_grad_()
        loss = compiled(x, n)
        (dx,) = torch.autograd.grad(loss, x)
        x64 = x.detach().double().requires_grad_()
        ref = torch_ref(x64, t, reduction="sum") / n
        (dx_ref,) = torch.autograd.grad(ref, x64)
        assert_close(loss, ref.detach())
        assert_close(dx, dx_ref, scale=4.0)
    # a constant number is checked while tracing too, as eagerly
    for bad in (0, float("inf")):
        bad_call = torch.compile(
            lambda x: softmax_gpu.cross_entropy(x, t, reduction="sum", divisor=bad),
            fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match="divisor must be a finite nonzero number"):
            bad_call(rand(6, C))


def test_divisor_with_every_extra_and_probability_targets():
    """The divisor with weights, smoothing, z-loss, softcap (class targets),
    and with probability targets, on both paths."""
    x = rand(5, 100)
    t = targets(5, 100, ignore=(1,))
    p = torch.softmax(rand(5, 100), -1)
    w = (torch.rand(100, dtype=torch.float64) + 0.5).to(DEVICE)
    for path in PATHS:
        for target, kw in ((t, dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)),
                           (p, dict(label_smoothing=0.1))):
            for div in (0.25, torch.tensor(8.0, dtype=torch.float64, device=DEVICE)):
                with forced(path):
                    xs = x.clone().requires_grad_()
                    loss = softmax_gpu.cross_entropy(xs, target, divisor=div, **kw)
                    loss.backward()
                d = float(div)
                x64 = x.double().requires_grad_()
                ref = torch_ref(x64, target, **kw) / d
                (dx_ref,) = torch.autograd.grad(ref, x64)
                assert_close(loss, ref.detach())
                assert_close(xs.grad, dx_ref, scale=4.0 / min(1.0, d))


def test_divisor_checks():
    x = rand(3, 10)
    t = targets(3, 10)
    for bad, err in ((0.0, ValueError), (math.inf, ValueError), (True, TypeError),
                     ("2", TypeError), (torch.ones(2, device=DEVICE), ValueError)):
        with pytest.raises(err, match="divisor"):
            softmax_gpu.cross_entropy(x, t, divisor=bad)
    # a CPU scalar tensor is read on the host; an integer tensor works too
    loss = softmax_gpu.cross_entropy(x, t, reduction="sum", divisor=torch.tensor(4))
    assert_close(loss, torch_ref(x.double(), t, reduction="sum") / 4)


def kernel_round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values rounded to ``dtype`` as the kernels' cast does: to nearest
    on a GPU; Triton's interpreter truncates fp32 -> bf16."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return (v.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return v.to(dtype)


def test_grad_output_stated_ahead_is_rounded_once():
    """bf16 16 x 50257 (an unaligned vocabulary) with grad_output -1.3 stated
    ahead (divisor = -1/1.3): the bf16 gradient is the kernel's fp32
    gradient (the same launch plan writing into an fp32 buffer) rounded
    once, bit for bit, and the backward does nothing. Doubly rounded (the
    gradient stored at forward time, then rescaled) it is not."""
    C = 50257
    x = rand(16, C, dtype=torch.bfloat16)
    t = targets(16, C, ignore=(3,))
    div = -1 / 1.3
    xs = x.clone().requires_grad_()
    softmax_gpu.cross_entropy(xs, t, divisor=div).backward()
    g32 = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
    plan = CE._plan(x, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, CE.NEW_GRAD, divisor=div,
                    lse_all=False)
    plan.run(x, t, None, g32)
    once = kernel_round(g32, torch.bfloat16)
    assert torch.equal(xs.grad.view(torch.int16), once.view(torch.int16))
    x64 = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(torch_ref(x64, t) * -1.3, x64)
    assert_close(g32, ref, torch.float32, scale=4.0)
    plain = torch.empty_like(g32)
    CE._plan(x, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, CE.NEW_GRAD,
             lse_all=False).run(x, t, None, plain)
    twice = kernel_round(kernel_round(plain, torch.bfloat16).float() * -1.3, torch.bfloat16)
    assert not torch.equal(twice.view(torch.int16), once.view(torch.int16))


def test_compiled_step_writes_the_gradient_once_from_the_logits():
    """Under torch.compile (a traced graph) with class targets, the forward
    writes no gradient and the backward writes grad_output times it in one
    pass over the saved logits (ce_class_backward), rounded once: each bf16
    element within one unit in the last place of float64 (a doubly rounded
    gradient, stored then rescaled, is not); also with a divisor and with
    every extra, against float64."""
    torch._dynamo.reset()
    C = 300
    x = rand(8, C, dtype=torch.bfloat16)
    t = targets(8, C, ignore=(2,))
    w = (torch.rand(C, dtype=torch.float64) + 0.5).float().to(DEVICE)

    def step(z, t, kw):
        return softmax_gpu.cross_entropy(z, t, **kw) * -1.3

    compiled = torch.compile(step, fullgraph=True)
    for kw in ({}, dict(divisor=2.5), dict(weight=w, label_smoothing=0.1, z_loss=1e-2,
                                           softcap=8.0)):
        xs = x.clone().requires_grad_()
        loss = compiled(xs, t, kw)
        with softmax_gpu.record_launches() as names:
            loss.backward()
        assert any(n.startswith("ce_class_backward") for n in names), names
        assert not any(n.startswith("ce_grad_scale") for n in names), names
        x64 = x.double().requires_grad_()
        d = kw.pop("divisor", 1.0)
        ref = torch_ref(x64, t, **kw) / d * -1.3
        (dx_ref,) = torch.autograd.grad(ref, x64)
        assert_close(loss, ref.detach(), torch.bfloat16)
        if not kw:
            ulp = 2.0 ** (torch.frexp(dx_ref.float())[1].double() - 8)
            err = (xs.grad.double() - dx_ref).abs()
            assert bool((err <= ulp * (1 + 1e-3) + 1e-30).all()), float((err / ulp).max())
        else:
            assert_close(xs.grad, dx_ref, torch.bfloat16, scale=4.0)


# --- the softcap's tanh, accurate at every cap ---------------------------------------


@triton.jit
def _softcap_values(X, Z, cap, N, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    cap = tl.zeros((), tl.float32) + cap  # an fp32 scalar, as the kernels' scalar_arg gives
    tl.store(Z + c, softcap_tanh(tl.load(X + c, mask=m, other=0.0), cap), mask=m)


@pytest.mark.parametrize("cap", [30.0, 100.0, 1000.0, 1e4])
def test_softcap_accurate_at_every_cap(cap):
    """cap * tanh(x / cap) in fp32 within 2x torch's fp32 error (max relative,
    against float64) at caps 30 to 1e4, over logits up to +-60 (both of its
    branches), and the cross-entropy gradient through it likewise (the
    former 1 - 2 / (e^(2u) + 1) form lost digits at large caps: 1e-3 at 1e4)."""
    gen = torch.Generator().manual_seed(int(cap))
    x = torch.cat([torch.randn(40000, dtype=torch.float64, generator=gen) * 8,
                   torch.linspace(-60, 60, 4001, dtype=torch.float64)]).float()
    z = torch.empty_like(x).to(DEVICE)
    _softcap_values[(triton.cdiv(x.numel(), 4096),)](x.to(DEVICE), z, cap, x.numel(), BLOCK=4096)
    ref = cap * torch.tanh(x.double() / cap)

    def err(v):
        return float(((v.double().cpu() - ref).abs() / ref.abs().clamp_min(1e-30)).max())

    assert err(z) <= 2 * err(cap * torch.tanh(x / cap))
    # the gradient of the loss through the softcap, against float64
    xs = (torch.randn(32, 1024, dtype=torch.float64, generator=gen) * 4).float()
    t = torch.randint(0, 1024, (32,), generator=gen)

    def grad(fn, v):
        v = v.clone().requires_grad_()
        fn(v).backward()
        return v.grad.double()

    g64 = grad(lambda v: F.cross_entropy(cap * torch.tanh(v / cap), t), xs.double())
    g_torch = grad(lambda v: F.cross_entropy(cap * torch.tanh(v / cap), t), xs)
    ours = grad(lambda v: softmax_gpu.cross_entropy(v, t.to(DEVICE), softcap=cap), xs.to(DEVICE))
    scale = g64.abs().max()
    assert float((ours.cpu() - g64).abs().max() / scale) <= \
        2 * float((g_torch - g64).abs().max() / scale)


def test_row_length_is_checked():
    x = torch.empty(2, 2**31, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        softmax_gpu.cross_entropy(x, torch.empty(2, dtype=torch.long, device="meta"))


def test_resident_rows_of_many_chunks():
    """The resident path with more chunks per row than one step of the
    partials' merge takes (44 > 32): loss, gradient and lse with class
    weights, label smoothing and ignored rows, against float64."""
    C = 1400  # cdiv(1400 + 7, 32) = 44 chunks of 32 bf16 columns
    x = rand(3, C, dtype=torch.bfloat16)
    t = targets(3, C, ignore=(1,))
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
    kw = dict(weight=w, label_smoothing=0.1)
    with heuristics.override(**LONG["resident"]):
        assert CE.cross_entropy_config(3, C, 2, x.device, True).splits == 44
        xs = x.clone().requires_grad_()
        with expect_launches(DEN, "ce_class_resident"):
            loss, lse = softmax_gpu.cross_entropy(xs, t, return_lse=True, **kw)
        (dx,) = torch.autograd.grad(loss, xs)
    x64 = x.double().requires_grad_()
    ref = torch_ref(x64, t, **kw)
    (dx_ref,) = torch.autograd.grad(ref, x64)
    assert_close(loss, ref.detach(), torch.bfloat16)
    assert_close(dx, dx_ref, torch.bfloat16, scale=4.0)
    assert_close(lse, torch.logsumexp(x.double(), 1), torch.float32)


@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1, softcap=5.0)])
def test_resident_chunk_bits_do_not_depend_on_who_wrote_it(kw):
    """A chunk left to its row's last arrival (read again) gets the same
    gradient bits as one written from its program's registers: rows of four
    equal chunks of 32 (the first raised, holding the max and the target);
    in the interpreter chunks 0-2 are left to chunk 3, the last arrival."""
    P = torch.randn(5, 32, device=DEVICE)
    x = torch.cat([P + 3.3, P, P, P], 1)
    t = torch.randint(0, 32, (5,), device=DEVICE)
    with heuristics.override(**LONG["resident"]):
        xs = x.clone().requires_grad_()
        with expect_launches(DEN, "ce_class_resident"):
            loss = softmax_gpu.cross_entropy(xs, t, **kw)
        (g,) = torch.autograd.grad(loss, xs)
    assert torch.equal(g[:, 32:64], g[:, 96:128]) and torch.equal(g[:, 64:96], g[:, 96:128])
    x64 = x.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(torch_ref(x64, t, **kw), x64)
    assert_close(g, g_ref, torch.float32)


def test_resident_plan_falls_back_past_its_chunk_count():
    """A forced resident plan takes at most RESIDENT_MAX_SPLITS chunks per row
    (the meeting word's bits), for class targets only; longer rows, and
    probability targets, take the other long-row plans."""
    from softmax_gpu.kernels.cross_entropy import RESIDENT_MAX_SPLITS

    cpu = torch.device("cpu")
    with heuristics.override(sm_count=2, long_path="resident", resident_chunk=64, max_single=64,
                             tile=16):
        n = 64 * RESIDENT_MAX_SPLITS - 7  # cdiv(n + 7, 64) chunks for 2-byte rows
        fits = CE.cross_entropy_config(4, n, 2, cpu)
        assert fits.path == heuristics.RESIDENT and fits.splits == RESIDENT_MAX_SPLITS
        assert CE.cross_entropy_config(4, n + 1, 2, cpu).path != heuristics.RESIDENT
        assert CE.cross_entropy_config(4, n, 2, cpu, True, coop=False).path != heuristics.RESIDENT
        # the interpreter never waits (its programs run one after the other)
        from softmax_gpu._dispatch import interpreted

        assert fits.spin == (0 if interpreted() else heuristics.Limits().resident_spin)


def test_config_reads_limits_for(monkeypatch):
    """cross_entropy_config plans with heuristics.limits_for("cross_entropy",
    ...) (the tuned table's entry point)."""
    seen = []

    def fake(op, device, elem_bytes, n):
        seen.append((op, elem_bytes, n))
        return dataclasses.replace(heuristics.limits(), ce_max_single_2byte=64, tile=64,
                                   long_path="coop", coop_splits=3, sm_count=2)

    monkeypatch.setattr(heuristics, "limits_for", fake)
    cfg = CE.cross_entropy_config(4096, 1000, 2, torch.device("cpu"))
    assert seen[0] == ("cross_entropy", 2, 1000)
    assert cfg.path == heuristics.COOP and cfg.splits == 3 and cfg.lag >= 2 and cfg.regs
    assert CE.cross_entropy_config(4096, 1000, 2, torch.device("cpu"), coop=False).path == \
        heuristics.LOOPED


def test_raised_on_chip_limit_is_for_rows_without_extras():
    """A tuned ce_max_single_2byte above the defaults' (the tuner's "onchip"
    candidate) puts plain rows on chip up to it, but rows with extras
    (probability targets, weights, smoothing, softcap) stay at the defaults'
    half: 16384-wide probability-target rows on chip spilled at sm_90. A
    lower limit still halves for extras."""
    cpu = torch.device("cpu")
    default = heuristics.Limits().ce_max_single_2byte
    with heuristics.override(ce_max_single_2byte=2 * default, sm_count=132):
        assert CE.cross_entropy_config(16384, 2 * default, 2, cpu).path == heuristics.SINGLE
        for extras, n in ((True, default), (True, default // 2)):
            got = CE.cross_entropy_config(16384, n, 2, cpu, extras)
            assert (got.path == heuristics.SINGLE) == (n <= default // 2), (n, got)
    with heuristics.override(ce_max_single_2byte=default // 4, sm_count=132):
        assert CE.ce_max_single(2, True) == default // 8


def test_causal_lm_loss_states_num_items_as_the_divisor():
    """transformers' loss with num_items_in_batch (a device tensor or an int):
    cross_entropy(reduction="sum", divisor=num_items_in_batch), so the
    gradient is written in the forward with it and the backward is the
    no-op launch; values as float64 torch's sum / num_items."""
    pytest.importorskip("transformers")
    from softmax_gpu.integrations.transformers import causal_lm_loss

    V = 50
    logits = rand(2, 6, V)
    labels = targets(12, V, ignore=(3, 7)).reshape(2, 6)
    for n in (torch.tensor(9, device=DEVICE), 9):
        x = logits.clone().requires_grad_()
        loss = causal_lm_loss(x, labels, V, num_items_in_batch=n)
        with expect_launches(BWD):
            loss.backward()
        x64 = logits.double().requires_grad_()
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
        ref = F.cross_entropy(x64.reshape(-1, V), shifted, reduction="sum") / 9
        ref.backward()
        assert_close(loss, ref.detach(), torch.float32)
        assert_close(x.grad, x64.grad, scale=4.0)


# --- exactness and accuracy at the row maximum, on every path ---------------

EVERY_PATH = {"single": ({}, 37), **{name: (lim, 100) for name, lim in LONG.items()}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("path", list(EVERY_PATH))
def test_row_maximum_is_exact_on_every_path(path, dtype):
    """A row whose only finite logit is the target: loss exactly 0, lse
    exactly that logit, gradient exactly 0; a one-class row likewise; an
    all-equal row: lse = x + log C."""
    lim, C = EVERY_PATH[path]
    M = 9
    x = rand(M, C, dtype=dtype)
    t = targets(M, C)
    x[0] = -math.inf
    x[0, t[0]] = float(torch.randn(()) * 20)
    x[1] = float(torch.randn(()) * 20)
    with heuristics.override(**lim):
        xs = x.clone().requires_grad_()
        loss, lse = softmax_gpu.cross_entropy(xs, t, reduction="none", return_lse=True)
        (g,) = torch.autograd.grad(loss.sum(), xs)
        one = rand(M, 1, dtype=dtype)
        l1, lse1 = softmax_gpu.cross_entropy(one, torch.zeros(M, dtype=torch.long),
                                             reduction="none", return_lse=True)
    assert loss[0].item() == 0.0 and lse[0].item() == float(x[0, t[0]])
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.equal(l1, torch.zeros_like(l1)) and torch.equal(lse1, one[:, 0].float())
    assert_close(lse[1], x[1, 0].double() + math.log(C), torch.float32)
    assert_close(loss, torch_ref(x.double(), t, reduction="none"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", list(EVERY_PATH))
def test_confident_token_loss_is_accurate(path, dtype):
    """The loss of a confident token (target logit 12 among logits of scale
    0.5) is log1p(r), r the small sum of the other terms: accurate to its own
    precision (torch's fp32 loss is off by about 3e-5 here). The logits
    require grad: without a gradient to write, every long-row candidate
    plans the looped kernel (one pass)."""
    lim, C = EVERY_PATH[path]
    M = 9
    x = rand(M, C, scale=0.5, dtype=dtype)
    t = targets(M, C)
    x[torch.arange(M), t] = 12.0
    kernel = "single" if path == "single" else long_kernel(path, dtype)
    with heuristics.override(**lim), expect_launches(f"ce_class_{kernel}"):
        loss = softmax_gpu.cross_entropy(x.clone().requires_grad_(), t, reduction="none")
    # the reference as log1p of the other terms' sum (float64's own lse - z_t
    # loses about 1e-16 * lse / loss, 5e-12 here)
    z = x.double()
    others = torch.exp(z - z[torch.arange(M), t][:, None])
    others[torch.arange(M), t] = 0.0
    expect = torch.log1p(others.sum(1))
    err = ((loss.double() - expect) / expect).abs().max().item()
    assert err < (2e-6 if dtype == torch.float32 else 1e-13), err


@pytest.mark.parametrize("fields", [dict(ce_single_ept=16), dict(ce_single_ept=32),
                                    dict(ce_single_ept=32, target_program_elems=128)])
def test_on_chip_candidates(fields):
    """The on-chip path's tuning candidates (more elements per thread, fewer
    warps; two rows per program), plain and with every extra, fp32 and bf16,
    against float64."""
    C = 64
    for dtype in (torch.float32, torch.bfloat16):
        x = rand(9, C, dtype=dtype)
        t = targets(9, C, ignore=(2,))
        w = (torch.rand(C, dtype=torch.float64) + 0.5).to(DEVICE)
        for kw in ({}, dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
                            reduction="sum")):
            xs = x.clone().requires_grad_()
            with heuristics.override(**fields):
                cfg = CE.cross_entropy_config(9, C, x.element_size(), x.device, bool(kw))
                assert cfg.path == "single"
                with expect_launches(*fwd_launches("single", False, **kw)):
                    loss = softmax_gpu.cross_entropy(xs, t, **kw)
                (dx,) = torch.autograd.grad(loss, xs)
            x64 = x.double().requires_grad_()
            ref = torch_ref(x64, t, **kw)
            (dx_ref,) = torch.autograd.grad(ref, x64)
            assert_close(loss, ref.detach(), dtype)
            assert_close(dx, dx_ref, dtype, scale=4.0)
    with heuristics.override(ce_single_ept=32, target_program_elems=128, sm_count=1):
        assert CE.cross_entropy_config(64, 64, 2, torch.device("cpu")).rows_per_program == 2

# --- fp16 mixed precision: torch.autocast, and loss scales known only at backward --------


def fp16_ulp(ref: torch.Tensor) -> torch.Tensor:
    """One fp16 unit in the last place at each value of the float64 ``ref``
    (subnormals: 2^-24)."""
    e = torch.frexp(ref.abs().clamp_min(2.0 ** -24))[1].double()
    return torch.maximum(2.0 ** (e - 11), torch.full_like(ref, 2.0 ** -24))


def assert_fp16_gradient(g, ref, term=None):
    """``g`` (fp16) within one fp16 ulp of the float64 gradient ``ref``, and
    not one element zero where ``ref`` rounded to fp16 is not (underflow).

    ``term``: the size of the target's part of each element (y_c * grad_output
    / denominator), which sigma_c * sum(y) cancels where the prediction meets
    the (smoothed or soft) target: fp32 arithmetic, torch's included, rounds
    both parts (sigma = exp(z - lse) to about |z - lse| fp32 ulps), so such an
    element is allowed 32 fp32 ulps of that size more (torch's fp32 gradient
    misses the float64 one by 2 fp16 ulps there)."""
    assert g.dtype == torch.float16
    g, ref = g.double().cpu(), ref.double().cpu()
    lost = int(((g == 0) & (ref.half() != 0)).sum())
    assert lost == 0, f"{lost} of {int((ref.half() != 0).sum())} gradient elements lost"
    tol = fp16_ulp(ref)
    if term is not None:
        tol = tol + 32 * 2.0 ** -24 * term.double().cpu().abs()
    err = (g - ref).abs() / tol
    assert float(err.max()) <= 1.0, float(err.max())


def target_term(x, t, go, reduction="mean", weight=None, label_smoothing=0.0, **_):
    """|y_c| * |grad_output| / the denominator per element of (M, C) logits
    ``x``: the part of the gradient that sigma_c * sum(y) cancels (float64)."""
    M, C = x.shape
    eps = label_smoothing
    w = weight.double().cpu() if weight is not None else torch.ones(C, dtype=torch.float64)
    if t.is_floating_point():
        y = ((1 - eps) * t.double().cpu() + eps / C) * w
        den = float(M) if reduction == "mean" else 1.0
    else:
        tc = t.cpu().long()
        kept = tc != -100
        y = (1 - eps) * F.one_hot(tc.clamp_min(0), C).double() * w[tc.clamp_min(0)][:, None] \
            + eps / C * w
        y = y * kept[:, None]
        den = float(w[tc[kept]].sum()) if reduction == "mean" else 1.0
    go = go.double().cpu().reshape(-1, 1) if go.numel() > 1 else go.double().cpu()
    return y * go.abs() / den


FP16_CASES = {
    "class": dict(),
    "extras": dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=20.0),
    "sum-divisor": dict(reduction="sum", divisor=300.0),
    "none": dict(reduction="none"),
    "prob": dict(prob=True),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", list(FP16_CASES))
@pytest.mark.parametrize("path", PATHS)
def test_fp16_loss_scale_known_at_backward_loses_nothing(path, case, inplace):
    """fp16 logits, a mean over 128 rows (32 on the looped path, whose
    interpreted tile loop is slow), and the loss times a GradScaler's
    scale (2^10 and 2^16, and an odd one) applied only at backward: the
    gradient is torch's fp32 gradient rounded to fp16 within one ulp, and no
    element that float64 keeps in fp16 underflows to zero (a gradient stored
    in fp16 at forward time and rescaled loses a third of them). Class
    targets: the backward forms it from the logits (the forward writes no
    gradient); probability targets: kept in fp32 until then. A retained
    graph's second backward gives it again; a gradient handed out is never
    changed."""
    kw = dict(FP16_CASES[case])
    prob = kw.pop("prob", False)
    M, C = (128, 300) if path == "single" else (32, C_FOR[path])
    gen = torch.Generator().manual_seed(7)
    x = rand(M, C, dtype=torch.float16, generator=gen)
    t = torch.softmax(rand(M, C, generator=gen), -1) if prob else \
        targets(M, C, ignore=(1, M - 3), generator=gen)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(C, dtype=torch.float64, generator=gen) + 0.5).to(DEVICE)
    div = kw.pop("divisor", None)
    for scale in (2.0 ** 10, 2.0 ** 16, 3000.0):
        # reduction="none": a mean's 1/M in each row's grad_output, times the scale
        go = torch.full((), scale) if kw.get("reduction") != "none" else \
            rand(M, scale=1.0, generator=gen).abs().cpu() * (scale / M)
        logits = x.clone().requires_grad_()
        h = logits * 1  # non-leaf logits, as a model's
        with forced(path):
            loss = softmax_gpu.cross_entropy(h, t, loss_dtype=torch.float32, divisor=div,
                                             inplace_backward=inplace, **kw)
            assert loss.dtype == torch.float32
            with softmax_gpu.record_launches() as names:
                (g1,) = torch.autograd.grad(loss, h, go.to(DEVICE), retain_graph=True)
            keep = g1.clone()
            (g2,) = torch.autograd.grad(loss, h, go.to(DEVICE))
        if not prob:
            assert any(n.startswith("ce_class_backward") for n in names), names
        x64 = x.double().requires_grad_()
        ref = torch_ref(x64, t, **{k: v for k, v in kw.items()})
        if div is not None:
            ref = ref / div
        (dref,) = torch.autograd.grad(ref, x64, go.double().to(DEVICE))
        term = target_term(x, t, go / (div or 1.0), **kw)
        assert_fp16_gradient(g1, dref, term)
        assert_fp16_gradient(g2, dref, term)
        assert torch.equal(g1, keep)
        assert_close(loss, ref.detach(), torch.float32, scale=4.0)


@pytest.mark.parametrize("case", ["class", "prob", "inplace"])
def test_fp16_loss_scale_under_torch_compile(case):
    """The same under torch.compile(fullgraph=True): the loss times 2^12 at
    backward, every element kept, within one fp16 ulp (probability targets
    keep the gradient in fp32; in place, fp16 takes the backward pass over
    the logits)."""
    torch._dynamo.reset()
    M, C = 128, 300
    x = rand(M, C, dtype=torch.float16)
    t = torch.softmax(rand(M, C), -1) if case == "prob" else targets(M, C, ignore=(3,))

    def step(z, t):
        return softmax_gpu.cross_entropy(z * 1, t, loss_dtype=torch.float32,
                                         inplace_backward=case == "inplace") * 4096.0

    compiled = torch.compile(step, fullgraph=True)
    xs = x.clone().requires_grad_()
    loss = compiled(xs, t)
    loss.backward()
    x64 = x.double().requires_grad_()
    ref = torch_ref(x64, t) * 4096.0
    (dref,) = torch.autograd.grad(ref, x64)
    assert_close(loss, ref.detach(), torch.float32, scale=4096.0)
    assert_fp16_gradient(xs.grad, dref, target_term(x, t, torch.tensor(4096.0)))


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
@torch._dynamo.config.patch(recompile_limit=64)  # one graph per dtype, target and reduction
def test_autocast_gives_torch_loss_dtype(amp):
    """Under torch.autocast on the test device, fp16/bf16 logits give torch's
    fp32 loss (autocast runs cross-entropy in fp32), unrounded: equal to the
    float64 loss of the 16-bit logits at fp32 tolerance; class and
    probability targets, every reduction, the module, return_lse,
    cross_entropy_with_grad, also compiled; the gradient keeps the logits'
    dtype; an explicit loss_dtype is kept; fp32 and fp64 logits are
    unchanged."""
    torch._dynamo.reset()
    C = 40
    t = targets(6, C, ignore=(2,))
    p = torch.softmax(rand(6, C), -1)
    compiled = torch.compile(lambda z, t, r: softmax_gpu.cross_entropy(z, t, reduction=r),
                             fullgraph=True, backend="aot_eager")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = rand(6, C, dtype=dtype)
        for target in (t, p):
            for reduction in ("mean", "none"):
                xs = x.clone().requires_grad_()
                with torch.autocast(DEVICE, dtype=amp):
                    want = F.cross_entropy(xs, target.to(dtype) if target.is_floating_point()
                                           else target, reduction=reduction)
                    got = softmax_gpu.cross_entropy(xs, target, reduction=reduction)
                    got_c = compiled(xs, target, reduction)
                    mod = softmax_gpu.CrossEntropyLoss(reduction=reduction)(xs, target)
                    kept = softmax_gpu.cross_entropy(xs, target, reduction=reduction,
                                                     loss_dtype=dtype)
                for out in (got, got_c, mod):
                    assert out.dtype == want.dtype, (dtype, out.dtype, want.dtype)
                    assert_close(out, torch_ref(x.double(), target, reduction=reduction),
                                 out.dtype, scale=4.0)
                assert kept.dtype == dtype
                (dx,) = torch.autograd.grad(got.sum() + got_c.sum(), xs)
                assert dx.dtype == dtype
        with torch.autocast(DEVICE, dtype=amp):
            loss, lse = softmax_gpu.cross_entropy(x, t, return_lse=True)
            loss2, grad = softmax_gpu.cross_entropy_with_grad(x, t)
        want = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        assert loss.dtype == loss2.dtype == want and lse.dtype == torch.float32
        assert grad.dtype == dtype


def test_grad_scaler_default_scale_trains():
    """The issue's report: fp16 logits under autocast with a GradScaler at its
    default initial scale 2^16. torch's fp32 loss makes the scaled gradient
    finite (an fp16 loss turned 65536 into inf); the step is taken, and the
    unscaled gradient is float64's within fp16 rounding."""
    M, C = 64, 300
    x = rand(M, C, dtype=torch.float16)
    t = targets(M, C, ignore=(5,))
    lin = torch.nn.Linear(C, C, bias=False).to(DEVICE)
    torch.nn.init.eye_(lin.weight)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler(DEVICE)
    assert scaler.get_scale() == 2.0 ** 16
    with torch.autocast(DEVICE, dtype=torch.float16):
        h = lin(x)
        assert h.dtype == torch.float16  # autocast ran the linear in fp16
        loss = softmax_gpu.cross_entropy(h, t)
    assert loss.dtype == torch.float32
    h.retain_grad()
    scaler.scale(loss).backward()
    assert bool(h.grad.isfinite().all())
    x64 = h.detach().double().requires_grad_()
    (dref,) = torch.autograd.grad(torch_ref(x64, t) * 2.0 ** 16, x64)
    assert_fp16_gradient(h.grad, dref, target_term(x, t, torch.tensor(2.0 ** 16)))
    before = lin.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 16  # no inf: the step was taken
    assert not torch.equal(lin.weight.detach(), before)


@pytest.mark.parametrize("case", ["grad", "deferred", "lse"])
def test_no_silent_double_backward(case):
    """The gradient is not differentiable: under create_graph=True it is right
    (first order) and differentiating it raises, even where grad_output is a
    constant (torch's once_differentiable let that through as a constant, and
    a gradient penalty's term was silently dropped), and with respect to the
    logits themselves (autograd.grad, functional.hvp / hessian: before, the
    logits looked unused there, and the Hessian came out as zeros). The
    torch reference (CPU without the interpreter) is a differentiable
    composite instead."""
    dtype = torch.float16 if case == "deferred" else torch.float64
    x = rand(5, 11, dtype=dtype).requires_grad_()
    t = torch.randint(0, 11, (5,), device=DEVICE)
    if case == "lse":
        def f(a):
            return softmax_gpu.cross_entropy(a, t, return_lse=True)[1].sum()
        ref_out = torch.logsumexp(x.double(), 1).sum()
    else:
        def f(a):
            return softmax_gpu.cross_entropy(a, t)
        ref_out = F.cross_entropy(x.double(), t)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (ref,) = torch.autograd.grad(ref_out, x)
    assert_close(g.detach(), ref, dtype)
    if softmax_gpu.backend_for(x) == "torch":
        (g * g).sum().backward()  # torch's double backward
        return
    assert_not_twice_differentiable(f, (x,))


def test_probability_targets_promote_the_loss_dtype():
    """As torch: the loss of bf16 logits with fp32 probabilities is fp32, of fp32
    logits with fp64 probabilities fp64 (the gradient keeps the logits' dtype)."""
    for xd, pd in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                   (torch.float16, torch.bfloat16), (torch.float32, torch.float32)):
        x = rand(4, 9, dtype=xd).requires_grad_()
        p = torch.softmax(rand(4, 9), -1).to(pd)
        for reduction in ("mean", "none"):
            ours = softmax_gpu.cross_entropy(x, p, reduction=reduction)
            ref = F.cross_entropy(x, p, reduction=reduction)
            assert ours.dtype == ref.dtype, (xd, pd, ours.dtype, ref.dtype)
            assert_close(ours.detach(), F.cross_entropy(x.double(), p.double(),
                                                         reduction=reduction), xd)
        ours.sum().backward()
        assert x.grad.dtype == xd


def test_torch_func_transforms():
    """torch.func.grad and vmap of the cross-entropy take its torch reference
    (the same semantics); the linear version, whose chunked passes write
    gradients in place, says it does not run there."""
    x = rand(4, 9, dtype=torch.float64)
    t = torch.randint(0, 9, (4,), device=DEVICE)
    w = torch.rand(9, dtype=torch.float64, device=DEVICE) + 0.5
    for kw in (dict(), dict(weight=w, label_smoothing=0.1)):
        ours = torch.func.grad(lambda a: softmax_gpu.cross_entropy(a, t, **kw))(x)
        assert_close(ours, torch.func.grad(lambda a: F.cross_entropy(a, t, **kw))(x),
                     torch.float64)
    per_row = torch.func.vmap(lambda a, b: softmax_gpu.cross_entropy(a, b))(x, t)
    assert_close(per_row, F.cross_entropy(x, t, reduction="none"), torch.float64)
    # a transform that wraps only the targets, or only the class weights
    ts = torch.randint(0, 9, (3, 4), device=DEVICE)
    assert_close(torch.func.vmap(lambda b: softmax_gpu.cross_entropy(x, b))(ts),
                 torch.func.vmap(lambda b: F.cross_entropy(x, b))(ts), torch.float64)
    ws = torch.rand(2, 9, dtype=torch.float64, device=DEVICE) + 0.5
    assert_close(torch.func.vmap(lambda c: softmax_gpu.cross_entropy(x, t, weight=c))(ws),
                 torch.func.vmap(lambda c: F.cross_entropy(x, t, weight=c))(ws), torch.float64)
    W = rand(9, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="inside a torch.func transform"):
        torch.func.grad(lambda a: softmax_gpu.linear_cross_entropy(a, W, t))(rand(4, 5))


def test_forward_mode_ad():
    """Forward-mode AD (torch.autograd.forward_ad): dual logits or a dual
    probability target take the torch reference, whose loss carries the
    tangent, equal to torch's; the kernels' loss carried none (read as a zero
    tangent). The linear version says it does not run there."""
    import torch.autograd.forward_ad as fwAD
    x, v = rand(5, 9, dtype=torch.float64), rand(5, 9, dtype=torch.float64)
    t = torch.randint(0, 9, (5,), device=DEVICE)
    t[1] = -100
    w = torch.rand(9, dtype=torch.float64, device=DEVICE) + 0.5
    p = torch.softmax(rand(5, 9, dtype=torch.float64), 1)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1), dict(reduction="sum", weight=w),
               dict(reduction="none")):
        def run(f):
            with fwAD.dual_level():
                return fwAD.unpack_dual(f(fwAD.make_dual(x, v), t, **kw))
        got, want = run(softmax_gpu.cross_entropy), run(F.cross_entropy)
        assert got.tangent is not None, kw
        assert_close(got.primal, want.primal, torch.float64)
        assert_close(got.tangent, want.tangent, torch.float64)
    with fwAD.dual_level():  # a dual probability target, plain logits
        got = fwAD.unpack_dual(softmax_gpu.cross_entropy(x, fwAD.make_dual(p, v)))
        want = fwAD.unpack_dual(F.cross_entropy(x, fwAD.make_dual(p, v)))
    assert_close(got.tangent, want.tangent, torch.float64)
    W = rand(9, 5, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="input is inside a torch.func transform .* or carries a forward-mode tangent"):
        softmax_gpu.linear_cross_entropy(fwAD.make_dual(rand(4, 5, dtype=torch.float64),
                                                        rand(4, 5, dtype=torch.float64)), W,
                                         t[:4].clamp_min(0))


def test_batched_grad_outputs_take_torch_ops():
    """autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True)
    hand the backward a batched grad_output, which the kernels cannot read:
    the backwards take torch ops there and match torch (before: 'Cannot
    access storage of BatchedTensorImpl')."""
    x = rand(3, 7, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 6, 2], device=DEVICE)
    for kw in (dict(reduction="none"), dict(), dict(label_smoothing=0.1, reduction="sum")):
        v = rand(4, *(() if kw.get("reduction") != "none" else (3,)), dtype=torch.float64)
        ours = torch.autograd.grad(softmax_gpu.cross_entropy(x, t, **kw), x, v,
                                   is_grads_batched=True)[0]
        ref = torch.autograd.grad(F.cross_entropy(x, t, **kw), x, v, is_grads_batched=True)[0]
        assert_close(ours, ref, torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda a: softmax_gpu.cross_entropy(a, t, reduction="none"), x.detach(), vectorize=True)
    ref = torch.autograd.functional.jacobian(
        lambda a: F.cross_entropy(a, t, reduction="none"), x.detach(), vectorize=True)
    assert_close(jac, ref, torch.float64)
    # the lse's gradient, and fp16 logits (the gradient formed at backward)
    _, lse = softmax_gpu.cross_entropy(x, t, return_lse=True)
    v = rand(2, 3, dtype=torch.float32)
    ours = torch.autograd.grad(lse, x, v, is_grads_batched=True)[0]
    ref = torch.autograd.grad(torch.logsumexp(x, 1).float(), x, v, is_grads_batched=True)[0]
    assert_close(ours, ref, torch.float64)
    for inplace in (False, True):
        h = rand(3, 7, dtype=torch.float16).requires_grad_()
        loss = softmax_gpu.cross_entropy(h * 1, t, inplace_backward=inplace)
        ours = torch.autograd.grad(loss, h, torch.tensor([1.0, 2.0], device=DEVICE,
                                                         dtype=loss.dtype),
                                   is_grads_batched=True)[0]
        ref = F.cross_entropy(h.double(), t)
        ref = torch.autograd.grad(ref, h, torch.tensor([1.0, 2.0], device=DEVICE,
                                                       dtype=torch.float64),
                                  is_grads_batched=True)[0]
        assert_close(ours, ref, torch.float16)


def test_compiled_probability_targets_get_their_gradient():
    """Distillation under torch.compile: probability targets that require grad
    get their gradient, as torch's (before: silently None)."""
    x0, s0 = rand(4, 6), rand(4, 6)

    def run(fn, compiled):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()

        def f(a, b):
            return fn(a, torch.softmax(b, 1))

        f = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
        f(x, s).backward()
        return x.grad, s.grad

    torch._dynamo.reset()
    ours, ref = run(softmax_gpu.cross_entropy, True), run(F.cross_entropy, False)
    assert ours[1] is not None
    assert_close(ours[0], ref[0], torch.float32)
    assert_close(ours[1], ref[1], torch.float32)


def test_one_row_input_shapes_on_every_path():
    """A (C,) input with reduction="none": loss and lse are 0-d, as torch's,
    eagerly, under torch.compile and from cross_entropy_with_grad."""
    x = rand(6)
    for target in (torch.tensor(2, device=DEVICE), torch.softmax(rand(6), 0)):
        want = F.cross_entropy(x, target, reduction="none").shape
        assert want == ()
        eager = softmax_gpu.cross_entropy(x, target, reduction="none", return_lse=True)
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda a, b: softmax_gpu.cross_entropy(a, b, reduction="none", return_lse=True),
            fullgraph=True, backend="aot_eager")(x, target)
        loss, grad, lse = softmax_gpu.cross_entropy_with_grad(x, target, reduction="none",
                                                              return_lse=True)
        for got in (*eager, *compiled, loss, lse):
            assert got.shape == want
        assert grad.shape == x.shape


def test_target_on_another_device_named_after_a_cached_plan():
    """The plan cache keys the target's device: a target on the wrong device
    is a ValueError naming it even after a valid call of the same shapes
    (before: it reached the kernel)."""
    x = rand(4, 9)
    t = torch.randint(0, 9, (4,), device=DEVICE)
    softmax_gpu.cross_entropy(x, t)
    with pytest.raises(ValueError, match="target"):
        softmax_gpu.cross_entropy(x, t.to("meta"))


@pytest.mark.parametrize("case", ["two losses", "logits changed"])
def test_fp16_inplace_backward_refuses_changed_logits(case):
    """fp16 logits with inplace_backward form the gradient from the logits at
    backward time: if they changed since the loss (another in-place loss's
    backward, or the caller), that backward raises, as autograd does for
    bf16 / fp32; before, it formed a wrong gradient silently."""
    x = rand(4, 9, dtype=torch.float16).requires_grad_()
    t = torch.randint(0, 9, (4,), device=DEVICE)
    logits = x * 1
    loss = softmax_gpu.cross_entropy(logits, t, inplace_backward=True)
    if case == "two losses":
        loss = loss + softmax_gpu.cross_entropy(logits, t.flip(0), inplace_backward=True)
    else:
        with torch.no_grad():
            logits.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


def test_subclass_override_and_fx_trace():
    """cross_entropy and CrossEntropyLoss take part in __torch_function__ as
    torch's function does (any of input, target, weight): a Tensor subclass is
    handed the call, and torch.fx.symbolic_trace records it as a node."""
    x, t = rand(4, 9), targets(4, 9, ignore=(1,))
    w = torch.rand(9, device=DEVICE) + 0.5
    want = softmax_gpu.cross_entropy(x, t, w, label_smoothing=0.1)
    for args in ((x.as_subclass(Logged), t, w), (x, t.as_subclass(Logged), w),
                 (x, t, w.as_subclass(Logged))):
        Logged.seen.clear()
        got = softmax_gpu.cross_entropy(*args, label_smoothing=0.1)
        assert Logged.seen[:1] == [softmax_gpu.cross_entropy] and type(got) is Logged
        assert torch.equal(got.as_subclass(torch.Tensor), want)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(9, 9).to(DEVICE)
            self.loss = softmax_gpu.CrossEntropyLoss(reduction="sum")

        def forward(self, x, t):
            h = self.lin(x)
            return softmax_gpu.cross_entropy(h, t) + self.loss(h, t)

    assert fx_functions(Net(), x, t).count(softmax_gpu.cross_entropy) == 2


def test_nested_and_sparse_tensors_are_refused_by_name():
    """A nested input or target is a TypeError naming it (cross_entropy and
    linear_cross_entropy)."""
    nt = torch.nested.nested_tensor([rand(2, 5), rand(3, 5)], layout=torch.jagged)
    tt = torch.nested.nested_tensor([targets(2, 5), targets(3, 5)], layout=torch.jagged)
    with pytest.raises(TypeError, match="input is a nested tensor"):
        softmax_gpu.cross_entropy(nt, targets(5, 5))
    with pytest.raises(TypeError, match="target is a nested tensor"):
        softmax_gpu.cross_entropy(rand(5, 5), tt)
    with pytest.raises(TypeError, match="input is a nested tensor"):
        softmax_gpu.linear_cross_entropy(nt, rand(5, 5), targets(5, 5))
    with pytest.raises(TypeError, match="target has layout torch.sparse_coo"):
        softmax_gpu.cross_entropy(rand(5, 5), torch.softmax(rand(5, 5), 1).to_sparse())
    x, w, t = rand(4, 8), rand(6, 8), targets(4, 6)
    for name, kw in [("linear_weight", dict(linear_weight=w.to_sparse())),
                     ("linear_bias", dict(linear_bias=rand(6).to_sparse())),
                     ("weight", dict(weight=rand(6).abs().to_sparse()))]:
        kw = {"linear_weight": w, **kw}
        with pytest.raises(TypeError, match=f"{name} has layout torch.sparse_coo"):
            softmax_gpu.linear_cross_entropy(x, kw.pop("linear_weight"), t, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_fp64_denominators_outside_fp32_range(path):
    """fp64 logits whose mean denominator (class weights) or divisor lies
    outside fp32's range keep fp64's digits: the kernels' fp64 reciprocal
    went through fp32 (weights of 1e-40 gave a -inf loss) and a number
    divisor travelled as fp32 parts (1e-300 gave NaN)."""
    C = C_FOR[path]
    x = rand(5, C, dtype=torch.float64)
    t = targets(5, C, ignore=(1,))
    cases = [dict(weight=torch.full((C,), 1e-40, dtype=torch.float64, device=DEVICE)),
             dict(reduction="sum", divisor=1e-40), dict(reduction="sum", divisor=1e-300),
             dict(reduction="sum", divisor=3e-39), dict(divisor=1e300),
             dict(reduction="sum", divisor=torch.tensor(1e-300, dtype=torch.float64,
                                                        device=DEVICE))]
    for kw in cases:
        xs = x.clone().requires_grad_()
        r = x.clone().requires_grad_()
        with forced(path):
            loss = softmax_gpu.cross_entropy(xs, t, **kw)
            loss.backward()
        rkw = {k: v for k, v in kw.items() if k != "divisor"}
        ref = F.cross_entropy(r, t, **rkw) / kw.get("divisor", 1.0)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0, msg=str(kw))
        torch.testing.assert_close(xs.grad, r.grad, rtol=1e-12, atol=1e-300, msg=str(kw))
    # logits computed in fp32: such a number divisor is refused by name
    for d in (1e-39, 1e-300, 2.0 ** 127):
        with pytest.raises(ValueError, match="divisor must lie in float32's normal range"):
            softmax_gpu.cross_entropy(x.float(), t, reduction="sum", divisor=d)


def test_legacy_reduction_arguments_compile():
    """The deprecated size_average / reduce under torch.compile(fullgraph=True)
    (torch's helper for them cannot be traced): every combination gives
    torch's reduction."""
    x, t = rand(4, 6), targets(4, 6)
    for size_average in (None, True, False):
        for reduce in (None, True, False):
            if size_average is None and reduce is None:
                continue
            torch._dynamo.reset()
            f = torch.compile(lambda x, t: softmax_gpu.cross_entropy(
                x, t, size_average=size_average, reduce=reduce), fullgraph=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
            assert_close(f(x, t), ref)
