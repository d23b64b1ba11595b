"""Tests of the benchmark harness in perf/ (run from the repo root, not installed).

- the arithmetic: minimal bytes per op, GB/s, fraction of copy, speedups;
- sizes, cuDNN row splitting and library lookup (with a fake library);
- the sweep in-process with fake providers: a wrong provider is flagged, one
  that raises gives an error row, an unavailable one is skipped;
- the CPU quick run end to end in a subprocess (Triton interpreter): CSV
  columns, CSV / PNG / summary files, rows for softmax_gpu and torch, and
  missing providers recorded as skipped.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT))  # the perf/ folder (not installed)

from perf import cudnn as pcudnn  # noqa: E402
from perf import env, ops, report, sizes, sweep, timing  # noqa: E402
from perf.providers import NotImplementedForOp, Provider, make_providers  # noqa: E402

REQUIRED_COLUMNS = [
    "op", "provider", "dtype", "M", "N", "ms", "ms_p20", "ms_p80", "gbps", "frac_copy_bw",
    "speedup_vs_torch", "peak_mem_bytes", "device", "torch", "triton", "cuda", "timestamp",
]


# --- arithmetic -------------------------------------------------------------


def test_minimal_bytes_model():
    M, N, e = 3, 5, 2
    assert ops.softmax_fwd_bytes(M, N, e) == 2 * 15 * 2 == 60
    assert ops.softmax_fwd_bwd_bytes(M, N, e) == 5 * 15 * 2 == 150
    # CE: logits once (+ grad once for fwd+bwd), plus 8-byte targets and a 4-byte value per row
    assert ops.ce_fwd_bytes(M, N, e) == 30 + 3 * 8 + 3 * 4 == 66
    assert ops.ce_fwd_bwd_bytes(M, N, e) == 60 + 3 * 8 + 3 * 4 == 96
    # linear + CE: x [M, D] and w [N, D] read once, their gradients written once
    assert ops.linear_ce_fwd_bwd_bytes(M, N, 4, e) == 2 * (3 + 5) * 4 * 2 + 3 * 8 + 3 * 4 == 164
    table = {name: spec.min_bytes(M, N, e) for name, spec in ops.OPS.items()}
    assert table == {"softmax_fwd": 60, "softmax_fwd_bwd": 150, "log_softmax_fwd": 60,
                     "ce_fwd": 66, "ce_fwd_bwd": 96, "vocab_parallel": 96,
                     "linear_ce_fwd_bwd": ops.linear_ce_fwd_bwd_bytes(M, N, sizes.LCE_HIDDEN, e)}


def test_bandwidth_fraction_and_speedup_arithmetic():
    assert timing.gbps(2e9, 1.0) == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert timing.gbps(3e6, 0.5) == pytest.approx(6.0)
    assert math.isnan(timing.gbps(1e9, 0.0))
    assert math.isnan(timing.gbps(1e9, math.nan))
    assert timing.fraction(1500.0, 3000.0) == pytest.approx(0.5)
    assert math.isnan(timing.fraction(1.0, 0.0))
    assert timing.speedup(2.0, 0.5) == pytest.approx(4.0)  # baseline 2 ms, ours 0.5 ms
    assert math.isnan(timing.speedup(math.nan, 1.0))


def _row(op, provider, ms, status="ok", dtype="bf16", M=4, N=8):
    return {"op": op, "provider": provider, "dtype": dtype, "M": M, "N": N, "ms": ms,
            "status": status, "speedup_vs_torch": math.nan}


def test_fill_speedups_matches_rows_by_case():
    rows = [
        _row("softmax_fwd", "torch", 2.0),
        _row("softmax_fwd", "softmax_gpu", 0.5),
        _row("softmax_fwd", "cudnn", 4.0),
        _row("softmax_fwd", "softmax_gpu", 1.0, dtype="fp32"),  # no torch row for fp32
        _row("ce_fwd", "torch", 3.0),
        _row("ce_fwd", "softmax_gpu", math.nan, status="error"),
    ]
    sweep.fill_speedups(rows)
    assert rows[0]["speedup_vs_torch"] == pytest.approx(1.0)
    assert rows[1]["speedup_vs_torch"] == pytest.approx(4.0)
    assert rows[2]["speedup_vs_torch"] == pytest.approx(0.5)
    assert math.isnan(rows[3]["speedup_vs_torch"])
    assert math.isnan(rows[5]["speedup_vs_torch"])


def test_wall_clock_quantiles_are_ordered():
    calls = []
    p50, p20, p80 = timing.bench(lambda: calls.append(1), "cpu", rep_ms=1)
    assert 0 <= p20 <= p50 <= p80
    assert len(calls) >= 4  # a warm-up and at least three timed calls


# --- sizes --------------------------------------------------------------------


@pytest.mark.parametrize("elem", [2, 4])
def test_grid_rows_give_about_one_gib(elem):
    for n in sizes.GRID_N:
        m = sizes.grid_rows(n, elem)
        nbytes = m * n * elem
        assert sizes.TARGET_INPUT_BYTES <= nbytes < sizes.TARGET_INPUT_BYTES + n * elem
        assert nbytes <= 2 << 30


def test_shape_sets():
    cpu = sizes.shapes_for(4, device="cpu", quick=True)
    assert [(s.M, s.N) for s in cpu] == [(64, 256), (64, 1024)]
    full = sizes.shapes_for(2, device="cuda", quick=False)
    assert [s.N for s in full if s.kind == "grid"] == list(sizes.GRID_N)
    assert [(s.M, s.N) for s in full if s.kind == "llm"] == [(16384, v) for v in sizes.LLM_VOCABS]
    quick = sizes.shapes_for(2, device="cuda", quick=True)
    assert len(quick) < len(full) and any(s.kind == "llm" for s in quick)
    assert [s.N for s in sizes.shapes_for(2, device="cuda", quick=False, which="llm")] == list(sizes.LLM_VOCABS)
    custom = sizes.shapes_for(2, device="cuda", quick=False, ns=(4096,), m=7)
    assert [(s.M, s.N, s.kind) for s in custom] == [(7, 4096, "custom")]
    assert sizes.parse_size("4k") == 4096 and sizes.parse_size("50257") == 50257
    assert sizes.size_label(131072) == "128k" and sizes.size_label(50257) == "50257"


def test_linear_ce_shapes():
    """The four LM heads (hidden x vocabulary) at 4096 and 16384 tokens; --quick
    on a GPU: Llama-3-8B's at both token counts."""
    full = sizes.linear_shapes(device="cuda", quick=False)
    heads = [(4096, 128256), (3584, 152064), (2304, 256000), (8192, 128256)]
    assert [(s.M, s.N, s.D) for s in full] == [(t, v, d) for t in (4096, 16384) for d, v in heads]
    assert [sizes.lce_model(s.N, s.D) for s in full[:4]] == \
        ["llama3-8b", "qwen2-7b", "gemma2-2b", "llama3-70b"]
    assert [(s.M, s.N, s.D) for s in sizes.linear_shapes(device="cuda", quick=True)] == \
        [(4096, 128256, 4096), (16384, 128256, 4096)]
    assert [(s.M, s.N, s.D) for s in sizes.linear_shapes(device="cuda", quick=True, m=16384)] == \
        [(16384, 128256, 4096)]
    cpu = sizes.linear_shapes(device="cpu", quick=True)
    assert [(s.M, s.N, s.D) for s in cpu] == [(64, 256, 32), (64, 1024, 32)]
    custom = sizes.linear_shapes(device="cuda", quick=False, ns=(50257,), m=2048)
    assert [(s.M, s.N, s.D, s.kind) for s in custom] == [(2048, 50257, 4096, "custom")]


