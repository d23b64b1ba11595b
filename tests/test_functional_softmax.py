"""softmax_gpu.softmax / log_softmax against float64 torch, on every path."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softmax_gpu
from softmax_gpu import _layout
from helpers import (
    DEVICE,
    FLOAT_DTYPES,
    assert_close,
    expect_launches,
    forced,
    path_rows,
    rand,
)

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
        y = FNS[log](x)
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
        y = FNS[log](x)
    assert_close(y, ref(x, -1, log))


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_split_merges_partials_with_large_offsets(path):
    """Chunks whose maxima differ by far more than exp's range still merge exactly."""
    x = rand(path_rows(path), 300)
    x[:, 250:] += 80.0
    x[0, :40] -= 200.0
    with forced(path):
        assert_close(softmax_gpu.softmax(x), ref(x, -1, False))
        assert_close(softmax_gpu.log_softmax(x), ref(x, -1, True))


@pytest.mark.parametrize("path", ["single", "looped", "split"])
def test_inf_rows_match_torch(path):
    """Masked lanes load -inf; an all -inf row is NaN, exactly as torch."""
    x = rand(path_rows(path), 100)
    x[0] = -math.inf
    x[1, ::3] = -math.inf
    x[2, 7] = math.inf
    with forced(path):
        for log in (False, True):
            y = FNS[log](x)
            expect = REFS[log](x.double(), -1)
            assert torch.equal(y.isnan(), expect.isnan()), log
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
        pytest.param(lambda x: x[::2, :50], id="padded-vocab-slice"),
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


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 300),
    shift=st.floats(-1e3, 1e3),
    path=st.sampled_from(["single", "looped", "split"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_rows_sum_to_one_and_shift_invariance(m, n, shift, path, seed):
    g = torch.Generator().manual_seed(seed)
    x = rand(m, n, generator=g)
    with forced(path):
        y = softmax_gpu.softmax(x)
        torch.testing.assert_close(
            y.sum(-1).double().cpu(), torch.ones(m, dtype=torch.float64), atol=1e-5, rtol=0
        )
        # a per-row shift leaves the softmax unchanged
        row_shift = torch.linspace(-1, 1, m, device=DEVICE)[:, None] * shift
        xs = (x.double() + row_shift.double()).float()
        ys = softmax_gpu.softmax(xs)
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
        y = FNS[log](x)
        with expect_launches(*BWD[path]):
            (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(REFS[log](x64, -1), x64, dy.double())
    assert dx.dtype == dtype
    assert_close(dx, dx_ref, scale=float(dy.abs().max()) * 4)


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
        softmax_gpu.softmax(torch.arange(4, device=DEVICE))
    with pytest.raises(TypeError, match="input must be a floating tensor.*torch.bool"):
        softmax_gpu.log_softmax(torch.ones(4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="input must be a floating tensor.*complex"):
        softmax_gpu.softmax(torch.ones(4, dtype=torch.complex64, device=DEVICE))
    with pytest.raises(IndexError, match="dim out of range: got 2"):
        softmax_gpu.softmax(rand(3, 4), dim=2)
    with pytest.raises(IndexError, match="dim out of range: got -3"):
        softmax_gpu.log_softmax(rand(3, 4), dim=-3)
    with pytest.raises(TypeError, match="dim must be an int"):
        softmax_gpu.softmax(rand(3, 4), dim=1.0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        softmax_gpu.softmax([1.0, 2.0])


def test_unsupported_device_is_refused(monkeypatch):
    from softmax_gpu import _dispatch

    monkeypatch.setattr(_dispatch, "_SUPPORTED_DEVICES", ("cuda", "cpu"))
    with pytest.raises(ValueError, match="input is on unsupported device meta"):
        softmax_gpu.softmax(torch.empty(3, 4, device="meta"))


def test_meta_tensors_give_shapes():
    y = softmax_gpu.softmax(torch.empty(3, 4, device="meta", dtype=torch.bfloat16))
    assert y.device.type == "meta" and y.shape == (3, 4) and y.dtype == torch.bfloat16


def test_backend_for():
    assert softmax_gpu.backend_for(torch.empty(1, device=DEVICE)) == "triton"
    with pytest.raises(TypeError):
        softmax_gpu.backend_for("cpu")
