"""The benchmarked ops: one registry, one :class:`OpSpec` per op.

An op is a *family* (the function a provider implements: ``softmax``,
``log_softmax`` or ``cross_entropy``) run either forward only or forward then
backward, with a minimal-bytes model used for GB/s.

Provider functions follow one calling convention per family:

- ``softmax`` / ``log_softmax``: ``f(x) -> y`` over the last dim of an
  [M, N] tensor, differentiable;
- ``cross_entropy``: ``f(x, target) -> loss``, the mean over rows, like
  ``F.cross_entropy(x, target)`` on [M, N] logits and int64 class targets,
  differentiable;
- ``linear_ce``: ``f(x, w, target) -> loss``, the mean over rows of
  ``F.cross_entropy(F.linear(x, w), target)`` for x [M, D] and w [N, D],
  differentiable in x and w (:class:`LinearCEOpSpec`). A provider may instead
  return a function marked ``unchecked = True`` that does its whole timed
  work in one call (the three-GEMM floor): it is timed, never checked.

Extra ops (``vocab_parallel``, say) register with
:func:`register_op`. One that fits an existing family only needs a new
:class:`OpSpec`; one with other inputs or semantics subclasses
:class:`OpSpec` under a new family name and overrides ``make_inputs``,
``call``, ``run_once`` and ``error``, and, when its problems are not
[M, N] rows, ``shapes``, ``shape_bytes`` and ``shape_inputs`` (the sweep uses
nothing else). A provider that does not know the new family reports "not
implemented" for it instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from perf.sizes import LCE_HIDDEN, Shape, linear_shapes, shapes_for

__all__ = [
    "OpSpec",
    "Inputs",
    "OPS",
    "register_op",
    "get_ops",
    "softmax_fwd_bytes",
    "softmax_fwd_bwd_bytes",
    "ce_fwd_bytes",
    "ce_fwd_bwd_bytes",
    "linear_ce_fwd_bwd_bytes",
    "LinearCEOpSpec",
    "TARGET_BYTES",
    "ROW_OUT_BYTES",
    "TOLERANCE",
    "OFF_TARGET_TOLERANCE",
    "DTYPES",
    "dtype_name",
]

# Bytes per class target (int64) and per per-row output (one fp32: the row's
# loss in the forward, its logsumexp saved for the backward).
TARGET_BYTES = 8
ROW_OUT_BYTES = 4

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}

# Largest accepted ||out - ref|| / ||ref|| against a float32 torch reference
# computed from the same inputs: about what one rounding to the dtype allows
# (bf16 keeps 8 bits: a norm-wise error near 2e-3), so that a result off by
# more than a rounding (a wrong row factor, an unwritten chunk) is flagged,
# not only errors of order 1. (On the H200 run of 2026-12-04 every provider
# was within 3e-3 in bf16.)
TOLERANCE: dict[torch.dtype, float] = {
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
}
# The cross-entropy's gradient off its targets (``off_target``), judged on
# its own: one rounding of p in the dtype is about 2e-3 in bf16, but torch's
# own bf16 cross-entropy forms its gradient as exp of a log-softmax rounded
# to bf16, whose error grows with |log p| (CPU, 64 rows of 2 x randn: 6.5e-3
# at 4096 classes, 9.6e-3 at 32768, 1.3e-2 at 128256). These limits pass
# that, and catch an error of a few percent in every such element, which
# the whole gradient's norm does not (at 128256 a 10% error there moves it
# by under 1e-2).
OFF_TARGET_TOLERANCE: dict[torch.dtype, float] = {
    torch.bfloat16: 3e-2,
    torch.float16: 6e-3,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
}
# The cross-entropy's gradient is checked at this grad_output (the loss times
# a constant: loss scaling, gradient accumulation), not at 1, where a backward
# can skip its rescale: the rescale path is what the check must see.
CHECK_GRAD_OUTPUT = 2.5


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported dtype {dtype}")


# --- minimal bytes per op (each input read once, each output written once) ---


def softmax_fwd_bytes(M: int, N: int, elem: int) -> int:
    """Read x, write y."""
    return 2 * M * N * elem


def softmax_fwd_bwd_bytes(M: int, N: int, elem: int) -> int:
    """Forward (read x, write y) plus backward (read y and dy, write dx)."""
    return 5 * M * N * elem


def ce_fwd_bytes(M: int, N: int, elem: int) -> int:
    """Read the logits once, plus the targets and one fp32 per row."""
    return M * N * elem + M * TARGET_BYTES + M * ROW_OUT_BYTES


def ce_fwd_bwd_bytes(M: int, N: int, elem: int) -> int:
    """Read the logits and write their gradient (a fused kernel), plus the
    targets and one fp32 per row."""
    return 2 * M * N * elem + M * TARGET_BYTES + M * ROW_OUT_BYTES


def linear_ce_fwd_bwd_bytes(M: int, N: int, D: int, elem: int) -> int:
    """Fused linear + cross-entropy: read x [M, D] and w [N, D], write their
    gradients, plus the targets and one fp32 per row (the logits need never
    reach memory). The op is GEMM-bound: its rows are judged by the time
    against the three-GEMM floor (``vs_floor``), not by GB/s."""
    return 2 * (M + N) * D * elem + M * TARGET_BYTES + M * ROW_OUT_BYTES


# --- inputs ---


@dataclasses.dataclass
class Inputs:
    """Fresh random inputs of one case (never zeros)."""

    x: Tensor  # [M, N] logits / scores; [M, D] hidden states (linear_ce)
    dy: Tensor | None = None  # [M, N] output gradient (softmax families, backward)
    target: Tensor | None = None  # [M] int64 classes (cross_entropy, linear_ce)
    w: Tensor | None = None  # [N, D] projection (linear_ce)
    key: tuple | None = None  # what made them (linear_ce: its reference is cached by it)


# Families called as f(logits, target) -> mean loss.
TARGET_FAMILIES = ("cross_entropy", "vocab_parallel_ce")

LOGIT_SCALE = 2.0  # x = 2 * randn: rows far from uniform, no overflow in fp16


def make_inputs(
    family: str, backward: bool, M: int, N: int, dtype: torch.dtype, device: str, seed: int
) -> Inputs:
    """Seeded inputs: the same seed gives every provider the same data."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randn((M, N), generator=g, device=device, dtype=dtype).mul_(LOGIT_SCALE)
    inp = Inputs(x=x)
    if family in TARGET_FAMILIES:
        inp.target = torch.randint(0, N, (M,), generator=g, device=device, dtype=torch.int64)
    elif backward:
        inp.dy = torch.randn((M, N), generator=g, device=device, dtype=dtype)
    return inp


