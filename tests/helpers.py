"""Helpers shared by the test modules: the device, fresh random inputs,
float64 references and per-dtype tolerances, and path forcing."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

import softmax_gpu
from softmax_gpu import heuristics

DEVICE = (
    "cuda"
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    else "cpu"
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (atol, rtol) against a float64 reference. bf16 allows a full ulp (2^-7)
# because Triton's interpreter truncates fp32 -> bf16 instead of rounding to
# nearest (the GPU rounds); fp16 likewise gets one ulp (2^-10).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-3, 1.6e-2),
}


# Forced long-row candidates (Limits fields the tuner can pick) at
# interpreter sizes: rows longer than 64 leave the on-chip path; 16-wide
# tiles; 2 SMs. LONG_KERNEL: the kernel family each one launches.
LONG = {
    "looped": dict(max_single=64, tile=16, sm_count=2, long_path="looped"),
    "persistent": dict(max_single=64, tile=16, sm_count=2, long_path="persistent",
                       programs_per_sm=1),
    "coop": dict(max_single=64, tile=16, sm_count=2, long_path="coop", programs_per_sm=1,
                 coop_splits=3),
    "coop-lag": dict(max_single=64, tile=16, sm_count=2, long_path="coop", programs_per_sm=2,
                     coop_splits=5, evict=False),
    # tile loops pipelined (a no-op in the interpreter; compiled on CUDA)
    "looped-stages": dict(max_single=64, tile=16, sm_count=2, long_path="looped", long_stages=2),
    "coop-stages": dict(max_single=64, tile=16, sm_count=2, long_path="coop", programs_per_sm=1,
                        coop_splits=3, long_stages=3),
    # chunks of 32 columns in registers, one program each (4 to 7 per row here;
    # in the interpreter every chunk but a row's last gives up waiting, and the
    # last arrival reads them again)
    "resident": dict(max_single=64, tile=16, sm_count=2, long_path="resident", resident_chunk=32),
}
LONG_KERNEL = {"looped": "looped", "persistent": "looped", "coop": "coop", "coop-lag": "coop",
               "looped-stages": "looped", "coop-stages": "coop", "resident": "resident"}


def long_kernel(candidate: str, dtype: torch.dtype) -> str:
    """The kernel family a forced long-row candidate launches for ``dtype``:
    LONG_KERNEL's, but fp64 has no resident kernel (its chunks spill) and
    walks each row in one program."""
    if candidate == "resident" and dtype == torch.float64:
        return "looped"
    return LONG_KERNEL[candidate]


def ce_reference(z, target, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None):
    """float64 cross-entropy of the logits ``z`` (classes on dim 1, or dim 0
    for one unbatched row), as the library defines it: ``F.cross_entropy`` of
    the softcapped logits ``softcap * tanh(z / softcap)`` (no cap when
    ``softcap`` is None or 0), plus the z-loss ``z_loss * lse^2`` per kept row
    (rows whose class target is not ``ignore_index``; every row for
    probability targets), reduced like the loss without class weights
    ("mean": over the kept rows). Returns ``(loss, lse)``, lse of the capped
    logits, both differentiable in ``z``."""
    z = z.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    prob = target.is_floating_point()
    t = target.double() if prob else target.long()
    w = weight.double() if weight is not None else None
    loss = F.cross_entropy(z, t, w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1 if z.dim() > 1 else 0)
    if z_loss:
        kept = torch.ones_like(lse) if prob else (t != ignore_index).double()
        zl = z_loss * lse * lse * kept
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / kept.sum()}[reduction]
    return loss, lse


def rand(*shape, dtype=torch.float32, scale=3.0, device=DEVICE, generator=None):
    """Fresh normal inputs (never zeros), scaled so the softmax is not flat."""
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(
        device=device, dtype=dtype
    )


def assert_close(out, ref, dtype=None, scale=None):
    """``out`` against the float64 ``ref`` with ``dtype``'s tolerance.

    ``scale`` multiplies the absolute tolerance (for values whose size is not
    O(1), such as gradients).
    """
    dtype = dtype or out.dtype
    atol, rtol = TOL[dtype]
    if scale is None:
        scale = max(1.0, float(ref.abs().nan_to_num(0.0).max())) if ref.numel() else 1.0
    assert out.shape == ref.shape, (out.shape, ref.shape)
    torch.testing.assert_close(
        out.double().cpu(), ref.double().cpu(), atol=atol * scale, rtol=rtol, equal_nan=True
    )


# Forced launch parameters so every path runs at interpreter-sized shapes.
# max_single=64: rows longer than 64 leave the on-chip path; tile=16: the
# looped and split paths take several tiles; the long path is pinned (split:
# so many split programs per SM that any row count splits, into at most 3
# programs a row, which keeps the interpreter's work small), whatever the rows.
PATHS = {
    "single": dict(),
    "looped": dict(max_single=64, tile=16, sm_count=2, long_path="looped"),
    "split": dict(max_single=64, tile=16, sm_count=2, long_path="split",
                  split_programs_per_sm=1 << 20, max_splits=3),
}
# The kernel families a launch's name tells apart.
FAMILIES = ("single", "looped", "split", "coop", "resident")


def path_rows(path: str) -> int:
    """A row count that makes ``path`` the heuristics' choice under PATHS[path]."""
    return {"single": 5, "looped": 9, "split": 3}[path]


