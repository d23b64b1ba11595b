"""softmax_gpu.softmax / log_softmax against float64 torch, on every path;
the torch.library ops, torch.compile, the modules, torch's call binding and
int64 offsets."""

import dataclasses
import inspect
import math
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import softmax_gpu
from softmax_gpu import _layout, heuristics
from softmax_gpu.kernels.softmax import (RESIDENT_MAX_SPLITS, coop_item, lean_forms,
                                         resident_launch_splits, resident_meet)
from helpers import (
    DEVICE,
    Logged,
    fx_functions,
    FLOAT_DTYPES,
    LONG,
    assert_close,
    expect_launches,
    forced,
    long_kernel,
    path_rows,
    rand,
    run_python,
)

SM = sys.modules["softmax_gpu.softmax"]  # the module (its name is shadowed by the function)

FNS = {False: softmax_gpu.softmax, True: softmax_gpu.log_softmax}
REFS = {False: torch.softmax, True: torch.log_softmax}
FWD = {
    "single": ("softmax_fwd_single",),
    "looped": ("softmax_fwd_looped",),
    "split": ("softmax_fwd_split_stats", "softmax_fwd_split_norm"),
}
BWD = {
    "single": ("softmax_bwd_single",),
    "looped": ("softmax_bwd_looped",),
    "split": ("softmax_bwd_split_sum", "softmax_bwd_split_apply"),
}


def ref(x, dim, log):
    return REFS[log](x.double(), dim)


# --- forward ---------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 17, 63, 64, 65, 1023, 1024, 1025])
def test_forward_on_chip(n, dtype, log):
    x = rand(3, n, dtype=dtype)
    with expect_launches(*FWD["single"]):
        y = FNS[log](x, -1)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref(x, -1, log))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["looped", "split"])
@pytest.mark.parametrize("n", [65, 160, 161, 1000])
def test_forward_long_rows(path, n, dtype, log):
    """Rows past the on-chip limit: online (max, sum) tiles, and rows split across programs."""
    x = rand(path_rows(path), n, dtype=dtype)
    with forced(path), expect_launches(*FWD[path]):
        y = FNS[log](x, -1)
    assert_close(y, ref(x, -1, log))


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_split_merges_partials_with_large_offsets(path):
    """Chunks whose maxima differ by far more than exp's range still merge exactly."""
    x = rand(path_rows(path), 300)
    x[:, 250:] += 80.0
    x[0, :40] -= 200.0
    with forced(path):
        assert_close(softmax_gpu.softmax(x, -1), ref(x, -1, False))
        assert_close(softmax_gpu.log_softmax(x, -1), ref(x, -1, True))


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_inf_rows_match_torch(path):
    """Masked lanes load -inf; an all -inf row is NaN, exactly as torch: the
    kernel's own NaN, also under a finite poison (an unwritten row would
    keep it)."""
    x = rand(path_rows(path), 100)
    x[0] = -math.inf
    x[1, ::3] = -math.inf
    x[2, 7] = math.inf
    for poison in (math.nan, -12345.0):
        with forced(path), softmax_gpu.poison_outputs(value=poison):
            for log in (False, True):
                y = FNS[log](x, -1)
                expect = REFS[log](x.double(), -1)
                assert torch.equal(y.isnan(), expect.isnan()), (log, poison)
                assert_close(y, expect)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_every_dim(path, log):
    shape = (3, 70, 2, 5) if path != "single" else (3, 4, 2, 5)
    x = rand(*shape)
    with forced(path):
        for dim in range(-x.dim(), x.dim()):
            assert_close(FNS[log](x, dim), ref(x, dim, log))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.t(), id="transposed"),
        pytest.param(lambda x: x[:, ::2], id="column-step"),
        pytest.param(lambda x: x[::2, :150], id="padded-vocab-slice"),
        pytest.param(lambda x: x.unsqueeze(1).expand(x.shape[0], 3, x.shape[1]), id="expanded"),
    ],
)
@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_non_contiguous(make, path):
    x = make(rand(6, 130) if path == "single" else rand(12, 260))
    with forced(path):
        for dim in range(x.dim()):
            assert_close(softmax_gpu.softmax(x, dim), ref(x, dim, False))
            assert_close(softmax_gpu.log_softmax(x, dim), ref(x, dim, True))


def test_row_strided_layouts_are_read_in_place():
    """A padded-vocabulary slice, a transpose and an inner dim have in-place row views."""
    base = rand(8, 160)
    padded = base[:, :150]
    assert _layout.rows_view(padded, 1) == (8, 150, 1, (160, 1, 0))
    assert _layout.rows_view(base.t(), 0) == (1, 160, 8, (0, 160, 1)) or \
        _layout.rows_view(base.t(), 0) == (1, 160, 8, (0, 1, 160))
    assert _layout.rows_view(rand(2, 3, 4), 1) == (2, 3, 4, (12, 4, 1))
    x, rows = _layout.as_rows(padded, 1)
    assert x is padded and rows.strides == (160, 1, 0)
    # only a layout that cannot collapse is copied
    odd = rand(4, 4, 6)[:, :2, :3]
    assert _layout.rows_view(odd, 2) is None


# --- semantics ----------------------------------------------------------------


