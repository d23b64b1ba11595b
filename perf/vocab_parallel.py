"""Vocab-parallel cross-entropy: bytes communicated per step, and timings.

    python -m perf.vocab_parallel                      # single rank: world size 1
    python -m perf.vocab_parallel --linear             # also the linear version
    torchrun --nproc-per-node 8 -m perf.vocab_parallel # real tensor parallelism

Bytes: per training step (forward + backward) our op runs an all-reduce MAX of
N values and one all-reduce SUM of k x N values (k = 2, or 3 with label
smoothing), fp32 (fp64 for fp64 logits); the backward communicates nothing.
The shard widths are all-gathered once per layout (8 bytes per rank, first
call only). The alternative, gathering the logits, moves the [N, V] logits.
Both are reported as the payload (bytes of the tensors handed to the
collectives on one rank) and as the bytes one rank sends under the ring
algorithms: all-reduce 2 (p - 1) / p x payload, all-gather (p - 1) / p x the
gathered tensor.

The linear version (``vocab_parallel_linear_cross_entropy``, the lm_head
sharded by vocabulary rows, input replicated) runs the same two all-reduces
per chunk of tokens (the same N-length vectors in all, 2 x chunks
collectives), plus ONE all-reduce SUM of dX [N, D] in the input's dtype (each
rank's dX is its shard's part). Gathering the logits instead moves the
[N, V] logits and still needs that dX all-reduce (any tensor-parallel
lm_head does), so both columns include it; ``linear_comm_bytes`` reports
the parts.

Timing: run standalone, the module initialises a single-rank process group
(NCCL on a GPU, gloo on CPU) on 127.0.0.1 and says so. A group of one rank
runs no collective (the op skips them), so the time is our kernels and host
work alone, a lower bound for a multi-GPU step, which adds two latency-bound
all-reduces of [N]-sized vectors per call (per chunk for the linear
version) and the linear version's dX all-reduce. With ``--shard-of
TP`` it times a rank's V/TP-wide shard instead of the whole vocabulary (the
per-rank kernel work at tensor parallelism TP). Under ``torchrun`` it uses
the launched group and each rank times its own shard of V. On CPU the
kernels run in Triton's interpreter and the timings only exercise the code.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

import torch

__all__ = ["shard_widths", "comm_bytes", "linear_comm_bytes", "ensure_group", "time_case",
           "time_linear_case", "vocab_parallel_case", "main"]

_ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def shard_widths(V: int, world_size: int) -> list[int]:
    """Even vocabulary shards, the remainder on the lowest ranks."""
    base, extra = divmod(V, world_size)
    return [base + (r < extra) for r in range(world_size)]


def comm_bytes(M: int, V: int, world_size: int, dtype: torch.dtype,
               label_smoothing: bool = False) -> dict:
    """Bytes communicated per step by our method next to gathering the logits.

    M rows (tokens), V global classes, ``world_size`` ranks, logits ``dtype``.
    """
    p = world_size
    stat = 8 if dtype == torch.float64 else 4
    k = 3 if label_smoothing else 2
    ours = (1 + k) * M * stat  # all-reduce MAX [M] + all-reduce SUM [k, M]
    logits = M * V * _ELEM[dtype]
    ours_wire = 2 * (p - 1) / p * ours
    gather_wire = (p - 1) / p * logits
    return dict(
        M=M, V=V, world_size=p, dtype=str(dtype).replace("torch.", ""),
        ours_payload_bytes=ours,
        ours_sent_bytes_per_rank=ours_wire,
        widths_first_call_bytes=8 * p,
        gather_logits_payload_bytes=logits,
        gather_logits_sent_bytes_per_rank=gather_wire,
        ratio=(gather_wire / ours_wire) if p > 1 else math.nan,  # nothing moves at p = 1
    )


def linear_comm_bytes(N: int, D: int, V: int, world_size: int, dtype: torch.dtype,
                      label_smoothing: bool = False, chunk_size: int = 4096) -> dict:
    """Bytes communicated per step (forward + backward) by
    ``vocab_parallel_linear_cross_entropy`` next to gathering the logits.

    N tokens, D features, V global classes, ``world_size`` ranks, input
    ``dtype``, chunks of ``chunk_size`` rows (the planned default is 4096 for
    LLM shapes). Ours: per chunk an all-reduce MAX of its rows and an
    all-reduce SUM of k x rows (k = 2, 3 with label smoothing; fp32, fp64 for
    fp64), then one all-reduce SUM of dX [N, D]. Gather: an all-gather of the
    [N, V] logits, then the same dX all-reduce. Ring algorithms, as
    :func:`comm_bytes`.
    """
    p = world_size
    stat = 8 if dtype == torch.float64 else 4
    k = 3 if label_smoothing else 2
    chunks = -(-N // chunk_size) if N else 0
    stats = (1 + k) * N * stat
    dx = N * D * _ELEM[dtype]
    logits = N * V * _ELEM[dtype]
    ours_wire = 2 * (p - 1) / p * (stats + dx)
    gather_wire = (p - 1) / p * logits + 2 * (p - 1) / p * dx
    return dict(
        N=N, D=D, V=V, world_size=p, dtype=str(dtype).replace("torch.", ""),
        chunks=chunks,
        stats_payload_bytes=stats,
        stats_collectives=2 * chunks,
        dx_payload_bytes=dx,
        ours_payload_bytes=stats + dx,
        ours_sent_bytes_per_rank=ours_wire,
        gather_logits_payload_bytes=logits,
        gather_sent_bytes_per_rank=gather_wire,
        ratio=(gather_wire / ours_wire) if p > 1 else math.nan,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_group(device: str) -> tuple[int, str, bool]:
    """(world size, backend, whether this call created the group).

    Uses an existing group; else the torchrun environment when WORLD_SIZE is
    set; else a single-rank group on 127.0.0.1 (NCCL for CUDA, gloo for CPU).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size(), str(dist.get_backend()), False
    backend = "nccl" if device == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    return dist.get_world_size(), backend, True


