"""Which path a call takes (compiled kernels, interpreted kernels, the torch
reference, or the ``torch.library`` ops while a graph is traced), the CUDA
device guard, output allocation, and a recorder of the kernels launched.

CUDA tensors run the compiled Triton kernels. CPU tensors run the same kernels
in Triton's interpreter when the kernels were defined with
``TRITON_INTERPRET=1`` in the environment (set it before importing
softmax_gpu), and otherwise the torch reference implementation, which has
identical semantics.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator

import torch
from torch.autograd import forward_ad as _forward_ad

from .kernels import softmax as _softmax_kernels

__all__ = ["backend_for", "interpreted", "traced", "autocast_on", "record_launches",
           "poison_outputs", "new_output", "empty_like", "device_guard", "launch_device",
           "launch_on", "plan_cache", "remember", "clear_plans", "interpreter_problem",
           "first_order", "anchor_output", "saved", "graph_kept", "transformed",
           "refuse_transformed"]

_SUPPORTED_DEVICES = ("cuda", "cpu", "meta")


# Whether the kernels were defined for Triton's interpreter (TRITON_INTERPRET=1
# when softmax_gpu.kernels was imported): fixed for the life of the process.
_INTERPRETED = type(_softmax_kernels.softmax_fwd_single_kernel).__name__ == "InterpretedFunction"


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter."""
    return _INTERPRETED


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    parts = re.match(r"(\d+)\.(\d+)", version)
    return (int(parts[1]), int(parts[2])) if parts else (0, 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels, or None.

    Triton before 3.7 turns a loop bound held by a kernel argument into an int
    with ``int()`` of a one-element numpy array, which numpy 2.4 made a
    TypeError: under that pair every kernel with such a loop fails."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run "
                f"softmax_gpu's kernels under numpy {numpy_version}: Triton before 3.7 "
                "converts loop bounds with int() of a one-element array, an error since "
                "numpy 2.4. Install numpy<2.4 or triton>=3.7 (compiled kernels on a GPU "
                "are not affected)")
    return None


def _interpreter_check() -> str | None:
    if not _INTERPRETED:
        return None
    import numpy
    import triton
    return interpreter_problem(triton.__version__, numpy.__version__)


_INTERPRETER_PROBLEM = _interpreter_check()