def test_linear_ce_inputs_and_float64_errors(monkeypatch):
    """Realistic scales (hidden states of unit RMS, a head of std 0.02); the
    errors of loss, dX and dW each against a float64 reference computed once
    per case on subsets of rows, each in its own column."""
    spec = ops.OPS["linear_ce_fwd_bwd"]
    monkeypatch.setattr(ops, "LCE_REF_ROWS", 5)
    monkeypatch.setattr(ops, "LCE_REF_CLASSES", 7)
    shape = sizes.Shape(64, 300, "custom", 48)
    inp = spec.shape_inputs(shape, torch.float32, "cpu", seed=3)
    assert float(inp.x.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.1)
    assert float(inp.w.std()) == pytest.approx(0.02, rel=0.1)
    ref = ops.linear_ce_reference(inp)
    assert ops.linear_ce_reference(spec.shape_inputs(shape, torch.float32, "cpu", seed=3)) is ref
    assert ref["dx"].shape == (5, 48) and ref["dw"].shape == (7, 48)
    assert ref["dx"].dtype == ref["dw"].dtype == torch.float64
    x, w, t = inp.x.double().requires_grad_(), inp.w.double().requires_grad_(), inp.target
    loss = torch.nn.functional.cross_entropy(x @ w.T, t)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert ref["loss"] == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(ref["dx"], gx[ref["rows"]], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ref["dw"], gw[ref["classes"]], rtol=1e-10, atol=1e-14)
    go = ops.CHECK_GRAD_OUTPUT  # run_once backpropagates go * loss
    good = {"loss": loss.float(), "dx": (go * gx).float(), "dw": (go * gw).float()}
    e = spec.errors(good, inp)
    assert set(e) == {"max_rel_err", "loss_rel_err", "dx_rel_err", "dw_rel_err",
                      "dw_off_target_rel_err"}
    assert max(e.values()) < 1e-6
    bad = spec.errors(dict(good, dw=good["dw"] * 1.01), inp)
    assert bad["dw_rel_err"] == pytest.approx(0.01, rel=1e-3) and bad["dx_rel_err"] < 1e-6
    assert bad["max_rel_err"] == bad["dw_rel_err"]
    assert math.isnan(spec.errors({}, inp)["dx_rel_err"])


def test_bench_calls_and_time_budget(monkeypatch):
    """Fixed-count timing (CPU: the wall-clock loop) gives ordered quantiles;
    runs past the sweep's time budget are recorded as skipped, not lost. The
    sweep's clock is a fake one that moves 1 s per reading, so the outcome
    does not depend on how fast the machine runs the first case."""
    clock = iter(range(1000))
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    calls = []
    ms, p20, p80 = timing.bench_calls(lambda: calls.append(1), "cpu", rep_ms=1)
    assert 0 <= p20 <= ms <= p80 and len(calls) >= 3
    cfg = sweep.SweepConfig(device="cpu", ops=ops.get_ops(["softmax_fwd"]),
                            providers=make_providers(["torch"]), dtypes=[torch.float32],
                            ns=(64, 128), m=8, rep_ms=1, copy_bytes=1 << 16, time_budget_s=1.5)
    rows = sweep.run_sweep(cfg, _info(), progress=False, log=lambda s: None)
    runs = [r for r in rows if r["op"] == "softmax_fwd"]
    assert [r["status"] for r in runs] == ["ok", "skipped"]  # checked at 1 s, then at 2 s
    assert "time budget" in runs[1]["note"]


# --- cuDNN binding (no GPU needed: a fake library) ----------------------------


def test_cudnn_row_chunks_stay_under_descriptor_limit():
    assert pcudnn.row_chunks(3, 5, max_elements=8) == [(0, 1), (1, 1), (2, 1)]
    assert pcudnn.row_chunks(10, 4) == [(0, 10)]
    M, N = 16384, 256000  # the 256k-vocabulary LLM shape: 4.2e9 elements
    pieces = pcudnn.row_chunks(M, N)
    assert len(pieces) == 2
    assert all(n * N < 2**31 for _, n in pieces)
    assert sum(n for _, n in pieces) == M
    assert [r for r, _ in pieces] == [0, pieces[0][1]]


def test_cudnn_path_from_maps():
    maps = "\n".join([
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6",
        "7f02-7f03 r-xp 00000000 08:01 2 /site/nvidia/cudnn/lib/libcudnn_ops.so.9",
        "7f04-7f05 r-xp 00000000 08:01 3 /site/nvidia/cudnn/lib/libcudnn.so.9",
        "7f06-7f07 rw-p 00000000 00:00 0 ",
    ])
    assert pcudnn.cudnn_path_from_maps(maps) == "/site/nvidia/cudnn/lib/libcudnn.so.9"
    assert pcudnn.cudnn_path_from_maps("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6") is None


class FakeCudnn:
    """Records calls; every function returns ``status`` (softmax calls only)."""

    def __init__(self, softmax_status=0):
        self.calls = []
        self.softmax_status = softmax_status

    def __getattr__(self, name):
        if not name.startswith("cudnn"):
            raise AttributeError(name)

        def fn(*args):
            self.calls.append((name, args))
            if name == "cudnnGetErrorString":
                return b"CUDNN_STATUS_NOT_SUPPORTED"
            return self.softmax_status if name.startswith("cudnnSoftmax") else 0

        return fn


def test_cudnn_splits_rows_and_sets_stream_before_each_call():
    fake = FakeCudnn()
    lib = pcudnn.Cudnn(fake, stream_fn=lambda: 1234, max_elements=8)
    x = torch.randn(3, 5)
    y = torch.empty_like(x)
    assert lib.softmax_forward(x, y, pcudnn.ALGO_LOG) == 3
    names = [n for n, _ in fake.calls]
    softmax_at = [i for i, n in enumerate(names) if n == "cudnnSoftmaxForward"]
    assert len(softmax_at) == 3
    for i in softmax_at:
        assert "cudnnSetStream" in names[max(0, i - 3):i]
    streams = [a[1].value for n, a in fake.calls if n == "cudnnSetStream"]
    assert streams == [1234] * 3
    descs = [a[1:] for n, a in fake.calls if n == "cudnnSetTensor4dDescriptor"]
    assert descs == [(pcudnn.TENSOR_NCHW, 0, 1, 5, 1, 1)]  # fp32 code 0, n=1 row, c=5, h=w=1
    fwd = [a for n, a in fake.calls if n == "cudnnSoftmaxForward"]
    assert [a[1:3] for a in fwd] == [(pcudnn.ALGO_LOG, pcudnn.MODE)] * 3
    x_ptrs = [a[5].value for a in fwd]
    assert x_ptrs == [x.data_ptr() + r * 5 * 4 for r in range(3)]  # one row further each call
    alpha = ctypes.cast(fwd[0][3], ctypes.POINTER(ctypes.c_float)).contents.value
    assert alpha == 1.0


