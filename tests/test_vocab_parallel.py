"""softmax_gpu.distributed: vocab_parallel_cross_entropy and
vocab_parallel_linear_cross_entropy.

Multi-rank tests spawn 2 and 3 processes (torch.multiprocessing, gloo on
127.0.0.1, CPU tensors). Each world size is one spawned group that runs every
case in turn (spawning costs seconds; a case costs milliseconds). Each rank
builds the full problem from a shared seed, takes its shard, and compares the
loss, the returned lse and its shard's gradients against single-process
float64 torch on the full problem: ``F.cross_entropy`` (class weights, label
smoothing) of the softcapped logits, plus z * lse^2 over the non-ignored rows
(for the mean divided by their number); for the linear version the logits are
``F.linear`` of the full weight and bias. Every rank must also return the same
loss and lse, bit for bit.

Where the parent runs the kernels in Triton's interpreter (no GPU) the children
do too: they set TRITON_INTERPRET=1 before importing softmax_gpu, which is
why this module imports neither softmax_gpu nor helpers at import time (a
spawned child imports it to find its worker). On a GPU machine the gloo
children take the torch path, and the kernels are tested on CUDA by the
in-process shard tests and by a world-size-1 NCCL group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F

# --- the cases --------------------------------------------------------------

F16, F32, F64, BF16 = torch.float16, torch.float32, torch.float64, torch.bfloat16

# vocab_parallel_cross_entropy. Keys: widths (per rank), shape (target shape;
# logits add the vocabulary dim), dtype, reduction, eps (label smoothing), z
# (z-loss), cap (softcap), weight (class weights), lse (return_lse, with a
# gradient), inplace (inplace_backward), loss_dtype, scale (the logits are
# multiplied by it before the call: a non-leaf input), mag (logit size),
# ignore (flat rows set to ignore_index, or "all"), ignore_index, targets_on
# (ranks whose columns hold the targets; default all), layout (contiguous /
# padded / transposed), path (None: default heuristics; "looped": shards wider
# than 16 loop over 16-wide tiles), shift (far-apart maxima across ranks),
# neg_inf (-inf columns and an all -inf shard row), vocab_size (passed through).
WORLD2 = [
    dict(widths=(13, 24), shape=(6,), dtype=F32, reduction="mean", ignore=(1, 4)),
    dict(widths=(13, 24), shape=(6,), dtype=F32, reduction="sum", eps=0.1, path="looped",
         shift=True),
    dict(widths=(13, 24), shape=(2, 3), dtype=BF16, reduction="none", eps=0.2, z=1e-3,
         layout="padded", ignore=(2,)),
    dict(widths=(13, 24), shape=(5,), dtype=F64, reduction="mean", eps=0.1, z=1e-2,
         targets_on=(0,), layout="transposed", ignore=(0,)),
    dict(widths=(13, 24), shape=(4,), dtype=F32, reduction="mean", ignore="all"),
    dict(widths=(13, 24), shape=(6,), dtype=F64, reduction="mean", weight=True, eps=0.1,
         cap=5.0, lse=True, ignore=(1,)),
    dict(widths=(13, 24), shape=(2, 3), dtype=F64, reduction="none", weight=True, z=1e-2,
         cap=3.0, lse=True, inplace=True, path="looped", layout="padded", ignore=(4,)),
    dict(widths=(13, 24), shape=(5,), dtype=F32, reduction="sum", weight=True, eps=0.3,
         inplace=True, loss_dtype=F64, shift=True),
    dict(widths=(13, 24), shape=(5,), dtype=BF16, reduction="mean", cap=2.0, inplace=True,
         lse=True, loss_dtype=F32, path="looped"),
    dict(widths=(13, 24), shape=(4,), dtype=F64, reduction="mean", weight=True, eps=0.1,
         lse=True, ignore="all"),
]

# Ports flash-attention's tests/losses/test_cross_entropy_parallel.py
# (test_cross_entropy_loss_parallel): two ranks, even shards, logits x 10,
# some rows ignored, reduction "none" with a random grad_output, fp32 losses
# (loss_dtype), over dtype x label smoothing {0, 0.9} x logit scale {1, 0.7}
# (applied before our call: it has no logit_scale; softcap is ours) x
# inplace_backward, with lse_square_scale 1e-2 (our z_loss). Its
# precompute_lse (an lse passed in, only without smoothing and scale) maps to
# our return_lse, checked against torch.logsumexp with a gradient, on the same
# cases. (vocab_size: rank 1's width is 24 in WORLD2 too; see clear_width_cache.)
FLASH_PARALLEL_CE = [
    dict(widths=(24, 24), shape=(16,), dtype=dtype, reduction="none", eps=eps, scale=scale,
         z=1e-2, inplace=inplace, lse=(eps == 0.0 and scale == 1.0), loss_dtype=F32, mag=10.0,
         ignore=(2, 9, 13), vocab_size=48)
    for dtype in (F16, F32, BF16) for eps in (0.0, 0.9) for scale in (1.0, 0.7)
    for inplace in (False, True)
]

WORLD3 = [
    dict(widths=(7, 19, 12), shape=(7,), dtype=F32, reduction="mean", ignore=(3,),
         targets_on=(0, 2), path="looped", shift=True, z=1e-2),
    dict(widths=(11, 0, 29), shape=(5,), dtype=BF16, reduction="sum", eps=0.1, targets_on=(2,)),
    dict(widths=(11, 0, 29), shape=(6,), dtype=F32, reduction="none", z=1e-2, neg_inf=True,
         ignore_index=3, ignore=(0, 5)),
    dict(widths=(7, 19, 12), shape=(2, 2), dtype=F64, reduction="mean", eps=0.05, z=1e-3,
         vocab_size=38, path="looped"),
    dict(widths=(11, 0, 29), shape=(6,), dtype=F64, reduction="mean", weight=True, eps=0.2,
         z=1e-2, cap=4.0, lse=True, inplace=True, ignore=(2,)),
    dict(widths=(7, 19, 12), shape=(5,), dtype=F32, reduction="none", weight=True, eps=0.1,
         cap=6.0, lse=True, path="looped", layout="transposed", targets_on=(1,)),
]

# vocab_parallel_linear_cross_entropy: the keys above (no layout / inplace /
# scale / neg_inf), plus n (tokens), chunk (chunk_size; None: planned), bias,
# nograd (under torch.no_grad: the loss alone), sizes (no tensor made in the
# forward and backward is as large as this rank's [N, V_r] logits). D = 8.
LINEAR2 = [
    dict(widths=(13, 24), n=21, chunk=4, dtype=F64, reduction="mean", bias=True, ignore=(3,)),
    dict(widths=(13, 24), n=21, chunk=5, dtype=F64, reduction="sum", weight=True, eps=0.1,
         bias=True, path="looped"),
    dict(widths=(13, 24), n=21, chunk=4, dtype=F64, reduction="none", weight=True, eps=0.2,
         z=1e-2, cap=4.0, lse=True, bias=True, ignore=(0, 20), sizes=True),
    dict(widths=(13, 24), n=21, chunk=6, dtype=F64, reduction="mean", z=1e-2, cap=3.0,
         lse=True, shift=True, loss_dtype=F32),
    dict(widths=(13, 24), n=9, chunk=4, dtype=F32, reduction="mean", weight=True, eps=0.1,
         ignore="all"),
    dict(widths=(13, 24), n=17, chunk=8, dtype=BF16, reduction="sum", bias=True, eps=0.1),
    dict(widths=(13, 24), n=10, chunk=3, dtype=F64, reduction="none", weight=True, cap=2.0,
         nograd=True),
    dict(widths=(13, 24), n=10, chunk=3, dtype=F64, reduction="mean", lse=True, nograd=True),
]

LINEAR3 = [
    dict(widths=(11, 0, 29), n=13, chunk=4, dtype=F64, reduction="mean", weight=True, eps=0.2,
         z=1e-2, cap=4.0, lse=True, bias=True, ignore=(5,)),
    dict(widths=(7, 19, 12), n=11, chunk=3, dtype=F64, reduction="none", ignore=(1,),
         path="looped", shift=True, bias=True),
    dict(widths=(7, 19, 12), n=12, chunk=None, dtype=F32, reduction="sum", lse=True,
         targets_on=(0,)),
]

# One rank: the cases above with the whole vocabulary on it (no collective runs).
def _one_rank(c: dict) -> dict:
    return {k: v for k, v in c.items() if k != "targets_on"} | {"widths": (sum(c["widths"]),)}


WORLD1 = [_one_rank(c) for c in WORLD2 + WORLD3 if not c.get("neg_inf")]
LINEAR1 = [_one_rank(c) for c in LINEAR2 + LINEAR3]

LOOPED = dict(max_single=16, tile=16, sm_count=2)


def _class_weights(V: int) -> torch.Tensor:
    return torch.rand(V, generator=torch.Generator().manual_seed(99), dtype=torch.float64) + 0.5


def _targets(c: dict, shape, g: torch.Generator) -> torch.Tensor:
    """Targets on the allowed ranks' columns, with c's ignored rows."""
    widths = c["widths"]
    V = sum(widths)
    ignore_index = c.get("ignore_index", -100)
    owners = c.get("targets_on", range(len(widths)))
    allowed = torch.cat([torch.arange(sum(widths[:r]), sum(widths[:r + 1])) for r in owners])
    if ignore_index >= 0:
        allowed = allowed[allowed != ignore_index]
    if c.get("neg_inf"):
        allowed = allowed[allowed < V - 3]  # no target on a -inf column
    return allowed[torch.randint(len(allowed), shape, generator=g)]


def _ignore_rows(c: dict, target: torch.Tensor) -> None:
    ignore = c.get("ignore", ())
    flat = target.reshape(-1)
    flat[list(range(flat.numel())) if ignore == "all" else list(ignore)] = \
        c.get("ignore_index", -100)


def _make_case(c: dict, rank: int):
    """(full logits [..., V] in c's dtype, target, this rank's shard, its offset)."""
    widths = c["widths"]
    V, off, W = sum(widths), sum(widths[:rank]), widths[rank]
    shape, dtype = c["shape"], c["dtype"]
    g = torch.Generator().manual_seed(1234 + V + len(shape))
    full = torch.randn(*shape, V, generator=g, dtype=torch.float64) * c.get("mag", 3.0)
    if c.get("shift"):  # the last rank's maxima far above the others'; one row far below
        full[..., V - widths[-1]:] += 30.0
        full.reshape(-1, V)[0, :widths[0]] -= 200.0
    target = _targets(c, shape, g)
    if c.get("neg_inf"):  # -inf columns in the last shard; rank 0's shard of row 1 all -inf
        full[..., V - 3:] = -math.inf
        full.reshape(-1, V)[1, :widths[0]] = -math.inf
        allowed_last = torch.arange(V - widths[-1], V - 3)
        target.reshape(-1)[1] = allowed_last[0]
    _ignore_rows(c, target)
    full = full.to(dtype)
    shard = full[..., off:off + W]
    layout = c.get("layout", "contiguous")
    if layout == "padded":  # a view into a wider buffer: row stride W + 3
        buf = torch.full((*shape, W + 3), math.nan, dtype=dtype)
        buf[..., :W] = shard
        shard = buf[..., :W]
    elif layout == "transposed":  # columns contiguous: stride along the row is the row count
        shard = shard.t().contiguous().t()
    else:  # a copy: with one rank the shard is the whole of full, which inplace overwrites
        shard = shard.clone(memory_format=torch.contiguous_format)
    return full, target, shard, off


def _reference(z: torch.Tensor, target: torch.Tensor, c: dict):
    """float64 (loss, lse) of the full logits ``z`` [..., V] (differentiable;
    :func:`helpers.ce_reference` with the case's options)."""
    from helpers import ce_reference

    V = z.shape[-1]
    loss, lse = ce_reference(
        z.reshape(-1, V), target.reshape(-1), _class_weights(V) if c.get("weight") else None,
        ignore_index=c.get("ignore_index", -100), reduction=c["reduction"],
        label_smoothing=c.get("eps", 0.0), z_loss=c.get("z", 0.0), softcap=c.get("cap"))
    if c["reduction"] == "none":
        loss = loss.reshape(target.shape)
    return loss, lse.reshape(target.shape)


def _gout(c, target, dtype):
    """grad_output of the loss (random per row for "none") and of the lse."""
    g = torch.Generator().manual_seed(7)
    gl = torch.randn(target.shape, generator=g, dtype=torch.float64).float()
    if c["reduction"] == "none":
        return torch.randn(target.shape, generator=g, dtype=torch.float64).to(dtype), gl
    return torch.tensor(0.7, dtype=dtype), gl


def _extras(c: dict) -> bool:
    """Whether the case's options count as extras for the shard config."""
    return bool(c.get("cap") or (c.get("weight") and c.get("eps")))


def _same_on_every_rank(*tensors) -> None:
    """Every rank returned these tensors bit for bit."""
    import torch.distributed as dist

    for v in tensors:
        mine = v.detach().double().reshape(-1)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        for other in every:
            torch.testing.assert_close(other, mine, rtol=0, atol=0, equal_nan=True)


def _run_case(rank: int, c: dict, interpret: bool) -> None:
    from helpers import assert_close, expect_launches
    from softmax_gpu import heuristics
    from softmax_gpu.distributed import vocab_parallel_cross_entropy
    from softmax_gpu.vocab_parallel import shard_config

    full, target, shard, off = _make_case(c, rank)
    W, V, dtype = shard.shape[-1], full.shape[-1], c["dtype"]
    x = shard.detach().requires_grad_(True)
    before = x.detach().clone()
    scale = c.get("scale", 1.0)
    loss_dtype = c.get("loss_dtype")
    gout, gl = _gout(c, target, loss_dtype or dtype)
    looped = c.get("path") == "looped"
    override = heuristics.override(**LOOPED) if looped else contextlib.nullcontext()
    with override:
        if interpret:
            cfg = shard_config(target.numel(), W, x.element_size(), x.device, _extras(c))
            kind = "single" if cfg.path == "single" else "looped"
            den = c["reduction"] == "mean" or (c.get("weight") and c.get("eps", 0.0) > 0)
            names = (("ce_denominators",) if den else ()) + (
                f"vp_stats_{kind}", "vp_rows", "vp_coefs") + ((f"vp_grad_{kind}",) if W else ())
            launches = expect_launches(*names)
        else:
            launches = contextlib.nullcontext()
        # in place: over a non-leaf (a leaf that requires grad is refused)
        inp = x * scale if scale != 1.0 else x * 1 if c.get("inplace") else x
        with launches:
            out = vocab_parallel_cross_entropy(
                inp, target,
                weight=_class_weights(V) if c.get("weight") else None,
                ignore_index=c.get("ignore_index", -100), reduction=c["reduction"],
                label_smoothing=c.get("eps", 0.0), z_loss=c.get("z", 0.0),
                softcap=c.get("cap"), return_lse=c.get("lse", False),
                inplace_backward=c.get("inplace", False), vocab_size=c.get("vocab_size"),
                loss_dtype=loss_dtype)
            loss, lse = out if c.get("lse") else (out, None)
            if lse is None:
                loss.backward(gout)
            else:
                torch.autograd.backward([loss, lse], [gout, gl])
    ref_x = full.double().clone().requires_grad_(True)
    ref_in = ref_x
    if scale != 1.0:  # the values our op saw (x * scale rounded to the dtype), gradient scale
        ref_in = ref_x * scale + ((full * scale).double() - full.double() * scale)
    ref_loss, ref_lse = _reference(ref_in, target, c)
    if lse is None:
        ref_loss.backward(gout.double())
    else:
        torch.autograd.backward([ref_loss, ref_lse], [gout.double(), gl.double()])
    ref_grad = ref_x.grad[..., off:off + W]
    assert loss.dtype == (loss_dtype or dtype) and loss.shape == ref_loss.shape, loss
    # the loss's arithmetic is fp32 (fp64): loss_dtype gets it unrounded
    assert_close(loss.detach(), ref_loss.detach(), F32 if loss_dtype == F32 else dtype)
    if lse is not None:
        assert lse.dtype == F32 and lse.shape == target.shape
        assert_close(lse.detach(), ref_lse.detach(), F32)
    # the gradient's rounding error grows with the logits' size (x - lse)
    finite = full.double()[full.double().isfinite()]
    gscale = max(1.0, float(finite.abs().max()) * scale / 8)
    assert x.grad.dtype == dtype
    assert_close(x.grad, ref_grad, dtype, scale=gscale)
    if c.get("inplace") and scale == 1.0:
        # the gradient was written over the logits the op received, x * 1
        assert torch.equal(inp.detach(), x.grad) or W == 0
    assert torch.equal(x.detach(), before)
    _same_on_every_rank(loss, *(() if lse is None else (lse,)))


def _make_linear(c: dict, rank: int):
    """(x [N, D] leaf, full weight [V, D], full bias or None, target, this rank's
    weight and bias leaves, offset), all in c's dtype."""
    widths = c["widths"]
    V, off, Wr = sum(widths), sum(widths[:rank]), widths[rank]
    N, D, dtype = c["n"], 8, c["dtype"]
    g = torch.Generator().manual_seed(4321 + V + N)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if c.get("bias") else None
    if c.get("shift"):  # the last rank's logits far above the others' (through the bias or x)
        if b is None:
            b = torch.zeros(V, dtype=torch.float64)
        b[V - widths[-1]:] += 30.0
    target = _targets(c, (N,), g)
    _ignore_rows(c, target)
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    w_r = w[off:off + Wr].clone().requires_grad_(True)
    b_r = b[off:off + Wr].clone().requires_grad_(True) if b is not None else None
    return x.requires_grad_(True), w, b, target, w_r, b_r, off


class _Sizes:
    """Records the largest tensor any out-of-place torch op returns inside the
    block (in-place ops allocate nothing; Triton's interpreter moves storages
    with them)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        sizes = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.overloadpacket.__name__.endswith("_"):
                    return out
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        sizes.largest = max(sizes.largest, t.numel())
                        sizes.made.append((tuple(t.shape), t.dtype))
                return out

        self.largest, self.made, self.mode = 0, [], Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _run_linear(rank: int, c: dict, interpret: bool) -> None:
    from helpers import assert_close
    from softmax_gpu import heuristics, record_launches
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy
    from softmax_gpu.vocab_parallel import shard_config

    x, w, b, target, w_r, b_r, off = _make_linear(c, rank)
    Wr, V, dtype, N = w_r.shape[0], w.shape[0], c["dtype"], c["n"]
    loss_dtype = c.get("loss_dtype")
    gout, gl = _gout(c, target, loss_dtype or dtype)
    looped = c.get("path") == "looped"
    override = heuristics.override(**LOOPED) if looped else contextlib.nullcontext()
    grad = not c.get("nograd")
    sizes = _Sizes() if c.get("sizes") else contextlib.nullcontext()
    with override, record_launches() as names, torch.set_grad_enabled(grad), sizes:
        out = vocab_parallel_linear_cross_entropy(
            x, w_r, target, linear_bias=b_r,
            weight=_class_weights(V) if c.get("weight") else None,
            reduction=c["reduction"], ignore_index=c.get("ignore_index", -100),
            label_smoothing=c.get("eps", 0.0), z_loss=c.get("z", 0.0), softcap=c.get("cap"),
            return_lse=c.get("lse", False), chunk_size=c.get("chunk"), loss_dtype=loss_dtype)
        loss, lse = out if c.get("lse") else (out, None)
        if grad:
            if lse is None:
                loss.backward(gout)
            else:
                torch.autograd.backward([loss, lse], [gout, gl])
    if interpret:
        chunks = -(-N // c["chunk"]) if c.get("chunk") else 1
        stats = sum(n.startswith("vp_stats") for n in names)
        grads = sum(n.startswith("vp_grad") for n in names)
        assert stats == chunks, names
        passes = 0 if not grad else (1 if c["reduction"] == "none" else
                                     1 + bool(lse is not None))
        assert grads == (passes * chunks if Wr else 0), names
        with heuristics.override(**LOOPED) if looped else contextlib.nullcontext():
            cfg = shard_config(min(N, c.get("chunk") or N), Wr, x.element_size(), x.device,
                               _extras(c))
        assert f"vp_stats_{cfg.path}_kernel" in names, names
        assert not looped or Wr < 16 or cfg.path == "looped"
    if c.get("sizes"):  # the largest: the [chunk, V_r] buffer, dX, the weight and its grad
        assert sizes.largest < N * Wr, (sizes.largest, N, Wr)
        assert sizes.largest >= c["chunk"] * Wr
    rx = x.detach().double().requires_grad_(True)
    rw = w.double().requires_grad_(True)
    rb = b.double().requires_grad_(True) if b is not None else None
    ref_loss, ref_lse = _reference(F.linear(rx, rw, rb), target, c)
    assert loss.dtype == (loss_dtype or dtype) and loss.shape == ref_loss.shape, loss
    assert_close(loss.detach(), ref_loss.detach(), F32 if loss_dtype == F32 else dtype)
    if lse is not None:
        assert lse.dtype == F32 and lse.shape == target.shape
        assert_close(lse.detach(), ref_lse.detach(), F32)
    _same_on_every_rank(loss, *(() if lse is None else (lse,)))
    if not grad:
        assert x.grad is None and w_r.grad is None
        return
    if lse is None:
        ref_loss.backward(gout.double())
    else:
        torch.autograd.backward([ref_loss, ref_lse], [gout.double(), gl.double()])
    # bf16: dX is the sum over ranks of each rank's rounded part
    tol = dict(scale=4.0) if dtype == BF16 else {}
    assert_close(x.grad, rx.grad, dtype, **tol)
    assert_close(w_r.grad, rw.grad[off:off + Wr], dtype, **tol)
    if b_r is not None:
        assert_close(b_r.grad, rb.grad[off:off + Wr], dtype, **tol)
    _same_on_every_rank(x.grad)  # the full input gradient, on every rank


def _retain_graph(rank: int) -> None:
    """A second backward over a retained graph gives the same gradients and
    leaves the first ones as they were, with inplace_backward too."""
    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    c = dict(widths=(13, 24), shape=(6,), dtype=F64, reduction="mean", eps=0.1)
    _, target, shard, _ = _make_case(c, rank)
    x = shard.detach().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)
    g1, = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=F64), retain_graph=True)
    kept = g1.clone()
    g2, = torch.autograd.grad(loss, x, torch.tensor(-0.5, dtype=F64))
    assert torch.equal(g1, kept)
    torch.testing.assert_close(g2, g1 * -0.25, rtol=1e-14, atol=0)
    # inplace_backward: a backward that retains the graph writes a new
    # tensor; the last one writes over the logits
    y = shard.detach().clone().requires_grad_(True)
    logits = y * 1
    loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1,
                                        inplace_backward=True)
    g1, = torch.autograd.grad(loss, logits, torch.tensor(2.0, dtype=F64), retain_graph=True)
    torch.testing.assert_close(g1, kept, rtol=1e-14, atol=0)
    assert torch.equal(logits.detach(), shard)
    g2, = torch.autograd.grad(loss, logits, torch.tensor(-0.5, dtype=F64))
    torch.testing.assert_close(g2, kept * -0.25, rtol=1e-14, atol=0)
    assert g2.data_ptr() == logits.data_ptr()
    # a leaf that requires grad (or a view of one) is refused, as torch's in-place ops
    for bad in (y, y[1:]):
        with pytest.raises(RuntimeError, match="local_logits is a .*leaf tensor that requires"):
            vocab_parallel_cross_entropy(bad, target[:bad.shape[0]], inplace_backward=True)
    for reduction in ("mean", "none"):
        lc = dict(widths=(13, 24), n=9, dtype=F64, reduction=reduction, bias=True)
        x, _, _, target, w_r, b_r, _ = _make_linear(lc, rank)
        loss = vocab_parallel_linear_cross_entropy(x, w_r, target, linear_bias=b_r,
                                                   reduction=reduction, chunk_size=4)
        go = torch.full(loss.shape, 3.0, dtype=F64)
        first = torch.autograd.grad(loss, (x, w_r, b_r), go, retain_graph=True)
        kept = [g.clone() for g in first]
        second = torch.autograd.grad(loss, (x, w_r, b_r), -go)
        for a, k, s in zip(first, kept, second):
            assert torch.equal(a, k)
            torch.testing.assert_close(s, -a, rtol=1e-13, atol=1e-15)


def _modified_after_forward(rank: int) -> None:
    """A target or class weight modified in place between the forward and a
    backward that reads it again is an error, as in torch (the gradient
    would silently use the new values), and inference tensors (no version)
    are fine; a batched grad_output is refused by name."""
    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 37, dtype=torch.float32, generator=g).requires_grad_(True)
    target = torch.randint(0, 37, (6,), generator=g)
    weight = torch.rand(37, generator=g) + 0.5
    for name, change in (("target", lambda: target.add_(1).remainder_(37)),
                         ("weight", lambda: weight.mul_(2))):
        loss = vocab_parallel_cross_entropy(x, target, weight=weight)
        change()
        with pytest.raises(RuntimeError, match=f"the {name} given to the forward was modified"):
            loss.backward()
    h = torch.randn(6, 8, dtype=torch.float32, generator=g, requires_grad=True)
    w = torch.randn(37, 8, dtype=torch.float32, generator=g, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(h, w, target, reduction="none")
    target.zero_()
    with pytest.raises(RuntimeError, match="the target given to the forward was modified"):
        loss.sum().backward()
    # inference tensors carry no version (and allow no backward): a plain forward
    with torch.inference_mode():
        ti, wi = target.clone(), weight.clone()
        assert torch.isfinite(vocab_parallel_cross_entropy(x.detach(), ti.int(), weight=wi))
        assert torch.isfinite(vocab_parallel_linear_cross_entropy(h.detach(), w.detach(), ti))
    # a batched grad_output (is_grads_batched): refused by name, not a storage error
    for f, ins in ((lambda: vocab_parallel_cross_entropy(x, target, reduction="none"), (x,)),
                   (lambda: vocab_parallel_linear_cross_entropy(h, w, target), (h, w))):
        loss = f()
        with pytest.raises(RuntimeError, match="backward: grad_output is .* batched by autograd"):
            torch.autograd.grad(loss, ins, torch.randn(2, *loss.shape), is_grads_batched=True)


def _linear_memory(rank: int) -> None:
    """The linear version's weight gradient: a bf16 shard's is accumulated in
    place in bf16 (no fp32 [V_r, D] tensor is made), acc_policy="balanced"
    makes one (rounded once at the end), and main_grad receives it (fp32,
    the weight gets none); every one right."""
    from helpers import assert_close
    from softmax_gpu import LinearCrossEntropyOptions
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy

    c = dict(widths=(13, 24), n=21, dtype=BF16, reduction="mean", bias=True)
    x, w, b, target, w_r, b_r, off = _make_linear(c, rank)
    Wr, D = w_r.shape
    rw = w.double().requires_grad_(True)
    ref, _ = _reference(F.linear(x.detach().double(), rw, b.double()), target, c)
    (want,) = torch.autograd.grad(ref * 2.0, (rw,))
    want = want[off:off + Wr]
    for policy in ("auto", "balanced"):
        opts = LinearCrossEntropyOptions(acc_policy=policy)
        sizes = _Sizes()
        with sizes:
            loss = vocab_parallel_linear_cross_entropy(x, w_r, target, linear_bias=b_r,
                                                       chunk_size=4, options=opts)
            loss.backward(torch.tensor(2.0, dtype=BF16))
        fp32_w = [m for m in sizes.made if m == ((Wr, D), F32)]
        assert bool(fp32_w) == (policy == "balanced"), (policy, sizes.made)
        assert w_r.grad.dtype == BF16
        assert_close(w_r.grad, want, BF16, scale=4.0)
        x.grad = w_r.grad = b_r.grad = None
    main = torch.zeros(Wr, D)
    loss = vocab_parallel_linear_cross_entropy(x, w_r, target, linear_bias=b_r, chunk_size=4,
                                               main_grad=main)
    loss.backward(torch.tensor(2.0, dtype=BF16))
    assert w_r.grad is None and x.grad is not None and b_r.grad is not None
    assert_close(main, want, BF16, scale=4.0)


def _bad_inputs(rank: int) -> None:
    """Clear errors on every rank (so no rank is left waiting in a collective)."""
    import softmax_gpu.vocab_parallel as D

    widths = (7, 19, 12)
    W = widths[rank]
    x = torch.randn(4, W)
    ok = torch.tensor([0, 5, 37, -100])
    with pytest.raises(ValueError, match=r"add up to 38, not vocab_size=40"):
        D.vocab_parallel_cross_entropy(x, ok, vocab_size=40)
    D.vocab_parallel_cross_entropy(x, ok, vocab_size=38)  # the matching layout works
    import numpy as np
    D.vocab_parallel_cross_entropy(x, ok, vocab_size=np.int64(38))  # numpy's too
    with pytest.raises(ValueError, match=r"weight must have shape \(38,\).*GLOBAL"):
        D.vocab_parallel_cross_entropy(x, ok, weight=torch.ones(W))
    xd, wd = torch.randn(4, 5), torch.randn(W, 5)
    with pytest.raises(ValueError, match=r"weight must have shape \(38,\)"):
        D.vocab_parallel_linear_cross_entropy(xd, wd, ok, weight=torch.ones(37))
    for bad in (38, 1000, -1):
        msg = rf"class id {bad}, outside the global vocabulary \[0, 38\)"
        with pytest.raises(ValueError, match=msg):
            D.vocab_parallel_cross_entropy(x, torch.tensor([0, bad, 3, 4]))
        with pytest.raises(ValueError, match=msg):
            D.vocab_parallel_linear_cross_entropy(xd, wd, torch.tensor([0, bad, 3, 4]))
    # Without the host check (as on CUDA tensors) a bad target poisons its row on the
    # device instead: NaN loss and gradient for that row on every rank, the rest exact.
    check, D._check_targets = D._check_targets, lambda *a: None
    try:
        x.requires_grad_(True)
        t = torch.tensor([0, 38, 20, -100])
        loss = D.vocab_parallel_cross_entropy(x, t, reduction="none")
        loss.sum().backward()
        xl = xd.clone().requires_grad_(True)
        lin = D.vocab_parallel_linear_cross_entropy(xl, wd, t, reduction="none", chunk_size=2)
        lin.sum().backward()
    finally:
        D._check_targets = check
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all(), loss
    assert x.grad[1].isnan().all() and x.grad[[0, 2, 3]].isfinite().all()
    assert (x.grad[3] == 0).all()
    assert lin[1].isnan() and lin[[0, 2, 3]].isfinite().all(), lin
    assert xl.grad[1].isnan().all() and xl.grad[[0, 2, 3]].isfinite().all()


def _width_cache(rank: int) -> None:
    """The widths are gathered once per layout."""
    import torch.distributed as dist

    import softmax_gpu.vocab_parallel as D

    calls = []
    gather = D.dist.all_gather

    def counting(*a, **k):
        calls.append(1)
        return gather(*a, **k)

    D.clear_width_cache()
    D.dist.all_gather = counting
    try:
        x = torch.randn(3, 5 + rank)
        t = torch.tensor([0, 1, -100])
        for _ in range(3):
            D.vocab_parallel_cross_entropy(x, t)
        for _ in range(2):  # the linear version's weight has the same width: same layout
            D.vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(5 + rank, 4), t)
    finally:
        D.dist.all_gather = gather
    assert len(calls) == 1, calls
    assert dist.get_world_size() == 3


def _unbatched_input(rank: int) -> None:
    """(D,) input with a () target, as linear_cross_entropy; (V_r,) logits with ()."""
    import softmax_gpu
    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    c = dict(widths=(7, 19, 12), n=1, dtype=F64, reduction="mean", bias=True)
    x, w, b, target, w_r, b_r, off = _make_linear(c, rank)
    loss = vocab_parallel_linear_cross_entropy(x[0], w_r, target[0], linear_bias=b_r)
    ref = softmax_gpu.linear_cross_entropy(x[0].detach(), w, target[0], linear_bias=b)
    assert loss.shape == () and torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    logits = F.linear(x[0].detach(), w, b)
    one = vocab_parallel_cross_entropy(logits[off:off + w_r.shape[0]], target[0])
    assert one.shape == () and torch.allclose(one, ref, rtol=1e-12, atol=1e-12)


def _torch_path(rank: int) -> None:
    """The torch reference path (CPU without TRITON_INTERPRET), through the collectives."""
    import softmax_gpu.vocab_parallel as D

    backend = D.backend_for
    D.backend_for = lambda t: "torch"
    try:
        for c in (WORLD3[0], WORLD3[2], WORLD3[4], WORLD3[5]):
            _run_case(rank, c, interpret=False)
        for c in LINEAR3:
            _run_linear(rank, c, interpret=False)
    finally:
        D.backend_for = backend


def _no_collective(rank: int) -> None:
    """One rank: no collective runs (the shard's statistics are the rows'), in
    both backends, and a row of -inf logits has lse -inf, as torch's."""
    import torch.distributed as dist

    import softmax_gpu.vocab_parallel as D
    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran in a group of one rank")

    x = torch.randn(4, 37, dtype=torch.float64)
    x[2] = -math.inf
    t = torch.tensor([3, 0, 5, -100])
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    backend, real, gather = D.backend_for, dist.all_reduce, dist.all_gather
    D.clear_width_cache()  # the layout is new: not even the widths are gathered
    dist.all_reduce = dist.all_gather = refuse
    try:
        for torch_path in (False, True):
            if torch_path:
                D.backend_for = lambda t: "torch"
            xg = x.clone().requires_grad_(True)
            loss, lse = vocab_parallel_cross_entropy(xg, t, reduction="none", return_lse=True)
            loss.sum().backward()
            assert torch.equal(lse[2], torch.tensor(-math.inf)), lse
            torch.testing.assert_close(lse, torch.logsumexp(x, -1).float())
            ref = F.cross_entropy(x, t, reduction="none")
            torch.testing.assert_close(loss[[0, 1, 3]], ref[[0, 1, 3]])
            vocab_parallel_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4, -100]),
                                                chunk_size=2).backward()
    finally:
        dist.all_reduce, dist.all_gather = real, gather
        D.backend_for = backend


