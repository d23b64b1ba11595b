"""Host cost per call: our own Python/torch work around each public op, beside
torch's own call, in one run.

    python -m perf.host                  # CUDA if there is a GPU, else CPU
    python -m perf.host --device cpu --out /tmp/host

Our kernels are replaced by no-op launchers for the measurement (the
``*_kernel`` objects of ``softmax_gpu.kernels``, restored afterwards), so the
figure is our host work alone: argument checks, launch planning, outputs,
autograd, excluding Triton's own launcher. On CUDA a second set of rows
("softmax_gpu+launch") times the real eager call, Triton's launcher included
(host time: the launches are asynchronous; the shapes are tiny).

On a CPU-only machine the kernels must be the interpreter's (this module sets
``TRITON_INTERPRET=1`` before importing softmax_gpu), so that CPU tensors take
the same host path as CUDA tensors instead of the torch reference.

Each row: op ``host:<call>``, provider ``softmax_gpu`` / ``torch``, the median
µs per call over several repeats in ``us``, written to
``<out>/<device-slug>_<date>_host.csv`` in the harness's long format (``ms``
holds the same figure in milliseconds), and printed as a table.

Calls: fwd = no gradient needed; fwd+grad = the input requires grad (autograd
records the op); fwd+bwd = forward, then ``torch.autograd.grad`` of it (the
backward's cost through the autograd engine is the difference of the last
two); bwd node = the op's backward node called directly, without the engine.
The vocab-parallel rows run in the caller's process group, else in a group
of one rank made for the measurement (no collective runs at one rank), with
the whole vocabulary as the shard, beside ``F.cross_entropy``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time

import torch

__all__ = ["main", "measure"]


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    @staticmethod
    def _noop(*args, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._noop


@contextlib.contextmanager
def stubbed_kernels():
    """Replace every kernel of softmax_gpu.kernels by a no-op launcher and
    forget the memoised plans (they hold the real launchers); restore both."""
    import softmax_gpu
    from softmax_gpu.kernels import cross_entropy, softmax, vocab_parallel

    saved = []
    for mod in (softmax, cross_entropy, vocab_parallel):
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                saved.append((mod, name, obj))
                setattr(mod, name, _NoLaunch())
    # the memoised plans hold the launchers (a release without them has none)
    clear = getattr(softmax_gpu._dispatch, "clear_plans", lambda: None)
    clear()
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        clear()


def _time_us(fn, repeats: int = 15, min_s: float = 0.02, warmup: int = 50,
             first_n: int = 16) -> float:
    """Median over ``repeats`` of the mean µs per call of ``fn``, after
    ``warmup`` untimed calls; each repeat runs n calls, n doubled from
    ``first_n`` until one repeat takes ``min_s``."""
    for _ in range(warmup):
        fn()
    n = first_n
    while True:  # calibrate: one repeat takes at least min_s
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            break
        n *= 2
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def _cases(device: str):
    """(call name, shape, ours, torch's) per public op."""
    import torch.nn.functional as F

    import softmax_gpu as sg

    M, N = 8, 64
    x = torch.randn(M, N, device=device)
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, N, device=device)
    t = torch.randint(0, N, (M,), device=device)
    sm_mod, lsm_mod = sg.Softmax(dim=-1), sg.LogSoftmax(dim=-1)
    tsm_mod = torch.nn.Softmax(dim=-1)
    ce_mod, tce_mod = sg.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    # the LM head: hidden [M, 16] and head [N, 16], both trained
    hg = torch.randn(M, 16, device=device, requires_grad=True)
    wg = torch.randn(N, 16, device=device, requires_grad=True)

    def lce_fwd_bwd(f):
        def run():
            torch.autograd.grad(f(hg, wg, t), (hg, wg))
        return run

    def eager_lce(h, w, tt):
        return F.cross_entropy(F.linear(h, w), tt)

    def fwd_bwd(f, *args):
        def run():
            y = f(xg, *args)
            torch.autograd.grad(y, xg, dy if y.dim() else None)
        return run

    def node(f):
        """The backward node of f's output alone (no autograd engine around it),
        made on the first call of this closure (its output kept alive with it)."""
        holder = {}

        def run():
            if "fn" not in holder:
                y = f(xg, -1)
                fn = y.grad_fn
                holder.update(y=y, fn=fn.apply if hasattr(fn, "apply") else fn)  # Python / C++
            with torch.no_grad():  # as the engine runs it (grad mode on means create_graph)
                holder["fn"](dy)
        return run

    shape = f"{M}x{N} fp32"
    cases = [
        ("softmax fwd", shape, lambda: sg.softmax(x, -1), lambda: torch.softmax(x, -1)),
        ("softmax fwd+grad", shape, lambda: sg.softmax(xg, -1), lambda: torch.softmax(xg, -1)),
        ("softmax fwd+bwd", shape, fwd_bwd(sg.softmax, -1), fwd_bwd(torch.softmax, -1)),
        ("log_softmax fwd", shape, lambda: sg.log_softmax(x, -1),
         lambda: torch.log_softmax(x, -1)),
        ("log_softmax fwd+grad", shape, lambda: sg.log_softmax(xg, -1),
         lambda: torch.log_softmax(xg, -1)),
        ("log_softmax fwd+bwd", shape, fwd_bwd(sg.log_softmax, -1),
         fwd_bwd(torch.log_softmax, -1)),
        ("softmax bwd node", shape, node(sg.softmax), node(torch.softmax)),
        ("log_softmax bwd node", shape, node(sg.log_softmax), node(torch.log_softmax)),
        ("Softmax module fwd", shape, lambda: sm_mod(x), lambda: tsm_mod(x)),
        ("LogSoftmax module fwd", shape, lambda: lsm_mod(x),
         lambda: torch.nn.functional.log_softmax(x, -1)),
        ("cross_entropy fwd", shape, lambda: sg.cross_entropy(x, t),
         lambda: F.cross_entropy(x, t)),
        ("cross_entropy fwd+grad", shape, lambda: sg.cross_entropy(xg, t),
         lambda: F.cross_entropy(xg, t)),
        ("cross_entropy fwd+bwd", shape, fwd_bwd(sg.cross_entropy, t),
         fwd_bwd(F.cross_entropy, t)),
        ("cross_entropy sum fwd+grad", shape, lambda: sg.cross_entropy(xg, t, reduction="sum"),
         lambda: F.cross_entropy(xg, t, reduction="sum")),
        ("cross_entropy none fwd+grad", shape,
         lambda: sg.cross_entropy(xg, t, reduction="none"),
         lambda: F.cross_entropy(xg, t, reduction="none")),
        ("cross_entropy_with_grad", shape, lambda: sg.cross_entropy_with_grad(x, t),
         fwd_bwd(F.cross_entropy, t)),
        ("CrossEntropyLoss module fwd+grad", shape, lambda: ce_mod(xg, t),
         lambda: tce_mod(xg, t)),
        ("linear_cross_entropy fwd+grad", f"{M}x16 @ {N}x16 fp32",
         lambda: sg.linear_cross_entropy(hg, wg, t), lambda: eager_lce(hg, wg, t)),
        ("linear_cross_entropy fwd+bwd", f"{M}x16 @ {N}x16 fp32",
         lce_fwd_bwd(sg.linear_cross_entropy), lce_fwd_bwd(eager_lce)),
    ]
    import torch.distributed as dist

    if dist.is_initialized():  # the group measure() made (or the caller's)
        from softmax_gpu.distributed import vocab_parallel_cross_entropy as vp_ce

        vp_shape = f"{shape}, {dist.get_world_size()} rank(s)"
        cases += [
            ("vocab_parallel_ce fwd+grad", vp_shape, lambda: vp_ce(xg, t),
             lambda: F.cross_entropy(xg, t)),
            ("vocab_parallel_ce fwd+bwd", vp_shape, fwd_bwd(vp_ce, t),
             fwd_bwd(F.cross_entropy, t)),
        ]
    return cases