def test_cudnn_bad_status_raises_with_code():
    lib = pcudnn.Cudnn(FakeCudnn(softmax_status=3000), stream_fn=lambda: 0)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    with pytest.raises(pcudnn.CudnnError, match="3000") as info:
        lib.softmax_backward(x, x.clone(), torch.empty_like(x))
    assert info.value.status == 3000 and info.value.func == "cudnnSoftmaxBackward"
    sets = [a for n, a in lib.lib.calls if n == "cudnnSetTensor4dDescriptor"]
    assert sets[0][2] == 9  # bf16's cuDNN code


FAKE_CUDNN_C = r"""
#include <stddef.h>
static int handle_obj;
static int descs[64];
static int n_descs;
int fake_softmax_status, fake_n_set_stream, fake_dtype, fake_n, fake_c, fake_h, fake_w, fake_fmt;
int fake_algo, fake_mode, fake_handle_ok;
double fake_alpha, fake_beta;
void *fake_stream, *fake_src, *fake_dst, *fake_dy, *fake_desc_in, *fake_desc_out;
static double scalar(const void *p) {
    return fake_dtype == 1 ? *(const double *)p : (double)*(const float *)p;
}
int cudnnCreate(void **h) { *h = &handle_obj; return 0; }
int cudnnDestroy(void *h) { return h == &handle_obj ? 0 : 2000; }
int cudnnSetStream(void *h, void *s) { fake_stream = s; fake_n_set_stream++; return h == &handle_obj ? 0 : 2000; }
int cudnnCreateTensorDescriptor(void **d) { *d = &descs[n_descs++ % 64]; return 0; }
int cudnnDestroyTensorDescriptor(void *d) { return 0; }
int cudnnSetTensor4dDescriptor(void *d, int fmt, int dt, int n, int c, int h, int w) {
    fake_fmt = fmt; fake_dtype = dt; fake_n = n; fake_c = c; fake_h = h; fake_w = w; return 0;
}
int cudnnSoftmaxForward(void *h, int algo, int mode, const void *alpha, void *xd, const void *x,
                        const void *beta, void *yd, void *y) {
    fake_handle_ok = h == &handle_obj; fake_algo = algo; fake_mode = mode;
    fake_alpha = scalar(alpha); fake_beta = scalar(beta);
    fake_src = (void *)x; fake_dst = y; fake_desc_in = xd; fake_desc_out = yd;
    return fake_softmax_status;
}
int cudnnSoftmaxBackward(void *h, int algo, int mode, const void *alpha, void *yd, const void *y,
                         void *dyd, const void *dy, const void *beta, void *dxd, void *dx) {
    fake_handle_ok = h == &handle_obj; fake_algo = algo; fake_mode = mode;
    fake_alpha = scalar(alpha); fake_beta = scalar(beta);
    fake_src = (void *)y; fake_dy = (void *)dy; fake_dst = dx; fake_desc_in = yd; fake_desc_out = dxd;
    return fake_softmax_status;
}
const char *cudnnGetErrorString(int s) { return "FAKE_CUDNN_STATUS"; }
size_t cudnnGetVersion(void) { return 90100; }
"""