def _linear_ignore_index_none(rank: int) -> None:
    """The linear version takes ``ignore_index=None`` as torch's -100, as
    softmax_gpu.linear_cross_entropy does (it raised a TypeError)."""
    from helpers import assert_close
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy as vpl

    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 8, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=F64, requires_grad=True)
    t = torch.tensor([3, 0, 10, -100, 7, 1])
    for reduction in ("mean", "sum"):
        loss = vpl(h, w, t, reduction=reduction, ignore_index=None)
        ref = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
        assert_close(loss.detach(), ref.detach(), F64)
        for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
            assert_close(got, want, F64)


def _linear_fp16_loss_scale(rank: int) -> None:
    """fp16 with a loss scale applied after the call (a GradScaler): the
    linear version forms its gradients after grad_output, as
    softmax_gpu.linear_cross_entropy does, so dX and dW are within 1.2x
    torch's fp16 error against float64 (before: the forward formed them
    unscaled and divided by N in fp16, ~14x torch's error here). On the
    torch path: the interpreter is too slow at a size where fp16's subnormals
    show; on the kernels' path the backward runs the same coefficient and
    gradient kernels the forward ran before, now with grad_output."""
    import softmax_gpu.vocab_parallel as D
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy as vpl

    g = torch.Generator().manual_seed(3)
    n, d, v, scale = 4096, 64, 2000, 1024.0
    x0 = torch.randn(n, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * 0.05
    t = torch.randint(0, v, (n,), generator=g)

    def grads(fn):
        x, w = (p.half().requires_grad_() for p in (x0, w0))
        (fn(x, w, t).float() * scale).backward()
        return x.grad, w.grad

    backend = D.backend_for
    D.backend_for = lambda t: "torch"
    try:
        ours = grads(vpl)
    finally:
        D.backend_for = backend
    theirs = grads(lambda a, b, c: F.cross_entropy(F.linear(a, b), c))
    x64, w64 = (p.half().double().requires_grad_() for p in (x0, w0))
    (F.cross_entropy(F.linear(x64, w64), t) * scale).backward()
    for a, b, r in zip(ours, theirs, (x64.grad, w64.grad)):
        err = [float((q.double() - r).norm() / r.norm()) for q in (a, b)]
        assert err[0] <= 1.2 * err[1], err


def _no_double_backward(rank: int) -> None:
    """As the cross-entropy: the gradients are not differentiable, and asking
    for it raises, also with respect to the inputs (autograd.grad,
    functional.hvp), where the inputs had looked unused (zeros or None)."""
    from helpers import assert_not_twice_differentiable

    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 11, dtype=F64, generator=g).requires_grad_()
    h = torch.randn(5, 4, dtype=F64, generator=g).requires_grad_()
    w = torch.randn(11, 4, dtype=F64, generator=g).requires_grad_()
    t = torch.randint(0, 11, (5,), generator=g)
    assert_not_twice_differentiable(lambda a: vocab_parallel_cross_entropy(a, t), (x,))
    for reduction in ("mean", "none"):
        assert_not_twice_differentiable(
            lambda a, b: vocab_parallel_linear_cross_entropy(a, b, t, reduction=reduction).sum(),
            (h, w))