# --- references (float32 torch, row chunk by row chunk to bound memory) ---

_CHUNK_ELEMS = 1 << 26  # 64 Mi elements: 256 MiB per fp32 temporary


def _row_chunks(M: int, N: int):
    step = max(1, _CHUNK_ELEMS // max(N, 1))
    for r in range(0, M, step):
        yield slice(r, min(M, r + step))


def _reference_chunk(family: str, backward: bool, inp: Inputs, rows: slice) -> dict[str, Tensor]:
    """Reference outputs for ``rows`` (fp32; fp64 inputs stay fp64).

    ``loss`` is returned as the per-row losses; the caller averages them.
    """
    x = inp.x[rows]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc)
    out: dict[str, Tensor] = {}
    if family == "softmax":
        y = torch.softmax(x, -1)
        out["y"] = y
        if backward:
            dy = inp.dy[rows].to(acc)
            out["dx"] = y * (dy - (dy * y).sum(-1, keepdim=True))
    elif family == "log_softmax":
        y = torch.log_softmax(x, -1)
        out["y"] = y
        if backward:
            dy = inp.dy[rows].to(acc)
            out["dx"] = dy - torch.exp(y) * dy.sum(-1, keepdim=True)
    elif family in TARGET_FAMILIES:
        t = inp.target[rows]
        lse = torch.logsumexp(x, -1)
        out["loss"] = lse - x.gather(1, t[:, None]).squeeze(1)
        if backward:
            M = inp.x.shape[0]
            dx = torch.softmax(x, -1)
            dx.scatter_add_(1, t[:, None], torch.full_like(dx[:, :1], -1.0))
            out["dx"] = dx * (CHECK_GRAD_OUTPUT / M)
    else:
        raise ValueError(f"no reference for family {family!r}")
    return out


