"""softmax_gpu.distributed.vocab_parallel_cross_entropy.

Multi-rank tests spawn 2 and 3 processes (torch.multiprocessing, gloo on
127.0.0.1, CPU tensors). Each world size is one spawned group that runs every
case in turn (spawning costs seconds; a case costs milliseconds). Each rank
builds the full logits from a shared seed, takes its shard, and compares the
loss and its shard's gradient against single-process float64
``F.cross_entropy`` on the full logits (with z-loss: that loss plus
z * lse^2, reduced over the non-ignored rows); every rank must also return
the same loss, bit for bit.

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
import math
import os

import pytest
import torch
import torch.nn.functional as F

# --- the cases --------------------------------------------------------------

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

# Keys: widths (per rank), shape (target shape; logits add the vocabulary
# dim), dtype, reduction, eps (label smoothing), z (z-loss), ignore (flat
# rows set to ignore_index, or "all"), ignore_index, targets_on (ranks whose
# columns hold the targets; default all), layout (contiguous / padded /
# transposed), path (None: default heuristics; "looped": shards wider than 16
# loop over 16-wide tiles), shift (far-apart maxima across ranks), neg_inf
# (-inf columns and an all -inf shard row), vocab_size (passed through).
WORLD2 = [
    dict(widths=(13, 24), shape=(6,), dtype=F32, reduction="mean", ignore=(1, 4)),
    dict(widths=(13, 24), shape=(6,), dtype=F32, reduction="sum", eps=0.1, path="looped",
         shift=True),
    dict(widths=(13, 24), shape=(2, 3), dtype=BF16, reduction="none", eps=0.2, z=1e-3,
         layout="padded", ignore=(2,)),
    dict(widths=(13, 24), shape=(5,), dtype=F64, reduction="mean", eps=0.1, z=1e-2,
         targets_on=(0,), layout="transposed", ignore=(0,)),
    dict(widths=(13, 24), shape=(4,), dtype=F32, reduction="mean", ignore="all"),
]

WORLD3 = [
    dict(widths=(7, 19, 12), shape=(7,), dtype=F32, reduction="mean", ignore=(3,),
         targets_on=(0, 2), path="looped", shift=True, z=1e-2),
    dict(widths=(11, 0, 29), shape=(5,), dtype=BF16, reduction="sum", eps=0.1, targets_on=(2,)),
    dict(widths=(11, 0, 29), shape=(6,), dtype=F32, reduction="none", z=1e-2, neg_inf=True,
         ignore_index=3, ignore=(0, 5)),
    dict(widths=(7, 19, 12), shape=(2, 2), dtype=F64, reduction="mean", eps=0.05, z=1e-3,
         vocab_size=38, path="looped"),
]

LOOPED = dict(max_single=16, tile=16, sm_count=2)


def _make_case(c: dict, rank: int):
    """(full logits [..., V] in c's dtype, target, this rank's shard, its offset)."""
    widths = c["widths"]
    V, off, W = sum(widths), sum(widths[:rank]), widths[rank]
    shape, dtype = c["shape"], c["dtype"]
    ignore_index = c.get("ignore_index", -100)
    g = torch.Generator().manual_seed(1234 + V + len(shape))
    full = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3.0
    if c.get("shift"):  # the last rank's maxima far above the others'; one row far below
        full[..., V - widths[-1]:] += 30.0
        full.reshape(-1, V)[0, :widths[0]] -= 200.0
    owners = c.get("targets_on", range(len(widths)))
    allowed = torch.cat([torch.arange(sum(widths[:r]), sum(widths[:r + 1])) for r in owners])
    if ignore_index >= 0:
        allowed = allowed[allowed != ignore_index]
    if c.get("neg_inf"):
        allowed = allowed[allowed < V - 3]  # no target on a -inf column
    target = allowed[torch.randint(len(allowed), shape, generator=g)]
    if c.get("neg_inf"):  # -inf columns in the last shard; rank 0's shard of row 1 all -inf
        full[..., V - 3:] = -math.inf
        full.reshape(-1, V)[1, :widths[0]] = -math.inf
        allowed_last = torch.arange(V - widths[-1], V - 3)
        target.reshape(-1)[1] = allowed_last[0]
    ignore = c.get("ignore", ())
    flat = target.reshape(-1)
    flat[list(range(flat.numel())) if ignore == "all" else list(ignore)] = ignore_index
    full = full.to(dtype)
    shard = full[..., off:off + W]
    layout = c.get("layout", "contiguous")
    if layout == "padded":  # a view into a wider buffer: row stride W + 3
        buf = torch.full((*shape, W + 3), math.nan, dtype=dtype)
        buf[..., :W] = shard
        shard = buf[..., :W]
    elif layout == "transposed":  # columns contiguous: stride along the row is the row count
        shard = shard.t().contiguous().t()
    else:
        shard = shard.contiguous()
    return full, target, shard, off


def _reference(full, target, c, gout):
    """float64 loss and gradient of the full logits."""
    ignore_index = c.get("ignore_index", -100)
    eps, z, reduction = c.get("eps", 0.0), c.get("z", 0.0), c["reduction"]
    V = full.shape[-1]
    x = full.double().clone().requires_grad_(True)
    x2, t = x.reshape(-1, V), target.reshape(-1)
    if z == 0.0:
        loss = F.cross_entropy(x2, t, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)
        if reduction == "none":
            loss = loss.reshape(target.shape)
    else:
        rows = F.cross_entropy(x2, t, ignore_index=ignore_index, reduction="none",
                               label_smoothing=eps)
        valid = t != ignore_index
        lse = torch.logsumexp(x2, -1)
        rows = rows + torch.where(valid, z * lse * lse, torch.zeros_like(lse))
        loss = {"none": lambda: rows.reshape(target.shape), "sum": rows.sum,
                "mean": lambda: rows.sum() / valid.sum()}[reduction]()
    loss.backward(gout.double())
    return loss.detach(), x.grad


def _gout(c, target):
    if c["reduction"] == "none":
        g = torch.Generator().manual_seed(7)
        return torch.randn(target.shape, generator=g, dtype=torch.float64).to(c["dtype"])
    return torch.tensor(0.7, dtype=c["dtype"])


def _run_case(rank: int, c: dict, interpret: bool) -> None:
    import torch.distributed as dist

    from helpers import assert_close, expect_launches
    from softmax_gpu import heuristics
    from softmax_gpu.vocab_parallel import shard_config, vocab_parallel_cross_entropy

    full, target, shard, off = _make_case(c, rank)
    W = shard.shape[-1]
    x = shard.detach().requires_grad_(True)
    gout = _gout(c, target)
    looped = c.get("path") == "looped"
    override = heuristics.override(**LOOPED) if looped else contextlib.nullcontext()
    with override:
        if interpret:
            cfg = shard_config(target.numel(), W, x.element_size(), x.device)
            kind = "single" if cfg.path == "single" else "looped"
            names = (f"vp_stats_{kind}",) + ((f"vp_grad_{kind}",) if W else ())
            launches = expect_launches(*names)
        else:
            launches = contextlib.nullcontext()
        with launches:
            loss = vocab_parallel_cross_entropy(
                x, target, ignore_index=c.get("ignore_index", -100), reduction=c["reduction"],
                label_smoothing=c.get("eps", 0.0), z_loss=c.get("z", 0.0),
                vocab_size=c.get("vocab_size"))
            loss.backward(gout)
    ref_loss, ref_grad = _reference(full, target, c, gout)
    dtype = c["dtype"]
    assert loss.dtype == dtype and loss.shape == ref_loss.shape, (loss.dtype, loss.shape)
    assert_close(loss.detach(), ref_loss, dtype)
    # the gradient's rounding error grows with the logits' size (x - lse)
    finite = full.double()[full.double().isfinite()]
    assert_close(x.grad, ref_grad[..., off:off + W], dtype,
                 scale=max(1.0, float(finite.abs().max()) / 8))
    # every rank returns the same loss, bit for bit
    mine = loss.detach().double().reshape(-1)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for other in every:
        torch.testing.assert_close(other, mine, rtol=0, atol=0, equal_nan=True)


def _bad_inputs(rank: int) -> None:
    """Clear errors on every rank (so no rank is left waiting in a collective)."""
    import softmax_gpu.vocab_parallel as D

    widths = (7, 19, 12)
    W, off = widths[rank], sum(widths[:rank])
    x = torch.randn(4, W)
    ok = torch.tensor([0, 5, 37, -100])
    with pytest.raises(ValueError, match=r"add up to 38, not vocab_size=40"):
        D.vocab_parallel_cross_entropy(x, ok, vocab_size=40)
    D.vocab_parallel_cross_entropy(x, ok, vocab_size=38)  # the matching layout works
    for bad in (38, 1000, -1):
        msg = rf"class id {bad}, outside the global vocabulary \[0, 38\)"
        with pytest.raises(ValueError, match=msg):
            D.vocab_parallel_cross_entropy(x, torch.tensor([0, bad, 3, 4]))
    # Without the host check (as on CUDA tensors) a bad target poisons its row on the
    # device instead: NaN loss and gradient for that row on every rank, the rest exact.
    check, D._check_targets = D._check_targets, lambda *a: None
    try:
        x.requires_grad_(True)
        t = torch.tensor([0, 38, 20, -100])
        loss = D.vocab_parallel_cross_entropy(x, t, reduction="none")
        loss.sum().backward()
    finally:
        D._check_targets = check
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all(), loss
    assert x.grad[1].isnan().all() and x.grad[[0, 2, 3]].isfinite().all()
    assert (x.grad[3] == 0).all()


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
    finally:
        D.dist.all_gather = gather
    assert len(calls) == 1, calls
    assert dist.get_world_size() == 3


def _torch_path(rank: int) -> None:
    """The torch reference path (CPU without TRITON_INTERPRET), through the collectives."""
    import softmax_gpu.vocab_parallel as D

    backend = D.backend_for
    D.backend_for = lambda t: "torch"
    try:
        for c in (WORLD3[0], WORLD3[2]):
            _run_case(rank, c, interpret=False)
    finally:
        D.backend_for = backend


def _init_child(rank, world, port, interpret, backend="gloo"):
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before softmax_gpu is imported
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import softmax_gpu

    assert softmax_gpu.backend_for(torch.empty(0)) == ("triton" if interpret else "torch")
    return dist


def _worker(rank, world, port, interpret, cases, extras):
    torch.set_num_threads(1)
    dist = _init_child(rank, world, port, interpret)
    import softmax_gpu

    with softmax_gpu.poison_outputs():
        for c in cases:
            try:
                _run_case(rank, c, interpret)
            except BaseException as e:
                raise AssertionError(f"rank {rank}, case {c}: {e}") from e
        for name in extras:
            globals()[name](rank)
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
    through the collectives."""
    dist = _init_child(rank, world, port, interpret, backend="nccl")
    from helpers import assert_close, expect_launches
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    for dtype, V in ((F32, 50000), (BF16, 50000), (BF16, 4000), (F64, 3000)):
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(64, V, generator=g) * 3).to(dtype).cuda()
        t = torch.randint(0, V, (64,), generator=g).cuda()
        t[3] = -100
        x = full.clone().requires_grad_(True)
        with expect_launches("vp_stats", "vp_grad"):
            loss = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3)
            loss.backward()
        xr = full.double().requires_grad_(True)
        rows = F.cross_entropy(xr, t, reduction="none", label_smoothing=0.1)
        valid = t != -100
        rows = rows + torch.where(valid, 1e-3 * torch.logsumexp(xr, -1) ** 2, 0.0)
        ref = rows.sum() / valid.sum()
        ref.backward()
        assert_close(loss, ref, dtype)
        assert_close(x.grad, xr.grad, dtype, scale=2.0)
    dist.destroy_process_group()


