"""The README's "Training backends" recipes, executed from the README itself.

Each ```python block there whose first line is ``# recipe: NAME`` is run
here and checked against a float64 torch reference of the contract its
framework expects (kernels in Triton's interpreter on CPU tensors).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"
V = 64


def recipes() -> dict[str, str]:
    text = README.read_text()
    section = text.split("\n## Training backends\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    found = {}
    for code in blocks:
        m = re.match(r"# recipe: (\w+)\n", code)
        if m:
            found[m.group(1)] = code
    return found


def load(name: str) -> dict:
    namespace: dict = {}
    exec(compile(recipes()[name], f"README.md recipe {name}", "exec"), namespace)
    return namespace


def test_every_recipe_is_tested():
    assert set(recipes()) == {"torchtitan", "torchtune", "lightning", "per_token"}


def micro_batches(seed=0, dtype=torch.bfloat16):
    """Two micro-batches of [B, S, V] logits and [B, S] labels with ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, n_ignored in ((6, 3), (9, 1)):
        logits = (torch.randn(2, s, V, generator=g) * 3).to(dtype)
        labels = torch.randint(0, V, (2, s), generator=g)
        labels.view(-1)[:n_ignored] = -100
        out.append((logits, labels))
    return out


def test_torchtitan_sum_over_global_tokens():
    fn = load("torchtitan")["cross_entropy_loss"]
    mbs = micro_batches()
    global_tokens = sum((lab != -100).sum() for _, lab in mbs)
    xs = [lg.clone().requires_grad_(True) for lg, _ in mbs]
    total = 0
    for x, (_, lab) in zip(xs, mbs):
        loss = fn(x.flatten(0, 1), lab.flatten())  # torchtitan passes [T, V], [T]
        assert loss.dtype == torch.float32 and loss.requires_grad
        (loss / global_tokens).backward()             # what the trainer does
        total = total + loss.detach() / global_tokens
    refs = [lg.double().requires_grad_(True) for lg, _ in mbs]
    ref = F.cross_entropy(torch.cat([r.flatten(0, 1) for r in refs]),
                          torch.cat([lab.flatten() for _, lab in mbs]))  # the global mean
    ref.backward()
    torch.testing.assert_close(total.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for x, r in zip(xs, refs):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=2e-2, atol=2e-4)


def test_torchtune_mean_over_kept_tokens():
    loss_fn = load("torchtune")["CrossEntropyLoss"]()
    mbs = micro_batches(1)
    running, tokens = 0, 0
    for logits, labels in mbs:
        x = logits.clone().requires_grad_(True)
        loss = loss_fn(x.reshape(-1, V), labels.reshape(-1))   # as torchtune's recipes call it
        ref_x = logits.double().requires_grad_(True)
        ref = F.cross_entropy(ref_x.reshape(-1, V), labels.reshape(-1))
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=2e-2, atol=2e-4)
        n = (labels != -100).sum()
        running, tokens = running + loss.detach() * n, tokens + n   # token-weighted
    flat = [(lg.double().reshape(-1, V), lab.reshape(-1)) for lg, lab in mbs]
    ref = F.cross_entropy(torch.cat([f for f, _ in flat]), torch.cat([t for _, t in flat]))
    torch.testing.assert_close((running / tokens).double(), ref, rtol=1e-5, atol=1e-6)


def test_per_token_losses_stay_fp32_and_differentiable():
    policy_loss = load("per_token")["policy_loss"]
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 5, V, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, V, (3, 5), generator=g)
    adv = torch.tensor([1.5, -0.5, 0.25])
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    x = logits.clone().requires_grad_(True)
    loss = policy_loss(x, ids, adv, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    ref_x = logits.double().requires_grad_(True)
    logp = torch.log_softmax(ref_x, -1).gather(-1, ids[..., None])[..., 0]
    ref = -(torch.exp(logp - logp.detach()) * adv.double()[:, None] * mask).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=2e-2, atol=2e-4)
    # the per-token values themselves: fp32, with a graph back to the bf16 logits
    import softmax_gpu
    nll = softmax_gpu.cross_entropy(x.flatten(0, 1), ids.flatten(), reduction="none",
                                    loss_dtype=torch.float32)
    assert nll.dtype == torch.float32 and nll.shape == (15,) and nll.grad_fn is not None


def test_lightning_training_step():
    L = pytest.importorskip("lightning")
    CausalLM = load("lightning")["CausalLM"]

    class Reference(CausalLM):
        def training_step(self, batch, batch_idx):
            logits = self.model(batch["input_ids"])
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   batch["labels"][:, 1:].flatten())

    g = torch.Generator().manual_seed(4)
    data = []
    for i in range(6):
        ids = torch.randint(0, V, (7,), generator=g)
        labels = ids.clone()
        labels[: i % 4] = -100
        data.append({"input_ids": ids, "labels": labels})

    def fit(cls):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
        module = cls(net)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
        assert trainer.global_step == 3
        return {n: p.detach().clone() for n, p in net.named_parameters()}

    got, ref = fit(CausalLM), fit(Reference)
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(p, dict(init.named_parameters())[name])  # it trained