def off_target(grad: Tensor, target: Tensor) -> Tensor:
    """A cross-entropy gradient [M, N] with each row's target element zeroed:
    the softmax part alone. At long vocabularies the target elements
    (p_t - 1) carry nearly all of the gradient's norm (randn x 3 logits:
    all but 7% at 256000 classes, 18% at 32768), so an error in every other
    element hides in the whole gradient's norm: the checks compare this part
    on its own too. Targets out of range (ignored rows) zero column 0."""
    return grad.scatter(1, target.clamp(0, grad.shape[1] - 1)[:, None], 0.0)


OFF = "off target"  # relative_errors' key of the gradient off its targets


def _norm_rel(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| (a zero ``want``: the difference's norm)."""
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def relative_errors(family: str, backward: bool, outputs: dict[str, Tensor],
                    inp: Inputs) -> dict[str, float]:
    """``max_rel_err``: the largest ``||out - ref|| / ||ref||`` over the
    outputs; for the cross-entropy's gradient also ``off_target_rel_err``,
    the same over its elements off the target (:func:`off_target`). Beside
    each, the same error of the reference itself rounded once to the
    output's dtype (``rounding_err``, ``off_target_rounding_err``): what no
    result in that dtype can beat, which :func:`verdict` allows twice of
    (fp16 gradients of a mean over many rows sit near fp16's subnormals,
    where one rounding alone is off by more than the fixed limit). inf if
    any output is not finite or has the wrong shape, or a comparison gave
    NaN."""
    M, N = inp.x.shape
    sq_diff: dict[str, float] = {}
    sq_round: dict[str, float] = {}
    sq_ref: dict[str, float] = {}
    loss_ref = 0.0
    inf = {"max_rel_err": math.inf}
    for rows in _row_chunks(M, N):
        ref = _reference_chunk(family, backward, inp, rows)
        for name, r in ref.items():
            if name == "loss":
                loss_ref += float(r.sum())
                continue
            o = outputs.get(name)
            if o is None or tuple(o.shape) != tuple(inp.x.shape):
                return inf  # missing (no gradient came back) or misshapen
            rr = r.to(o.dtype).to(r.dtype)
            o = o[rows].to(r.dtype)
            if not bool(torch.isfinite(o).all()):
                return inf
            pairs = [(name, o, r, rr)]
            if name == "dx" and family in TARGET_FAMILIES:
                t = inp.target[rows]
                pairs.append((OFF, off_target(o, t), off_target(r, t), off_target(rr, t)))
            for key, a, b, br in pairs:
                sq_diff[key] = sq_diff.get(key, 0.0) + float(((a - b) ** 2).sum())
                sq_round[key] = sq_round.get(key, 0.0) + float(((br - b) ** 2).sum())
                sq_ref[key] = sq_ref.get(key, 0.0) + float((b**2).sum())

    def rel(sq: dict, k: str) -> float:
        return math.sqrt(sq[k] / sq_ref[k]) if sq_ref[k] > 0 else math.sqrt(sq[k])

    errors = [rel(sq_diff, k) for k in sq_diff if k != OFF]
    floors = [rel(sq_round, k) for k in sq_round if k != OFF]
    if "loss" in outputs:
        loss = outputs["loss"].detach()
        got = float(loss.double().reshape(()))
        want = loss_ref / M
        if not math.isfinite(got):
            return inf
        scale = max(abs(want), 1e-30)
        errors.append(abs(got - want) / scale)
        rounded = float(torch.tensor(want, dtype=torch.float64).to(loss.dtype).double())
        floors.append(abs(rounded - want) / scale)
    out = {"max_rel_err": max(errors) if errors else math.inf,
           "rounding_err": max(floors) if floors else 0.0}
    if OFF in sq_diff:
        out["off_target_rel_err"] = rel(sq_diff, OFF)
        out["off_target_rounding_err"] = rel(sq_round, OFF)
    if any(math.isnan(v) for v in [*errors, *floors, *out.values()]):
        return inf
    return out


def relative_error(family: str, backward: bool, outputs: dict[str, Tensor], inp: Inputs) -> float:
    """Largest ``||out - ref|| / ||ref||`` over the outputs; inf if any
    output is not finite or has the wrong shape."""
    return relative_errors(family, backward, outputs, inp)["max_rel_err"]


def _limits(errors: dict[str, float], dtype: torch.dtype) -> tuple[float, float]:
    """(the whole error's limit, the off-target error's): the dtype's fixed
    limit, or twice the error of one rounding of the reference where that
    is larger (a limit no result in the dtype could meet is no limit)."""
    def at_least(fixed: float, floor) -> float:
        return fixed if floor is None or not 2 * floor > fixed else 2 * floor

    return (at_least(TOLERANCE[dtype], errors.get("rounding_err")),
            at_least(OFF_TARGET_TOLERANCE[dtype], errors.get("off_target_rounding_err")))


def verdict(errors: dict[str, float], dtype: torch.dtype):
    """Whether a result with ``errors`` (:meth:`OpSpec.errors`) is right:
    ``max_rel_err`` within ``TOLERANCE`` and, where reported,
    ``off_target_rel_err`` within ``OFF_TARGET_TOLERANCE``, each limit
    raised to twice the error one rounding of the reference to the dtype
    gives where that is larger; "" when it was not checked (NaN
    ``max_rel_err``: no outputs, the timing floor). An off-target error
    that is absent or NaN (a CSV row of another op) is not judged:
    :func:`relative_errors` never gives NaN (an unusable comparison is inf)."""
    err = errors["max_rel_err"]
    if math.isnan(err):
        return ""
    whole, off_lim = _limits(errors, dtype)
    off = _off(errors)
    return bool(err <= whole and (off is None or off <= off_lim))


def _off(errors: dict[str, float]):
    """The off-target error, or None where there is none."""
    off = errors.get("off_target_rel_err")
    return None if off is None or math.isnan(off) else off


def wrong_note(errors: dict[str, float], dtype: torch.dtype) -> str:
    """What a wrong result's note says: each error past its limit."""
    whole, off_lim = _limits(errors, dtype)
    parts = []
    if not errors["max_rel_err"] <= whole:
        parts.append(f"rel err {errors['max_rel_err']:.3g} > {whole:.3g}")
    off = _off(errors)
    if off is not None and not off <= off_lim:
        parts.append(f"off-target rel err {off:.3g} > {off_lim:.3g}")
    return "WRONG: " + ", ".join(parts)


# --- the op table ---


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One benchmarked op.

    Attributes:
        name: CSV ``op`` column.
        family: which provider function runs it (see module docstring).
        backward: time forward+backward (``grad_to_none`` resets x.grad).
        bytes_fn: minimal bytes moved, ``(M, N, elem_size) -> bytes``.
        description: one line for ``--help`` and the summary.
    """

    name: str
    family: str
    backward: bool
    bytes_fn: Callable[[int, int, int], int]
    description: str

    def min_bytes(self, M: int, N: int, elem_size: int) -> int:
        return self.bytes_fn(M, N, elem_size)

    def make_inputs(self, M: int, N: int, dtype: torch.dtype, device: str, seed: int) -> Inputs:
        return make_inputs(self.family, self.backward, M, N, dtype, device, seed)

    def shapes(self, elem_size: int, **kwargs) -> list[Shape]:
        """The problems to run (``kwargs`` as :func:`perf.sizes.shapes_for`)."""
        return shapes_for(elem_size, **kwargs)

    def shape_bytes(self, shape: Shape, elem_size: int) -> int:
        return self.min_bytes(shape.M, shape.N, elem_size)

    def shape_inputs(self, shape: Shape, dtype: torch.dtype, device: str, seed: int) -> Inputs:
        return self.make_inputs(shape.M, shape.N, dtype, device, seed)

    def call(self, fn: Callable, inp: Inputs) -> Tensor:
        """The forward alone: ``fn(x)`` or ``fn(x, target)``."""
        if self.family in TARGET_FAMILIES:
            return fn(inp.x, inp.target)
        return fn(inp.x)

    def closure(self, fn: Callable, inp: Inputs) -> tuple[Callable[[], object], list[Tensor] | None]:
        """The timed callable and the tensors whose ``.grad`` is reset between runs."""
        if not self.backward:
            return (lambda: self.call(fn, inp)), None
        inp.x.requires_grad_(True)
        if self.family in TARGET_FAMILIES:
            return (lambda: self.call(fn, inp).backward()), [inp.x]
        return (lambda: self.call(fn, inp).backward(inp.dy)), [inp.x]

    def run_once(self, fn: Callable, inp: Inputs) -> dict[str, Tensor]:
        """One call, returning the outputs that :meth:`error` checks."""
        key = "loss" if self.family in TARGET_FAMILIES else "y"
        if not self.backward:
            return {key: self.call(fn, inp).detach()}
        inp.x.requires_grad_(True)
        inp.x.grad = None
        out = self.call(fn, inp)
        if self.family in TARGET_FAMILIES:
            (out * CHECK_GRAD_OUTPUT).backward()
        else:
            out.backward(inp.dy)
        result = {key: out.detach(), "dx": inp.x.grad}
        inp.x.grad = None
        inp.x.requires_grad_(False)
        return result

    def error(self, outputs: dict[str, Tensor], inp: Inputs) -> float:
        """Relative error of ``outputs`` against torch in float32 on ``inp``."""
        return relative_error(self.family, self.backward, outputs, inp)

    def errors(self, outputs: dict[str, Tensor], inp: Inputs) -> dict[str, float]:
        """The CSV's error columns, what ``correct`` is judged by
        (:func:`verdict`): ``max_rel_err``, the cross-entropy's
        ``off_target_rel_err``, and per output where the op reports them."""
        return relative_errors(self.family, self.backward, outputs, inp)

    def bench(self, call, device: str, grads, *, warmup_ms: float, rep_ms: float):
        """(median, p20, p80) ms of ``call`` (do_bench on CUDA)."""
        from perf import timing

        return timing.bench(call, device, grad_to_none=grads, warmup_ms=warmup_ms, rep_ms=rep_ms)


# Rows of dX and vocabulary rows of dW compared with the float64 reference of
# the linear op (evenly spaced): its cost is one fp64 pass of logits for the
# lse, plus these subsets.
LCE_REF_ROWS = 512
LCE_REF_CLASSES = 4096
# Standard deviation of the LM head's entries: the initializer of Llama,
# Qwen2 and Gemma (``initializer_range``); hidden states have unit RMS.
LCE_HEAD_STD = 0.02


def _spaced(n: int, k: int, device) -> Tensor:
    """min(n, k) evenly spaced indices of range(n)."""
    return torch.linspace(0, n - 1, min(n, k), device=device).round().long().unique()


_LCE_REFERENCE: dict = {}  # the current case's float64 reference (one entry)


def linear_ce_reference(inp: Inputs) -> dict:
    """Float64 reference of the mean loss of cross_entropy(x @ w^T, t) on the
    inputs' values: the loss; dX on LCE_REF_ROWS rows and dW on
    LCE_REF_CLASSES vocabulary rows (``rows``, ``classes``: their indices;
    ``untargeted``: which of those classes no token has as its target).
    One fp64 pass over all the logits (chunked) gives each row's lse; the
    subsets then cost little. Cached for the inputs' ``key`` (every provider
    of a case shares it)."""
    key = (inp.key if inp.key is not None else id(inp), LCE_REF_ROWS, LCE_REF_CLASSES)
    hit = _LCE_REFERENCE.get(key)
    if hit is not None:
        return hit
    _LCE_REFERENCE.clear()
    x, w, t = inp.x.double(), inp.w.double(), inp.target
    M, N = x.shape[0], w.shape[0]
    lse = torch.empty(M, dtype=torch.float64, device=x.device)
    loss = 0.0
    for rows in _row_chunks(M, 2 * N):  # fp64: half the rows of an fp32 chunk
        z = x[rows] @ w.T
        lse[rows] = torch.logsumexp(z, -1)
        loss += float((lse[rows] - z.gather(1, t[rows, None])[:, 0]).sum())
        del z
    rows = _spaced(M, LCE_REF_ROWS, x.device)
    g = torch.exp(x[rows] @ w.T - lse[rows, None])
    g[torch.arange(rows.numel(), device=x.device), t[rows]] -= 1.0
    dx = (g / M) @ w
    del g
    classes = _spaced(N, LCE_REF_CLASSES, x.device)
    wc = w[classes]
    dw = torch.zeros_like(wc)
    is_target = torch.zeros(N, dtype=torch.bool, device=x.device)
    is_target[t] = True
    col = torch.full((N,), -1, dtype=torch.long, device=x.device)
    col[classes] = torch.arange(classes.numel(), device=x.device)
    for r in _row_chunks(M, classes.numel() * 2):
        g = torch.exp(x[r] @ wc.T - lse[r, None])
        hit_rows = (col[t[r]] >= 0).nonzero()[:, 0]
        g[hit_rows, col[t[r][hit_rows]]] -= 1.0
        dw += g.T @ x[r]
    ref = {"loss": loss / M, "rows": rows, "dx": dx, "classes": classes, "dw": dw / M,
           "untargeted": ~is_target[classes]}
    _LCE_REFERENCE[key] = ref
    return ref


@dataclasses.dataclass(frozen=True)
class LinearCEOpSpec(OpSpec):
    """Fused linear + cross-entropy, forward then backward into x and w:
    ``f(x [M, D], w [N, D], target [M]) -> mean loss``. Shapes from
    :func:`perf.sizes.linear_shapes` (D in ``Shape.D``). Checked against a
    float64 reference (loss; dx and dw on subsets of rows,
    :func:`linear_ce_reference`), each error in its own column."""

    def shapes(self, elem_size: int, *, device: str, quick: bool, ns=None, m=None,
               **_) -> list[Shape]:
        return linear_shapes(device=device, quick=quick, ns=ns, m=m)

    def shape_bytes(self, shape: Shape, elem_size: int) -> int:
        return linear_ce_fwd_bwd_bytes(shape.M, shape.N, shape.D or LCE_HIDDEN, elem_size)

    def shape_inputs(self, shape: Shape, dtype: torch.dtype, device: str, seed: int) -> Inputs:
        """Realistic scales: hidden states of unit RMS (randn), a head
        initialised as a real model's (normal, std LCE_HEAD_STD = 0.02: logits
        of std 0.02 sqrt(D), 1.3 at D = 4096), uniform random targets."""
        M, N, D = shape.M, shape.N, shape.D or LCE_HIDDEN
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        x = torch.randn((M, D), generator=g, device=device, dtype=dtype)
        w = torch.randn((N, D), generator=g, device=device, dtype=dtype).mul_(LCE_HEAD_STD)
        t = torch.randint(0, N, (M,), generator=g, device=device, dtype=torch.int64)
        return Inputs(x=x, w=w, target=t, key=(M, N, D, dtype, str(device), seed))

    def make_inputs(self, M, N, dtype, device, seed):
        return self.shape_inputs(Shape(M, N, "custom", LCE_HIDDEN), dtype, device, seed)

    def call(self, fn: Callable, inp: Inputs) -> Tensor:
        return fn(inp.x, inp.w, inp.target)

    def closure(self, fn, inp):
        if getattr(fn, "unchecked", False):
            return (lambda: self.call(fn, inp)), None
        inp.x.requires_grad_(True)
        inp.w.requires_grad_(True)
        return (lambda: self.call(fn, inp).backward()), [inp.x, inp.w]

    def run_once(self, fn, inp):
        if getattr(fn, "unchecked", False):
            self.call(fn, inp)
            return {}
        for t in (inp.x, inp.w):
            t.requires_grad_(True)
            t.grad = None
        out = self.call(fn, inp)
        (out * CHECK_GRAD_OUTPUT).backward()  # the backward's rescale path, as the CE ops
        result = {"loss": out.detach(), "dx": inp.x.grad, "dw": inp.w.grad}
        for t in (inp.x, inp.w):
            t.grad = None
            t.requires_grad_(False)
        return result

    def errors(self, outputs, inp) -> dict[str, float]:
        """Relative errors against float64 (:func:`linear_ce_reference`):
        ``loss_rel_err``; ``dx_rel_err`` and ``dw_rel_err`` as
        ||out - ref|| / ||ref|| over the reference's rows of dX and
        vocabulary rows of dW, the gradients of CHECK_GRAD_OUTPUT times the
        loss (:meth:`run_once`); ``max_rel_err`` the largest. Beside them,
        not in ``max_rel_err``: ``dw_off_target_rel_err``, the same over the
        dW rows of classes no token targets. Those rows are the softmax part
        alone (sum over tokens of p x), where the targeted rows hold -x per
        token: at realistic scales (4096 tokens, 128256 classes, logits of
        std 1.3) the targeted 3% of the rows carry over 99% of dW's norm, so
        the softmax part's precision (the rounding of p, a bf16 dW's
        accumulation, a peer's gradient filtering) shows only here. inf for
        a missing, misshapen or non-finite output; NaN for an unchecked
        (floor) provider."""
        nan = math.nan
        if not outputs:
            return {"max_rel_err": nan, "loss_rel_err": nan, "dx_rel_err": nan, "dw_rel_err": nan,
                    "dw_off_target_rel_err": nan}
        ref = linear_ce_reference(inp)
        dx, dw, loss = outputs.get("dx"), outputs.get("dw"), outputs.get("loss")
        out = {"loss_rel_err": math.inf, "dx_rel_err": math.inf, "dw_rel_err": math.inf}
        if loss is not None:
            got = float(loss.double().reshape(()))
            if math.isfinite(got):
                out["loss_rel_err"] = abs(got - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        parts = {}  # name -> (the output's checked rows in float64, the reference's)
        for name, g, shape, idx in (("dx", dx, inp.x.shape, ref["rows"]),
                                    ("dw", dw, inp.w.shape, ref["classes"])):
            if g is None or g.shape != shape:
                continue
            part = g[idx].double()
            if bool(torch.isfinite(part).all()):
                parts[name] = (part, ref[name] * CHECK_GRAD_OUTPUT)
                out[f"{name}_rel_err"] = _norm_rel(*parts[name])
        out["max_rel_err"] = max(out.values())
        # reported beside, not judged: a peer's documented approximation
        # (gradient filtering) shows here, and is not called wrong; NaN when
        # every sampled class is some token's target
        soft = ref["untargeted"]
        got, want = parts.get("dw", (None, None))
        out["dw_off_target_rel_err"] = (math.inf if got is None else nan if not bool(soft.any())
                                        else _norm_rel(got[soft], want[soft]))
        return out

    def error(self, outputs, inp) -> float:
        """The largest of :meth:`errors` (NaN for an unchecked provider)."""
        return self.errors(outputs, inp)["max_rel_err"]

    def bench(self, call, device, grads, *, warmup_ms, rep_ms):
        """A fixed number of calls after untimed warm-ups (:func:`timing.bench_calls`):
        these calls take 10 to 200 ms, and a slow first call (autotuning,
        compiling) must not set the number of repetitions."""
        from perf import timing

        return timing.bench_calls(call, device, grad_to_none=grads, rep_ms=rep_ms)


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add an op to the sweep (name must be new)."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is already registered")
    OPS[spec.name] = spec
    return spec


def get_ops(names: list[str] | None = None) -> list[OpSpec]:
    """The registered ops in registration order, or the named ones."""
    if names is None:
        return list(OPS.values())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise KeyError(f"unknown op(s) {unknown}; known: {list(OPS)}")
    return [OPS[n] for n in names]


register_op(OpSpec("softmax_fwd", "softmax", False, softmax_fwd_bytes,
                   "softmax over the last dim, forward"))
register_op(OpSpec("softmax_fwd_bwd", "softmax", True, softmax_fwd_bwd_bytes,
                   "softmax forward then backward (y, dy -> dx)"))
register_op(OpSpec("log_softmax_fwd", "log_softmax", False, softmax_fwd_bytes,
                   "log-softmax over the last dim, forward"))
register_op(OpSpec("ce_fwd", "cross_entropy", False, ce_fwd_bytes,
                   "cross-entropy (mean over rows), forward"))
register_op(OpSpec("ce_fwd_bwd", "cross_entropy", True, ce_fwd_bwd_bytes,
                   "cross-entropy forward then backward (dlogits)"))
register_op(OpSpec("vocab_parallel", "vocab_parallel_ce", True, ce_fwd_bwd_bytes,
                   "vocab-parallel cross-entropy forward+backward (softmax_gpu.distributed) in "
                   "the current process group, world size 1 unless launched with torchrun; "
                   "the note gives the bytes communicated per step vs gathering the logits"))
register_op(LinearCEOpSpec(
    "linear_ce_fwd_bwd", "linear_ce", True,
    lambda M, N, elem: linear_ce_fwd_bwd_bytes(M, N, LCE_HIDDEN, elem),
    "fused linear + cross-entropy (LM head: hidden [M, D] x head [N, D], mean loss), forward "
    "then backward into hidden and head; judged against the three-GEMM floor (vs_floor)"))