def backend_for(tensor: torch.Tensor, name: str = "tensor") -> str:
    """``"triton"`` or ``"torch"``: the path a call on ``tensor`` takes.

    - CUDA tensors: ``"triton"`` (compiled kernels).
    - CPU tensors with ``TRITON_INTERPRET=1`` set before import: ``"triton"``
      (the same kernels, run by Triton's interpreter).
    - Any other CPU tensor: ``"torch"``, a reference implementation.
    - A tensor inside a ``torch.func`` transform (``vmap``, ``grad``,
      ``jvp``, ...) or carrying a forward-mode tangent
      (``torch.autograd.forward_ad``): ``"torch"`` (see :func:`transformed`).

    Any other device is a ValueError that names the argument (``name``).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    if _wrapped(tensor) and not _is_compiling():
        return "torch"
    dev = tensor.device.type
    if dev == "cuda":
        return "triton"
    if dev == "cpu":
        return "triton" if _INTERPRETED else "torch"
    check_device(tensor, name)  # meta passes: shapes only
    return "torch"


def anchor_output(ctx, *tensors) -> torch.Tensor:
    """``ctx.save_for_backward(*tensors)``, plus a fresh 0-element tensor that
    the Function returns as its last output (the caller drops it) and that is
    saved too. As an output its grad_fn is the Function's own node, so
    :func:`first_order` ties its error to a path that reaches every input of
    the Function: differentiating a gradient with respect to an input
    (``autograd.grad``, ``autograd.functional.hessian`` / ``hvp``) then
    raises, where without a path the input looked unused (an error about
    that, or zeros where unused inputs are allowed). Read the tensors back
    with :func:`saved`. No memory, and no work on the device."""
    anchor = torch.empty(0)
    ctx.save_for_backward(*tensors, anchor)
    ctx.anchored = True
    return anchor


def saved(ctx) -> tuple:
    """``ctx.saved_tensors`` without the anchor of :func:`anchor_output`."""
    out = ctx.saved_tensors
    return out[:-1] if getattr(ctx, "anchored", False) else out


def graph_kept() -> bool:
    """Inside a backward: whether the running backward keeps the graph
    (``retain_graph`` / ``create_graph``), so that a later backward may read
    this node's saved tensors again. A gradient saved by the forward is then
    scaled into a new tensor; otherwise (the graph is freed after this
    backward, and no later one can read it) it may be scaled in place and
    handed out. True where this torch cannot say."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def first_order(backward):
    """Decorates an ``autograd.Function.backward`` whose gradients are not
    themselves differentiable: as torch's ``once_differentiable`` (the body
    runs without grad), but under ``create_graph=True`` every gradient it
    returns raises when differentiated, whether or not the incoming gradient
    requires grad, and with respect to the Function's inputs too when the
    forward saved with :func:`anchor_output`. (``once_differentiable``
    checks only the incoming gradient: a gradient penalty of a loss whose
    grad_output is a constant got a gradient without a graph, and its term
    was silently dropped; and it detaches what it marks, so that a Hessian
    of the inputs came out as zeros.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        single = not isinstance(out, tuple)
        outs = (out,) if single else out
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        if not tensors:
            return out
        marks = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        if getattr(ctx, "anchored", False):
            marks.append(ctx.saved_tensors[-1])  # the path to the inputs
        err = torch._C._functions.DelayedError(
            f"{backward.__qualname__}: this gradient is not differentiable (no double "
            "backward): compute the loss with torch's op where create_graph=True must "
            "reach through it", len(marks))
        marked = err(*marks)
        marked = iter(marked if isinstance(marked, tuple) else (marked,))
        outs = tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in outs)
        return outs[0] if single else outs

    return wrapper


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_unpack_dual = torch._VF._unpack_dual


def _dual(t: torch.Tensor) -> bool:
    """True when ``t`` carries a tangent of the active
    ``torch.autograd.forward_ad`` dual level (none is active almost always,
    and that test is one attribute read)."""
    level = _forward_ad._current_level
    return level >= 0 and _unpack_dual(t, level).tangent is not None


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _wrapped(t: torch.Tensor) -> bool:
    return _functorch_wrapped(t) or _legacy_batched(t) or _dual(t)


def transformed(*tensors) -> bool:
    """True when any of ``tensors`` (None and non-tensors skipped) is inside a
    ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...),
    is batched by autograd's own vmap (a backward's grad_output under
    ``is_grads_batched`` or ``jacobian(vectorize=True)``) or is a
    forward-mode dual tensor (``torch.autograd.forward_ad``): the kernels
    cannot read a wrapper's storage, and a kernel's output would carry no
    tangent, so the ops (forward and backward) take torch ops there (the
    same semantics, composed of torch ops that every transform and
    forward-mode AD support). Never asked while dynamo traces."""
    if _is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and _wrapped(t):
            return True
    return False


def refuse_transformed(who: str, why: str, **tensors) -> None:
    """RuntimeError naming the first of ``tensors`` that is inside a
    ``torch.func`` transform or carries a forward-mode tangent, for the ops
    that cannot run there (``why``)."""
    for name, t in tensors.items():
        if transformed(t):
            raise RuntimeError(f"{who}: {name} is inside a torch.func transform (vmap, grad, "
                               f"jvp, ...), is batched by autograd (is_grads_batched, "
                               f"jacobian(vectorize=True)) or carries a forward-mode tangent "
                               f"(torch.autograd.forward_ad), {why}")


def refuse_batched_backward(who: str, **grads) -> None:
    """:func:`refuse_transformed` for the grad_outputs of a backward that runs
    only one grad_output at a time (``is_grads_batched``,
    ``jacobian(vectorize=True)`` and vmap over it are refused by name)."""
    refuse_transformed(f"{who}'s backward", "which it does not support: take the gradients "
                       "one grad_output at a time", **grads)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_is_functional = torch._is_functional_tensor
_jit_tracing = torch._C._get_tracing_state


def traced(t: torch.Tensor) -> bool:
    """True when a call on ``t`` must go through the ``torch.library`` ops
    rather than launch kernels eagerly: while torch.compile traces, under a
    dispatch mode (FakeTensorMode, make_fx, functionalization), or for a
    tensor subclass (fake, functional, DTensor, ...), and while
    ``torch.jit.trace`` records (the graph holds the ops)."""
    return (_is_compiling() or _dispatch_modes() > 0 or type(t) not in _PLAIN_TENSORS
            or _is_functional(t) or _jit_tracing() is not None)


def autocast_on(t: torch.Tensor) -> bool:
    """True when ``torch.autocast`` is enabled for ``t``'s device type (CUDA or
    CPU; other devices have no autocast here). Read at call time, so a traced
    graph sees the autocast state of the region it traces (torch.compile
    guards on it)."""
    dev = t.device.type
    return (dev == "cuda" or dev == "cpu") and torch.is_autocast_enabled(dev)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(
            f"{name} is on unsupported device {t.device}: softmax_gpu runs on CUDA or CPU tensors"
        )


# Memoised launch plans of every op module (key -> plan); they hold the
# kernels' launchers, so whoever swaps a kernel object must clear them.
_PLAN_CACHES: list[dict] = []
MAX_PLANS = 4096


def plan_cache() -> dict:
    """A new memo of launch plans, registered for :func:`clear_plans`."""
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


def remember(cache: dict, key, plan):
    """``cache[key] = plan`` (the cache is emptied when it reaches MAX_PLANS)."""
    if len(cache) >= MAX_PLANS:
        cache.clear()
    cache[key] = plan
    return plan


def clear_plans() -> None:
    """Forget every memoised launch plan of every op."""
    for cache in _PLAN_CACHES:
        cache.clear()


_recorder: list[str] | None = None


def record(names) -> None:
    """Called by the host after each launch with the kernel names it ran."""
    if _recorder is not None:
        _recorder.extend(names)


@contextlib.contextmanager
def record_launches() -> Iterator[list[str]]:
    """Collect the names of the Triton kernels launched inside the block.

    The test-suite uses it to fail when a path silently falls back to torch.
    """
    global _recorder
    previous = _recorder
    _recorder = [] if previous is None else previous
    start = len(_recorder)
    view: list[str] = []
    try:
        yield view
    finally:
        view.extend(_recorder[start:])
        _recorder = previous


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launch (no-op on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launch_device(device: torch.device) -> int | None:
    """The CUDA device index a launch on ``device`` must make current, or None
    (CPU). Used by the memoised plans: see :func:`on_device`."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def launch_on(index: int | None, launch, *tensors) -> None:
    """Run a planned ``launch(*tensors)`` with CUDA device ``index`` current
    (from :func:`launch_device`; None on CPU), and record the kernel names it
    returns. The device is switched only when it is not already current.
    Where the kernels run in an interpreter that cannot run them
    (:func:`interpreter_problem`), the interpreter's error is raised as a
    RuntimeError that says why."""
    try:
        if index is None or index == torch.cuda.current_device():
            names = launch(*tensors)
        else:
            with torch.cuda.device(index):
                names = launch(*tensors)
    except Exception as e:
        if _INTERPRETER_PROBLEM is not None and "0-dimensional arrays" in str(e):
            raise RuntimeError(_INTERPRETER_PROBLEM) from e
        raise
    if _recorder is not None:
        _recorder.extend(names)


_poison: float | None = None  # the fill of new kernel outputs (None: left as allocated)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True, value: float = float("nan")) -> Iterator[None]:
    """Fill every output buffer with ``value`` (NaN by default; integers: -1)
    before a kernel writes it, so that an element a kernel leaves unwritten
    shows in tests. A finite ``value`` shows one whose right result is NaN
    too (an all -inf row, an all-ignored mean)."""
    global _poison
    previous, _poison = _poison, (value if enabled else None)
    try:
        yield
    finally:
        _poison = previous


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _poison is not None:
        t.fill_(_poison if t.is_floating_point() else -1)
    return t


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (poisoned inside :func:`poison_outputs`)."""
    return _fill(torch.empty(shape, dtype=dtype, device=device))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous kernel output of ``x``'s shape, dtype and device (poisoned
    inside :func:`poison_outputs`)."""
    return _fill(torch.empty_like(x, memory_format=torch.contiguous_format))