# --- tests -------------------------------------------------------------------


def test_two_ranks():
    """Uneven shards, ignore_index rows, label smoothing, z-loss, each reduction,
    non-contiguous shards, the looped path, a rank holding no target."""
    from helpers import spawn_group

    spawn_group(_worker, 2, WORLD2, ())


def test_three_ranks():
    """As above with an empty shard, -inf columns, far-apart maxima across ranks,
    a custom ignore_index; bad inputs; the width cache; the torch path."""
    from helpers import spawn_group

    spawn_group(_worker, 3, WORLD3, ("_bad_inputs", "_width_cache", "_torch_path"))


def test_world_size_one_on_cuda():
    from helpers import DEVICE, spawn_group

    if DEVICE != "cuda":
        pytest.skip("NCCL needs a GPU; the CPU groups above run the kernels in the interpreter")
    spawn_group(_cuda_worker, 1)


def test_no_process_group_is_a_clear_error():
    import torch.distributed as dist

    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        vocab_parallel_cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be"),
    (dict(vocab_size=0), ValueError, "vocab_size must be a positive int"),
    (dict(target=torch.zeros(3)), TypeError, "integer class ids"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target shape"),
    (dict(x=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "floating tensor"),
])
def test_argument_errors(kwargs, exc, match):
    """Checked before any collective (no group needed to see them)."""
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    x = kwargs.pop("x", torch.randn(3, 5))
    t = kwargs.pop("target", torch.tensor([0, 1, 2]))
    with pytest.raises(exc, match=match):
        vocab_parallel_cross_entropy(x, t, **kwargs)