def _inplace_4d(rank: int) -> None:
    """inplace_backward over [B, S, H, V] logits whose vocabulary dim is padded
    (their rows along the last dim have an in-place view, though dim 1 does
    not collapse with the dims after it): the gradient lands in the logits'
    own storage, the padding untouched, equal to torch's."""
    from helpers import assert_close
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    V = 5
    g = torch.Generator().manual_seed(3)
    buf = torch.full((2, 3, 2, V + 3), math.nan, dtype=F64)
    buf[..., :V] = torch.randn(2, 3, 2, V, generator=g, dtype=F64)
    t = torch.randint(0, V, (2, 3, 2), generator=g)
    ref = buf[..., :V].clone().requires_grad_(True)
    F.cross_entropy(ref.reshape(-1, V), t.reshape(-1), reduction="sum").backward()
    # the padded buffer as a model's output (a non-leaf), the logits a view of it
    out = buf + torch.zeros((), dtype=F64, requires_grad=True)
    x = out[..., :V]
    x.retain_grad()
    vocab_parallel_cross_entropy(x, t, reduction="sum", inplace_backward=True).backward()
    assert_close(x.grad, ref.grad, F64)
    assert torch.equal(out[..., :V], x.grad)  # written over the logits' storage
    assert out[..., V:].isnan().all()