@contextlib.contextmanager
def forced(path: str):
    """PATHS[path] in force; fails when the block launched kernels of other
    families only (rows too short for a long path, say), so that a test
    named after a path runs it."""
    with heuristics.override(**PATHS[path]), softmax_gpu.record_launches() as names:
        yield
    ran = {f for name in names for f in FAMILIES if f"_{f}" in name}
    assert not ran or path in ran, f"forced({path!r}) launched {sorted(ran)} only: {names}"


@contextlib.contextmanager
def expect_launches(*prefixes: str):
    """Fail unless the block launched Triton kernels whose names start with
    each of ``prefixes`` in order (so a silent fallback to torch fails)."""
    with softmax_gpu.record_launches() as names:
        yield names
    assert len(names) == len(prefixes), names
    for name, prefix in zip(names, prefixes):
        assert name.startswith(prefix), (names, prefixes)


def assert_not_twice_differentiable(f, inputs) -> None:
    """Differentiating the gradient of the scalar ``f(*inputs)`` raises the
    library's "not differentiable" error whichever way it is asked:
    ``backward()`` of a gradient penalty, ``autograd.grad`` of it with
    respect to the inputs (allow_unused=True: an input found unused would
    give None, a silently dropped term), and ``autograd.functional.hvp``
    (which gives zeros for an input found unused)."""
    import pytest

    for how in ("backward", "grad", "hvp"):
        with pytest.raises(RuntimeError, match="this gradient is not differentiable"):
            if how == "hvp":
                torch.autograd.functional.hvp(
                    f, tuple(i.detach() for i in inputs),
                    tuple(torch.ones_like(i) for i in inputs))
                continue
            grads = torch.autograd.grad(f(*inputs), inputs, create_graph=True)
            penalty = sum((g.float() ** 2).sum() for g in grads)
            if how == "backward":
                penalty.backward()
            else:
                torch.autograd.grad(penalty, inputs, allow_unused=True)


def run_python(code: str, timeout: float = 600.0) -> str:
    """Run ``code`` in a fresh interpreter with this test run's environment
    (TRITON_INTERPRET included) and return its stdout; fail with its output if
    it exits non-zero or dies by a signal (a 32-bit offset overflow shows as a
    segfault in Triton's interpreter)."""
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(__file__)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, (
        f"subprocess exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc.stdout


# --- process groups (tests/test_distributed.py) --------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_group(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, interpret, *args)`` in ``world_size`` fresh
    processes (torch.multiprocessing, spawn start method).

    ``interpret`` says whether this process runs the kernels in Triton's
    interpreter: the child must then set ``TRITON_INTERPRET=1`` before it
    imports softmax_gpu, so ``fn`` must live in a module that does not import
    softmax_gpu (or this module) at import time. A failure in any rank raises
    here with that rank's traceback, after the other ranks are terminated.
    """
    import torch.multiprocessing as mp

    from softmax_gpu._dispatch import interpreted

    mp.spawn(fn, args=(world_size, free_port(), interpreted(), *args), nprocs=world_size,
             join=True)


class Logged(torch.Tensor):
    """A Tensor subclass with torch's default ``__torch_function__`` that
    records every function it is handed, as a tensor-subclass library sees
    them (``Logged.seen``)."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def fx_functions(module: torch.nn.Module, *args) -> list:
    """The functions ``torch.fx.symbolic_trace(module)`` records, in order,
    after checking that the traced module gives ``module``'s result on
    ``args``, bit for bit."""
    gm = torch.fx.symbolic_trace(module)
    got, want = gm(*args), module(*args)
    assert torch.equal(got, want), (got, want)
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]