# --- the shard kernels against their torch reference, in process -------------


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("path", ["single", "looped"])
def test_shard_kernels_match_torch_reference(path, dtype, smooth):
    """Stats and gradient kernels on one shard (no collectives): targets owned
    here, elsewhere, ignored and out of range; a strided shard; -inf entries."""
    from helpers import DEVICE, TOL, expect_launches, rand
    from softmax_gpu import heuristics
    import softmax_gpu.vocab_parallel as D

    M, W, off, V, ignore = 9, 40, 30, 100, -100
    buf = rand(M, W + 8, dtype=dtype)
    x = buf[:, 4:4 + W]
    x[2, :] = -math.inf  # a shard row entirely -inf: this rank contributes nothing
    x[3, 5] = -math.inf
    t = torch.tensor([30, 69, 5, 99, ignore, 31, 100, 45, -7], device=DEVICE)
    override = heuristics.override(**LOOPED) if path == "looped" else contextlib.nullcontext()
    with override:
        with expect_launches(f"vp_stats_{path}"):
            mx, st = D._shard_stats(x, t, off, V, ignore, smooth)
        rmx, rst = D._torch_stats(x, t, off, V, ignore, smooth)
        atol, rtol = TOL[F64 if dtype == F64 else F32]
        torch.testing.assert_close(mx, rmx, atol=0, rtol=0)
        torch.testing.assert_close(st, rst, atol=atol * W, rtol=rtol, equal_nan=True)
        assert st[1, 6].isnan() and st[1, 8].isnan()  # ids 100 and -7 are outside [0, V)
        assert st[1, 4] == 0 and st[1, 3] == 0 and st[0, 2] == 0  # ignored, not owned, empty
        acc = mx.dtype
        lse = (torch.randn(M, dtype=torch.float64) + 4).to(acc).to(DEVICE)
        g = torch.rand(M, dtype=torch.float64).to(acc).to(DEVICE)
        coef = D._scalars((0.9, 0.1 / V, 2e-2), acc, x.device)
        with expect_launches(f"vp_grad_{path}"):
            dx = D._shard_grad(x, t, lse, g, coef, off, V, ignore)
        rdx = D._torch_grad(x, t, lse, g, coef, off, V, ignore)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(dx.double(), rdx.double(), atol=atol * 4, rtol=rtol,
                                   equal_nan=True)
        assert dx[6].isnan().all() and dx[8].isnan().all() and (dx[4] == 0).all()
        assert not dx[[0, 1, 2, 3, 5, 7]].isnan().any()