# _time_us settings: "full" (the default), "brief" (a timed step of the
# device check: ~0.05 s a row), "quick" (tests of the harness; rough figures)
TIMINGS = {"full": {}, "brief": dict(repeats=5, min_s=0.005, warmup=10),
           "quick": dict(repeats=3, min_s=0.002, warmup=1, first_n=1)}


def measure(device: str, *, with_launch: bool = False, quick: bool = False,
            timing: str | None = None, rows: list | None = None,
            on_row=None) -> list[dict]:
    """Rows (call, shape, provider, us) for every case on ``device``,
    appended to ``rows`` (and passed to ``on_row``) as each is measured, so
    that an interrupted run keeps them. ``timing``: a :data:`TIMINGS` key
    (``quick=True`` is ``"quick"``)."""
    import torch.distributed as dist

    from perf.vocab_parallel import ensure_group

    settings = TIMINGS[timing or ("quick" if quick else "full")]
    rows = [] if rows is None else rows

    def add(name, shape, provider, fn):
        rows.append(dict(call=name, shape=shape, provider=provider, us=_time_us(fn, **settings)))
        if on_row:
            on_row(rows[-1])

    # the vocab-parallel op needs a group: the caller's, else one rank of our
    # own (no collective at one rank), destroyed afterwards
    _, _, created = ensure_group(device)
    try:
        with stubbed_kernels():
            # cases made under the stubs: their backward nodes hold stubbed plans
            for name, shape, ours, theirs in _cases(device):
                add(name, shape, "softmax_gpu", ours)
        for name, shape, ours, theirs in _cases(device):
            add(name, shape, "torch", theirs)
            if with_launch:
                add(name, shape, "softmax_gpu+launch", ours)
    finally:
        if created:
            dist.destroy_process_group()
    return rows