def _neg_inf_everywhere(rank: int) -> None:
    """A row of -inf logits on every rank: lse -inf (torch.logsumexp's), not
    NaN, with either backend; the other rows as torch."""
    import softmax_gpu.vocab_parallel as D
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    widths = (4, 5)
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, sum(widths), generator=g, dtype=F64)
    full[1] = -math.inf
    t = torch.tensor([2, -100, 7])
    off = sum(widths[:rank])
    backend = D.backend_for
    try:
        for torch_path in (False, True):
            if torch_path:
                D.backend_for = lambda t: "torch"
            x = full[:, off:off + widths[rank]].clone().requires_grad_(True)
            loss, lse = vocab_parallel_cross_entropy(x, t, reduction="none", return_lse=True)
            loss.sum().backward()
            assert torch.equal(lse[1], torch.tensor(-math.inf)), (torch_path, lse)
            torch.testing.assert_close(lse, torch.logsumexp(full, -1).float())
            ref = F.cross_entropy(full[[0, 2]], t[[0, 2]], reduction="none")
            torch.testing.assert_close(loss[[0, 2]], ref)
            assert loss[1] == 0 and (x.grad[1] == 0).all() and x.grad.isfinite().all()
    finally:
        D.backend_for = backend


def _offset_logits_precision(rank: int) -> None:
    """fp32 logits far from 0 (a common offset of 1000 and of 1e4, the lse
    with them), label smoothing with and without class weights, on both
    shard paths: the loss and the shard's gradient each within 2x torch's
    fp32 error against float64, as the single-device op. (A gradient formed
    as e^(z - lse) from the rounded lse lost |lse| ulp: 3e-5 where torch's
    is 6e-8; a smoothing term formed as sw lse - sum w z cancelled: 2.3e-5
    of loss error at 1000 where torch's is 5e-7.)"""
    from softmax_gpu import heuristics
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    widths = (30, 34)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(16, sum(widths), generator=g, dtype=F64) * 3
    t = torch.randint(0, sum(widths), (16,), generator=g)
    cw = torch.rand(sum(widths), generator=g, dtype=F64).float() + 0.5
    off = sum(widths[:rank])
    for offset in (1000.0, 1e4):
        full = (base + offset).float()
        for weight in (None, cw):
            kw = dict(reduction="sum", label_smoothing=0.1, weight=weight)

            def torch_run(v):
                v = v.clone().requires_grad_(True)
                w = None if weight is None else weight.to(v.dtype)
                loss = F.cross_entropy(v, t, **{**kw, "weight": w})
                loss.backward()
                return loss.double(), v.grad.double()

            ref_loss, ref = torch_run(full.double())
            t_loss, t_grad = torch_run(full)
            for path in ({}, LOOPED):
                x = full[:, off:off + widths[rank]].clone().requires_grad_(True)
                with heuristics.override(**path):
                    loss = vocab_parallel_cross_entropy(x, t, **kw)
                    loss.backward()
                what = (offset, weight is not None, bool(path))
                ours = (loss.double() - ref_loss).abs()
                assert ours <= 2 * (t_loss - ref_loss).abs() + 1e-12 * ref_loss.abs(), (
                    what, float(ours), float((t_loss - ref_loss).abs()))
                ours = (x.grad.double() - ref[:, off:off + widths[rank]]).abs().max()
                assert ours <= 2 * (t_grad - ref).abs().max(), (
                    what, float(ours), float((t_grad - ref).abs().max()))