def test_cudnn_ctypes_marshalling_against_a_compiled_fake(tmp_path):
    """The real ctypes path (CDLL, prototypes, byref scalars, pointers) against a
    C library with cuDNN's signatures that records what it receives."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "fake_cudnn.c"
    so = tmp_path / "libfakecudnn.so"
    src.write_text(FAKE_CUDNN_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O0", "-o", str(so), str(src)], check=True)
    lib = pcudnn.Cudnn(path=str(so), stream_fn=lambda: 0xABC000)
    raw = lib.lib

    def get(name, ctype=ctypes.c_int):
        return ctype.in_dll(raw, name).value

    assert lib.version() == 90100
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.empty_like(x)
    assert lib.softmax_forward(x, y, pcudnn.ALGO_ACCURATE) == 1
    assert get("fake_handle_ok") == 1 and get("fake_stream", ctypes.c_void_p) == 0xABC000
    assert (get("fake_fmt"), get("fake_dtype"), get("fake_n"), get("fake_c"), get("fake_h"), get("fake_w")) \
        == (0, 1, 6, 10, 1, 1)
    assert (get("fake_algo"), get("fake_mode")) == (pcudnn.ALGO_ACCURATE, pcudnn.MODE)
    assert get("fake_alpha", ctypes.c_double) == 1.0 and get("fake_beta", ctypes.c_double) == 0.0
    assert get("fake_src", ctypes.c_void_p) == x.data_ptr() and get("fake_dst", ctypes.c_void_p) == y.data_ptr()

    lib.max_elements = 25  # 2 rows of 10 per call: the last call covers rows 4-5
    h = torch.randn(6, 10, dtype=torch.float16)
    dh = torch.randn_like(h)
    dx = torch.empty_like(h)
    assert lib.softmax_backward(h, dh, dx, pcudnn.ALGO_LOG) == 3
    assert get("fake_n_set_stream") == 4
    assert (get("fake_dtype"), get("fake_n"), get("fake_algo")) == (2, 2, pcudnn.ALGO_LOG)
    assert get("fake_alpha", ctypes.c_double) == 1.0  # read back as a float for half
    offset = 4 * 10 * 2
    assert get("fake_src", ctypes.c_void_p) == h.data_ptr() + offset
    assert get("fake_dy", ctypes.c_void_p) == dh.data_ptr() + offset
    assert get("fake_dst", ctypes.c_void_p) == dx.data_ptr() + offset

    ctypes.c_int.in_dll(raw, "fake_softmax_status").value = 3000
    with pytest.raises(pcudnn.CudnnError, match=r"status 3000 \(FAKE_CUDNN_STATUS\)"):
        lib.softmax_forward(x, y)
    lib.close()


# --- correctness check ----------------------------------------------------------


def test_relative_error_catches_wrong_and_unwritten_outputs():
    spec = ops.OPS["softmax_fwd_bwd"]
    inp = spec.make_inputs(8, 64, torch.float32, "cpu", seed=3)
    good = spec.run_once(lambda x: torch.softmax(x, -1), inp)
    inp = spec.make_inputs(8, 64, torch.float32, "cpu", seed=3)
    assert spec.error(good, inp) < 1e-6
    nan = dict(good, dx=torch.full_like(good["dx"], math.nan))
    assert spec.error(nan, inp) == math.inf
    zeros = dict(good, y=torch.zeros_like(good["y"]))
    assert spec.error(zeros, inp) == pytest.approx(1.0)
    # a cross-entropy whose backward drops grad_output is wrong: the check's
    # grad_output is not 1
    class Unscaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t):
            ctx.save_for_backward(x, t)
            return torch.nn.functional.cross_entropy(x, t)

        @staticmethod
        def backward(ctx, grad_output):
            x, t = ctx.saved_tensors
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                (dx,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xx, t), xx)
            return dx, None

    cfb = ops.OPS["ce_fwd_bwd"]
    assert ops.CHECK_GRAD_OUTPUT != 1
    for fn, ok in ((torch.nn.functional.cross_entropy, True), (Unscaled.apply, False)):
        got = cfb.run_once(fn, cfb.make_inputs(8, 64, torch.float32, "cpu", seed=5))
        err = cfb.error(got, cfb.make_inputs(8, 64, torch.float32, "cpu", seed=5))
        assert (err < 1e-6) if ok else (err > 0.5), (fn, err)
    # the gradient off the targets is judged on its own: at long rows the
    # targets carry nearly all of the norm, so every other element 10% off
    # hides under the bf16 limit in the whole gradient's norm
    good = cfb.run_once(torch.nn.functional.cross_entropy,
                        cfb.make_inputs(4, 32768, torch.float32, "cpu", seed=6))
    cin = cfb.make_inputs(4, 32768, torch.float32, "cpu", seed=6)
    soft = torch.where(ops.off_target(torch.ones_like(good["dx"]), cin.target) > 0,
                       good["dx"] * 1.1, good["dx"])
    errs = cfb.errors(dict(good, dx=soft), cin)
    assert errs["max_rel_err"] < ops.TOLERANCE[torch.bfloat16], errs
    assert errs["off_target_rel_err"] == pytest.approx(0.1, rel=1e-3)
    assert ops.verdict(errs, torch.bfloat16) is False
    assert "off-target rel err 0.1 > " in ops.wrong_note(errs, torch.bfloat16)
    # torch's own bf16 cross-entropy, whose gradient is exp of a bf16
    # log-softmax, is within the off-target limit (and so never flagged)
    bf = cfb.make_inputs(16, 32768, torch.bfloat16, "cpu", seed=7)
    errs = cfb.errors(cfb.run_once(torch.nn.functional.cross_entropy, bf),
                      cfb.make_inputs(16, 32768, torch.bfloat16, "cpu", seed=7))
    assert errs["off_target_rel_err"] < ops.OFF_TARGET_TOLERANCE[torch.bfloat16], errs
    assert ops.verdict(errs, torch.bfloat16) is True
    # fp16 gradients of a mean over many rows sit near fp16's subnormals: the
    # reference rounded once to fp16 is itself off by more than the fixed
    # limit there, and the limit is twice that instead (a correct result is
    # not flagged; one off by far more still is)
    half = [cfb.make_inputs(256, 32768, torch.float16, "cpu", seed=8) for _ in range(2)]
    errs = cfb.errors(cfb.run_once(torch.nn.functional.cross_entropy, half[0]), half[1])
    floor = errs["off_target_rounding_err"]
    assert floor > ops.OFF_TARGET_TOLERANCE[torch.float16] / 2, errs
    assert errs["off_target_rel_err"] <= 2 * floor and ops.verdict(errs, torch.float16) is True
    bad = dict(errs, off_target_rel_err=3 * floor)
    assert ops.verdict(bad, torch.float16) is False
    assert f"off-target rel err {3 * floor:.3g} > {2 * floor:.3g}" in ops.wrong_note(bad, torch.float16)
    ce = ops.OPS["ce_fwd"]
    cin = ce.make_inputs(8, 64, torch.float32, "cpu", seed=4)
    loss = torch.nn.functional.cross_entropy(cin.x, cin.target)
    assert ce.error({"loss": loss}, cin) < 1e-6
    assert ce.error({"loss": loss * 1.1}, cin) == pytest.approx(0.1, rel=1e-3)
    assert not bool((cin.x == 0).all())  # inputs are random, never zeros


def test_long_row_check_names_how_rows_are_wrong(monkeypatch):
    """The GPU script's long-row check, at its CPU size: every path passes;
    with the backward's rescale dropped every path fails, and the report names
    the rows, their scale (1 / grad_output: left unscaled) and their target
    element. The report alone locates a wrong chunk of columns."""
    import importlib

    from perf import gpu_checks

    # no element near 0: every element of a scaled row or range is off
    ref = (torch.arange(600, dtype=torch.float64).reshape(6, 100) % 7 + 1) * \
        torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(300).reshape(6, 100)
    got = ref.clone()
    got[2] *= 0.4
    got[4, 50:75] *= 1.2
    rep = gpu_checks._row_report(got, ref, torch.tensor([1, 2, 3, 4, 60, 6]))
    assert rep.startswith("2 of 6 rows off") and "rows [2, 4]" in rep, rep
    assert "row 2: 6.00e-01, scale 0.4, cols 0..99 (100 off)" in rep, rep
    assert "row 4:" in rep and "cols 50..74 (25 off), target 60:" in rep, rep
    assert gpu_checks._row_report(ref.clone(), ref).startswith("worst row"), rep

    case = [("cross_entropy", torch.bfloat16, 9, 300)]
    res = gpu_checks.Results()
    gpu_checks._long_row_check(res, "cpu", case, repeats=1)
    assert res.ok and len(res.items) == len(gpu_checks.LONG_PATHS), res.table()
    ce = importlib.import_module("softmax_gpu.cross_entropy")
    with monkeypatch.context() as mp:
        mp.setattr(ce, "_scale_", lambda g, state, go: None)
        res = gpu_checks.Results()
        gpu_checks._long_row_check(res, "cpu", case, repeats=1)
    assert len(res.items) == len(gpu_checks.LONG_PATHS), res.table()
    for row in res.items:
        assert row[1] is False and "9 of 9 rows off" in row[2], res.table()
        found = re.search(r"row 0: [^;]*, scale ([0-9.]+), [^;]*target \d+: ", row[2])
        assert found and abs(float(found.group(1)) - 0.4) < 0.01, row
    # every element off its target 10% high (they are the positive ones):
    # the off-target error is reported on its own, larger than the whole
    # gradient's
    real = ce._scale_
    with monkeypatch.context() as mp:
        mp.setattr(ce, "_scale_", lambda g, state, go: (real(g, state, go),
                                                          g.mul_(torch.where(g > 0, 1.1, 1.0))))
        res = gpu_checks.Results()
        gpu_checks._long_row_check(res, "cpu", case[:1], repeats=1)
    for row in res.items:
        whole, off = re.search(r"grad ([0-9.e+-]+), grad off target ([0-9.e+-]+)", row[2]).groups()
        assert row[1] is False and float(whole) < float(off) and abs(float(off) - 0.1) < 0.01, row
    # a race: each path's second run comes out different
    real, calls = ce._scale_, []

    def racy(g, state, go):
        real(g, state, go)
        calls.append(1)
        if len(calls) % 3 == 2:
            g.mul_(1.03)

    monkeypatch.setattr(ce, "_scale_", racy)
    res = gpu_checks.Results()
    gpu_checks._long_row_check(res, "cpu", case, repeats=3)
    assert len(calls) == 3 * len(gpu_checks.LONG_PATHS)
    for name, ok, detail in res.items:
        assert ok is False, res.table()
        assert "run 2 of 3 differs from run 1: 0 output and " in detail, detail
        assert "gradient rows [0, 1, 2, 3, 4, 5, 6, 7] ..." in detail, detail
        assert "run 3" not in detail, detail


def test_linear_ce_check_catches_wrong_results():
    spec = ops.OPS["linear_ce_fwd_bwd"]
    shape = sizes.Shape(16, 40, "custom", 8)
    eager = make_providers(["torch"])[0].function("linear_ce")
    good = spec.run_once(eager, spec.shape_inputs(shape, torch.float32, "cpu", seed=3))
    fresh = spec.shape_inputs(shape, torch.float32, "cpu", seed=3)
    assert spec.error(good, fresh) < 1e-5
    assert spec.error(dict(good, loss=good["loss"] * 1.1), fresh) == pytest.approx(0.1, rel=1e-3)
    assert spec.error(dict(good, dw=good["dw"] * 0), fresh) == pytest.approx(1.0)
    assert spec.error(dict(good, dx=good["dx"].flip(0)), fresh) > 0.5
    assert spec.error(dict(good, dx=torch.full_like(good["dx"], math.nan)), fresh) == math.inf
    assert spec.error(dict(good, dw=None), fresh) == math.inf
    assert math.isnan(spec.error({}, fresh))  # the floor: nothing to check
    # the dW rows of classes no token targets (the softmax part alone) are
    # reported on their own; at realistic scales the targeted rows carry
    # nearly all of dW's norm, so a 10% error in every untargeted row
    # hardly moves dw_rel_err
    shape = sizes.Shape(64, 4096, "custom", 64)
    good = spec.run_once(eager, spec.shape_inputs(shape, torch.float32, "cpu", seed=4))
    fresh = spec.shape_inputs(shape, torch.float32, "cpu", seed=4)
    hit = torch.zeros(4096, dtype=torch.bool)
    hit[fresh.target] = True
    soft = torch.where(hit[:, None], good["dw"], good["dw"] * 1.1)
    errs = spec.errors(dict(good, dw=soft), fresh)
    assert errs["dw_off_target_rel_err"] == pytest.approx(0.1, rel=1e-3), errs
    assert errs["dw_rel_err"] < 1e-2 and errs["max_rel_err"] < 1e-2, errs
    assert spec.errors(good, fresh)["dw_off_target_rel_err"] < 1e-5


# --- the sweep in-process, with fake providers ------------------------------------


class WrongSoftmax(Provider):
    name = "wrong"

    def function(self, family):
        if family == "softmax":
            return lambda x: torch.softmax(x, -1).flip(0)  # rows swapped
        raise NotImplementedForOp("wrong has only softmax")


class RaisingSoftmax(Provider):
    name = "raising"

    def function(self, family):
        def boom(*args):
            raise RuntimeError("kernel exploded")

        return boom


class Missing(Provider):
    name = "missing"

    def availability(self, ctx):
        return "not importable: No module named 'missing'"


def _info():
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    return env.run_info("cpu", now=now)


def _run(providers, op_names=("softmax_fwd", "ce_fwd")):
    cfg = sweep.SweepConfig(device="cpu", ops=ops.get_ops(list(op_names)), providers=providers,
                            dtypes=[torch.float32], ns=(64,), m=8, rep_ms=1, copy_bytes=1 << 16)
    return sweep.run_sweep(cfg, _info(), progress=False, log=lambda s: None)


def test_sweep_flags_wrong_errors_and_skips_without_crashing():
    rows = _run(make_providers(["torch"]) + [WrongSoftmax(), RaisingSoftmax(), Missing()])
    by = {(r["op"], r["provider"]): r for r in rows}
    assert by[("copy", "torch")]["gbps"] > 0
    t = by[("softmax_fwd", "torch")]
    assert t["status"] == "ok" and t["correct"] is True and t["gbps"] > 0
    assert t["frac_copy_bw"] == pytest.approx(t["gbps"] / t["copy_gbps"])
    assert t["gbps"] == pytest.approx(t["bytes"] / (t["ms"] * 1e-3) / 1e9)
    w = by[("softmax_fwd", "wrong")]
    # timed, but never reported as a speed (nor in the speedups)
    assert w["status"] == "wrong" and w["correct"] is False and "WRONG" in w["note"]
    assert math.isnan(w["gbps"]) and math.isnan(w["frac_copy_bw"]) and w["ms"] > 0
    assert math.isnan(w["speedup_vs_torch"])
    assert by[("ce_fwd", "wrong")]["status"] == "not_implemented"
    r = by[("softmax_fwd", "raising")]
    assert r["status"] == "error" and "kernel exploded" in r["note"]
    m = by[("softmax_fwd", "missing")]
    assert m["status"] == "skipped" and "not importable" in m["note"]
    md = report.summary_markdown(rows, _info())
    assert "**WRONG**" in md and "ERROR" in md and "`missing` skipped" in md


def test_softmax_gpu_cross_entropy_detected_at_run_time(monkeypatch):
    import softmax_gpu

    provider = make_providers(["softmax_gpu"])[0]
    monkeypatch.delattr(softmax_gpu, "cross_entropy", raising=False)
    with pytest.raises(NotImplementedForOp):
        provider.function("cross_entropy")
    rows = _run(make_providers(["softmax_gpu", "torch"]), op_names=("ce_fwd",))
    assert {r["status"] for r in rows if r["provider"] == "softmax_gpu"} == {"not_implemented"}

    calls = []

    def fake_ce(x, t):
        calls.append(x.shape)
        return torch.nn.functional.cross_entropy(x, t)

    monkeypatch.setattr(softmax_gpu, "cross_entropy", fake_ce, raising=False)
    rows = _run(make_providers(["softmax_gpu"]), op_names=("ce_fwd", "ce_fwd_bwd"))
    ours = [r for r in rows if r["provider"] == "softmax_gpu"]
    assert [r["status"] for r in ours] == ["ok", "ok"] and all(r["correct"] for r in ours)
    assert calls and calls[0] == (8, 64)


def test_linear_ce_sweep_floor_ratio_and_unchecked_floor():
    """The linear op's rows: the GEMM floor is timed, not checked, and every
    row's vs_floor is its time over the floor's; a wrong provider is flagged."""
    class WrongLinear(Provider):
        name = "wrong_linear"

        def function(self, family):
            return lambda x, w, t: torch.nn.functional.cross_entropy(x @ w.T, t.flip(0))

    cfg = sweep.SweepConfig(device="cpu", ops=[ops.OPS["linear_ce_fwd_bwd"]],
                            providers=make_providers(["torch", "gemm_floor", "softmax_gpu"])
                            + [WrongLinear()], dtypes=[torch.float32], ns=(48,), m=8, rep_ms=1,
                            copy_bytes=1 << 16)
    rows = sweep.run_sweep(cfg, _info(), progress=False, log=lambda s: None)
    by = {r["provider"]: r for r in rows if r["op"] == "linear_ce_fwd_bwd"}
    assert {r["status"] for n, r in by.items() if n != "wrong_linear"} == {"ok"}
    assert by["wrong_linear"]["status"] == "wrong"
    assert by["gemm_floor"]["correct"] == "" and "WRONG" not in by["gemm_floor"]["note"]
    assert by["gemm_floor"]["vs_floor"] == pytest.approx(1.0)
    for name in ("torch", "softmax_gpu"):
        r = by[name]
        assert r["correct"] is True and (r["M"], r["N"], r["D"]) == (8, 48, 4096)
        assert r["vs_floor"] == pytest.approx(r["ms"] / by["gemm_floor"]["ms"])
    assert by["wrong_linear"]["correct"] is False
    assert math.isnan(by["wrong_linear"]["vs_floor"])
    for name in ("torch", "softmax_gpu", "wrong_linear"):
        assert all(math.isfinite(by[name][c]) for c in ("dx_rel_err", "dw_rel_err", "loss_rel_err"))
    assert math.isnan(by["gemm_floor"]["dw_rel_err"])
    md = report.summary_markdown(rows, _info())
    assert "x floor" in md and "Hidden size D = 4096" in md and "dW " in md


def test_csv_refuses_mixed_devices_and_stems_do_not_collide(tmp_path):
    info = _info()
    rows = _run(make_providers(["torch"]), op_names=("softmax_fwd",))
    stem = report.output_stem(str(tmp_path), info)
    assert stem == "cpu_2026-01-02"
    report.write_csv(rows, str(tmp_path / f"{stem}.csv"))
    assert report.output_stem(str(tmp_path), info) == "cpu_2026-01-02_run2"
    rows[-1] = dict(rows[-1], device="other gpu")
    with pytest.raises(ValueError, match="mix devices"):
        report.write_csv(rows, str(tmp_path / "mixed.csv"))


def test_help_explains_the_flags():
    from perf.cli import build_parser

    text = build_parser().format_help()
    for flag in ("--quick", "--ops", "--providers", "--dtypes", "--out", "--unavailable", "--device"):
        assert flag in text
    assert "copy bandwidth" in text and "meaningless" in text


# --- the CPU quick run end to end -------------------------------------------------


def test_quick_run_on_cpu_end_to_end(tmp_path):
    out = tmp_path / "results"
    envv = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "perf", "--quick", "--device", "cpu", "--out", str(out), "--no-progress",
           "--providers", "softmax_gpu,torch,torch_compile,cudnn,liger,quack", "--unavailable", "quack"]
    proc = subprocess.run(cmd, cwd=ROOT, env=envv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MEANINGLESS" in proc.stdout

    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1 and csvs[0].name.startswith("cpu_")
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        rows = list(reader)
    assert set(REQUIRED_COLUMNS) <= set(columns)
    assert {"status", "note", "correct"} <= set(columns)
    assert len({r["device"] for r in rows}) == 1

    def rows_of(provider, op=None):
        return [r for r in rows if r["provider"] == provider and (op is None or r["op"] == op)]

    for provider in ("softmax_gpu", "torch"):
        for op in ("softmax_fwd", "softmax_fwd_bwd", "log_softmax_fwd"):
            got = rows_of(provider, op)
            assert {(r["dtype"], r["M"], r["N"]) for r in got} == {
                (d, "64", n) for d in ("fp32", "bf16") for n in ("256", "1024")}
            for r in got:
                assert r["status"] == "ok" and r["correct"] == "True", r
                assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["frac_copy_bw"]) > 0
                assert float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"])
    for r in rows_of("torch", "ce_fwd_bwd"):
        assert r["status"] == "ok" and r["correct"] == "True"
    ce_status = {r["status"] for r in rows_of("softmax_gpu") if r["op"].startswith("ce_")}
    import softmax_gpu

    assert ce_status == ({"ok"} if hasattr(softmax_gpu, "cross_entropy") else {"not_implemented"})
    for provider, why in (("quack", "forced unavailable"), ("cudnn", "needs CUDA"),
                          ("torch_compile", "--quick"), ("liger", "")):
        got = rows_of(provider)
        assert got and {r["status"] for r in got} == {"skipped"}, provider
        assert all(why in r["note"] for r in got)
    copy = [r for r in rows if r["op"] == "copy"]
    assert len(copy) == 1 and float(copy[0]["gbps"]) > 0

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(ops.OPS) * 2  # one per op and dtype
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))
    summaries = list(out.glob("*_summary.md"))
    assert len(summaries) == 1
    text = summaries[0].read_text()
    assert "MEANINGLESS" in text and "## softmax_fwd" in text and "skip" in text


def test_host_cost_table(tmp_path):
    """python -m perf.host: every public call timed beside torch's, with our
    kernels stubbed out (restored afterwards), written to a long-format CSV."""
    from perf import host
    from perf.report import read_csv

    import softmax_gpu
    from softmax_gpu.kernels import cross_entropy as kce

    real = kce.ce_class_single_kernel
    # the launch rows too (on CUDA they are the default): the real calls,
    # backward nodes included, after the stubbed ones
    assert host.main(["--device", "cpu", "--out", str(tmp_path), "--quick", "--launch"]) == 0
    assert kce.ce_class_single_kernel is real
    (path,) = tmp_path.glob("*_host.csv")
    rows = read_csv(str(path))
    calls = {r["op"] for r in rows}
    for call in ("softmax fwd", "log_softmax fwd+bwd", "cross_entropy fwd+grad",
                 "cross_entropy_with_grad", "CrossEntropyLoss module fwd+grad",
                 "linear_cross_entropy fwd+bwd", "vocab_parallel_ce fwd+bwd"):
        assert f"host:{call}" in calls
    import torch.distributed as dist

    assert not dist.is_initialized()  # the one-rank group it made is gone
    assert {r["provider"] for r in rows} == {"softmax_gpu", "torch", "softmax_gpu+launch"}
    assert {r["op"] for r in rows if r["provider"] == "softmax_gpu+launch"} == calls
    assert all(float(r["ms"]) > 0 for r in rows)
    # the kernels are back: a real call still computes
    x = torch.randn(3, 5)
    assert torch.allclose(softmax_gpu.softmax(x, -1), torch.softmax(x, -1), atol=1e-6)
    h = torch.randn(8, 16, requires_grad=True)  # the shape and grad mode host.py timed
    w, t = torch.randn(64, 16, requires_grad=True), torch.randint(0, 64, (8,))
    assert torch.allclose(softmax_gpu.linear_cross_entropy(h, w, t),
                          torch.nn.functional.cross_entropy(h @ w.T, t), atol=1e-5)


def test_summary_flags_implausible_results(tmp_path):
    """Under 5% of copy, or over 3x away from the same provider's previous
    run of the same kind on the same GPU: marked in the table and listed."""
    import dataclasses as dc

    info = dc.replace(env.run_info("cpu"), device="cuda", interpreted=False,
                      device_name="Fake GPU", device_slug="fake-gpu", date="2026-12-05")

    def row(provider, frac, ms, op="softmax_fwd"):
        return dict(op=op, provider=provider, dtype="bf16", M=64, N=4096, status="ok",
                    frac_copy_bw=frac, gbps=frac * 4000, ms=ms, correct=True, note="",
                    speedup_vs_torch=math.nan, vs_floor=math.nan, D="", shape_kind="grid")

    copy = dict(row("torch", 1.0, 0.1), op="copy", note="")
    rows = [copy, row("softmax_gpu", 0.9, 1.0), row("torch", 0.5, 2.0), row("cudnn", 0.01, 90.0)]
    old = tmp_path / "fake-gpu" / "2026-12-04"
    old.mkdir(parents=True)
    report.write_csv([dict(r, device="Fake GPU", ms=ms) for r, ms in
                      zip(rows, (0.1, 0.9, 7.0, 80.0))], str(old / "fake-gpu_2026-12-04.csv"))
    report.write_csv([dict(r, device="Fake GPU") for r in rows],
                     str(old / "fake-gpu_2026-12-04_linear.csv"))  # another kind: not compared
    prev = report.previous_run(str(tmp_path), "fake-gpu", "")
    assert prev[0].endswith("fake-gpu_2026-12-04.csv")
    flags = report.implausible(rows, prev)
    assert set(flags) == {("softmax_fwd", "cudnn", "bf16", 64, 4096, ""),
                          ("softmax_fwd", "torch", "bf16", 64, 4096, "")}
    assert "1.0% of the copy bandwidth" in flags[("softmax_fwd", "cudnn", "bf16", 64, 4096, "")]
    assert "0.29x its time" in flags[("softmax_fwd", "torch", "bf16", 64, 4096, "")]
    md = report.summary_markdown(rows, info, previous=prev)
    assert "## Implausible results" in md and md.count("**IMPLAUSIBLE**") == 2
    # heads of one vocabulary and token count are told apart by D: each is
    # compared with its own previous time (over 3x apart here)
    lin = [copy] + [dict(row("softmax_gpu", math.nan, ms, op="linear_ce_fwd_bwd"), D=d,
                         vs_floor=1.1) for d, ms in ((4096, 20.0), (8192, 70.0))]
    old_lin = tmp_path / "lin" / "fake-gpu" / "2026-12-04"
    old_lin.mkdir(parents=True)
    report.write_csv([dict(r, device="Fake GPU") for r in lin],
                     str(old_lin / "fake-gpu_2026-12-04_linear.csv"))
    prev_lin = report.previous_run(str(tmp_path / "lin"), "fake-gpu", "linear")
    assert prev_lin is not None and report.implausible(lin, prev_lin) == {}
    slow = [lin[0], lin[1], dict(lin[2], ms=300.0)]
    assert set(report.implausible(slow, prev_lin)) == {
        ("linear_ce_fwd_bwd", "softmax_gpu", "bf16", 64, 4096, 8192)}
    # a CPU run's timings are meaningless: nothing is flagged
    assert "IMPLAUSIBLE" not in report.summary_markdown(rows, env.run_info("cpu"), previous=prev)


def test_gpu_checks_lean_autocast_compares_with_float64(monkeypatch):
    """gpu_checks' fp32-head autocast check (CPU: the comparisons only):
    "lean" and the default plan against float64 pass, and a wrong dX on the
    sliced path fails it."""
    import importlib

    from perf import gpu_checks

    res = gpu_checks.Results()
    gpu_checks._lean_autocast_check(res, "cpu", gpu_checks.CPU_LEAN)
    assert res.ok and len(res.items) == 1, res.table()
    lce = importlib.import_module("softmax_gpu.linear_cross_entropy")
    sliced = lce._input_grad_sliced
    monkeypatch.setattr(lce, "_input_grad_sliced",
                        lambda g, w, out, gemm: (sliced(g, w, out, gemm), out.mul_(1.05)))
    res = gpu_checks.Results()
    gpu_checks._lean_autocast_check(res, "cpu", gpu_checks.CPU_LEAN)
    assert res.items[0][1] is False, res.table()


def test_profile_merges_ncu_counters_with_the_cases(tmp_path):
    """perf.profile: each profiled launch (ncu's raw CSV, one line per
    metric, after its banner) beside the case and plan that launched it,
    DRAM bytes over the op's minimal bytes."""
    from perf import profile

    manifest = tmp_path / "m.csv"
    manifest.write_text("case,op,M,N,plan,fields,kernel,min_bytes\n"
                        "ce_fwd_bwd 8x16,ce_fwd_bwd,8,16,default,{},ce_class_single_kernel,1000\n"
                        'ce_fwd_bwd 8x16,ce_fwd_bwd,8,16,tuned,"{""ce_single_ept"": 32}",'
                        "ce_class_single_kernel,1000\n")
    lines = ["==PROF== Connected to process 1", '"ID","Kernel Name","Metric Name","Metric Value"']
    for i, (read, hit) in enumerate(((3000, 10.0), (1500, 55.5))):
        for metric, value in (("dram__bytes_read.sum", read), ("dram__bytes_write.sum", 500),
                              ("lts__t_sector_hit_rate.pct", hit),
                              ("sm__warps_active.avg.pct_of_peak_sustained_active", 80),
                              ("launch__registers_per_thread", 32),
                              ("gpu__time_duration.sum", "1,234")):
            lines.append(f'"{i}","ce_class_single_kernel","{metric}","{value}"')
    raw = tmp_path / "raw.csv"
    raw.write_text("\n".join(lines) + "\n")
    rows = profile.merge(str(manifest), str(raw), env.run_info("cpu"))
    assert [r["plan"] for r in rows] == ["default", "tuned"]
    assert rows[0]["dram_over_min"] == pytest.approx(3.5) and rows[1]["dram_over_min"] == 2.0
    assert rows[1]["l2_hit_pct"] == 55.5 and rows[0]["duration_ns"] == 1234.0
    assert rows[1]["kernel"] == "ce_class_single_kernel"
    # ncu's scaled units (its default) are converted to bytes and ns; an
    # unknown unit gives NaN, never a number off by a power of ten
    lines = ['"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for metric, unit, value in (("dram__bytes_read.sum", "Kbyte", "3"),
                                ("dram__bytes_write.sum", "byte", "500"),
                                ("lts__t_sector_hit_rate.pct", "%", "10"),
                                ("gpu__time_duration.sum", "usecond", "1.5"),
                                ("launch__registers_per_thread", "furlong", "32")):
        lines.append(f'"0","ce_class_single_kernel","{metric}","{unit}","{value}"')
    raw.write_text("\n".join(lines) + "\n")
    rows = profile.merge(str(manifest), str(raw), env.run_info("cpu"))
    assert rows[0]["dram_over_min"] == pytest.approx(3.5)
    assert rows[0]["duration_ns"] == pytest.approx(1500.0) and rows[0]["l2_hit_pct"] == 10.0
    assert math.isnan(rows[0]["registers"])
    # a call of two launches: each launch's share, and the call's sum
    manifest.write_text("case,op,M,N,plan,fields,kernel,min_bytes\n"
                        "ce 8x16,ce_fwd_bwd,8,16,default,{},ce_class_single_kernel,1000\n"
                        "ce 8x16,ce_fwd_bwd,8,16,default,{},ce_grad_scale_kernel,1000\n")
    lines = ['"ID","Kernel Name","Metric Name","Metric Value"']
    for i, (kernel, read) in enumerate((("ce_class_single_kernel", 400),
                                        ("ce_grad_scale_kernel", 600))):
        for metric, value in (("dram__bytes_read.sum", read), ("dram__bytes_write.sum", 100)):
            lines.append(f'"{i}","{kernel}","{metric}","{value}"')
    raw.write_text("\n".join(lines) + "\n")
    rows = profile.merge(str(manifest), str(raw), env.run_info("cpu"))
    assert [r["dram_over_min"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.7)]
    assert all(r["call_dram_over_min"] == pytest.approx(1.2) for r in rows)
    # no GPU here: the command says so and writes nothing
    assert profile.main(["--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_profile_runs_each_case_in_its_own_ncu_process(tmp_path, monkeypatch):
    """perf.profile on a GPU (ncu and the cases stubbed): one ncu process
    per case, most important first; the CSV written again after each case; a
    case whose process fails leaves the others; no case starts that would
    end past --time-budget-s; ns/us units read; each distinct plan once."""
    import subprocess as sp

    import torch

    from perf import profile

    clock = [0.0]
    calls = []

    def fake_run(cmd, *a, **k):
        i = int(cmd[cmd.index("--case") + 1])
        calls.append(i)
        clock[0] += 10.0
        if profile.CASES[i][3] == 128256:  # the second case faults
            return sp.CompletedProcess(cmd, 3)
        name, _, M, N = profile.CASES[i]
        manifest = cmd[cmd.index("--manifest") + 1]
        with open(manifest, "w") as f:
            f.write("case,op,M,N,plan,fields,launch_plan,kernel,min_bytes\n"
                    f"{name} {M}x{N},{name},{M},{N},installed,{{}},path=single,k_{i},1000\n")
        raw = cmd[cmd.index("--log-file") + 1]
        with open(raw, "w") as f:
            f.write('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
                    f'"0","k_{i}","dram__bytes_read.sum","b","1500"\n'
                    f'"0","k_{i}","dram__bytes_write.sum","kb","0.5"\n'
                    f'"0","k_{i}","gpu__time_duration.sum","us","2"\n')
        return sp.CompletedProcess(cmd, 0)

    cpu_info = env.run_info("cpu")
    monkeypatch.setattr(profile.subprocess, "run", fake_run)
    monkeypatch.setattr(profile.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(profile, "_ncu", lambda: "ncu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "run_info", lambda device: cpu_info)
    out = tmp_path / "out"
    assert profile.main(["--out", str(out), "--time-budget-s", "35"]) == 0
    assert calls == [0, 1, 2]  # a fourth would end at 40 s, past 35
    (csv_path,) = out.glob("*_profile.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["kernel"] for r in rows] == ["k_0", "k_2"]
    assert float(rows[0]["dram_over_min"]) == 2.0 and float(rows[0]["duration_ns"]) == 2000.0
    assert [p.name for p in out.iterdir()] == [csv_path.name]  # the per-case files elsewhere
    # every case failing: the run fails
    monkeypatch.setattr(profile, "CASES", profile.CASES[1:2])
    assert profile.main(["--out", str(tmp_path / "bad")]) == 3


def test_profile_plans_each_distinct_plan_once(tmp_path):
    """The installed plan, the defaults and the tuned table's, each distinct
    launch plan once (no table installed here: installed is the default)."""
    import json

    from perf import profile
    from softmax_gpu import heuristics

    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"ops": {"cross_entropy": {"2": [
        {"n": 65536, "limits": {"long_path": "looped"}}]}}}))
    cpu = torch.device("cpu")
    with heuristics.override(sm_count=132):
        got = profile._variants("cross_entropy", 16384, 128256, str(table), cpu)
        assert [(n, f) for n, f, _ in got] == [("installed", None), ("tuned", {"long_path": "looped"})]
        assert "path=looped" in got[1][2] and got[0][2] != got[1][2]
        only = profile._variants("cross_entropy", 16384, 128256, None, cpu)
    assert [n for n, _, _ in only] == ["installed"]


def test_plots_skip_a_case_with_nothing_measured(tmp_path):
    """A run cut short can leave a case whose every row was skipped: its plot
    is left out, where matplotlib's log axis used to raise and lose the
    other plots (seen on a dry run of the device check's linear step)."""
    pytest.importorskip("matplotlib")
    info = env.run_info("cpu")
    base = dict(correct=True, shape_kind="llm", note="", gbps=1.0, vs_floor=1.1)
    rows = [dict(_row("copy", "torch", 1.0, M=256, N=16384), shape_kind="roofline",
                 gbps=10.0, note="", correct=None),
            dict(_row("linear_ce_fwd_bwd", "gemm_floor", 1.0, dtype="fp32", N=256), **base),
            dict(_row("linear_ce_fwd_bwd", "softmax_gpu", 1.1, dtype="fp32", N=256), **base),
            dict(_row("linear_ce_fwd_bwd", "softmax_gpu", math.nan, status="skipped",
                      dtype="bf16", N=256), **base)]
    paths = report.plot_all(rows, str(tmp_path), "run", info)
    assert [os.path.basename(p) for p in paths] == ["run_linear_ce_fwd_bwd_fp32.png"]


def test_inplace_check_finds_a_target_logit_read_after_the_gradient(monkeypatch):
    """The GPU script's in-place check, at its CPU size: every plan passes, and
    a call that writes the gradient over the logits and then takes a row's
    loss from what is there (a lost race: the target logit read after another
    warp's store) fails on every plan, naming the losses."""
    import softmax_gpu
    from perf import gpu_checks

    case = [(torch.bfloat16, 6, 300)]
    res = gpu_checks.Results()
    gpu_checks._inplace_check(res, "cpu", case, repeats=2)
    assert res.ok and len(res.items) == 3, res.table()
    real = softmax_gpu.cross_entropy

    def lost_race(x, t, **kw):
        loss, lse = real(x, t, **kw)
        if kw.get("inplace_backward"):  # x holds the gradient now
            zt = x.detach().gather(1, t[:, None])[:, 0].float()
            loss = loss + (loss.detach() - (lse.detach() - zt))
        return loss, lse

    monkeypatch.setattr(softmax_gpu, "cross_entropy", lost_race)
    res = gpu_checks.Results()
    gpu_checks._inplace_check(res, "cpu", case, repeats=2)
    assert len(res.items) == 3, res.table()
    for name, ok, detail in res.items:
        assert ok is False and "run 1: elements differing from out of place: losses 6" in detail, \
            res.table()
