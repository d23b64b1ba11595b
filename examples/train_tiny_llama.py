"""Train a small Llama three ways and compare them side by side.

    plain   transformers as shipped (its loss upcasts the logits to fp32)
    hook    softmax_gpu.integrations.transformers.apply(model, fused_linear=False)
    fused   softmax_gpu.integrations.transformers.apply(model)  (no logits in training)

Same initial weights, same batches, same optimizer for all three. Prints the
loss curves, the median step time and the peak GPU memory side by side, and
saves a PNG plot (matplotlib, from the ``perf`` extra).

    python examples/train_tiny_llama.py                  # GPU demo, 300 steps
    python examples/train_tiny_llama.py --steps 50
    python examples/train_tiny_llama.py --smoke          # a few steps of a tiny model (CPU ok)

Needs ``pip install -e ".[transformers,perf]"``. On a CPU softmax_gpu runs its
torch path (or Triton's interpreter with TRITON_INTERPRET=1): a smoke test,
not a benchmark; peak memory is reported on CUDA only.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

import softmax_gpu
from softmax_gpu.integrations.transformers import apply

MODES = ("plain", "hook", "fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="default 300 (4 with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model (vocab 256, 1 layer, 2x32 tokens) for a few steps")
    p.add_argument("--device", default="auto", help="auto: cuda when there is a GPU, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary by default")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="train_tiny_llama.png", help="PNG plot path ('' for none)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps is None:
        args.steps = 4 if args.smoke else 300
    if args.smoke:
        args.batch, args.seq, args.vocab, args.hidden, args.layers = 2, 32, 256, 32, 1
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def make_config(args):
    from transformers import LlamaConfig

    heads = max(1, args.hidden // 64)
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False)


class Batches:
    """A synthetic language: each token has 4 likely successors (90%), else a
    uniform one. Batch i is the same for every mode. The first 8 positions of
    each sequence are a "prompt" (label -100)."""

    def __init__(self, args):
        g = torch.Generator().manual_seed(args.seed + 1)
        self.next = torch.randint(0, args.vocab, (args.vocab, 4), generator=g)
        self.args = args

    def __call__(self, i: int):
        a = self.args
        g = torch.Generator().manual_seed(a.seed * 100003 + i)
        ids = torch.empty(a.batch, a.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, a.vocab, (a.batch,), generator=g)
        choice = torch.randint(0, 4, (a.batch, a.seq), generator=g)
        noise = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
        uniform = torch.rand(a.batch, a.seq, generator=g) < 0.1
        for t in range(1, a.seq):
            nxt = self.next[ids[:, t - 1], choice[:, t]]
            ids[:, t] = torch.where(uniform[:, t], noise[:, t], nxt)
        labels = ids.clone()
        labels[:, : min(8, a.seq - 1)] = -100
        return ids, labels


def train(mode: str, args, batches) -> dict:
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(make_config(args)).to(device=device, dtype=dtype).train()
    if mode == "hook":
        apply(model, fused_linear=False)
    elif mode == "fused":
        apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(args.steps):
        ids, labels = (t.to(device) for t in batches(step))
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    del model, opt, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    warm = times[min(len(times) - 1, max(1, len(times) // 10)):]
    step_s = statistics.median(warm)
    return {"losses": losses, "step_ms": 1e3 * step_s, "peak_mib": peak,
            "tokens_per_s": args.batch * args.seq / step_s}


def report(results: dict, args) -> None:
    modes = list(results)
    every = max(1, args.steps // 10)
    print("\nloss")
    print("step  " + "".join(f"{m:>12}" for m in modes))
    for s in sorted(set(range(0, args.steps, every)) | {args.steps - 1}):
        print(f"{s:>4}  " + "".join(f"{results[m]['losses'][s]:>12.4f}" for m in modes))
    print("\n| mode | step ms (median) | tokens/s | peak MiB | final loss |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        r = results[m]
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"| {m} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} | "
              f"{r['losses'][-1]:.4f} |")


def plot(results: dict, args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[perf]')")
        return
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 4))
    for m, r in results.items():
        ax0.plot(r["losses"], label=m)
    ax0.set(xlabel="step", ylabel="loss", title="training loss")
    ax0.legend()
    modes = list(results)
    ax1.bar(modes, [results[m]["step_ms"] for m in modes])
    ax1.set(ylabel="ms", title="median step time")
    peaks = [results[m]["peak_mib"] or 0.0 for m in modes]
    ax2.bar(modes, peaks)
    ax2.set(ylabel="MiB", title="peak memory" + ("" if any(peaks) else " (CUDA only)"))
    fig.suptitle(f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, batch {args.batch}x"
                 f"{args.seq}, {args.dtype}, {args.device}, softmax_gpu on "
                 f"{softmax_gpu.backend_for(torch.empty(0, device=args.device))}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"\nplot: {args.out}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = softmax_gpu.backend_for(torch.empty(0, device=args.device))
    print(f"device {args.device} ({args.dtype}), softmax_gpu backend: {backend}; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens, vocab {args.vocab}")
    batches = Batches(args)
    results = {}
    for mode in args.modes:
        results[mode] = train(mode, args, batches)
        print(f"  {mode}: done ({results[mode]['step_ms']:.1f} ms/step)")
        if args.json:  # after every mode: a run stopped early keeps the modes it finished
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f)
    report(results, args)
    if args.out:
        plot(results, args)
    return results


if __name__ == "__main__":
    main()