def _init_child(rank, world, port, interpret, backend="gloo"):
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before softmax_gpu is imported
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import softmax_gpu

    assert softmax_gpu.backend_for(torch.empty(0)) == ("triton" if interpret else "torch")
    return dist


def _worker(rank, world, port, interpret, cases, linear_cases, extras):
    torch.set_num_threads(1)
    dist = _init_child(rank, world, port, interpret)
    import softmax_gpu

    with softmax_gpu.poison_outputs():
        for run, group in ((_run_case, cases), (_run_linear, linear_cases)):
            for c in group:
                try:
                    run(rank, c, interpret)
                except BaseException as e:
                    raise AssertionError(f"rank {rank}, {run.__name__}, case {c}: {e}") from e
        for name in extras:
            globals()[name](rank)
    # Graphs still referenced by garbage cycles (tracebacks of the expected
    # errors) hold the process group: freed here, not at interpreter exit,
    # where a late gloo destructor has aborted the process.
    gc.collect()
    # Only on success: a rank that fails leaves the group as it is, so that the
    # parent sees its traceback before gloo aborts the others (which it does
    # when a peer closes its connections mid-collective). The barrier keeps a
    # rank from tearing gloo down while a peer still uses its connections (a
    # teardown race seen once as "terminate called without an active
    # exception" / SIGABRT on a loaded machine).
    dist.barrier()
    dist.destroy_process_group()