def _table(rows: list[dict]) -> str:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    calls = list(dict.fromkeys(r["call"] for r in rows))
    by = {(r["call"], r["provider"]): r["us"] for r in rows}
    head = ["call"] + [f"{p} µs" for p in providers] + ["ours / torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in calls:
        cells = [c] + [f"{by[(c, p)]:.1f}" if (c, p) in by else "" for p in providers]
        ratio = by.get((c, "softmax_gpu"), float("nan")) / by.get((c, "torch"), float("nan"))
        lines.append("| " + " | ".join(cells + [f"{ratio:.1f}x"]) + " |")
    # the backwards, as differences
    for op in ("softmax", "log_softmax", "cross_entropy"):
        a, b = by.get((f"{op} fwd+bwd", "softmax_gpu")), by.get((f"{op} fwd+grad", "softmax_gpu"))
        ta, tb = by.get((f"{op} fwd+bwd", "torch")), by.get((f"{op} fwd+grad", "torch"))
        if None not in (a, b, ta, tb):
            lines.append(f"| {op} bwd (difference) | {a - b:.1f} | {ta - tb:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default perf/results/<device>/<date>/)")
    p.add_argument("--quick", action="store_true",
                   help="few short repeats (checks the harness; the figures are rough)")
    p.add_argument("--brief", action="store_true",
                   help="fewer, shorter repeats than the default (a timed step: ~0.05 s a row)")
    p.add_argument("--launch", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the real calls, kernels launched (default: on CUDA)")
    args = p.parse_args(argv)

    from perf import env
    from perf.env import choose_device, enable_interpreter_for_cpu, run_info

    device = choose_device(args.device)
    warning = enable_interpreter_for_cpu(device)
    if warning:
        raise SystemExit(f"perf.host: {warning}")
    info = run_info(device)
    launch = device == "cuda" if args.launch is None else args.launch

    from perf.report import output_stem, write_csv
    from perf.sweep import COLUMNS

    out_dir = args.out or os.path.join("perf", "results", info.device_slug, info.date)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, output_stem(out_dir, info, "host") + ".csv")

    def csv_row(r):
        row = {c: "" for c in COLUMNS}
        row.update(op=f"host:{r['call']}", provider=r["provider"], dtype="fp32", M=8, N=64,
                   ms=r["us"] / 1e3, device=info.device_name, torch=info.torch,
                   triton=info.triton, cuda=info.cuda, timestamp=info.timestamp, status="ok",
                   shape_kind="host",
                   note=("our host work only: kernels replaced by no-op launchers"
                         if r["provider"] == "softmax_gpu" else
                         "real eager call, Triton launcher included"
                         if r["provider"] == "softmax_gpu+launch" else "torch's own call"))
        return row

    def on_row(r):  # the CSV holds every row measured so far
        print(f"  {r['call']} [{r['provider']}]: {r['us']:.1f} us", flush=True)
        write_csv([csv_row(x) for x in rows], path + ".part")
        os.replace(path + ".part", path)  # never a half-written CSV

    rows: list[dict] = []
    env.sigterm_interrupts()  # `timeout`: stop; the CSV already holds what was measured
    interrupted = False
    try:
        measure(device, with_launch=launch, timing="quick" if args.quick else
                "brief" if args.brief else "full", rows=rows, on_row=on_row)
    except KeyboardInterrupt:
        interrupted = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"host cost per call on {info.device_name} (torch {info.torch}, triton {info.triton})"
          + (": INTERRUPTED, the rows measured before" if interrupted else ""))
    print(_table(rows))
    print(f"wrote {path}")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
