"""softmax_gpu.integrations.megatron.vocab_parallel_cross_entropy: Megatron-core's
signature and semantics ([s, b, V/tp] logits, per-token fp32 loss, Megatron's
label-smoothing formula over the global vocabulary) on 2 gloo ranks.

Each rank builds the full [s, b, V] logits from a shared seed, takes its even
shard, and compares the per-token loss and its shard's gradient against a
float64 single-process reference of the formula. Like tests/test_distributed.py
this module imports neither softmax_gpu nor helpers at import time (spawned
children import it to find their worker, and must set TRITON_INTERPRET first).
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest
import torch

S, BATCH, V = 5, 2, 64
CASES = [
    dict(dtype=torch.float32, eps=0.0),
    dict(dtype=torch.bfloat16, eps=0.1, ignored=True),
    dict(dtype=torch.float64, eps=0.3, group="explicit"),
    dict(dtype=torch.float16, eps=0.0, ignored=True),
]


def megatron_reference(full: torch.Tensor, target: torch.Tensor, alpha: float):
    """float64 Megatron per-token loss: K = alpha V / (V - 1),
    (1 - K) * nll - K * mean_j log p_j; a target of -100 gives 0."""
    x = full.double()
    logp = torch.log_softmax(x, -1)
    keep = target != -100
    nll = -logp.gather(-1, torch.where(keep, target, 0)[..., None])[..., 0]
    k = alpha * V / (V - 1)
    loss = (1 - k) * nll - k * logp.mean(-1) if alpha > 0 else nll
    return torch.where(keep, loss, torch.zeros_like(loss))


def _case(c, rank, world):
    g = torch.Generator().manual_seed(99)
    full = (torch.randn(S, BATCH, V, generator=g, dtype=torch.float64) * 3).to(c["dtype"])
    target = torch.randint(0, V, (S, BATCH), generator=g)
    if c.get("ignored"):
        target[1, 0] = -100
    w = V // world
    return full, target, full[..., rank * w:(rank + 1) * w].contiguous()


def _worker(rank, world, port, interpret):
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before softmax_gpu is imported
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import softmax_gpu
    from softmax_gpu.integrations.megatron import vocab_parallel_cross_entropy

    assert softmax_gpu.backend_for(torch.empty(0)) == ("triton" if interpret else "torch")
    explicit = dist.new_group([0, 1])
    gtol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}
    with softmax_gpu.poison_outputs():
        for c in CASES:
            full, target, shard = _case(c, rank, world)
            x = shard.detach().requires_grad_(True)
            group = explicit if c.get("group") else None
            loss = vocab_parallel_cross_entropy(x, target, c["eps"], tp_group=group)
            assert loss.shape == (S, BATCH) and loss.dtype == torch.float32, loss
            # per-token weights, exact in fp32 (the loss's dtype)
            gout = (torch.arange(S * BATCH, dtype=torch.float64) % 4 + 1).reshape(S, BATCH) / 4
            loss.backward(gout.float())
            # the reference sees the same (rounded) logits
            ref_x = full.double().requires_grad_(True)
            ref = megatron_reference(ref_x, target, c["eps"])
            ref.backward(gout)
            w = V // world
            # the loss is fp32 whatever the logits' dtype
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=2e-6,
                                       msg=lambda m, c=c: f"{c}\n{m}")
            assert x.grad.dtype == c["dtype"]
            torch.testing.assert_close(x.grad.double(), ref_x.grad[..., rank * w:(rank + 1) * w],
                                       rtol=gtol[c["dtype"]], atol=gtol[c["dtype"]],
                                       msg=lambda m, c=c: f"{c}\n{m}")
            if c.get("ignored"):
                assert loss[1, 0] == 0 and (x.grad[1, 0] == 0).all()
            every = [torch.empty_like(loss) for _ in range(world)]
            dist.all_gather(every, loss.detach())
            assert all(torch.equal(o, every[0]) for o in every)
        for bad in (1.0, -0.1, 1 - 0.5 / V):
            with pytest.raises(ValueError, match="label_smoothing"):
                vocab_parallel_cross_entropy(torch.randn(S, BATCH, V // world), target, bad)
        for bad in (True, "0.1", None):
            with pytest.raises(TypeError, match="label_smoothing"):
                vocab_parallel_cross_entropy(torch.randn(S, BATCH, V // world), target, bad)
        # uneven shards (which the adapter's Megatron layout never has): a clear
        # error on every rank, naming the argument and the widths
        uneven = torch.randn(S, BATCH, V // world + (1 if rank else -1))
        with pytest.raises(ValueError, match=r"vocab_parallel_logits .*same shard width.*\["
                                             f"{V // world - 1}, {V // world + 1}\]"):
            vocab_parallel_cross_entropy(uneven, target, 0.1)
        # a NumPy scalar, as a config read with NumPy holds it: its value, as a float
        shard = torch.randn(S, BATCH, V // world)
        assert torch.equal(vocab_parallel_cross_entropy(shard, target, np.float32(0.1)),
                           vocab_parallel_cross_entropy(shard, target, float(np.float32(0.1))))
    dist.barrier()
    dist.destroy_process_group()


def test_megatron_vocab_parallel_two_ranks():
    from helpers import spawn_group

    spawn_group(_worker, 2)


def test_reference_is_megatrons_formula_at_tp1():
    """The float64 reference above is Megatron-core's own tp=1 computation
    (written out from its cross_entropy.py): nll, softmax, then
    (1 - K) * loss - K * mean(log(softmax))."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(S, BATCH, V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (S, BATCH), generator=g)
    alpha = 0.2
    m = x.max(-1, keepdim=True).values
    e = torch.exp(x - m)
    loss = torch.log(e.sum(-1)) - (x - m).gather(-1, t[..., None])[..., 0]
    p = e / e.sum(-1, keepdim=True)
    k = alpha * V / (V - 1)
    megatron = (1.0 - k) * loss - k * torch.log(p).mean(-1)
    torch.testing.assert_close(megatron_reference(x, t, alpha), megatron, rtol=1e-12, atol=1e-12)


def test_needs_a_process_group():
    from softmax_gpu.integrations.megatron import vocab_parallel_cross_entropy

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_cross_entropy(torch.randn(2, 1, 8), torch.zeros(2, 1, dtype=torch.long))