def _cuda_worker(rank, world, port, interpret):
    """World size 1 over NCCL: the compiled kernels (looped and single paths),
    through the collectives, with every option."""
    dist = _init_child(rank, world, port, interpret, backend="nccl")
    from helpers import assert_close, expect_launches
    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    c = dict(reduction="mean", eps=0.1, z=1e-3, cap=20.0, weight=True)
    for dtype, V in ((F32, 50000), (BF16, 50000), (BF16, 4000), (F64, 3000)):
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(64, V, generator=g) * 3).to(dtype)
        t = torch.randint(0, V, (64,), generator=g)
        t[3] = -100
        xr = full.double().clone().requires_grad_(True)
        ref, ref_lse = _reference(xr, t, c)
        (ref + ref_lse.mean()).backward()
        for inplace in (False, True):
            x = full.cuda().requires_grad_(True)
            with expect_launches("ce_denominators", "vp_stats", "vp_rows", "vp_coefs", "vp_grad"):
                loss, lse = vocab_parallel_cross_entropy(
                    x * 1 if inplace else x, t.cuda(), weight=_class_weights(V).cuda(),
                    label_smoothing=c["eps"],
                    z_loss=c["z"], softcap=c["cap"], return_lse=True, inplace_backward=inplace)
                (loss + lse.mean()).backward()
            assert_close(loss.cpu(), ref.detach(), dtype)
            assert_close(lse.cpu(), ref_lse.detach(), F32)
            assert_close(x.grad.cpu(), xr.grad, dtype, scale=2.0)
    # no host sync once the layout is known (one rank: no collective either)
    x, tc, cw = full.cuda().requires_grad_(True), t.cuda(), _class_weights(V).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, lse = vocab_parallel_cross_entropy(
            x, tc, weight=cw, label_smoothing=c["eps"], z_loss=c["z"], softcap=c["cap"],
            return_lse=True)
        (loss + lse.mean()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    xin = torch.randn(300, 64, device="cuda", dtype=BF16, requires_grad=True)
    w = torch.randn(5000, 64, device="cuda", dtype=BF16, requires_grad=True)
    t = torch.randint(0, 5000, (300,), device="cuda")
    loss = vocab_parallel_linear_cross_entropy(xin, w, t, chunk_size=128, label_smoothing=0.1)
    loss.backward()
    xr, wr = xin.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = F.cross_entropy(F.linear(xr, wr), t, label_smoothing=0.1)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), BF16)
    assert_close(xin.grad, xr.grad, BF16, scale=2.0)
    assert_close(w.grad, wr.grad, BF16, scale=2.0)
    dist.destroy_process_group()