def test_zero_dim_and_empty():
    s = torch.tensor(2.5, device=DEVICE)
    for log in (False, True):
        for dim in (0, -1):
            out = FNS[log](s, dim)
            assert out.shape == () and torch.equal(out.cpu(), REFS[log](s.cpu(), dim))
    for shape, dim in [((0, 5), 1), ((4, 0), 1), ((0, 5), 0), ((2, 0, 3), 2)]:
        x = torch.empty(shape, device=DEVICE)
        assert FNS[False](x, dim).shape == shape
        assert FNS[True](x, dim).shape == shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_casts_before_the_op(dtype):
    xi = torch.randint(-5, 5, (3, 9), device=DEVICE)
    y = softmax_gpu.softmax(xi, dim=1, dtype=dtype)
    assert y.dtype == dtype
    assert_close(y, torch.softmax(xi.double(), 1), dtype=dtype)
    x16 = rand(3, 9, dtype=torch.float16)
    y = softmax_gpu.log_softmax(x16, dim=0, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, torch.log_softmax(x16.double(), 0), dtype=torch.float32)
    # a dtype that is not floating is refused by its own name (not "pass dtype=")
    with pytest.raises(TypeError, match="^dtype must be a floating dtype"):
        softmax_gpu.softmax(xi, dim=1, dtype=torch.long)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 300),
    shift=st.floats(-1e3, 1e3),
    path=st.sampled_from(["single", "looped", "split"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_rows_sum_to_one_and_shift_invariance(m, n, shift, path, seed):
    if path != "single":
        n += 64  # past PATHS' max_single: the long path runs
    g = torch.Generator().manual_seed(seed)
    x = rand(m, n, generator=g)
    with forced(path):
        y = softmax_gpu.softmax(x, -1)
        torch.testing.assert_close(
            y.sum(-1).double().cpu(), torch.ones(m, dtype=torch.float64), atol=1e-5, rtol=0
        )
        # a per-row shift leaves the softmax unchanged
        row_shift = torch.linspace(-1, 1, m, device=DEVICE)[:, None] * shift
        xs = (x.double() + row_shift.double()).float()
        ys = softmax_gpu.softmax(xs, -1)
        torch.testing.assert_close(ys, torch.softmax(xs.double(), -1).float(), atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(ys, y, atol=1e-4 * max(1.0, abs(shift)) * 1e-2 + 2e-6, rtol=1e-3)


# --- backward -------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_backward_matches_reference(path, dtype, log):
    n = 37 if path == "single" else 200
    x = rand(path_rows(path), n, dtype=dtype).requires_grad_()
    dy = rand(path_rows(path), n, dtype=dtype, scale=1.0)
    with forced(path):
        y = FNS[log](x, -1)
        with expect_launches(*BWD[path]):
            (dx,) = torch.autograd.grad(y, x, dy)
    # float64 backward at the forward's stored output y: the kernel's inputs
    # (in 16-bit dtypes y's rounding alone moves exp(y) * sum(dy) by more
    # than the output tolerance, so the exact gradient at x is no fair bar)
    dx_ref = SM.reference_backward(y.detach().double(), dy.double(), 1, log)
    assert dx.dtype == dtype
    assert_close(dx, dx_ref, scale=float(dy.abs().max()) * 4)
    if dtype in (torch.float32, torch.float64):
        x64 = x.detach().double().requires_grad_()
        (exact,) = torch.autograd.grad(REFS[log](x64, -1), x64, dy.double())
        assert_close(dx, exact, scale=float(dy.abs().max()) * 4)


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_backward_with_strided_grad_and_inner_dim(path):
    """Gradients arriving expanded (stride 0) or transposed, and a non-last dim."""
    n = 9 if path == "single" else 100
    x = rand(4, n, 3).requires_grad_()
    with forced(path):
        y = softmax_gpu.log_softmax(x, dim=1)
        (dx,) = torch.autograd.grad(y.sum(), x)  # expanded ones
        g = rand(3, n, 4).permute(2, 1, 0)
        (dx2,) = torch.autograd.grad(softmax_gpu.softmax(x, 1), x, g)
    x64 = x.detach().double().requires_grad_()
    (r,) = torch.autograd.grad(torch.log_softmax(x64, 1).sum(), x64)
    (r2,) = torch.autograd.grad(torch.softmax(x64, 1), x64, g.double())
    assert_close(dx, r, scale=4)
    assert_close(dx2, r2, scale=20)


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_gradcheck_float64(path):
    # fast_mode checks random projections of the Jacobian: O(1) launches instead of O(numel)
    n = 7 if path == "single" else 70
    x = rand(path_rows(path), n, dtype=torch.float64, scale=1.0).requires_grad_()
    with forced(path):
        assert torch.autograd.gradcheck(lambda t: softmax_gpu.softmax(t, -1), (x,), fast_mode=True)
        assert torch.autograd.gradcheck(lambda t: softmax_gpu.log_softmax(t, -1), (x,), fast_mode=True)
    xs = rand(2, 5, 3, dtype=torch.float64, scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: softmax_gpu.log_softmax(t, 1), (xs,))


@pytest.mark.parametrize("path", ["single", "looped"])
def test_double_backward(path):
    """create_graph=True gives a differentiable gradient (gradient penalties,
    Hessian-vector products): gradgradcheck in fp64, eager and through the
    torch.library op, and a penalty's gradient equal to torch's. Before, the
    gradient came back without a graph and the penalty's term was silently
    dropped."""
    n = 7 if path == "single" else 70
    x = rand(3, n, dtype=torch.float64, scale=1.0).requires_grad_()
    xs = rand(2, 5, 3, dtype=torch.float64, scale=1.0).requires_grad_()
    with forced(path):
        for f in (softmax_gpu.softmax, softmax_gpu.log_softmax):
            assert torch.autograd.gradgradcheck(lambda t: f(t, -1), (x,), fast_mode=True)
            assert torch.autograd.gradgradcheck(lambda t: f(t, 1), (xs,), fast_mode=True)
            op = (lambda t: SM.softmax_forward(t, 1, f is softmax_gpu.log_softmax))
            assert torch.autograd.gradgradcheck(op, (x,), fast_mode=True)
            v = rand(3, n, dtype=torch.float64)
            grads = []
            for fn in (f, getattr(torch, f.__name__)):
                xx = x.detach().clone().requires_grad_()
                y = fn(xx, 1)
                (g,) = torch.autograd.grad(y, xx, v, create_graph=True)
                ((y * v).sum() + (g * g).sum()).backward()
                grads.append(xx.grad)
            assert_close(grads[0], grads[1], torch.float64)


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_jacobian_is_diag_sigma_minus_outer(path):
    """The seed: d sigma_j / d z_k = sigma_j (delta_jk - sigma_k), j != k included."""
    n = 6 if path == "single" else 66
    z = rand(n, dtype=torch.float64, scale=1.0)
    with forced(path):
        if path == "split":  # one row of a batch of path_rows rows
            J = torch.autograd.functional.jacobian(
                lambda t: softmax_gpu.softmax(t.expand(3, n), -1)[1], z
            )
        else:
            J = torch.autograd.functional.jacobian(lambda t: softmax_gpu.softmax(t, -1), z)
        s = softmax_gpu.softmax(z, -1)
    expected = torch.diag(s) - torch.outer(s, s)
    torch.testing.assert_close(J.cpu(), expected.cpu(), atol=1e-12, rtol=1e-10)
    off = ~torch.eye(n, dtype=torch.bool)
    assert (J.cpu()[off] < 0).all()  # the j != k terms are -sigma_j sigma_k


# --- errors -----------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(TypeError, match="input must be a floating tensor.*torch.int64"):
        softmax_gpu.softmax(torch.arange(4, device=DEVICE), 0)
    with pytest.raises(TypeError, match="input must be a floating tensor.*torch.bool"):
        softmax_gpu.log_softmax(torch.ones(4, dtype=torch.bool, device=DEVICE), 0)
    with pytest.raises(TypeError, match="input must be a floating tensor.*complex"):
        softmax_gpu.softmax(torch.ones(4, dtype=torch.complex64, device=DEVICE), 0)
    with pytest.raises(IndexError, match="dim out of range: got 2"):
        softmax_gpu.softmax(rand(3, 4), dim=2)
    with pytest.raises(IndexError, match="dim out of range: got -3"):
        softmax_gpu.log_softmax(rand(3, 4), dim=-3)
    with pytest.raises(TypeError, match="dim must be an int"):
        softmax_gpu.softmax(rand(3, 4), dim=1.0)
    np = pytest.importorskip("numpy")  # an integral scalar, as torch takes it
    x = rand(3, 4)
    torch_fn = {softmax_gpu.softmax: torch.softmax, softmax_gpu.log_softmax: torch.log_softmax}
    for fn in (softmax_gpu.softmax, softmax_gpu.log_softmax):
        assert torch.equal(fn(x, dim=np.int64(-1)), fn(x, dim=-1))
        # a 0-d integer tensor, as torch takes it
        assert torch.equal(fn(x, dim=torch.tensor(0)), fn(x, dim=0))
        torch.testing.assert_close(fn(x, dim=torch.tensor(0)), torch_fn[fn](x, dim=torch.tensor(0)))
    with pytest.raises(TypeError, match="dim must be an int"):
        softmax_gpu.softmax(x, dim=np.float32(1.0))
    for bad in (torch.tensor(1.0), torch.tensor([0, 1]), torch.tensor([1]), torch.tensor(True),
                np.array(1), True):
        with pytest.raises(TypeError, match="dim must be an int"):
            softmax_gpu.softmax(x, dim=bad)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        softmax_gpu.softmax([1.0, 2.0], 0)


def test_unsupported_device_is_refused(monkeypatch):
    from softmax_gpu import _dispatch

    monkeypatch.setattr(_dispatch, "_SUPPORTED_DEVICES", ("cuda", "cpu"))
    with pytest.raises(ValueError, match="input is on unsupported device meta"):
        softmax_gpu.softmax(torch.empty(3, 4, device="meta"), -1)


def test_meta_tensors_give_shapes():
    y = softmax_gpu.softmax(torch.empty(3, 4, device="meta", dtype=torch.bfloat16), -1)
    assert y.device.type == "meta" and y.shape == (3, 4) and y.dtype == torch.bfloat16


def test_backend_for():
    assert softmax_gpu.backend_for(torch.empty(1, device=DEVICE)) == "triton"
    with pytest.raises(TypeError):
        softmax_gpu.backend_for("cpu")


def test_interpreter_problem_named(monkeypatch):
    """Triton < 3.7's interpreter under numpy >= 2.4 cannot run a loop whose
    bound is a kernel argument: a clear error at the first launch, not the
    interpreter's TypeError from inside a kernel."""
    from softmax_gpu import _dispatch

    problem = _dispatch.interpreter_problem
    assert problem("3.6.0", "2.4.6") and "numpy<2.4" in problem("3.6.0", "2.4.6")
    assert problem("3.6.0", "2.3.5") is None
    assert problem("3.7.0", "2.4.0") is None and problem("3.9.0", "2.5.5") is None
    assert problem("3.6.0+git1a2b", "2.4.0rc1") is not None
    monkeypatch.setattr(_dispatch, "_INTERPRETER_PROBLEM", problem("3.6.0", "2.4.6"))
    # the path is still the kernels' (a static compile needs no interpreter)...
    assert softmax_gpu.backend_for(torch.empty(1, device=DEVICE)) == "triton"

    def interpreter_fails(*tensors):  # what the old interpreter raises from a kernel
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    # ...and the interpreter's error at a launch says why and what mends it
    with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter.*numpy<2.4"):
        _dispatch.launch_on(None, interpreter_fails)
    with pytest.raises(ValueError, match="other"):  # any other error passes through
        _dispatch.launch_on(None, lambda: (_ for _ in ()).throw(ValueError("other")))


# --- torch.library ops, compile, modules ---------------------------------------


@pytest.mark.parametrize("path", ["single", "split"])
def test_opcheck_forward_and_backward(path):
    n = 13 if path == "single" else 100
    with forced(path):
        for log in (False, True):
            x = rand(path_rows(path), n, dtype=torch.float64).requires_grad_()
            torch.library.opcheck(SM.softmax_forward, (x, 1, log))
            y = SM.softmax_forward(x.detach(), 1, log)
            torch.library.opcheck(SM.softmax_backward, (y, rand(*y.shape, dtype=torch.float64), 1, log))


def test_compile_fullgraph_training_step():
    """A small step compiled with fullgraph=True: no graph breaks, same values and grads."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 24).to(DEVICE)
    x = rand(6, 16)

    def step(inp):
        h = softmax_gpu.log_softmax(lin(inp), dim=-1)
        p = softmax_gpu.softmax(h * 0.5, dim=0)
        return (h * p).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    loss_e = step(x)
    loss_e.backward()
    assert_close(loss_c.detach(), loss_e.detach().double())
    for gc, p in zip(grads_c, lin.parameters()):
        assert_close(gc, p.grad.double(), scale=4)


def test_compile_fullgraph_dynamic_shapes():
    """torch.compile(fullgraph=True, dynamic=True) (a trainer whose batch or
    sequence length changes), two row counts through one graph: the values
    and gradients of eager torch in float64."""
    torch._dynamo.reset()

    def step(inp):
        h = softmax_gpu.log_softmax(inp, dim=-1)
        return (h * softmax_gpu.softmax(inp.transpose(0, 1), dim=0).transpose(0, 1)).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 9):
        x = rand(n, 12).requires_grad_()
        loss = compiled(x)
        loss.backward()
        xr = x.detach().double().requires_grad_()
        ref = (torch.log_softmax(xr, -1) * torch.softmax(xr, -1)).sum()
        ref.backward()
        assert_close(loss.detach(), ref.detach())
        assert_close(x.grad, xr.grad, scale=4)


def test_module_forward_and_repr():
    m, lm = softmax_gpu.Softmax(dim=0), softmax_gpu.LogSoftmax(dim=-1)
    x = rand(5, 7)
    assert_close(m(x), torch.softmax(x.double(), 0))
    assert_close(lm(x), torch.log_softmax(x.double(), -1))
    assert repr(m) == "Softmax(dim=0)" and repr(lm) == "LogSoftmax(dim=-1)"
    # subclasses of torch's modules: code that checks isinstance treats them as torch's
    assert isinstance(m, torch.nn.Softmax) and isinstance(lm, torch.nn.LogSoftmax)
    # torch's default dim=None: the legacy implicit dim, with torch's warning
    for ours, theirs in ((softmax_gpu.Softmax(), torch.nn.Softmax()),
                         (softmax_gpu.LogSoftmax(), torch.nn.LogSoftmax())):
        assert repr(ours) == repr(theirs)
        for shape in ((5,), (5, 7), (2, 5, 7), (2, 3, 5, 7)):
            x = rand(*shape)
            with pytest.warns(UserWarning, match="Implicit dimension choice"):
                y = ours(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert_close(y, theirs(x.double()))


def test_public_api_names():
    for name in ("softmax", "log_softmax", "Softmax", "LogSoftmax", "backend_for"):
        assert name in softmax_gpu.__all__ and hasattr(softmax_gpu, name)
    assert softmax_gpu.kernels.softmax.__name__ == "softmax_gpu.kernels.softmax"


# --- torch's call binding -------------------------------------------------------


def test_binding_matches_torch():
    """Every valid way of calling torch.softmax / torch.log_softmax /
    F.softmax / F.log_softmax binds the same way here: positional dtype
    (torch's), positional _stacklevel then dtype (functional's), keywords,
    and dim=None (the legacy implicit dim, with its warning)."""
    import torch.nn.functional as F

    for ours, torch_fn, f_fn in ((softmax_gpu.softmax, torch.softmax, F.softmax),
                                 (softmax_gpu.log_softmax, torch.log_softmax, F.log_softmax)):
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(f_fn).parameters)
        x = rand(3, 4, 5)
        calls = [
            ((x, 1), {}),
            ((x,), dict(dim=-1)),
            ((x, 0, torch.float64), {}),  # torch.softmax(input, dim, dtype)
            ((x, 2, 3, torch.float64), {}),  # F.softmax(input, dim, _stacklevel, dtype)
            ((x, 1), dict(dtype=torch.float64)),
            ((x,), dict(dim=2, _stacklevel=5, dtype=torch.float64)),
            ((x, 1, float), {}),  # Python's float names float64, as torch takes it
            ((x, 1), dict(dtype=float)),
        ]
        for args, kw in calls:
            ref_fn = torch_fn if len(args) < 4 and "_stacklevel" not in kw else f_fn
            y = ours(*args, **kw)
            r = ref_fn(*[a.double() if isinstance(a, torch.Tensor) else a for a in args], **kw)
            assert y.dtype == ref_fn(*args, **kw).dtype, (args, kw)
            assert_close(y, r, y.dtype)
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            y = ours(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_close(y, f_fn(x.double()))
        with pytest.raises(TypeError, match="multiple values for argument 'dtype'"):
            ours(x, 1, torch.float64, torch.float32)


# --- int64 offsets ----------------------------------------------------------------

CODE = r"""
import os, torch, softmax_gpu
from softmax_gpu import heuristics
from helpers import DEVICE

N = 200
ROW_STRIDE = 2**30 + 64          # fits in int32, so Triton passes it as i32
M = 4                            # rows 2 and 3 start past element 2**31: row * stride overflows int32
base = torch.empty(ROW_STRIDE * (M - 1) + N, dtype=torch.bfloat16, device=DEVICE)
x = base.as_strided((M, N), (ROW_STRIDE, 1))
x.copy_(torch.randn(M, N) * 3)
g = torch.empty_like(base).as_strided((M, N), (ROW_STRIDE, 1))
g.copy_(torch.randn(M, N))
ref_x, ref_g = x.double().cpu(), g.double().cpu()
ok = []
LONG_ROWS = dict(max_single=64, tile=32, sm_count=2, programs_per_sm=1)
for path, lim in [("single", {}), ("looped", dict(max_single=64, tile=32, split_programs_per_sm=0)),
                  ("split", dict(max_single=64, tile=32, sm_count=8)),
                  ("persistent", dict(LONG_ROWS, long_path="persistent", split_programs_per_sm=0)),
                  ("coop", dict(LONG_ROWS, long_path="coop", coop_splits=3, split_programs_per_sm=0)),
                  ("resident", dict(LONG_ROWS, long_path="resident", resident_chunk=64))]:
    with heuristics.override(**lim), softmax_gpu.record_launches() as names:
        for log in (False, True):
            xr = x.detach().requires_grad_()
            y = (softmax_gpu.log_softmax if log else softmax_gpu.softmax)(xr, -1)
            (dx,) = torch.autograd.grad(y, xr, g)
            r = ref_x.clone().requires_grad_()
            yr = (torch.log_softmax if log else torch.softmax)(r, -1)
            (dr,) = torch.autograd.grad(yr, r, ref_g)
            # bf16: one ulp (2^-7) relative, as helpers.TOL
            assert ((y.double().cpu() - yr).abs() / (yr.abs() + 1)).max() < 2e-2, (path, log)
            assert ((dx.double().cpu() - dr).abs() / (dr.abs().max() + 1e-3)).max() < 2e-2, (path, log)
    family = "looped" if path == "persistent" else path
    assert any(f"_{family}" in n for n in names), (path, names)
    ok.append(path)
print("OK", ok)
"""


def test_rows_beyond_2_pow_31_every_path():
    out = run_python(CODE)
    assert "OK ['single', 'looped', 'split', 'persistent', 'coop', 'resident']" in out


# --- long rows: persistent, cooperative, unaligned rows -------------------------------

# LONG, long_kernel: the forced long-row candidates (helpers).


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [100, 203])
@pytest.mark.parametrize("candidate", list(LONG))
def test_long_row_candidates_forward_and_backward(candidate, n, dtype):
    """Every long-row path a tuner can force, forward and backward of softmax
    and log-softmax, against float64; rows of 100 and 203 columns are not a
    multiple of 16 bytes, so the head / aligned body / tail walk runs (VEC >
    1) on most rows, and a persistent grid of 2 programs walks 9 rows."""
    kern = long_kernel(candidate, dtype)
    for log in (False, True):
        x = rand(9, n, dtype=dtype).requires_grad_()
        dy = rand(9, n, dtype=dtype)
        with heuristics.override(**LONG[candidate]):
            with expect_launches(f"softmax_fwd_{kern}"):
                y = FNS[log](x, -1)
            with expect_launches(f"softmax_bwd_{kern}"):
                (dx,) = torch.autograd.grad(y, x, dy)
        assert_close(y, ref(x.detach().double(), -1, log))
        # the backward against float64 at the stored y (its inputs), as above
        dx_ref = SM.reference_backward(y.detach().double(), dy.double(), 1, log)
        assert_close(dx, dx_ref, scale=4 * max(1.0, float(dx_ref.abs().max())))


@pytest.mark.parametrize("candidate", ["persistent", "coop", "resident"])
def test_long_rows_at_every_alignment(candidate):
    """Rows read from slices starting at every element offset modulo 16 bytes
    (x[:, k:], x's rows and y's rows not congruent: the walk falls back to
    masked tiles), strided rows (transposed: VEC = 1) and an inner-dim
    reduction: all against float64."""
    base = rand(9, 140)
    with heuristics.override(**LONG[candidate]):
        for k in range(9):
            x = base[:, k:k + 101]
            assert_close(softmax_gpu.softmax(x, -1), ref(x, -1, False))
        xt = rand(120, 9).t()
        assert_close(softmax_gpu.log_softmax(xt, -1), ref(xt, -1, True))
        x3 = rand(3, 110, 3)
        assert_close(softmax_gpu.softmax(x3, 1), ref(x3, 1, False))


@triton.jit
def _decode_tickets(OUT_SECOND, OUT_ITEM, n, LAG, BLOCK: tl.constexpr):
    """(second pass?, item) of tickets 0 .. 2n-1 (``coop_item``)."""
    t = tl.arange(0, BLOCK)
    second, item = coop_item(t, n, LAG)
    tl.store(OUT_SECOND + t, second.to(tl.int32), mask=t < 2 * n)
    tl.store(OUT_ITEM + t, item, mask=t < 2 * n)


def test_coop_ticket_order_never_waits_on_a_later_ticket():
    """The cooperative path's ticket order (``coop_item``), run as a kernel
    over every ticket: each chunk item gets exactly one first and one second
    pass, and every first pass of a row has a smaller ticket than any second
    pass of that row whenever LAG >= SPLITS - 1, the condition of the
    deadlock-freedom argument (a waiting second pass waits only on earlier
    tickets, held by running programs that never wait)."""
    for rows, splits in ((5, 1), (4, 3), (7, 4), (2, 8)):
        n = rows * splits
        for lag in sorted({splits - 1, splits, n // 2, n, n + 5}):
            sec = torch.full((2 * n,), -1, dtype=torch.int32, device=DEVICE)
            item = torch.full((2 * n,), -1, dtype=torch.int32, device=DEVICE)
            _decode_tickets[(1,)](sec, item, n, lag, BLOCK=triton.next_power_of_2(2 * n))
            sec, item = sec.cpu().tolist(), item.cpu().tolist()
            firsts = {i: k for k, (s, i) in enumerate(zip(sec, item)) if s == 0}
            seconds = {i: k for k, (s, i) in enumerate(zip(sec, item)) if s == 1}
            assert sorted(firsts) == sorted(seconds) == list(range(n)), (rows, splits, lag)
            for i, k in seconds.items():
                row = i // splits
                assert all(firsts[j] < k for j in range(row * splits, (row + 1) * splits)), \
                    (rows, splits, lag, i)


@triton.jit
def _meet_in_order(SYNC, KS, OUT, SPLITS, spin, STEPS: tl.constexpr):
    """Arrivals of chunks KS[0], KS[1], ... of row 0, one after the other (as
    Triton's interpreter runs a launch's programs): OUT[i] = (own, last, left)."""
    for i in range(STEPS):
        own, last, left = resident_meet(SYNC, 0, tl.load(KS + i), SPLITS, spin)
        tl.store(OUT + 3 * i, own.to(tl.int64))
        tl.store(OUT + 3 * i + 1, last.to(tl.int64))
        tl.store(OUT + 3 * i + 2, left)


def test_resident_meet_hands_every_chunk_to_exactly_one_writer():
    """The resident path's meeting word (``resident_meet``): chunks arriving
    one after the other, none able to wait for a later one, give up; the
    last arrival then holds exactly their bits, and writes them and its own.
    A word whose other chunks have all arrived makes the arrival the last.
    Each chunk has exactly one writer: itself (own) or the last arrival."""
    for order in ([2, 0, 1], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], list(range(RESIDENT_MAX_SPLITS))):
        splits = len(order)
        sync = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        out = torch.full((3 * splits,), -1, dtype=torch.int64, device=DEVICE)
        ks = torch.tensor(order, dtype=torch.int32, device=DEVICE)
        _meet_in_order[(1,)](sync, ks, out, splits, 0, STEPS=splits)
        own, last, left = out.view(-1, 3).cpu().t().tolist()
        assert last == [0] * (splits - 1) + [1] and own == last, order
        assert left[-1] == sum(1 << k for k in order[:-1]), order
        writers = {k: "self" for k, o in zip(order, own) if o}
        writers.update({k: "last" for k in range(splits) if (left[-1] >> k) & 1})
        assert sorted(writers) == list(range(splits)), order
        assert sync.item() == splits | (left[-1] << 16)
    # the others arrived (two of them gave up): this arrival is the last, and owns
    sync = torch.tensor([3 | (0b101 << 16)], dtype=torch.int64, device=DEVICE)
    out = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    _meet_in_order[(1,)](sync, torch.tensor([1], dtype=torch.int32, device=DEVICE), out, 4, 8,
                         STEPS=1)
    assert out.cpu().tolist() == [1, 1, 0b101]


def _resident_against_float64(x, dy):
    """Softmax and log-softmax of x (requires grad), forward and backward
    with dy, on the resident path, against float64."""
    for log in (False, True):
        with heuristics.override(**LONG["resident"]):
            with expect_launches("softmax_fwd_resident"):
                y = FNS[log](x, -1)
            with expect_launches("softmax_bwd_resident"):
                (dx,) = torch.autograd.grad(y, x, dy)
        assert_close(y, ref(x.detach().double(), -1, log))
        dx_ref = SM.reference_backward(y.detach().double(), dy.double(), 1, log)
        assert_close(dx, dx_ref, scale=4 * max(1.0, float(dx_ref.abs().max())))


def test_resident_rows_of_many_chunks():
    """The resident path with more chunks per row than one step of the
    partials' merge takes (44 > 32), forward and backward, against float64."""
    _resident_against_float64(rand(3, 1400, dtype=torch.bfloat16).requires_grad_(),
                              rand(3, 1400, dtype=torch.bfloat16))


def test_resident_rows_on_16_byte_boundaries_take_no_empty_chunk():
    """Rows that all start on a 16-byte boundary (no head) are cut into
    cdiv(N, chunk) chunks, not the cdiv(N + VEC - 1, chunk) that rows with a
    head need (a power-of-two row had an empty last chunk, a program that
    only met its row); forward and backward against float64 at both."""
    assert resident_launch_splits(128, 32, 8, (128, 1, 0)) == 4
    assert resident_launch_splits(128, 32, 8, (128, 1, 0), (256, 1, 0)) == 4
    assert resident_launch_splits(128, 32, 8, (132, 1, 0)) == 5  # heads of 4: cdiv(135, 32)
    assert resident_launch_splits(128, 32, 8, (128, 1, 0), (132, 1, 0)) == 5
    assert resident_launch_splits(129, 32, 8, (136, 1, 0)) == 5
    assert resident_launch_splits(128, 32, 1, (384, 3, 1)) == 4
    # no heads (4 chunks); rows of 126 with heads of 0-6 (cdiv(133, 32) = 5
    # chunks: 4 leave the tail of a row with a head unwritten); x and y not
    # congruent (VEC 1: no heads)
    for n, pad in ((128, 128), (126, 126), (128, 132)):
        x = rand(6, pad, dtype=torch.bfloat16)[:, :n].requires_grad_()
        _resident_against_float64(x, rand(6, n, dtype=torch.bfloat16))


def test_resident_chunk_bits_do_not_depend_on_who_wrote_it():
    """A chunk left to its row's last arrival (read again) gets the same bits
    as one written from its program's registers: rows of four equal chunks
    of 32 (the first raised, holding the max); in the interpreter chunks 0-2
    are left to chunk 3, the last arrival."""
    P = torch.randn(16, 32, device=DEVICE)
    x = torch.cat([P + 3.3, P, P, P], 1)
    for log in (False, True):
        with heuristics.override(**LONG["resident"]):
            with expect_launches("softmax_fwd_resident"):
                y = FNS[log](x, -1)
        assert torch.equal(y[:, 32:64], y[:, 96:128]) and torch.equal(y[:, 64:96], y[:, 96:128])
        assert_close(y, ref(x, -1, log))


def test_resident_plans_fall_back_past_their_chunk_count():
    """A forced resident plan takes at most RESIDENT_MAX_SPLITS chunks per row
    (the meeting word's bits); longer rows take the other long-row plans."""
    cpu = torch.device("cpu")
    with heuristics.override(sm_count=2, long_path="resident", resident_chunk=64, max_single=64,
                             tile=16):
        n = 64 * RESIDENT_MAX_SPLITS - 7  # cdiv(n + 7, 64) chunks for 2-byte rows
        fits = SM.softmax_config(4, n, 2, cpu, coop=True)
        assert fits.path == heuristics.RESIDENT and fits.splits == RESIDENT_MAX_SPLITS
        assert SM.softmax_config(4, n + 1, 2, cpu, coop=True).path != heuristics.RESIDENT
        # the vocab-parallel shard kernels (coop=False) have no resident kernel
        assert SM.softmax_config(4, n, 2, cpu).path != heuristics.RESIDENT


def test_int32_bounds_rows_and_cooperative_counts():
    """Column indices and loop counters are int32: a row longer than
    2^31 - 2^16 elements (a loop's last tile step would wrap) is refused by
    name (checked on the meta device, where the plan is made without storage);
    the cooperative path's int32 ticket counts bound its item count, so a
    forced cooperative plan with too many chunk items walks the rows on the
    persistent grid instead."""
    big = torch.empty(1, 2**31, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"input's dim 1 has 2147483648 elements"):
        SM._plan_forward(big, 1, False)
    with pytest.raises(ValueError, match=r"has 2147418113 elements.*2\^31 - 2\^16"):
        SM._plan_forward(torch.empty(2, 2**31 - 2**16 + 1, device="meta"), 1, False)
    SM._plan_forward(torch.empty(2, 2**31 - 2**16, device="meta", dtype=torch.bfloat16), 1, False)
    cpu = torch.device("cpu")
    with heuristics.override(sm_count=132, long_path="coop", tile=16, max_single=16):
        assert SM.softmax_config(1 << 20, 4096, 2, cpu, coop=True).path == heuristics.COOP
        wide = SM.softmax_config(1 << 29, 4096, 2, cpu, coop=True)
        assert wide.path == heuristics.LOOPED and wide.programs > 0


@pytest.mark.parametrize("kind", ["log_fwd", "bwd"])
def test_two_row_kinds_are_on_chip_at_the_forwards_limit(kind):
    """The log-softmax forward (x and e^(x - m)) and both backwards (y and
    dy) hold two rows' values where the softmax forward holds one: they keep
    rows up to the forward's on-chip limit by spreading them over 32 warps
    (bf16 32768: the log-softmax forward 63 registers, the backward 60 with y
    read twice; the sm_90 static check compiles every plan), never fp64;
    ``wide_single=False`` halves their limit again. Below that, their
    longest 16-warp rows of 2-byte elements budget 64 registers (two
    programs per SM), and ``lean_single=False`` gives them 128 again; both
    budgets of 64 take the kernels' lean forms."""
    cpu = torch.device("cpu")
    with heuristics.override(sm_count=132):
        for elem, n in ((2, 32768), (4, 16384)):
            two = SM.call_config(kind, 16384, n, elem, cpu)
            fwd = SM.call_config("fwd", 16384, n, elem, cpu)
            assert (two.path, two.block_n) == (fwd.path, fwd.block_n) == (heuristics.SINGLE, n)
            assert (two.num_warps, two.regs) == (2 * fwd.num_warps, 64) == (32, 64)
            # shorter rows: 16 warps at most; two programs per SM at 16 with
            # 2-byte elements (fp32's plain kernels fit two already)
            half = SM.call_config(kind, 16384, n // 2, elem, cpu)
            lean = 64 if elem == 2 else 128
            assert (half.path, half.num_warps, half.regs) == (heuristics.SINGLE, 16, lean)
            assert lean_forms(two.regs) and lean_forms(half.regs) == (elem == 2)
            quarter = SM.call_config(kind, 16384, n // 4, elem, cpu)
            assert quarter.regs > 64 and not lean_forms(quarter.regs)
            with heuristics.override(lean_single=False):
                plain = SM.call_config(kind, 16384, n // 2, elem, cpu)
                assert (plain.num_warps, plain.regs) == (16, 128), plain
            with heuristics.override(wide_single=False):
                assert SM.call_config(kind, 16384, n, elem, cpu).path != heuristics.SINGLE
        # the forward keeps its budget (one row-sized array: no lean forms)
        assert SM.call_config("fwd", 16384, 16384, 2, cpu).regs == 128
        assert SM.call_config(kind, 16384, 16384, 8, cpu).path != heuristics.SINGLE
        assert SM.call_config(kind, 16384, 65536, 2, cpu).path != heuristics.SINGLE
    # the plan the interpreter runs: a row past half the on-chip limit, on
    # 32 warps, so the kernels' 32-warp forms run (the forward's maxima from
    # e == 1, the backward's second read of y)
    for dtype in (torch.bfloat16, torch.float32):
        x = rand(6, 100, dtype=dtype).requires_grad_()
        dy = rand(6, 100, dtype=dtype, scale=1.0)
        with heuristics.override(max_single=128):
            wide = SM.call_config(kind, 6, 100, dtype.itemsize, cpu)
            assert (wide.path, wide.num_warps) == (heuristics.SINGLE, 32)
            for log in (False, True):
                y = FNS[log](x, -1)
                assert_close(y, ref(x.detach(), -1, log), dtype)
                with expect_launches(*BWD["single"]):
                    (dx,) = torch.autograd.grad(y, x, dy)
                dx_ref = SM.reference_backward(y.detach().double(), dy.double(), 1, log)
                assert_close(dx, dx_ref, scale=float(dy.abs().max()) * 4)


def test_config_reads_limits_for(monkeypatch):
    """softmax_config plans with heuristics.limits_for("softmax", ...) (the
    tuned table's entry point): what it returns decides the path."""
    seen = []

    def fake(op, device, elem_bytes, n):
        seen.append((op, elem_bytes, n))
        return dataclasses.replace(heuristics.limits(), max_single_2byte=64, tile=64,
                                   long_path="coop", coop_splits=2, sm_count=2)

    monkeypatch.setattr(heuristics, "limits_for", fake)
    cfg = SM.softmax_config(4096, 1000, 2, torch.device("cpu"), coop=True)
    assert seen and seen[0] == ("softmax", 2, 1000)
    assert cfg.path == heuristics.COOP and cfg.splits == 2 and cfg.regs > 0
    assert SM.softmax_config(4096, 1000, 2, torch.device("cpu")).path == heuristics.LOOPED
    # each call kind plans with its own table op: the forward, the
    # log-softmax forward and the backward (of either) are tuned apart
    seen.clear()
    SM._plan_forward(torch.randn(3, 40), -1, False)
    SM._plan_forward(torch.randn(3, 41), -1, True)
    SM._plan_backward(torch.randn(3, 42), torch.randn(3, 42), -1, False)
    SM._plan_backward(torch.randn(3, 43), torch.randn(3, 43), -1, True)
    assert seen == [("softmax", 4, 40), ("log_softmax", 4, 41), ("softmax_backward", 4, 42),
                    ("softmax_backward", 4, 43)]
    assert {kind[2] for kind in SM.CALL_KINDS.values()} <= set(heuristics.TUNED_OPS)


def test_long_row_plan_fits_l2():
    """The default plan keeps the data between a row's two reads inside the
    L2 share: a persistent grid when its rows fit, else the cooperative path
    with chunks that do (132 SMs, 50 MiB, as the CPU planning assumes)."""
    dev = torch.device("cpu")
    with heuristics.override(sm_count=132):
        lim = heuristics.limits()
        budget = lim.l2_fraction * heuristics.l2_bytes(dev)
        for n in (65536, 131072, 262144):
            for kind, (live, reread, op, wide) in SM.CALL_KINDS.items():
                cfg = SM.call_config(kind, 16384, n, 2, dev)
                if cfg.path == heuristics.SINGLE:
                    continue
                per_row = reread * n * 2
                if cfg.path == heuristics.COOP:
                    assert cfg.programs * cfg.chunk * reread * 2 <= budget + cfg.programs * \
                        cfg.block_n * reread * 2, (n, kind, cfg)
                    assert cfg.lag >= cfg.splits - 1
                else:
                    assert cfg.path == heuristics.LOOPED and cfg.programs * per_row <= budget


# --- exactness at the row maximum, on every path ---------------------------

# Every path at interpreter sizes: the on-chip path, the split path, and the
# forced long-row candidates (looped, persistent, cooperative).
EVERY_PATH = {"single": ({}, 5, 64), "wide": (dict(max_single=128), 5, 128),
              "split": (dict(max_single=64, tile=16, sm_count=2), 3, 128),
              **{name: (lim, 9, 128) for name, lim in LONG.items()}}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("path", list(EVERY_PATH))
def test_row_maximum_is_exact_on_every_path(path, dtype):
    """The max's term is exactly e^0 = 1: a row holding one finite value
    gives softmax exactly 1 and log-softmax exactly 0 there; an all-equal
    row of 2^k gives exactly 2^-k; a one-element row's log-softmax is 0."""
    lim, M, N = EVERY_PATH[path]
    x = rand(M, N, dtype=dtype)
    x[0] = -math.inf
    x[0, N // 3] = float(torch.randn(()) * 20)
    x[1] = float(torch.randn(()) * 20)
    x[2, N // 2] = x[2, N // 5] = x[2].max() + 1.0  # a tie at the max
    with heuristics.override(**lim):
        y = softmax_gpu.softmax(x, -1)
        ly = softmax_gpu.log_softmax(x, -1)
    assert y[0, N // 3].item() == 1.0 and ly[0, N // 3].item() == 0.0
    assert torch.equal(y[0], (x[0] > -math.inf).to(dtype))
    assert torch.equal(y[1], torch.full_like(y[1], 1.0 / N))
    assert_close(ly[1], torch.full((N,), -math.log(N), dtype=torch.float64), dtype)
    for log, out in ((False, y), (True, ly)):
        assert_close(out, ref(x, -1, log), dtype)
    one = rand(M, 1, dtype=dtype)
    assert torch.equal(softmax_gpu.log_softmax(one, -1), torch.zeros_like(one))
    assert torch.equal(softmax_gpu.softmax(one, -1), torch.ones_like(one))
    # beside the max, its neighbour one ulp below: its term rounds to exactly
    # 1 in fp32 and fp64 (counted with the max, not summed), not in 16 bits
    near = torch.full((M, N), -math.inf, dtype=dtype)
    near[:, 3] = 0.1
    near[:, N // 2] = torch.nextafter(near[:, 3], near[:, 0])
    with heuristics.override(**lim):
        for log in (False, True):
            got = softmax_gpu.log_softmax(near, -1) if log else softmax_gpu.softmax(near, -1)
            assert_close(got, ref(near, -1, log), dtype)


@pytest.mark.parametrize("path", list(EVERY_PATH))
def test_log_softmax_of_a_confident_row_is_accurate(path):
    """log-softmax at the max of a confident row is -log1p(r) with r the
    small sum of the other terms: accurate to its own precision, not to
    that of the max's 1 (fp32: well under torch's own error)."""
    lim, M, N = EVERY_PATH[path]
    x = rand(M, N, scale=0.5)
    x[:, 7] = 12.0
    with heuristics.override(**lim):
        ly = softmax_gpu.log_softmax(x, -1)
    expect = torch.log_softmax(x.double(), -1)[:, 7]
    err = ((ly[:, 7].double() - expect) / expect).abs().max().item()
    assert err < 2e-6, err

# --- mixed precision: fp16/bf16 input, fp32 result (dtype=, torch.autocast) -----------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["single", "looped", "split", "coop"])
def test_half_input_fp32_result_is_read_in_place(path, dtype):
    """``dtype=torch.float32`` with fp16/bf16 input: the kernel reads the
    16-bit input and stores fp32 (the forward launches its kernels alone);
    the result is the fp32 softmax of the 16-bit values, the gradient is in
    the input's dtype (the backward reads the fp32 output), on every path."""
    n = 37 if path == "single" else 203
    rows = 9 if path == "coop" else path_rows(path)
    limits = LONG["coop"] if path == "coop" else None
    for log in (False, True):
        x = rand(rows, n, dtype=dtype).requires_grad_()
        dy = rand(rows, n, scale=1.0)
        with (heuristics.override(**limits) if limits else forced(path)):
            with expect_launches(*(("softmax_fwd_coop",) if limits else FWD[path])):
                y = FNS[log](x, -1, dtype=torch.float32)
            with expect_launches(*(("softmax_bwd_coop",) if limits else BWD[path])):
                (dx,) = torch.autograd.grad(y, x, dy)
        assert y.dtype == torch.float32 and dx.dtype == dtype
        assert_close(y, ref(x.detach(), -1, log), torch.float32)
        x64 = x.detach().double().requires_grad_()
        (exact,) = torch.autograd.grad(REFS[log](x64, -1), x64, dy.double())
        assert_close(dx, exact, scale=4 * max(1.0, float(exact.abs().max())))


def test_half_input_fp32_result_makes_no_fp32_copy():
    """No op converts the 16-bit input to fp32 before the kernel (the path a
    dispatch mode sees: the torch.library op), forward and backward; the
    op's result and gradient dtypes are right under FakeTensorMode too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = rand(6, 40, dtype=torch.float16).requires_grad_()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    for log in (False, True):
        seen.clear()
        with Record():
            y = FNS[log](x, -1, dtype=torch.float32)
            (dx,) = torch.autograd.grad(y.sum(), x)
        copies = [f for f in seen if f in (torch.ops.aten._to_copy.default,
                                          torch.ops.aten.copy_.default)]
        assert not copies, copies
        assert y.dtype == torch.float32 and dx.dtype == torch.float16
        assert_close(y, ref(x.detach(), -1, log), torch.float32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xf = torch.empty(3, 5, dtype=torch.bfloat16, device=DEVICE)
        assert SM.softmax_forward(xf, 1, False, torch.float32).dtype == torch.float32
        yf = torch.empty(3, 5, dtype=torch.float32, device=DEVICE)
        assert SM.softmax_backward(yf, yf, 1, True, torch.bfloat16).dtype == torch.bfloat16
    x64 = rand(3, 7, dtype=torch.float64)
    torch.library.opcheck(SM.softmax_forward, (rand(3, 7, dtype=torch.bfloat16), 1, True,
                                               torch.float32))
    torch.library.opcheck(SM.softmax_backward, (x64.float(), x64.float(), 1, False,
                                                torch.float16))


def _calls(x, softmax, log_softmax, module):
    """The softmax ops on ``x`` as a model calls them."""
    return (softmax(x, -1), log_softmax(x, 1), module(x), softmax(x, -1, dtype=torch.float16),
            log_softmax(x, -1, dtype=torch.float32))


def _ours_under_autocast(x, amp):
    with torch.autocast(DEVICE, dtype=amp):
        return _calls(x, softmax_gpu.softmax, softmax_gpu.log_softmax, softmax_gpu.Softmax(0))


def _torch_under_autocast(x, amp):
    with torch.autocast(DEVICE, dtype=amp):
        return _calls(x, torch.softmax, torch.nn.functional.log_softmax, torch.nn.Softmax(0))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_autocast_follows_torch(amp, compiled):
    """Under torch.autocast on the test device, each call returns torch's
    dtype for the same call (CUDA's policy runs softmax / log_softmax in fp32
    for 16-bit input unless a dtype is given; CPU's leaves them alone) and
    the float64 values within that dtype's tolerance; the gradient has the
    input's dtype. Eagerly and under torch.compile (the autocast region
    inside the compiled function)."""
    torch._dynamo.reset()
    ours = torch.compile(_ours_under_autocast, fullgraph=True) if compiled else \
        _ours_under_autocast
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = rand(4, 33, dtype=dtype).requires_grad_()
        got = ours(x, amp)
        want = _torch_under_autocast(x, amp)
        x64 = x.detach().double()
        refs = (torch.softmax(x64, -1), torch.log_softmax(x64, 1), torch.softmax(x64, 0),
                torch.softmax(x64.half().double(), -1), torch.log_softmax(x64, -1))
        for k, (g, w, r) in enumerate(zip(got, want, refs)):
            assert g.dtype == w.dtype, (k, dtype, g.dtype, w.dtype)
            assert_close(g, r, g.dtype)
        (dx,) = torch.autograd.grad(sum(g.float().sum() for g in got), x)
        assert dx.dtype == dtype and bool(dx.isfinite().all())


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA autocast")
def test_cuda_autocast_upcasts_in_the_kernel():
    """torch.autocast("cuda"): softmax of fp16 logits is fp32 (torch's policy)
    and allocates only its fp32 result, no fp32 copy of the input."""
    x = rand(64, 4096, dtype=torch.float16)
    torch.cuda.synchronize()
    for log in (False, True):
        FNS[log](x, -1)  # plans and compiles outside the measurement
        with torch.autocast("cuda", dtype=torch.float16):
            FNS[log](x, -1)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.float16):
            y = FNS[log](x, -1)
        torch.cuda.synchronize()
        assert y.dtype == torch.float32
        assert torch.cuda.max_memory_allocated() - before <= x.numel() * 4 + (1 << 16)
        assert_close(y, ref(x, -1, log), torch.float32)


def test_torch_func_transforms():
    """Inside torch.func transforms (vmap, jvp, grad, hessian) the kernels cannot
    read the wrapped tensors: the ops take their torch reference, equal to
    torch's; before, the launch failed with 'Cannot access storage'."""
    x, v = rand(3, 6, dtype=torch.float64), rand(3, 6, dtype=torch.float64)
    for ours, theirs in ((softmax_gpu.softmax, torch.softmax),
                         (softmax_gpu.log_softmax, torch.log_softmax)):
        for transform in (
                lambda f: torch.func.vmap(lambda a: f(a, 0))(x),
                lambda f: torch.func.jvp(lambda a: f(a, 1), (x,), (v,))[1],
                lambda f: torch.func.grad(lambda a: (f(a, 1) * v).sum())(x),
                lambda f: torch.func.hessian(lambda a: (f(a, 0) * v[0]).sum())(x[0])):
            assert_close(transform(ours), transform(theirs), torch.float64)


def test_forward_mode_ad():
    """A forward-mode dual tensor (torch.autograd.forward_ad) takes the torch
    reference, whose result carries the tangent; the kernels' result carried
    none, which forward AD reads as a zero tangent (silently wrong)."""
    import torch.autograd.forward_ad as fwAD
    x, v = rand(3, 6, dtype=torch.float64), rand(3, 6, dtype=torch.float64)
    for ours, theirs in ((softmax_gpu.softmax, torch.softmax),
                         (softmax_gpu.log_softmax, torch.log_softmax)):
        for dim in (0, 1):
            with fwAD.dual_level():
                got = fwAD.unpack_dual(ours(fwAD.make_dual(x, v), dim))
                want = fwAD.unpack_dual(theirs(fwAD.make_dual(x, v), dim))
            assert got.tangent is not None
            assert_close(got.primal, want.primal, torch.float64)
            assert_close(got.tangent, want.tangent, torch.float64)
    # inside a dual level, a plain tensor still runs the kernels
    with fwAD.dual_level():
        assert softmax_gpu._dispatch.backend_for(x) == ("triton" if DEVICE == "cuda" or
                                                        softmax_gpu._dispatch.interpreted()
                                                        else "torch")


def test_batched_grad_outputs_take_torch_ops():
    """autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True)
    hand the backward a batched dy, which the kernels cannot read: the
    backward takes torch ops there and matches torch (before: 'Cannot access
    storage of BatchedTensorImpl')."""
    x = rand(3, 6, dtype=torch.float64).requires_grad_()
    v = rand(4, 3, 6, dtype=torch.float64)
    for ours, theirs in ((softmax_gpu.softmax, torch.softmax),
                         (softmax_gpu.log_softmax, torch.log_softmax)):
        got = torch.autograd.grad(ours(x, 1), x, v, is_grads_batched=True)[0]
        want = torch.autograd.grad(theirs(x, 1), x, v, is_grads_batched=True)[0]
        assert_close(got, want, torch.float64)
        got = torch.autograd.functional.jacobian(lambda a: ours(a, 0), x.detach(),
                                                 vectorize=True)
        want = torch.autograd.functional.jacobian(lambda a: theirs(a, 0), x.detach())
        assert_close(got, want, torch.float64)


def test_subclass_override_and_fx_trace():
    """softmax / log_softmax and their modules take part in __torch_function__
    as torch's functions do: a Tensor subclass is handed the call (and gets
    its type back), and torch.fx.symbolic_trace records each call as a node
    (it failed on the Proxy)."""
    x = rand(3, 8)
    for fn in (softmax_gpu.softmax, softmax_gpu.log_softmax):
        Logged.seen.clear()
        y = fn(x.as_subclass(Logged), 1)
        assert Logged.seen[:1] == [fn] and type(y) is Logged
        assert torch.equal(y.as_subclass(torch.Tensor), fn(x, 1))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sm = softmax_gpu.Softmax(1)

        def forward(self, x):
            return softmax_gpu.log_softmax(x, -1) * self.sm(x)

    assert fx_functions(Net(), x)[:2] == [softmax_gpu.log_softmax, softmax_gpu.softmax]


def test_nested_and_sparse_tensors_are_refused_by_name():
    """A nested tensor (jagged or strided) is a TypeError naming the argument,
    not an internal error from deep inside."""
    parts = [rand(2, 5), rand(3, 5)]
    for layout in (torch.jagged, torch.strided):
        nt = torch.nested.nested_tensor(parts, layout=layout)
        for fn in (softmax_gpu.softmax, softmax_gpu.log_softmax):
            with pytest.raises(TypeError, match="input is a nested tensor"):
                fn(nt, -1)
    # sparse layouts too
    with pytest.raises(TypeError, match="input has layout torch.sparse_coo"):
        softmax_gpu.softmax(rand(3, 4).to_sparse(), -1)


def test_implicit_dim_compiles():
    """dim=None (torch's deprecated implicit dim) under
    torch.compile(fullgraph=True): torch's dim, no warning traced (it was a
    graph break), for the functions and the modules."""
    for shape in ((5,), (4, 5), (2, 4, 5)):
        x = rand(*shape)
        for ours, theirs in ((softmax_gpu.softmax, torch.nn.functional.softmax),
                             (softmax_gpu.log_softmax, torch.nn.functional.log_softmax),
                             (softmax_gpu.Softmax(), torch.nn.Softmax())):
            torch._dynamo.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = theirs(x.double())
            assert_close(torch.compile(lambda x: ours(x), fullgraph=True)(x), ref)