def time_case(M: int, V: int, dtype: torch.dtype, device: str, *, shard_of: int = 1,
              label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
    """Median ms of our op, forward and forward+backward, in the initialised group.

    Each rank times its shard of V (split over the group, or over ``shard_of``
    ranks when the group has one rank). With one rank, also times
    ``F.cross_entropy`` on the [M, width] logits for reference.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    from perf.timing import bench
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    world, rank = dist.get_world_size(), dist.get_rank()
    parts = world if world > 1 else shard_of
    width = shard_widths(V, parts)[rank]
    vocab = V if parts == world else width  # one rank timing a shard sees it as the vocabulary
    g = torch.Generator(device=device)
    g.manual_seed(0)
    x = torch.randn((M, width), generator=g, device=device, dtype=dtype).mul_(2.0)
    t = torch.randint(0, vocab, (M,), generator=g, device=device)

    def loss():
        return vocab_parallel_cross_entropy(x, t, label_smoothing=label_smoothing,
                                            z_loss=z_loss)

    out = dict(timed_world_size=world, rank=rank, width=width)
    out["fwd_ms"] = bench(loss, device)[0]
    x.requires_grad_(True)
    out["fwd_bwd_ms"] = bench(lambda: loss().backward(), device, grad_to_none=[x])[0]
    if world == 1:
        def ref():
            return F.cross_entropy(x, t, label_smoothing=label_smoothing)

        out["torch_ce_fwd_bwd_ms"] = bench(lambda: ref().backward(), device, grad_to_none=[x])[0]
    x.requires_grad_(False)
    return out


def time_linear_case(N: int, D: int, V: int, dtype: torch.dtype, device: str, *,
                     shard_of: int = 1, chunk_size: int | None = None) -> dict:
    """Median ms of ``vocab_parallel_linear_cross_entropy`` forward+backward in
    the initialised group, each rank with its shard of the [V, D] weight
    (split over the group, or over ``shard_of`` ranks when the group has one
    rank); with one rank, also the single-device ``linear_cross_entropy`` of
    the same shard for reference."""
    import torch.distributed as dist

    import softmax_gpu
    from perf.timing import bench
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy

    world, rank = dist.get_world_size(), dist.get_rank()
    parts = world if world > 1 else shard_of
    width = shard_widths(V, parts)[rank]
    vocab = V if parts == world else width
    g = torch.Generator(device=device)
    g.manual_seed(0)
    x = torch.randn((N, D), generator=g, device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn((width, D), generator=g, device=device, dtype=dtype) * D ** -0.5
         ).requires_grad_(True)
    t = torch.randint(0, vocab, (N,), generator=g, device=device)

    def step():
        vocab_parallel_linear_cross_entropy(x, w, t, chunk_size=chunk_size).backward()

    out = dict(timed_world_size=world, rank=rank, width=width)
    out["fwd_bwd_ms"] = bench(step, device, grad_to_none=[x, w])[0]
    if world == 1:
        def ref():
            softmax_gpu.linear_cross_entropy(x, w, t, chunk_size=chunk_size).backward()

        out["single_device_fwd_bwd_ms"] = bench(ref, device, grad_to_none=[x, w])[0]
    return out


def vocab_parallel_case(M: int, V: int, world_size: int, dtype: torch.dtype, device: str, *,
                        timed: bool = True, shard_of: int = 1) -> dict:
    """One row of the report: :func:`comm_bytes` for ``world_size``, plus
    :func:`time_case` in the initialised group when ``timed`` (its own world
    size is in ``timed_world_size``)."""
    row = comm_bytes(M, V, world_size, dtype)
    if timed:
        row.update(time_case(M, V, dtype, device, shard_of=shard_of))
    return row


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def main(argv=None) -> int:
    from perf import env

    ap = argparse.ArgumentParser(prog="python -m perf.vocab_parallel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--m", type=int, default=None, help="rows (tokens); default 16384 (CPU: 64)")
    ap.add_argument("--v", type=int, nargs="+", default=None,
                    help="global vocabularies; default 128256 151936 (CPU: 1000)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "fp64"), default="bf16")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="world sizes of the bytes model (default 1 2 4 8)")
    ap.add_argument("--shard-of", type=int, default=1,
                    help="single rank: time a V/TP shard instead of the whole vocabulary")
    ap.add_argument("--d", type=int, default=None,
                    help="linear version: hidden size; default 4096 (CPU: 64)")
    ap.add_argument("--chunk", type=int, default=4096,
                    help="linear version: rows per chunk (bytes model and timing; default 4096)")
    ap.add_argument("--linear", action="store_true",
                    help="also time vocab_parallel_linear_cross_entropy")
    ap.add_argument("--no-time", action="store_true", help="bytes model only")
    args = ap.parse_args(argv)

    device = env.choose_device(args.device)
    warning = env.enable_interpreter_for_cpu(device)
    if warning:
        print("warning:", warning, file=sys.stderr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "fp64": torch.float64}[args.dtype]
    M = args.m or (16384 if device == "cuda" else 64)
    vocabs = args.v or ([128256, 151936] if device == "cuda" else [1000])

    print(f"# vocab-parallel cross-entropy, {args.dtype}, M={M}, device {device}")
    print("\n## bytes per step (forward + backward; the backward communicates nothing)\n")
    print("| V | world | ours: payload | ours: sent/rank | gather logits: payload "
          "| gather: sent/rank | gather / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for V in vocabs:
        for p in args.world_sizes:
            b = comm_bytes(M, V, p, dtype)
            print(f"| {V} | {p} | {_fmt_bytes(b['ours_payload_bytes'])} | "
                  f"{_fmt_bytes(b['ours_sent_bytes_per_rank'])} | "
                  f"{_fmt_bytes(b['gather_logits_payload_bytes'])} | "
                  f"{_fmt_bytes(b['gather_logits_sent_bytes_per_rank'])} | "
                  + (f"{b['ratio']:.0f}x |" if p > 1 else "- |"))
    D = args.d or (4096 if device == "cuda" else 64)
    print(f"\n## linear version, bytes per step (D={D}, chunks of {args.chunk} rows; both "
          "columns include the all-reduce of dX that any tensor-parallel lm_head needs)\n")
    print("| V | world | ours: stats | ours: dX | collectives | ours: sent/rank "
          "| gather: sent/rank | gather / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for V in vocabs:
        for p in args.world_sizes:
            b = linear_comm_bytes(M, D, V, p, dtype, chunk_size=args.chunk)
            print(f"| {V} | {p} | {_fmt_bytes(b['stats_payload_bytes'])} | "
                  f"{_fmt_bytes(b['dx_payload_bytes'])} | {b['stats_collectives']} + 1 | "
                  f"{_fmt_bytes(b['ours_sent_bytes_per_rank'])} | "
                  f"{_fmt_bytes(b['gather_sent_bytes_per_rank'])} | "
                  + (f"{b['ratio']:.1f}x |" if p > 1 else "- |"))
    if args.no_time:
        return 0

    world, backend, created = ensure_group(device)
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        how = ("a single-rank process group this script created" if created and world == 1
               else "the launched process group")
        print(f"\n## timings: world size {world} ({backend}, {how})\n")
        if world == 1:
            print("World size 1: the op runs no collective, so these are our kernels and host "
                  "work alone, a lower bound for a multi-GPU step." + (f" Each case times a V/{args.shard_of} shard." if
                                       args.shard_of > 1 else ""))
        if device != "cuda" or env.run_info(device).interpreted:
            print("CPU / Triton interpreter: the timings only exercise the code.")
        print("\n| V | rank width | fwd ms | fwd+bwd ms | torch F.cross_entropy fwd+bwd ms |")
        print("|---:|---:|---:|---:|---:|")
    for V in vocabs:
        r = time_case(M, V, dtype, device, shard_of=args.shard_of)
        if rank == 0:
            ref = r.get("torch_ce_fwd_bwd_ms", math.nan)
            print(f"| {V} | {r['width']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {ref:.3f} |")
    if args.linear:
        if rank == 0:
            print(f"\n### linear version, fwd+bwd (N={M}, D={D}, chunks of {args.chunk})\n")
            print("| V | rank width | ours ms | single-device linear_cross_entropy ms |")
            print("|---:|---:|---:|---:|")
        for V in vocabs:
            r = time_linear_case(M, D, V, dtype, device, shard_of=args.shard_of,
                                 chunk_size=args.chunk)
            if rank == 0:
                ref = r.get("single_device_fwd_bwd_ms", math.nan)
                print(f"| {V} | {r['width']} | {r['fwd_bwd_ms']:.3f} | {ref:.3f} |")
    if created:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