# --- tests -------------------------------------------------------------------


def test_two_ranks():
    """Uneven shards, ignore_index rows (all of them), label smoothing, z-loss,
    class weights, softcap, the returned lse and its gradient,
    inplace_backward, loss_dtype, each reduction, non-contiguous shards, the
    looped path, a rank holding no target; the ported flash-attention cases
    (FLASH_PARALLEL_CE); the linear version over several chunks with an
    uneven last one; retained graphs; the linear version's weight-gradient
    accumulation (in place in bf16, fp32 on request, into main_grad); a row
    of -inf on every rank; logits far from 0 as precise as torch's."""
    from helpers import spawn_group

    spawn_group(_worker, 2, WORLD2 + FLASH_PARALLEL_CE, LINEAR2,
                ("_retain_graph", "_linear_memory", "_neg_inf_everywhere",
                 "_offset_logits_precision"))


def test_one_rank():
    """A group of one rank: the two-rank and three-rank cases with the whole
    vocabulary on it, and no collective at all (not even the widths' gather);
    the gradient in place over 4-d logits with a padded vocabulary; no
    silent double backward."""
    from helpers import spawn_group

    spawn_group(_worker, 1, WORLD1, LINEAR1,
                ("_no_collective", "_inplace_4d", "_linear_ignore_index_none",
                 "_linear_fp16_loss_scale", "_no_double_backward", "_modified_after_forward"))


def test_three_ranks():
    """As above with an empty shard (both functions), -inf columns, far-apart
    maxima across ranks, a custom ignore_index; bad inputs; the width cache;
    unbatched input; the torch path."""
    from helpers import spawn_group

    spawn_group(_worker, 3, WORLD3, LINEAR3,
                ("_bad_inputs", "_width_cache", "_unbatched_input", "_torch_path"))


def test_world_size_one_on_cuda():
    from helpers import DEVICE, spawn_group

    if DEVICE != "cuda":
        pytest.skip("NCCL needs a GPU; the CPU groups above run the kernels in the interpreter")
    spawn_group(_cuda_worker, 1)


def test_no_process_group_is_a_clear_error():
    import torch.distributed as dist

    from softmax_gpu.distributed import (vocab_parallel_cross_entropy,
                                         vocab_parallel_linear_cross_entropy)

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        vocab_parallel_cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4),
                                            torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be between"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(vocab_size=0), ValueError, "vocab_size must be a positive int"),
    (dict(loss_dtype=torch.int32), TypeError, "loss_dtype must be a floating dtype"),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must be a floating"),
    (dict(weight=[1.0] * 5), TypeError, "weight must be a torch.Tensor"),
    (dict(weight=torch.ones(5, requires_grad=True)), RuntimeError, "weight requires grad"),
    (dict(target=torch.zeros(3)), TypeError, "integer class ids"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target shape"),
    (dict(x=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "local_logits must be a floating"),
    (dict(x=torch.zeros(1, 5).expand(3, 5), inplace_backward=True), ValueError,
     "local_logits cannot take the gradient in place"),
    (dict(x=torch.zeros(20).as_strided((3, 5), (2, 1)), inplace_backward=True), ValueError,
     "local_logits cannot take the gradient in place"),
    (dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
    # leading dims that do not collapse into one row index (a [B, S+1, V]
    # buffer's [:, :S], a transposed [S, B, V]): no in-place row view
    (dict(x=torch.zeros(2, 4, 5)[:, :3], target=torch.zeros(2, 3, dtype=torch.long),
          inplace_backward=True), ValueError, "local_logits cannot take the gradient in place"),
    (dict(x=torch.zeros(3, 2, 5).transpose(0, 1), target=torch.zeros(2, 3, dtype=torch.long),
          inplace_backward=True), ValueError, "local_logits cannot take the gradient in place"),
])
def test_argument_errors(kwargs, exc, match):
    """Checked before any collective (no group needed to see them)."""
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    x = kwargs.pop("x", torch.randn(3, 5))
    t = kwargs.pop("target", torch.tensor([0, 1, 2]))
    if x.is_floating_point():
        x = x.detach().requires_grad_(True)
    with pytest.raises(exc, match=match):
        vocab_parallel_cross_entropy(x, t, **kwargs)


_X, _W, _T = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((_X.int(), _W, _T), {}, TypeError, "input must be a floating"),
    ((torch.randn(2, 3, 4), _W, _T), {}, ValueError, r"input must have shape \(N, D\)"),
    ((_X, torch.randn(5, 3), _T), {}, ValueError, r"local_weight must have shape \(V_r, 4\)"),
    ((_X, torch.randn(5), _T), {}, ValueError, "local_weight must have shape"),
    ((_X, _W.double(), _T), {}, TypeError, "local_weight must have the input's dtype"),
    ((_X, _W, _T), dict(linear_bias=torch.randn(4)), ValueError,
     r"linear_bias must have shape \(5,\)"),
    ((_X, _W, _T), dict(linear_bias=torch.randn(5).double()), TypeError,
     "linear_bias must have the input's dtype"),
    ((_X, _W, _T.float()), {}, TypeError, "integer class ids"),
    ((_X, _W, _T[:2]), {}, ValueError, "target shape"),
    ((_X, _W, _T), dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    ((_X, _W, _T), dict(reduction="avg"), ValueError, "reduction must be one of"),
    ((_X, _W, _T), dict(softcap=-1.0), ValueError, "softcap must be"),
    ((_X, _W, _T), dict(weight=torch.ones(5, dtype=torch.long)), TypeError,
     "weight must be a floating"),
    ((_X, _W, _T), dict(loss_dtype=torch.long), TypeError, "loss_dtype must be"),
])
def test_linear_argument_errors(args, kwargs, exc, match):
    """The linear version's checks, before any collective, naming the argument."""
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy

    with pytest.raises(exc, match=match):
        vocab_parallel_linear_cross_entropy(*args, **kwargs)