def test_empty_shard_and_no_rows():
    from helpers import DEVICE, expect_launches
    import softmax_gpu.vocab_parallel as D

    x = torch.empty(4, 0, device=DEVICE)
    t = torch.tensor([0, 3, -100, 9], device=DEVICE)
    with expect_launches("vp_stats_single"):
        mx, st = D._shard_stats(x, t, 5, 10, -100, True)
    assert (mx == -math.inf).all() and (st[0] == 0).all() and (st[2] == 0).all()
    assert (st[1] == 0).all()
    coef = D._scalars((1.0, 0.0, 0.0), torch.float32, x.device)
    dx = D._shard_grad(x, t, torch.zeros(4, device=DEVICE), torch.ones(1, device=DEVICE),
                       coef, 5, 10, -100)
    assert dx.shape == (4, 0)
    with expect_launches():
        mx, st = D._shard_stats(torch.empty(0, 7, device=DEVICE),
                                torch.empty(0, dtype=torch.long, device=DEVICE), 0, 7, -100, False)
    assert mx.shape == (0,) and st.shape == (2, 0)


def test_comm_bytes_model():
    from perf.vocab_parallel import comm_bytes, shard_widths

    assert shard_widths(10, 3) == [4, 3, 3] and sum(shard_widths(151936, 8)) == 151936
    b = comm_bytes(16384, 128256, 8, torch.bfloat16)
    assert b["ours_payload_bytes"] == 3 * 16384 * 4  # max [M] + sums [2, M], fp32
    assert b["gather_logits_payload_bytes"] == 16384 * 128256 * 2
    assert b["ours_sent_bytes_per_rank"] == 2 * 7 / 8 * 3 * 16384 * 4
    assert b["ratio"] > 10000
    fp64 = comm_bytes(4, 10, 2, torch.float64, label_smoothing=True)
    assert fp64["ours_payload_bytes"] == 4 * 4 * 8  # max + three sums, fp64
    assert math.isnan(comm_bytes(4, 10, 1, torch.float32)["ratio"])  # nothing moves at p = 1