# --- the shard kernels against their torch reference, in process -------------


@pytest.mark.parametrize("opts", ["plain", "smooth", "all"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("path", ["single", "looped"])
def test_shard_kernels_match_torch_reference(path, dtype, opts):
    """Stats and gradient kernels on one shard (no collectives): targets owned
    here, elsewhere, ignored and out of range; a strided shard; -inf entries;
    label smoothing, class weights, softcap; the gradient written in place."""
    from helpers import DEVICE, TOL, expect_launches, rand
    from softmax_gpu import heuristics
    import softmax_gpu.vocab_parallel as D

    M, W, off, V, ignore = 9, 40, 30, 100, -100
    smooth = opts != "plain"
    cap = 3.0 if opts == "all" else 0.0
    cw = (torch.rand(V, dtype=torch.float64) + 0.5).to(DEVICE, D._acc(dtype)) \
        if opts == "all" else None
    buf = rand(M, W + 8, dtype=dtype)
    x = buf[:, 4:4 + W]
    x[2, :] = -math.inf  # a shard row entirely -inf: this rank contributes nothing
    x[3, 5] = -math.inf
    t = torch.tensor([30, 69, 5, 99, ignore, 31, 100, 45, -7], device=DEVICE)
    override = heuristics.override(**LOOPED) if path == "looped" else contextlib.nullcontext()
    with override:
        with expect_launches(f"vp_stats_{path}"):
            mx, st = D._shard_stats(x, t, off, V, ignore, smooth, cap, cw)
        rmx, rst = D._torch_stats(x, t, off, V, ignore, smooth, cap, cw)
        atol, rtol = TOL[F64 if dtype == F64 else F32]
        torch.testing.assert_close(mx, rmx, atol=atol * 4 if cap else 0, rtol=rtol if cap else 0)
        torch.testing.assert_close(st, rst, atol=atol * W, rtol=rtol, equal_nan=True)
        assert st[1, 6].isnan() and st[1, 8].isnan()  # ids 100 and -7 are outside [0, V)
        assert st[1, 4] == 0 and st[1, 3] == 0  # ignored, not owned
        assert st[0, 2] == (W if cap else 0)  # all -inf: nothing, or -cap after the softcap
        acc = mx.dtype
        coef = torch.rand(5, M, dtype=torch.float64)
        coef[0] += 2  # the lse as its max m and the log l of its sum
        coef[1] += 2
        coef[2:, 4] = 0  # an ignored row without an lse gradient: zero whatever the logits
        coef[2, 6] = math.nan  # an invalid target: a NaN row
        coef = coef.to(DEVICE, acc)
        rdx = D._torch_grad(x, t, coef, off, smooth, cap, cw)
        with expect_launches(f"vp_grad_{path}"):
            dx = D._shard_grad(x, t, coef, off, smooth, cap, cw)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(dx.double(), rdx.double(), atol=atol * 4, rtol=rtol,
                                   equal_nan=True)
        assert dx[6].isnan().all() and (dx[4] == 0).all()
        assert not dx[[0, 1, 3, 5, 7, 8]].isnan().any()
        with expect_launches(f"vp_grad_{path}"):  # in place, over the strided shard
            out = D._shard_grad(x, t, coef, off, smooth, cap, cw, out=x)
        assert out is x
        torch.testing.assert_close(x.double(), dx.double(), atol=0, rtol=0, equal_nan=True)
        assert buf[:, :4].isfinite().all() and buf[:, 4 + W:].isfinite().all()


def test_row_planes_are_int64_offsets():
    """The [k, M] per-row arrays are addressed at K * M + row in int64: with
    M above 2^31 / 3 rows a K * M of the int32 argument would wrap (to
    -1894967296 at M = 8e8)."""
    import triton
    import triton.language as tl

    from helpers import DEVICE
    from softmax_gpu.kernels import vocab_parallel

    # the jit resolves names in this module's globals, where softmax_gpu is
    # not imported at import time (see the module docstring)
    globals()["_vp_kernels"] = vocab_parallel

    @triton.jit
    def offsets(OUT, M, K: tl.constexpr):
        rows = tl.arange(0, 4).to(tl.int64)
        tl.store(OUT + rows, _vp_kernels.plane(rows, M, K))  # noqa: F821

    for M, K in ((800_000_000, 3), (1_100_000_000, 2), (7, 3)):
        out = torch.empty(4, dtype=torch.int64, device=DEVICE)
        offsets[(1,)](out, M, K)
        assert out.tolist() == [K * M + r for r in range(4)], (M, K, out)


def test_empty_shard_and_no_rows():
    from helpers import DEVICE, expect_launches
    import softmax_gpu.vocab_parallel as D

    x = torch.empty(4, 0, device=DEVICE)
    t = torch.tensor([0, 3, -100, 9], device=DEVICE)
    with expect_launches("vp_stats_single"):
        mx, st = D._shard_stats(x, t, 5, 10, -100, True)
    assert (mx == -math.inf).all() and (st[0] == 0).all() and (st[2] == 0).all()
    assert (st[1] == 0).all()
    coef = torch.ones(5, 4, device=DEVICE)
    with expect_launches():
        dx = D._shard_grad(x, t, coef, 5, True)
    assert dx.shape == (4, 0)
    with expect_launches():
        mx, st = D._shard_stats(torch.empty(0, 7, device=DEVICE),
                                torch.empty(0, dtype=torch.long, device=DEVICE), 0, 7, -100, False)
    assert mx.shape == (0,) and st.shape == (2, 0)


def test_comm_bytes_model():
    from perf.vocab_parallel import comm_bytes, linear_comm_bytes, shard_widths

    assert shard_widths(10, 3) == [4, 3, 3] and sum(shard_widths(151936, 8)) == 151936
    b = comm_bytes(16384, 128256, 8, torch.bfloat16)
    assert b["ours_payload_bytes"] == 3 * 16384 * 4  # max [M] + sums [2, M], fp32
    assert b["gather_logits_payload_bytes"] == 16384 * 128256 * 2
    assert b["ours_sent_bytes_per_rank"] == 2 * 7 / 8 * 3 * 16384 * 4
    assert b["ratio"] > 10000
    fp64 = comm_bytes(4, 10, 2, torch.float64, label_smoothing=True)
    assert fp64["ours_payload_bytes"] == 4 * 4 * 8  # max + three sums, fp64
    assert math.isnan(comm_bytes(4, 10, 1, torch.float32)["ratio"])  # nothing moves at p = 1
    lin = linear_comm_bytes(16384, 4096, 128256, 8, torch.bfloat16, chunk_size=4096)
    assert lin["stats_payload_bytes"] == 3 * 16384 * 4  # the same vectors, chunk by chunk
    assert lin["stats_collectives"] == 2 * 4  # two all-reduces per chunk, four chunks
    assert lin["dx_payload_bytes"] == 16384 * 4096 * 2  # dX all-reduce, bf16
    assert lin["ours_sent_bytes_per_rank"] == 2 * 7 / 8 * (3 * 16384 * 4 + 16384 * 4096 * 2)
    assert lin["gather_sent_bytes_per_rank"] == \
        7 / 8 * 16384 * 128256 * 2 + 2 * 7 / 8 * 16384 * 4096 * 2
    assert 16 < lin["ratio"] < 17  # the dX all-reduce, which both need, dominates ours
