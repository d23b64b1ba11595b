"""Fused cross-entropy: the host side (the kernels are in
``softmax_gpu/kernels/cross_entropy.py``).

One launch reads the logits once and writes each row's loss (already divided
by the mean's denominators, which a one-program kernel computes on the device
beforehand), its log-sum-exp and, when autograd needs it, the gradient
sigma * sum(y) - y. The backward then only rescales that gradient by
grad_output, and does nothing at all when grad_output is 1. fp16 logits are
the exception (an fp16 gradient stored before grad_output is known
underflows under a loss scale): with class targets the forward writes the
loss and lse only and the backward forms grad_output times the gradient
from the logits (``ce_class_backward_kernel``, as a traced graph does);
with probability targets the forward's gradient is kept in fp32.

- Launch planning: :func:`cross_entropy_config` (path, tile, rows per
  program, warps) and :func:`cross_entropy_scale_config` (the backward's
  rescale); a plan per call signature is memoised, so a repeated call only
  allocates its outputs and launches.
- Checks: :func:`check_cross_entropy`, :func:`check_inplace_rows`.
- The torch reference (:func:`reference_forward`, :func:`reference_loss`):
  the CPU path when the kernels are not interpreted.
- Autograd: eagerly ``torch.autograd.Function`` s that call the launchers
  directly; while a graph is traced or compiled, the ``torch.library`` ops
  ``softmax_gpu::cross_entropy_*``.
- Public: :func:`cross_entropy`, :func:`cross_entropy_with_grad`,
  :class:`CrossEntropyLoss`.

Gradients handed out are never changed afterwards: a backward that frees
the graph rescales the saved gradient in place and returns it; one that
retains it (a later backward reads it again) writes a new tensor from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import heuristics
from ._checks import (STRIDED, as_int, as_number, check_float, check_loss_dtype,
                      check_not_grad_leaf, check_row_length, check_strided, check_tensor,
                      check_weight_takes_no_grad)
from ._dispatch import (anchor_output, autocast_on, backend_for, empty_like, first_order,
                        graph_kept, interpreted, launch_device, launch_on, new_output,
                        plan_cache, remember, saved, traced, transformed)
from ._layout import Rows, rows_view
from .heuristics import LOOPED, MIN_BLOCK, SINGLE, by_elem, next_pow2, warps_for
from .kernels import cross_entropy as K

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "CrossEntropyLoss",
    "CrossEntropyConfig",
    "cross_entropy_config",
    "cross_entropy_scale_config",
    "cross_entropy_backward_config",
    "all_cross_entropy_configs",
    "check_cross_entropy",
    "check_inplace_rows",
    "reference_forward",
    "reference_loss",
]


# ----------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossEntropyConfig:
    path: str  # SINGLE (row in registers), LOOPED (stats pass + gradient pass) or COOP
    block_n: int  # tile width in elements (a power of two; >= C on the single path)
    rows_per_program: int  # rows one program owns (SINGLE; else 1)
    num_warps: int
    programs: int = 0  # grid of a persistent LOOPED / COOP launch, or the rescale's (0: per row)
    splits: int = 1  # COOP: chunks per row; RESIDENT: at most (resident_launch_splits)
    chunk: int = 0  # COOP: columns per chunk, a multiple of block_n
    lag: int = 0  # COOP: first passes dealt ahead of the second passes
    evict: bool = False  # eviction hints on the two reads (LOOPED, COOP)
    regs: int = 0  # register budget (maxnreg) of the long-row kernels; 0: ptxas's choice
    stages: int = 1  # long rows: tiles in flight per program (software pipelining)
    spin: int = 0  # RESIDENT: polls a chunk waits for its row (resident_spin; 0 interpreted)


def ce_max_single(elem_bytes: int, extras: bool = False, lim=None) -> int:
    """Longest (power-of-two) row the cross-entropy on-chip path takes.
    ``extras`` (probability targets, class weights, label smoothing or a
    softcap: more tiles live at once) halves it, and a limit raised above
    the defaults' (a tuned table's) applies to rows without extras only."""
    lim = heuristics.limits() if lim is None else lim
    n = by_elem(elem_bytes, lim.ce_max_single_2byte, lim.ce_max_single_4byte,
                lim.ce_max_single_8byte)
    if extras:
        # never past the defaults' (a tuned longer limit is for plain rows:
        # 16384-wide probability-target rows spilled at sm_90)
        d = heuristics.Limits()
        n = min(n, by_elem(elem_bytes, d.ce_max_single_2byte, d.ce_max_single_4byte,
                           d.ce_max_single_8byte)) // 2
    cap = by_elem(elem_bytes, lim.max_single_2byte, lim.max_single_4byte, lim.max_single_8byte)
    return max(1, min(n, cap))


def _rows_per_program(M: int, block: int, device: torch.device, target: int) -> int:
    """Rows per program for short rows: about ``target`` elements a program,
    keeping at least ~2 programs per multiprocessor when M allows."""
    rows = max(1, target // block)
    programs_wanted = 2 * heuristics.sm_count(device)
    while rows > 1 and -(-M // rows) < programs_wanted:
        rows //= 2
    return min(rows, next_pow2(M))


def _ce_single(M: int, block: int, elem_bytes: int, device: torch.device, lim,
               extras: bool = False) -> CrossEntropyConfig:
    """Whole rows per program: ``lim.ce_single_ept`` elements (default 8;
    half for fp64) of a short row per thread, so that the per-row values a
    thread holds stay few, half that with extras (the softcap's and the
    weights' temporaries; rows not a multiple of 16 bytes, addressed element
    by element, spilled at 8 under 16 warps); several rows share at most 8
    warps (each thread then holds fewer rows' values; 16 warps of 32 rows of
    unaligned bf16 spilled), a row longer than that takes up to 16 warps
    alone."""
    ept = min(block, lim.ce_single_ept // (2 if elem_bytes > 4 else 1) // (2 if extras else 1))
    target = min(lim.target_program_elems, max(block, 256 * ept))
    rows = _rows_per_program(M, block, device, target)
    warps = max(1, min(16, block * rows // (32 * ept)))
    return CrossEntropyConfig(SINGLE, block, rows, warps, regs=heuristics.single_regs(warps))


def _ce_tile(C: int, elem_bytes: int, heavy: bool, lim, weight: int) -> tuple[int, int, int]:
    """(tile, warps, register budget) of the looped kernels of weight class
    ``weight`` (``heuristics.long_row_regs``): 16 elements per thread per
    tile (8 with extras or fp64, on a halved tile), or ``lim.long_warps``
    (more per thread: ``heuristics.long_row_budget``)."""
    tile = min(max(1, lim.tile // 2) if heavy else lim.tile, next_pow2(C))
    ept = 8 if heavy else 16
    if heavy and not lim.long_warps:
        # at most ept a thread of 16 warps: 16 spilled at sm_90 (extras, tile 8192)
        tile = min(tile, 16 * 32 * ept)
    warps = lim.long_warps or max(1, min(16, tile // (32 * ept)))
    regs = heuristics.long_row_regs(elem_bytes, weight)
    return tile, warps, heuristics.long_row_budget(regs, tile, warps, ept)


def cross_entropy_config(M: int, C: int, elem_bytes: int, device: torch.device,
                         extras: bool = False, *, reread: bool = True,
                         coop: bool = True) -> CrossEntropyConfig:
    """Path and launch parameters of the fused cross-entropy over [M, C] logits.

    ``extras``: probability targets, class weights, label smoothing or a
    softcap (more live tiles: a shorter on-chip limit and looped tile).
    ``reread``: a second pass over the logits follows the statistics (the
    gradient, or label smoothing); without one every path reads the logits
    once, and long rows take one program each. ``coop``: the kernel family
    has the cooperative path (class targets do, probability targets not).

    - single: a program owns ``rows`` whole rows (``_ce_single``).
    - long rows, read twice: :func:`softmax_gpu.heuristics.long_rows` (a
      persistent looped grid whose rows in flight fit in L2, else the
      cooperative path with the fewest chunks per row that fit), 16 elements
      per thread per tile (8 with extras or fp64, on a halved tile).
    All choices compile without spills at sm_90 (``python -m perf.static``).
    """
    lim = heuristics.limits_for("cross_entropy", device, elem_bytes, C)
    block = next_pow2(C)
    if block <= ce_max_single(elem_bytes, extras, lim):
        return _ce_single(M, block, elem_bytes, device, lim, extras)
    if reread and coop and lim.long_path == heuristics.RESIDENT:
        plan = _ce_resident(M, C, elem_bytes, device, lim, extras)
        if plan is not None:
            return plan
    tile, warps, regs = _ce_tile(C, elem_bytes, extras or elem_bytes > 4, lim,
                                 _ce_weight(elem_bytes, extras, reread))
    if not reread:
        return CrossEntropyConfig(LOOPED, tile, 1, warps, regs=regs, stages=lim.long_stages)
    plan = heuristics.long_rows(M, C, tile, C * elem_bytes, device, lim, coop, warps, regs)
    return CrossEntropyConfig(plan.path, tile, 1, warps, plan.programs, plan.splits, plan.chunk,
                              plan.lag, plan.evict, plan.regs, lim.long_stages)


def _ce_resident(M: int, C: int, elem_bytes: int, device: torch.device, lim,
                 extras: bool) -> Optional[CrossEntropyConfig]:
    """The resident plan (``ce_class_resident_kernel``): chunks of
    ``lim.resident_chunk`` columns (``heuristics.resident_chunk``), each a
    program laid out as the on-chip path lays out one row of that length;
    None (the other long-row plans) for fp64 (its chunks spill), when a row
    takes more than RESIDENT_MAX_SPLITS chunks or the M x chunks items
    overflow int32."""
    if elem_bytes > 4:
        return None
    chunk = min(heuristics.resident_chunk(lim, ce_max_single(elem_bytes, extras, lim)),
                next_pow2(C))
    splits = heuristics.resident_splits(M, C, chunk, elem_bytes, 4, K.RESIDENT_MAX_SPLITS)
    if splits is None:
        return None
    warps = _ce_single(1, chunk, elem_bytes, device, lim, extras).num_warps
    return CrossEntropyConfig(heuristics.RESIDENT, chunk, 1, warps, splits=splits, chunk=chunk,
                              regs=heuristics.resident_regs(chunk, warps, elem_bytes, extras),
                              spin=0 if interpreted() else lim.resident_spin)


def _ce_weight(elem_bytes: int, extras: bool, reread: bool) -> int:
    """Weight class of a long-row cross-entropy kernel (``heuristics.long_row_regs``):
    one for a second pass (the gradient or smoothing), one for the extras;
    fp64 with extras the heaviest."""
    if extras and elem_bytes > 4:
        return 2
    return int(reread) + int(extras)


def cross_entropy_scale_config(M: int, C: int, elem_bytes: int,
                               device: torch.device) -> CrossEntropyConfig:
    """Launch parameters of the row-wise backward kernels (the rescale of the
    saved gradient, the lse's gradient): rows up to one tile are whole
    (several per program, as the on-chip path), longer rows are looped one
    per program. ``programs``: the rescale's persistent grid (programs_per_sm
    x SMs; each takes a contiguous group of rows, so a backward with nothing
    to rescale is one wave, not one program per row)."""
    lim = heuristics.limits_for("cross_entropy", device, elem_bytes, C)
    block = next_pow2(C)
    if block <= lim.tile:
        cfg = _ce_single(M, block, elem_bytes, device, lim)
    else:
        cfg = CrossEntropyConfig(LOOPED, lim.tile, 1, warps_for(lim.tile))
    return dataclasses.replace(cfg, programs=lim.programs_per_sm * heuristics.sm_count(device))


def cross_entropy_backward_config(M: int, C: int, elem_bytes: int, device: torch.device,
                                  extras: bool = False) -> CrossEntropyConfig:
    """Launch parameters of the traced backward (``ce_class_backward_kernel``:
    one pass over each row's logits, writing the gradient): the looped tile
    and warps on a persistent grid of programs_per_sm x SMs programs."""
    lim = heuristics.limits_for("cross_entropy", device, elem_bytes, C)
    tile, warps, regs = _ce_tile(C, elem_bytes, extras or elem_bytes > 4, lim, int(extras))
    tile = max(tile, MIN_BLOCK)
    fit = max(1, heuristics.REGISTERS_PER_SM // (regs * 32 * warps))
    programs = max(1, min(lim.programs_per_sm, fit) * heuristics.sm_count(device))
    return CrossEntropyConfig(LOOPED, tile, 1, warps, min(M, programs), regs=regs,
                              stages=lim.long_stages)


def all_cross_entropy_configs(extra: Sequence[dict] = ()) -> list[tuple]:
    """Every (kernel family, extras, path, block_n, rows_per_program,
    num_warps, elem bytes, second pass, regs) the defaults can pick, for the
    static compile check; enumerated from the config functions themselves.
    Families: "class" and "prob" (forward kernels; probability targets
    always count as extras), "scale" (the row-wise backward kernels) and
    "backward" (the traced backward). "second pass": the configuration was
    planned for kernels that write the gradient or smooth (else statistics
    only). Long rows also with each path ``Limits.long_path`` can force
    and each of the tuner's ``Limits.long_warps`` (tuning candidates), and
    with every entry of the installed tuned tables. ``extra``: further
    ``Limits`` overrides, each enumerated the same way at 2-byte rows
    (perf.static passes every candidate of perf.tune)."""
    seen = set()
    dev = torch.device("cpu")
    default = heuristics.Limits()

    def add(elems) -> None:
        """The configurations of the limits in force, at every row shape."""
        for elem in elems:
            for logn in range(0, 21):
                for M in (1, 64, 1 << 20):
                    C = 1 << logn
                    for fam, extras in (("class", False), ("class", True), ("prob", True)):
                        for reread in (True, False):
                            c = cross_entropy_config(M, C, elem, dev, extras, reread=reread,
                                                     coop=fam == "class")
                            seen.add((fam, extras, c.path, c.block_n, c.rows_per_program,
                                      c.num_warps, elem, reread or c.path == SINGLE, c.regs))
                    if elem == 2 and C > default.ce_max_single_2byte and \
                            C <= default.max_single_2byte:
                        # the tuner's on-chip candidate (perf.tune "onchip"): class
                        # targets without extras, the rows past the default limit
                        with heuristics.override(ce_max_single_2byte=C):
                            for reread in (True, False):
                                c = cross_entropy_config(M, C, elem, dev, reread=reread)
                                seen.add(("class", False, c.path, c.block_n,
                                          c.rows_per_program, c.num_warps, elem, True, c.regs))
                    c = cross_entropy_scale_config(M, C, elem, dev)
                    seen.add(("scale", False, c.path, c.block_n, c.rows_per_program,
                              c.num_warps, elem, True, c.regs))
                    for extras in (False, True):
                        c = cross_entropy_backward_config(M, C, elem, dev, extras)
                        seen.add(("backward", extras, c.path, c.block_n, 1, c.num_warps,
                                  elem, True, c.regs))

    # the tuning candidates of the on-chip path (tuned tables are 2-byte)
    on_chip = itertools.product(heuristics.CE_EPT_CHOICES, (4096, 8192, 16384))
    for (long_path, chunk), (ept, per_program) in itertools.product(
            heuristics.LONG_PATH_CHOICES, on_chip):
        plain = ept == default.ce_single_ept and per_program == default.target_program_elems
        with heuristics.override(sm_count=132, long_path=long_path, ce_single_ept=ept,
                                 target_program_elems=per_program, resident_chunk=chunk):
            add((2, 4, 8) if plain else (2,))
    for warps in heuristics.LONG_WARPS_CHOICES:  # the tuner's long-row warps
        with heuristics.override(sm_count=132, long_warps=warps):
            add((2,))
    for elem, fields in heuristics.installed_overrides("cross_entropy"):
        with heuristics.override(sm_count=132, **fields):
            add((elem,))
    for fields in extra:
        with heuristics.override(sm_count=132, **fields):
            add((2,))
    return sorted(seen)


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------

_REDUCTIONS = ("none", "mean", "sum")


def _scalar_options(ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The scalar arguments checked: (ignore_index as an int, then eps, z_loss
    and cap as floats; cap 0: none)."""
    ignore_index = as_int(ignore_index, "ignore_index")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {ignore_index}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = as_number(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    zl = as_number(z_loss, "z_loss")
    if not (zl >= 0.0 and zl != math.inf):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is None:
        return ignore_index, eps, zl, 0.0
    cap = as_number(softcap, "softcap")
    if not (cap > 0.0 and cap != math.inf):
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap}")
    return ignore_index, eps, zl, cap


def check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap) -> bool:
    """Validate :func:`cross_entropy`'s arguments as torch does (plus the
    extras); return True for probability targets, False for class indices."""
    check_tensor(input, "input")
    check_float(input, "input")
    if input.dim() < 1:
        raise ValueError("input must have the classes in dim 1: shape (C,), (N, C) or "
                         "(N, C, d1, ..., dK); got a 0-d tensor")
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    rows = input.shape[0] * math.prod(input.shape[2:]) if input.dim() >= 2 else 1
    if C == 0 and rows:  # no rows and no classes: torch's empty-batch results
        raise ValueError(f"input has no classes (shape {tuple(input.shape)})")
    check_row_length(C, "input's class dim")
    check_tensor(target, "target")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    prob = target.shape == input.shape
    if prob:
        if not target.is_floating_point():
            raise TypeError(
                f"target has the input's shape {tuple(input.shape)}, so it is read as class "
                f"probabilities and must be floating, got {target.dtype}")
    else:
        batch = _row_dims(input)
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices of shape {tuple(batch)}, or "
                f"floating class probabilities of the input's shape {tuple(input.shape)}; "
                f"got {target.dtype} of shape {tuple(target.shape)}")
        if tuple(target.shape) != tuple(batch):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape "
                f"{tuple(input.shape)}: class indices need shape {tuple(batch)} "
                "(the input's shape without the class dim 1)")
    if weight is not None:
        check_tensor(weight, "weight")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
        if weight.dim() != 1 or weight.shape[0] != C:
            raise ValueError(f"weight must be 1-D with one value per class (C={C}), "
                             f"got shape {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    ignore_index = _scalar_options(ignore_index, reduction, label_smoothing, z_loss, softcap)[0]
    if prob and ignore_index >= 0:
        raise ValueError("ignore_index is not supported with probability targets "
                         f"(got ignore_index={ignore_index}), as in torch")
    return prob


def check_inplace_rows(input, name: str = "input", dim: int = 1) -> None:
    """The gradient can be written over ``input``: its rows along ``dim`` (the
    classes: 1 for (N, C, *) logits, -1 for vocabulary-last ones) have an
    in-place view and no two logits share memory (dims of size > 1, taken by
    increasing stride, each step past the extent of the ones before: no
    expanded, stride-0 dims and no rows that overlap, which torch's in-place
    ops refuse too; a layout this cannot prove free of overlap is refused)."""
    x = input if input.dim() >= 2 else input.unsqueeze(0)
    # by increasing stride, inserted one by one: torch.compile traces the
    # comparisons of symbolic sizes and strides (dynamic shapes), not sorted()
    dims = []
    for size, stride in zip(x.shape, x.stride()):
        if size > 1:
            at = len(dims)
            while at > 0 and dims[at - 1][0] > stride:
                at -= 1
            dims.insert(at, (stride, size))
    extent, overlapping = 1, False  # extent: the span of the dims taken so far
    for stride, size in dims:
        overlapping |= stride < extent
        extent += stride * (size - 1)
    if overlapping or rows_view(x, dim % x.dim()) is None:
        raise ValueError(
            f"{name} cannot take the gradient in place: its layout (shape {tuple(input.shape)}, "
            f"strides {tuple(input.stride())}) has expanded, overlapping or non-collapsible "
            "dims; pass a contiguous tensor, or use inplace_backward=False / inplace=False")


# ----------------------------------------------------------------------------
# Torch reference: the CPU path, with the kernels' semantics
# ----------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_last(t: Tensor) -> Tensor:
    """(N, C, *) -> (M, C) with rows ordered like the flattened (N, *) target."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _num_rows(x: Tensor) -> int:
    """Rows of (N, C, *) logits: N * prod(*)."""
    m = x.shape[0]
    for s in x.shape[2:]:
        m = m * s
    return m


def reference_forward(x, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                      softcap, grad_scale, with_grad, divisor=None, grad_dtype=None):
    """The fused op's outputs in torch, for (N, C, *) logits ``x``:
    ``(loss rows already divided by the mean's denominators and the divisor,
    lse (fp32; fp64 for fp64), grad or empty, state or empty)``, as the
    kernels compute them. ``grad_scale``: a number, or a tensor of one value
    per row (or one value); ``divisor``: None, a number or a 0-d tensor;
    ``grad_dtype``: the gradient's dtype (None: x's).

    Class indices outside [0, C) that are not ignore_index raise IndexError,
    as torch does (the Triton kernels give NaN rows instead)."""
    acc = _acc(x.dtype)
    div = 1.0 if divisor is None else (divisor.to(acc) if isinstance(divisor, Tensor)
                                       else divisor)
    C = x.shape[1]
    eps = label_smoothing
    z = _rows_last(x.to(acc))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    M = z.shape[0]
    lse = torch.logsumexp(z, -1) if M else z.new_zeros(0)
    logp = z - lse[:, None]
    w = weight.to(acc) if weight is not None else None
    if target.is_floating_point():
        y = (1 - eps) * _rows_last(target.to(acc)) + eps / C
        if w is not None:
            y = y * w
        den = (float(M) if reduction == "mean" else 1.0) * div
        loss = (-(y * logp).sum(-1) + z_loss * lse * lse) / den
        kept = torch.ones(M, dtype=torch.bool, device=x.device)
        sig_coef = (y.sum(-1) + 2 * z_loss * lse) / den
        y = y / den
    else:
        t = target.reshape(-1).long()
        kept = t != ignore_index
        bad = kept & ((t < 0) | (t >= C))
        if x.device.type != "meta" and bool(bad.any()):
            raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
        tc = torch.where(kept, t, 0).clamp(0, max(C - 1, 0))
        wc = w if w is not None else z.new_ones(C)
        wt = torch.where(kept, wc[tc], 0)
        zt = z.gather(1, tc[:, None])[:, 0]
        loss = wt * (lse - zt)
        if eps > 0:
            loss = (1 - eps) * loss + (eps / C) * (wc * (lse[:, None] - z)).sum(-1)
        zl = z_loss * lse * lse
        if reduction == "mean":
            dl, dz = (wt.sum(), kept.sum(dtype=acc)) if w is not None else (kept.sum(dtype=acc),) * 2
        else:
            dl = dz = torch.ones((), dtype=acc, device=x.device)
        dl, dz = dl * div, dz * div
        loss = torch.where(kept, loss / dl + zl / dz, 0 / dl + 0 / dz)
        y = (1 - eps) * wt[:, None] * torch.nn.functional.one_hot(tc, C).to(acc) \
            + (eps / C) * wc * kept[:, None]
        sig_coef = y.sum(-1) / dl + 2 * z_loss * lse / dz
        y = y / dl
    lse = lse.to(acc)
    if not with_grad:
        return loss, lse, x.new_empty(0), loss.new_empty(0)
    g = torch.exp(logp) * sig_coef[:, None] - y
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    if isinstance(grad_scale, Tensor):
        grad_scale = _per_row(grad_scale.to(acc))
        if grad_scale.dim():
            grad_scale = grad_scale[:, None]
    g = torch.where(kept[:, None], g * grad_scale, 0)
    shape = (x.shape[0], *x.shape[2:], C)
    g = g.reshape(shape).movedim(-1, 1).to(grad_dtype or x.dtype).contiguous()
    return loss, lse, g, torch.ones(M, dtype=acc, device=x.device)


def reference_loss(x, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                   divisor=None):
    """Differentiable torch composite of the whole op on (N, C, *) logits:
    ``(loss in fp32/fp64, lse [batch] fp32/fp64)``, both differentiable (the
    CPU path, and probability targets that require grad); the loss divided
    by ``divisor`` (None, a number or a 0-d tensor)."""
    acc = _acc(x.dtype)
    z = x.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    w = weight.to(acc) if weight is not None else None
    loss = torch.nn.functional.cross_entropy(
        z, target.to(acc) if target.is_floating_point() else target.long(), w,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1)
    if z_loss:
        zl = z_loss * lse * lse
        if not target.is_floating_point():
            kept = target != ignore_index
            zl = torch.where(kept, zl, 0)
            n = kept.sum()
        else:
            n = zl.numel()
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / n}[reduction]
    if divisor is not None:
        loss = loss / (divisor.to(acc) if isinstance(divisor, Tensor) else divisor)
    return loss, lse


def reference_lse_grad(x: Tensor, lse: Tensor, dlse: Tensor, softcap: float) -> Tensor:
    """d(sum(lse * dlse)) / dx for (N, C, *) logits: sigma * dlse per row,
    through the softcap; in x's dtype, contiguous."""
    acc = _acc(x.dtype)
    z = x.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    shape = (x.shape[0], 1, *x.shape[2:])
    g = torch.exp(z - lse.to(acc).reshape(shape)) * dlse.to(acc).reshape(shape)
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    return g.to(x.dtype).contiguous()


# ----------------------------------------------------------------------------
# Eager launches, planned once per call signature
# ----------------------------------------------------------------------------

NO_GRAD, NEW_GRAD, INPLACE_GRAD = 0, 1, 2


def _contiguous_rows(shape) -> Rows:
    """The [OUTER, C, INNER] view of a contiguous (N, C, *) tensor of ``shape``
    (exactly as :func:`rows_view` describes a real one)."""
    return rows_view(torch.empty(shape, device="meta"), 1)


def _reduce(rows: Tensor, reduction: str, batch, dtype: torch.dtype) -> Tensor:
    """Row losses (already divided by the mean's denominators) reduced, in ``dtype``."""
    if reduction == "none":
        return rows.reshape(batch).to(dtype)
    total = rows.sum()
    if rows.numel() == 0 and reduction == "mean":
        total = total * math.nan  # the mean of no rows, as torch
    return total.to(dtype)


def _legacy_reduction(size_average, reduce) -> str:
    """torch's ``reduction`` for the deprecated ``size_average`` / ``reduce``,
    with its warning (torch's own helper, outside torch.compile, which cannot
    trace it: torch's function gives no warning there either)."""
    if not torch.compiler.is_compiling():
        return _reduction.legacy_get_string(size_average, reduce)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else "mean" if size_average else "sum"


def check_divisor(divisor, input: Tensor):
    """``divisor`` checked: (None or a float, None or a 0-d tensor on the
    input's device). A number must be finite and nonzero; a tensor must hold
    one real value (any float or integer dtype). A CPU tensor with a CUDA
    input is read on the host (no device sync: its value is already there).
    While ``torch.compile`` traces, a number (which it may have made
    symbolic: a token count that changes from step to step) is checked
    (guards, for a symbolic one) and becomes a 0-d tensor, as does a number
    outside fp32's normal range (fp64 input; for other inputs, computed in
    fp32, such a number is a ValueError)."""
    if divisor is None:
        return None, None
    if isinstance(divisor, Tensor):
        if divisor.numel() != 1 or divisor.is_complex() or divisor.dtype == torch.bool:
            raise ValueError(f"divisor must be a number or a one-element real tensor, got a "
                             f"{divisor.dtype} tensor of shape {tuple(divisor.shape)}")
        if divisor.device != input.device:
            if divisor.device.type != "cpu":
                raise ValueError(f"divisor is on {divisor.device} but input is on {input.device}")
            divisor = divisor.item()  # a host value: no device sync
        else:
            return None, divisor.detach().reshape(())
    if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
        raise TypeError(f"divisor must be a number or a tensor, got {type(divisor).__name__}")
    d = float(divisor)
    # comparisons, not math.isfinite: a symbolic number turns them into guards
    if not (-math.inf < d < math.inf and d != 0.0):
        # (a symbolic number cannot be formatted while tracing)
        got = "" if torch.compiler.is_compiling() else f", got {divisor}"
        raise ValueError(f"divisor must be a finite nonzero number{got}")
    in_fp32 = 2.0 ** -126 <= abs(d) < 2.0 ** 127
    if not in_fp32 and input.dtype != torch.float64:
        got = "" if torch.compiler.is_compiling() else f", got {divisor}"
        raise ValueError(f"divisor must lie in float32's normal range [2^-126, 2^127) for "
                         f"{input.dtype} input, whose loss is computed in float32{got}")
    if torch.compiler.is_compiling() or not in_fp32:
        # while tracing (a symbolic number), or outside fp32's normal range
        # (the kernels take a number as a pair of fp32 parts): a 0-d tensor
        return None, torch.full((), divisor, dtype=torch.float64, device=input.device)
    return d, None


def _div_kind(div_f, div_t):
    """The divisor as the plans see it: None, its float value, or a tensor's dtype."""
    return div_t.dtype if div_t is not None else div_f


class _Plan:
    """Everything about a call that depends only on its signature."""

    __slots__ = ("M", "C", "acc", "dev", "reduction", "batch", "prob", "copy_x", "copy_y",
                 "flat_t", "den", "main")

    def __init__(self, x, target, weight, ignore_index, reduction, eps, zl, cap, grad_scale,
                 mode, divisor=None, lse_all=True):
        """``divisor``: None, a float, or the dtype of a tensor divisor (read
        on the device at run time). ``lse_all``: every row's lse (else
        ignored rows are not read and their lse is 0)."""
        self.M, self.C = _num_rows(x), x.shape[1]
        self.acc = _acc(x.dtype)
        self.dev = launch_device(x.device)
        self.reduction = reduction
        self.batch = tuple(target.shape) if not target.is_floating_point() else \
            (x.shape[0], *x.shape[2:])
        self.prob = target.is_floating_point()
        self.copy_x = rows_view(x, 1) is None
        r = rows_view(x.contiguous() if self.copy_x else x, 1)
        g_rows = r if mode == INPLACE_GRAD else _contiguous_rows(x.shape)
        self.den = None
        write = mode != NO_GRAD
        has_w = weight is not None
        extras = self.prob or has_w or eps > 0 or cap > 0
        cfg = cross_entropy_config(self.M, self.C, x.element_size(), x.device, extras,
                                   reread=write or eps > 0, coop=not self.prob)
        div = "tensor" if isinstance(divisor, torch.dtype) else divisor
        if self.prob:
            self.copy_y = rows_view(target, 1) is None
            y_rows = _contiguous_rows(target.shape) if self.copy_y else rows_view(target, 1)
            if divisor is not None:
                self.den = K.denominators_launcher(0, self.C, 0, False, False, x.dtype,
                                                   count=False, divisor=div, serial_steps=1)
            self.main = K.prob_launcher(
                self.M, self.C, r.inner, r.strides, y_rows.strides, g_rows.strides,
                self.M if reduction == "mean" else 1, eps, zl, cap, grad_scale, has_w, write,
                x.dtype, cfg, use_div=divisor is not None)
            self.flat_t = True
            return
        self.copy_y = False
        self.flat_t = target.dim() == 1 and target.stride(0) == 1
        use_den = reduction == "mean" or divisor is not None
        if use_den or (has_w and eps > 0):
            self.den = denominators_plan(self.M, self.C, ignore_index, has_w, eps > 0, x.dtype,
                                         x.device, count=reduction == "mean", divisor=div)
        self.main = K.class_launcher(
            self.M, self.C, r.inner, r.strides, g_rows.strides, ignore_index, use_den, eps,
            zl, cap, grad_scale, has_w, write, x.dtype, cfg, lse_all=lse_all)

    # -- forward --------------------------------------------------------------

    def denominators(self, t: Tensor, w: Optional[Tensor], div: Optional[Tensor],
                     placeholder: Tensor) -> Tensor:
        """The DEN tensor of a launch (``placeholder`` when there is none)."""
        if self.den is None:
            return placeholder
        den = new_output((K.DEN_LEN,), self.acc, placeholder.device)
        launch_on(self.dev, self.den, t, den if w is None else w, den if div is None else div,
                  den)
        return den

    def run(self, x: Tensor, target: Tensor, w: Optional[Tensor], g: Optional[Tensor],
            div: Optional[Tensor] = None):
        """Launch the forward: ``(loss rows, lse (ACC), state)``; the gradient
        goes to ``g`` (None: no gradient; x itself: in place); ``div``: a
        tensor divisor (when the plan has one)."""
        M, acc = self.M, self.acc
        loss = new_output((M,), acc, x.device)
        lse = new_output((M,), acc, x.device)
        state = new_output((M,), acc, x.device) if g is not None else loss
        if M == 0:
            return loss, lse, state
        xin = x.contiguous() if self.copy_x else x
        if g is None:
            g = xin
        if self.prob:
            y = target.contiguous() if self.copy_y else target
            den = self.denominators(loss, None, div, loss)
            launch_on(self.dev, self.main, xin, y, loss if w is None else w, den, g, loss, lse,
                      state)
            return loss, lse, state
        t = target if self.flat_t else target.reshape(-1).contiguous()
        den = self.denominators(t, w, div, loss)
        launch_on(self.dev, self.main, xin, t, loss if w is None else w, den, g, loss, lse,
                  state, loss)
        return loss, lse, state

    def reduce(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """The row losses (already divided by the mean's denominators), reduced;
        for "none" the flat [M] losses in ``dtype``, never a view of ``rows``
        (an autograd Function's output that is a view cannot be modified in
        place, as ``loss *= mask``): :meth:`shape` gives them their dims."""
        if self.reduction == "none":
            return rows.to(dtype)
        return _reduce(rows, self.reduction, self.batch, dtype)

    def shape(self, loss: Tensor, input: Tensor) -> Tensor:
        """The loss of :meth:`reduce` in the target's batch dims (none; () for
        a (C,) input)."""
        if self.reduction != "none":
            return loss
        return loss.reshape(self.batch if input.dim() >= 2 else ())


def denominators_plan(M: int, C: int, ignore_index: int, has_weight: bool, smooth: bool,
                      dtype: torch.dtype, device: torch.device, *, count: bool = True,
                      divisor=None):
    """The ``ce_denominators_kernel`` launch (``K.denominators_launcher``) for M
    targets over C classes of ``dtype`` logits on ``device``, its serial steps
    from the heuristics' limits; ``divisor``: None, a float, or "tensor"."""
    steps = heuristics.limits_for("cross_entropy", device, dtype.itemsize, C).den_serial_steps
    return K.denominators_launcher(M, C, ignore_index, has_weight, smooth, dtype, count, divisor,
                                   serial_steps=steps)


# Row-wise backward launchers over a (N, C, *) layout, memoised:
# key -> (CUDA device index or None, copy first, rows, launch)
_AUX = plan_cache()


def _aux(kind: str, t: Tensor, cap: float = 0.0):
    key = (kind, t.shape, t.stride(), t.dtype, t.device, cap, heuristics.generation())
    hit = _AUX.get(key)
    if hit is None:
        copy = rows_view(t, 1) is None
        r = rows_view(t.contiguous() if copy else t, 1)
        cfg = cross_entropy_scale_config(r.m, r.n, t.element_size(), t.device)
        out = _contiguous_rows(t.shape).strides
        if kind == "lse":
            launch = K.lse_grad_launcher(r.m, r.n, r.inner, r.strides, out, cap, t.dtype, cfg)
        else:
            in_place = kind == "scale_"
            launch = K.grad_scale_launcher(r.m, r.n, r.inner, r.strides,
                                           r.strides if in_place else out, in_place, t.dtype, cfg)
        hit = remember(_AUX, key, (launch_device(t.device), copy, r.m, launch))
    return hit


def _flat(v: Tensor):
    """A per-row vector (or one value) as a flat pointer and its stride (0: one value)."""
    if v.dim() == 0:
        return v, 0
    v = v.reshape(-1)
    return v, (v.stride(0) if v.numel() > 1 else 0)


def _scale_(g: Tensor, state: Tensor, go: Tensor) -> None:
    """g's rows *= go / state where they differ (exact zeros stay 0 whatever
    the factor); state <- go (in place; g must have an in-place row view). A
    launch that touches two scalars per row when every factor is already
    right."""
    dev, _, M, launch = _aux("scale_", g)
    if M:
        launch_on(dev, launch, g, g, state, *_flat(go))


def _scaled(g: Tensor, state: Tensor, go: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new contiguous tensor: g's rows times go / state (g, state untouched),
    in ``dtype`` (None: g's; an fp32 g is rounded once, on store); exact
    zeros stay 0 whatever the factor."""
    dev, copy, M, launch = _aux("scaled", g)
    out = empty_like(g) if dtype is None or dtype == g.dtype else \
        new_output(g.shape, dtype, g.device)
    if M:
        launch_on(dev, launch, g.contiguous() if copy else g, out, state, *_flat(go))
    return out


def _lse_grad(x: Tensor, lse: Tensor, dlse: Tensor, cap: float) -> Tensor:
    """sigma(x) * dlse per row, through the softcap: a new contiguous tensor."""
    dev, copy, M, launch = _aux("lse", x, cap)
    out = empty_like(x)
    if M:
        dlse, s_dlse = _flat(dlse)
        launch_on(dev, launch, x.contiguous() if copy else x, lse, dlse, out, s_dlse)
    return out


_PLANS = plan_cache()


def _plan(x, target, weight, ignore_index, reduction, eps, zl, cap, grad_scale, mode,
          on_miss=None, divisor=None, lse_all=True) -> _Plan:
    """The memoised plan of a call on (N, C, *) logits ``x``; ``on_miss`` (the
    argument checks) runs before a new plan is made. ``divisor``: None, a
    float or a tensor divisor's dtype."""
    key = (x.shape, x.stride(), x.dtype, x.device, target.shape, target.stride(), target.dtype,
           target.device, None if weight is None else (weight.shape, weight.dtype, weight.device),
           ignore_index, reduction, eps, zl, cap, grad_scale, mode, divisor, lse_all,
           heuristics.generation())
    plan = _PLANS.get(key)
    if plan is None:
        if on_miss is not None:
            on_miss()
        plan = remember(_PLANS, key, _Plan(x, target, weight, ignore_index, reduction, eps, zl,
                                           cap, grad_scale, mode, divisor, lse_all))
    return plan


def _row_dims(input: Tensor) -> tuple:
    """The shape of the per-row loss and lse: the input's without its class
    dim 1, ``()`` for a (C,) input (as torch's ``reduction="none"``)."""
    return (input.shape[0], *input.shape[2:]) if input.dim() >= 2 else ()


def _weight(weight: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    if weight is None:
        return None
    if weight.dtype != acc:
        weight = weight.to(acc)
    return weight.contiguous()


class _BackwardPlan:
    """The backward of class targets from the logits and the lse (traced
    graphs; fp16 logits eagerly): the denominators, then one pass over the
    logits writing grad_output * the gradient (``in_place``: over the logits,
    which must have an in-place row view)."""

    __slots__ = ("M", "acc", "dev", "copy_x", "flat_t", "den", "main", "in_place")

    def __init__(self, x, target, weight, ignore_index, reduction, eps, zl, cap, grad_scale,
                 divisor, in_place=False):
        self.M = _num_rows(x)
        self.acc = _acc(x.dtype)
        self.dev = launch_device(x.device)
        self.in_place = in_place
        self.copy_x = rows_view(x, 1) is None
        r = rows_view(x.contiguous() if self.copy_x else x, 1)
        self.flat_t = target.dim() == 1 and target.stride(0) == 1
        has_w = weight is not None
        use_den = reduction == "mean" or divisor is not None
        div = "tensor" if isinstance(divisor, torch.dtype) else divisor
        self.den = None
        if use_den or (has_w and eps > 0):
            self.den = denominators_plan(self.M, r.n, ignore_index, has_w, eps > 0, x.dtype,
                                         x.device, count=reduction == "mean", divisor=div)
        cfg = cross_entropy_backward_config(self.M, r.n, x.element_size(), x.device,
                                            has_w or eps > 0 or cap > 0)
        self.main = K.class_backward_launcher(
            self.M, r.n, r.inner, r.strides,
            r.strides if in_place else _contiguous_rows(x.shape).strides, ignore_index,
            use_den, eps, zl, cap, grad_scale, has_w, x.dtype, cfg)

    denominators = _Plan.denominators

    def run(self, x, target, w, lse, go, div):
        out = x if self.in_place else empty_like(x)
        if self.M == 0:
            return out
        t = target if self.flat_t else target.reshape(-1).contiguous()
        den = self.denominators(t, w, div, lse)
        go, s_go = _flat(go)
        launch_on(self.dev, self.main, x.contiguous() if self.copy_x else x, t,
                  lse if w is None else w, den, lse, go, out, s_go)
        return out


def _class_backward(x, target, weight, lse, go, ignore_index, reduction, eps, zl, cap,
                    grad_scale, div_f, div_t, in_place=False) -> Tensor:
    """grad_output * d loss / d x for class targets, from the logits and the
    lse: a new tensor, or written over ``x`` itself (``in_place``)."""
    divisor = _div_kind(div_f, div_t)
    key = ("backward", x.shape, x.stride(), x.dtype, x.device, target.shape, target.stride(),
           target.dtype, None if weight is None else (weight.shape, weight.dtype),
           ignore_index, reduction, eps, zl, cap, grad_scale, divisor, in_place,
           heuristics.generation())
    plan = _PLANS.get(key)
    if plan is None:
        plan = remember(_PLANS, key, _BackwardPlan(x, target, weight, ignore_index, reduction,
                                                   eps, zl, cap, grad_scale, divisor, in_place))
    return plan.run(x, target, _weight(weight, plan.acc), lse, go, div_t)


class _CrossEntropyFunction(torch.autograd.Function):
    """Eager autograd of the fused op: the forward writes the gradient (into a
    new buffer, or over the logits); the backward rescales it by grad_output
    (nothing to do when it is 1, i.e. when the scale was stated ahead as the
    divisor), in place and handed out when the graph is freed after it, else
    (``retain_graph``: a later backward reads it again) into a new tensor, so
    the saved gradient never changes while it can still be read. ``wide``:
    the buffer is fp32 (fp16 logits with probability targets), and every
    backward writes grad_output times it into a new tensor of the logits'
    dtype, rounded once."""

    @staticmethod
    def forward(ctx, x, target, w, plan, inplace, loss_dtype, div, wide=False):
        g = x.detach() if inplace else \
            new_output(x.shape, torch.float32, x.device) if wide else empty_like(x)
        rows, lse, state = plan.run(x, target, w, g, div)
        if inplace:
            torch.autograd.graph.increment_version(x)  # its values are now the gradient
        anchor = anchor_output(ctx, g, state)
        ctx.out_dtype = x.dtype if wide else None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return plan.reduce(rows, loss_dtype), lse, anchor

    @staticmethod
    @first_order
    def backward(ctx, d_loss, d_lse, d_anchor):
        none = (None,) * 7
        if d_loss is None:
            return (None,) + none
        g, state = saved(ctx)
        if transformed(d_loss):  # batched (is_grads_batched, vmap of a backward): torch ops
            return (reference_scaled(g, state, d_loss, ctx.out_dtype),) + none
        if ctx.out_dtype is not None or graph_kept():
            # wide (the fp32 buffer is never handed out), or the graph is
            # retained: the saved gradient stays as the forward wrote it
            return (_scaled(g, state, d_loss, ctx.out_dtype),) + none
        _scale_(g, state, d_loss)  # a no-op launch when grad_output is 1
        return (g,) + none


class _DeferredCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd of fp16 logits with class targets: the forward writes the
    loss and lse only; the backward writes grad_output times the gradient in
    one pass over the saved logits (``ce_class_backward_kernel``), rounded
    once from fp32, so that a grad_output known only then (a GradScaler's loss
    scale) loses nothing to fp16 underflow. ``inplace``: a backward that
    frees the graph writes it over the logits; one that retains it (a later
    backward reads the logits again) writes a new tensor."""

    @staticmethod
    def forward(ctx, x, target, w, plan, inplace, loss_dtype, div, options):
        rows, lse, _ = plan.run(x, target, w, None, div)
        if inplace:
            # kept off the saved tensors (a backward that frees the graph
            # overwrites them), with their version, checked by every backward
            # as autograd would
            ctx.x, ctx.version = x.detach(), x._version
            anchor = anchor_output(ctx, target, w, lse, div)
        else:
            anchor = anchor_output(ctx, x, target, w, lse, div)
        ctx.inplace, ctx.options = inplace, options
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return plan.reduce(rows, loss_dtype), lse, anchor

    @staticmethod
    @first_order
    def backward(ctx, d_loss, d_lse, d_anchor):
        none = (None,) * 7
        if d_loss is None:
            return (None,) + none
        if ctx.inplace:
            x, (target, w, lse, div) = ctx.x, saved(ctx)
            if x._version != ctx.version:
                raise RuntimeError(
                    "softmax_gpu.cross_entropy(..., inplace_backward=True): the logits were "
                    "modified in place after the loss was computed, so the gradient cannot "
                    "be formed from them; compute the loss without inplace_backward, or "
                    "after the change")
        else:
            x, target, w, lse, div = saved(ctx)
        ignore_index, reduction, eps, zl, cap, div_f = ctx.options
        if transformed(d_loss):  # is_grads_batched, vmap of a backward: torch ops
            return (reference_class_grad(x, target, w, d_loss, ignore_index, reduction, eps, zl,
                                         cap, 1.0, div if div is not None else div_f),) + none
        in_place = ctx.inplace and not graph_kept()
        g = _class_backward(x, target, w, lse, d_loss, ignore_index, reduction, eps, zl, cap,
                            1.0, div_f, div, in_place=in_place)
        if in_place:
            torch.autograd.graph.increment_version(x)  # its values are now the gradient
        return (g,) + none


class _LseFunction(torch.autograd.Function):
    """Makes the returned lse (fp32) differentiable: d lse / d x = sigma (per row)."""

    @staticmethod
    def forward(ctx, x, lse, cap):
        anchor = anchor_output(ctx, x, lse)
        ctx.cap = cap
        return lse.to(torch.float32, copy=True), anchor

    @staticmethod
    @first_order
    def backward(ctx, dlse, d_anchor):
        x, lse = saved(ctx)
        if transformed(dlse):  # batched: torch ops
            return reference_lse_grad(x, lse, dlse, ctx.cap), None, None
        return _lse_grad(x, lse, dlse, ctx.cap), None, None


class _InplaceLseFunction(torch.autograd.Function):
    """The lse of an in-place call, as fp32: differentiable in form (tied to
    the loss), so that a term built from it is never silently left out of
    the gradient; its backward raises, since the logits d lse / d z needs
    now hold the loss's gradient."""

    @staticmethod
    def forward(ctx, lse, loss):
        return lse.to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx, dlse):
        raise RuntimeError(
            "softmax_gpu.cross_entropy(..., return_lse=True, inplace_backward=True): the lse "
            "has no gradient, because the logits it needs were overwritten by the loss's "
            "gradient. Use lse.detach() where it only feeds a metric, z_loss= for a z-loss, or "
            "inplace_backward=False to backpropagate through the lse")


# ----------------------------------------------------------------------------
# torch.library ops: what a traced graph (torch.compile, make_fx, opcheck) holds
#
# cross_entropy_forward      functional; one fused launch: row losses (already
#                            divided by the mean's denominators and the divisor),
#                            lse and, when with_grad, the gradient and the per-row
#                            factor state. Its backward: with_grad, the saved
#                            gradient scaled (cross_entropy_scaled_grad); else
#                            (class targets) one pass over the saved logits
#                            (cross_entropy_backward).
# cross_entropy_backward     grad_output * the gradient, from the logits and lse.
# cross_entropy_forward_     mutates input: the gradient is written over the logits.
# cross_entropy_scaled_grad  a new tensor, every row times grad_output / state.
# cross_entropy_attach_grad  a copy of the row losses whose backward scales the
#                            gradient held in ``input`` (the inplace link).
# cross_entropy_lse          a copy of the lse whose backward is
# cross_entropy_lse_backward   sigma * dlse.
# ----------------------------------------------------------------------------


@torch.library.custom_op("softmax_gpu::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float, grad_scale: float, with_grad: bool,
    divisor: Optional[float] = None, divisor_t: Optional[Tensor] = None, lse_all: bool = True,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused cross-entropy of (N, C, *) logits over dim 1.

    Returns ``(loss, lse, grad, state)``: ``loss`` [M] (fp32; fp64 for fp64)
    per row, already divided by the reduction's denominators and the divisor
    (``divisor`` a float, or ``divisor_t`` a 0-d tensor) so that its sum is
    the reduced loss; ``lse`` [M] (fp32; fp64 for fp64; 0 on ignored rows
    unless ``lse_all``); when ``with_grad``, ``grad`` of the input's shape
    and dtype (``grad_dtype`` when given: fp32 keeps an fp16 input's
    gradient from underflowing until grad_output is applied) holding
    grad_scale * d(loss.sum())/d(input), and ``state`` [M] (ones, the factor
    applied so far); else both are empty. ``softcap`` 0 means none.
    """
    if backend_for(input) == "triton":
        mode = NEW_GRAD if with_grad else NO_GRAD
        plan = _plan(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                     softcap, grad_scale, mode, divisor=_div_kind(divisor, divisor_t),
                     lse_all=lse_all)
        grad = None
        if with_grad:
            grad = empty_like(input) if grad_dtype in (None, input.dtype) else \
                new_output(input.shape, grad_dtype, input.device)
        loss, lse, state = plan.run(input, target, _weight(weight, plan.acc), grad, divisor_t)
        if not with_grad:
            return loss, lse, input.new_empty(0), loss.new_empty(0)
        return loss, lse, grad, state
    return reference_forward(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss, softcap, grad_scale, with_grad,
                             divisor_t if divisor_t is not None else divisor, grad_dtype)


@cross_entropy_forward.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      grad_scale, with_grad, divisor=None, divisor_t=None, lse_all=True, grad_dtype=None):
    M = _num_rows(input)
    acc = _acc(input.dtype)
    loss = input.new_empty((M,), dtype=acc)
    lse = input.new_empty((M,), dtype=acc)
    if with_grad:
        return loss, lse, torch.empty(input.shape, dtype=grad_dtype or input.dtype,
                                      device=input.device), input.new_empty((M,), dtype=acc)
    return loss, lse, input.new_empty(0), input.new_empty(0, dtype=acc)


@torch.library.custom_op("softmax_gpu::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    input: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor, grad_output: Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float,
    grad_scale: float, divisor: Optional[float] = None, divisor_t: Optional[Tensor] = None,
) -> Tensor:
    """grad_output times the gradient of :func:`cross_entropy_forward`'s row
    losses wrt the (N, C, *) logits ``input`` with class-index targets, from
    the logits and the forward's ``lse``: one read of the logits and one
    write, rounded once. ``grad_output`` [M] (any stride) or one value."""
    if backend_for(input) == "triton":
        return _class_backward(input, target, weight, lse, grad_output, ignore_index, reduction,
                               label_smoothing, z_loss, softcap, grad_scale, divisor, divisor_t)
    return reference_class_grad(input, target, weight, grad_output, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, grad_scale,
                                divisor_t if divisor_t is not None else divisor)


def _per_row(go: Tensor) -> Tensor:
    """A grad_output as the torch paths apply it: one value as 0-d, else one
    per row, flat ([M]; also none, an empty batch)."""
    return go.reshape(()) if go.numel() == 1 else go.reshape(-1)


def reference_class_grad(input, target, weight, grad_output, ignore_index, reduction,
                         label_smoothing, z_loss, softcap, grad_scale, divisor) -> Tensor:
    """:func:`cross_entropy_backward` in torch ops, from the logits (also for
    a batched ``grad_output``)."""
    go = _per_row(grad_output)
    return reference_forward(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss, softcap, go * grad_scale, True, divisor)[2]


@cross_entropy_backward.register_fake
def _(input, target, weight, lse, grad_output, ignore_index, reduction, label_smoothing, z_loss,
      softcap, grad_scale, divisor=None, divisor_t=None):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


@torch.library.custom_op("softmax_gpu::cross_entropy_scaled_grad", mutates_args=())
def cross_entropy_scaled_grad(grad: Tensor, state: Tensor, grad_output: Tensor,
                              dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new contiguous tensor holding each row of ``grad`` ((N, C, *), rows
    over dim 1) times grad_output[r] / state[r] (``grad_output`` [M], any
    stride, or one value), in ``dtype`` (None: grad's); exact zeros stay 0."""
    if backend_for(grad) == "triton":
        return _scaled(grad, state, grad_output, dtype)
    return reference_scaled(grad, state, grad_output, dtype)


def times_keeping_zeros(g: Tensor, f: Tensor, state: Tensor,
                        out: Optional[Tensor] = None) -> Tensor:
    """``g * f`` (torch ops; ``f`` is grad_output / ``state``, both shaped to
    broadcast over g's rows) with g's exact zeros kept at 0 whatever ``f``
    is, inf and NaN included: an ignored row's gradient stays 0 under any
    grad_output, as in torch's backward (the eager kernels do the same). Not
    in a row whose state is 0 (its gradient was scaled to 0: nothing is
    left to scale, so NaN, never a silent 0).
    Zeros are told by value, so an exact 0 in a kept row (a class whose
    probability underflowed) also stays 0 where torch gives NaN; the row's
    other entries still carry the inf / NaN.
    Formed in the promoted dtype; with ``out`` (which may be ``g`` itself)
    rounded once into it, with no full-size temporary but a bool mask;
    without, a new tensor (functional: also under vmap)."""
    keep = (g == 0) & (state != 0)
    if out is None:
        return torch.where(keep, 0, g * f)
    torch.mul(g, f, out=out)
    return out.masked_fill_(keep, 0)


def reference_scaled(grad: Tensor, state: Tensor, grad_output: Tensor,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`cross_entropy_scaled_grad` in torch ops (also for a batched
    ``grad_output``: ``is_grads_batched``, vmap over a backward)."""
    acc = state.dtype
    shape = (grad.shape[0], 1, *grad.shape[2:])
    f = _per_row(grad_output.to(acc)) / state
    return times_keeping_zeros(grad, f.reshape(shape), state.reshape(shape)) \
        .to(dtype or grad.dtype).contiguous()


@cross_entropy_scaled_grad.register_fake
def _(grad, state, grad_output, dtype=None):
    return torch.empty(grad.shape, dtype=dtype or grad.dtype, device=grad.device)


def _op_setup_context(ctx, inputs, output):
    (input, target, weight, ignore_index, reduction, eps, zl, cap, gs, with_grad,
     divisor, divisor_t, _, _) = inputs
    _, lse, grad, state = output
    ctx.with_grad = with_grad
    ctx.mark_non_differentiable(lse, grad, state)
    if with_grad:
        ctx.save_for_backward(grad, state)
        ctx.grad_dtype = input.dtype if grad.dtype != input.dtype else None
    else:
        ctx.save_for_backward(input, target, weight, lse, divisor_t)
        ctx.options = (ignore_index, reduction, eps, zl, cap, gs, divisor)


def _op_backward(ctx, d_loss, d_lse, d_grad, d_state):
    if d_loss is None:
        return (None,) * 14
    if ctx.with_grad:
        grad, state = ctx.saved_tensors
        return (cross_entropy_scaled_grad(grad, state, d_loss, ctx.grad_dtype),) + (None,) * 13
    input, target, weight, lse, divisor_t = ctx.saved_tensors
    if target.is_floating_point():
        raise RuntimeError(
            "softmax_gpu.cross_entropy: the forward ran without a gradient (grad mode off or "
            "input.requires_grad False at the call), so there is none to backpropagate")
    ignore_index, reduction, eps, zl, cap, gs, divisor = ctx.options
    return (cross_entropy_backward(input, target, weight, lse, d_loss, ignore_index, reduction,
                                   eps, zl, cap, gs, divisor, divisor_t),) + (None,) * 13


cross_entropy_forward.register_autograd(_op_backward, setup_context=_op_setup_context)


@torch.library.custom_op("softmax_gpu::cross_entropy_forward_", mutates_args=("input",))
def cross_entropy_forward_(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float, grad_scale: float,
    divisor: Optional[float] = None, divisor_t: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_entropy_forward` with the gradient written over ``input``
    (whose rows must have an in-place view). Returns ``(loss, lse, state)``."""
    if backend_for(input) == "triton":
        plan = _plan(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                     softcap, grad_scale, INPLACE_GRAD, divisor=_div_kind(divisor, divisor_t))
        return plan.run(input, target, _weight(weight, plan.acc), input, divisor_t)
    loss, lse, grad, state = reference_forward(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        grad_scale, True, divisor_t if divisor_t is not None else divisor)
    input.copy_(grad)
    return loss, lse, state


@cross_entropy_forward_.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      grad_scale, divisor=None, divisor_t=None):
    M = _num_rows(input)
    acc = _acc(input.dtype)
    return (input.new_empty((M,), dtype=acc), input.new_empty((M,), dtype=acc),
            input.new_empty((M,), dtype=acc))


@torch.library.custom_op("softmax_gpu::cross_entropy_attach_grad", mutates_args=())
def cross_entropy_attach_grad(input: Tensor, loss: Tensor, state: Tensor) -> Tensor:
    """A copy of ``loss`` (the row losses of :func:`cross_entropy_forward_`)
    whose backward returns ``input`` (which holds the gradient) times
    grad_output / state as the input's gradient: the autograd link of
    ``inplace_backward``."""
    return loss.clone()


@cross_entropy_attach_grad.register_fake
def _(input, loss, state):
    return torch.empty_like(loss)


def _attach_setup_context(ctx, inputs, output):
    input, _, state = inputs
    ctx.save_for_backward(input, state)


def _attach_backward(ctx, d_loss):
    grad, state = ctx.saved_tensors
    return cross_entropy_scaled_grad(grad, state, d_loss), None, None


cross_entropy_attach_grad.register_autograd(_attach_backward, setup_context=_attach_setup_context)


@torch.library.custom_op("softmax_gpu::cross_entropy_lse_backward", mutates_args=())
def cross_entropy_lse_backward(input: Tensor, lse: Tensor, grad_lse: Tensor,
                               softcap: float) -> Tensor:
    """d(sum(lse * grad_lse)) / d input for (N, C, *) logits: sigma * grad_lse
    per row (through the softcap; 0 means none). A new contiguous tensor."""
    if backend_for(input) == "triton":
        return _lse_grad(input, lse, grad_lse, softcap)
    return reference_lse_grad(input, lse, grad_lse, softcap)


@cross_entropy_lse_backward.register_fake
def _(input, lse, grad_lse, softcap):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


@torch.library.custom_op("softmax_gpu::cross_entropy_lse", mutates_args=())
def cross_entropy_lse(input: Tensor, lse: Tensor, softcap: float) -> Tensor:
    """An fp32 copy of ``lse`` ([M], of the (N, C, *) logits ``input``) whose
    backward is :func:`cross_entropy_lse_backward`."""
    return lse.to(torch.float32, copy=True)


@cross_entropy_lse.register_fake
def _(input, lse, softcap):
    return torch.empty(lse.shape, dtype=torch.float32, device=lse.device)


def _lse_setup_context(ctx, inputs, output):
    input, lse, softcap = inputs
    ctx.save_for_backward(input, lse)
    ctx.softcap = softcap


def _lse_backward(ctx, d_lse):
    input, lse = ctx.saved_tensors
    return cross_entropy_lse_backward(input, lse, d_lse, ctx.softcap), None, None


cross_entropy_lse.register_autograd(_lse_backward, setup_context=_lse_setup_context)


# ----------------------------------------------------------------------------
# Public functions and module
# ----------------------------------------------------------------------------


def _loss_dtype(input: Tensor, loss_dtype: Optional[torch.dtype], target=None) -> torch.dtype:
    """The returned loss's dtype: ``loss_dtype`` when given, else torch's:
    the input's, promoted with floating (probability) targets' (bf16 logits
    with fp32 probabilities give fp32), and fp32 for fp16/bf16 logits under
    ``torch.autocast`` (which runs cross-entropy in fp32 on CUDA and CPU
    alike)."""
    if loss_dtype is not None:
        check_loss_dtype(loss_dtype)
        return loss_dtype
    if input.dtype in _HALF and autocast_on(input):
        return torch.float32
    if isinstance(target, Tensor) and target.is_floating_point():
        return torch.promote_types(input.dtype, target.dtype)
    return input.dtype


_HALF = (torch.float16, torch.bfloat16)


def _as_rows_input(input: Tensor, target: Tensor):
    """(C,) input / () target seen as one row."""
    if input.dim() >= 2:
        return input, target
    return input.unsqueeze(0), target.unsqueeze(0)


def _traced_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl, cap,
                          return_lse, inplace_backward, loss_dtype, need_grad, div_f, div_t):
    """The op graph a tracer records (torch.compile, make_fx).

    Class targets: the forward writes the loss and lse only, and the
    backward makes one pass over the saved logits (3 passes over logits-sized
    data in all, the gradient rounded once); probability targets and
    ``inplace_backward``: the forward writes the gradient, which the backward
    scales into a new tensor. fp16 logits: never in place (the gradient is
    formed at backward time), and probability targets' gradient is kept in
    fp32 until then."""
    prob = check_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl,
                               cap or None)
    x, t = _as_rows_input(input, target)
    batch = _row_dims(input)
    half = x.dtype == torch.float16
    if need_grad and inplace_backward:
        check_not_grad_leaf(input, "input")
    if need_grad and inplace_backward and not half:
        check_inplace_rows(input)
        rows, lse, state = cross_entropy_forward_(x.detach(), t, weight, ignore_index, reduction,
                                                  eps, zl, cap, 1.0, div_f, div_t)
        rows = cross_entropy_attach_grad(x, rows, state)
    else:
        wide = need_grad and prob and half
        rows, lse, _, _ = cross_entropy_forward(x, t, weight, ignore_index, reduction, eps, zl,
                                                cap, 1.0, need_grad and prob, div_f, div_t,
                                                return_lse, torch.float32 if wide else None)
        if return_lse and need_grad:
            lse = cross_entropy_lse(x, lse, cap)
    loss = _reduce(rows, reduction, batch, loss_dtype)
    return (loss, lse.to(torch.float32).reshape(batch)) if return_lse else loss


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
    divisor: float | Tensor | None = None,
):
    """Fused cross-entropy: a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Bound like torch (``cross_entropy(input, target, weight, size_average,
    ignore_index, reduce, reduction, label_smoothing)``; the deprecated
    ``size_average`` / ``reduce`` map to ``reduction`` with torch's warning)
    and with torch's semantics for every case it accepts: input (C,), (N, C)
    or (N, C, d1..dK) with the classes in dim 1; integer class-index targets
    of the input's shape without dim 1 (any integer dtype), or floating class
    probabilities of the input's shape; ``weight``, ``ignore_index``,
    ``reduction`` ("none" | "mean" | "sum"), ``label_smoothing`` (torch's
    formula, weights included); the mean divides by the kept rows' total
    weight (NaN when every target is ignored; probability targets: by the
    number of rows). Arithmetic is fp32 (fp64 for fp64 logits).

    One Triton launch reads the logits once and writes each row's loss and
    log-sum-exp; when autograd will need the input's gradient (grad mode on
    and ``input.requires_grad`` at the call) the same launch also writes
    sigma * sum(y) - y, scaled for the reduction and the divisor, so the
    backward does nothing at all when grad_output is 1 (``loss.backward()``,
    or any scale stated ahead as ``divisor``). Any other grad_output still
    works: the backward then rescales the saved gradient, one more pass over
    it and one more rounding in 16-bit dtypes. Under ``torch.compile`` (a
    traced graph) with class targets, the forward writes the loss and lse
    only and the backward writes grad_output times the gradient in one pass
    over the saved logits (rounded once) whatever grad_output is. Rows whose
    target is ``ignore_index`` are never read (unless ``return_lse``), only
    their zero gradient written. Peak extra memory is one logits-sized
    gradient buffer (none with ``inplace_backward``). No host-device sync;
    capturable in a CUDA graph and traceable by
    ``torch.compile(fullgraph=True)``. A gradient, once returned by a
    backward, is never changed afterwards: a backward that frees the graph
    (``loss.backward()``) scales the saved gradient in place and hands it
    out; one that retains it (``retain_graph=True``, where a later backward
    reads it again) writes a new tensor, as torch's backward does.

    An ignored row's gradient is exactly 0 on the kernels' path whatever its
    logits hold: a padded row of -inf or NaN logits stays 0, where torch's
    (and the CPU reference path's) log-softmax backward gives NaN there.

    Extras (keyword-only):
        z_loss: adds ``z_loss * lse**2`` per non-ignored row, reduced like the
            loss but, for the mean, over the number of non-ignored rows
            (no class weights).
        softcap: ``z = softcap * tanh(z / softcap)`` before everything, its
            derivative applied in the gradient. Must be > 0.
        return_lse: also return the per-row log-sum-exp (of the softcapped
            logits), fp32, shaped like the target's batch dims (NaN for a
            row holding +inf or NaN, where ``torch.logsumexp`` gives +inf for
            +inf; that row's loss and gradient are NaN in both). It is
            differentiable (d lse / d z = sigma): z-loss or distillation terms
            built from it backpropagate into the logits. While it (or a graph
            that uses it) lives it keeps the logits alive. With
            ``inplace_backward`` the logits are overwritten: a backward
            through the lse raises (eagerly; under torch.compile it is
            detached), so detach it where it only feeds a metric.
        inplace_backward: the gradient is written over the logits in the
            forward (when a gradient is needed), so there is no extra
            logits-sized memory. The logits' values are then gone: nothing
            else may use them afterwards (autograd raises if another op saved
            them for its backward), and they must be writable in place (no
            expanded dims) and not a leaf that requires grad (nor a view of
            one), as for torch's in-place ops.
        loss_dtype: the dtype of the returned loss (default: the input's, as
            torch, promoted with probability targets' dtype; fp32 for
            fp16/bf16 logits under ``torch.autocast``).
            ``torch.float32`` returns the fp32 result unrounded, as trainers
            want their loss, without an fp32 copy of the logits.
        divisor: the returned loss is the reduced loss divided by it, and so
            is the gradient the forward writes: the way to state a backward
            scale ahead of time (gradient accumulation's 1/k as ``divisor=k``,
            a loss scale s as ``divisor=1/s``, transformers'
            ``num_items_in_batch`` with ``reduction="sum"``), so that the
            backward's grad_output is 1 and costs nothing. A finite nonzero
            number (in float32's normal range unless the input is fp64), or
            a one-element tensor on the input's device (read there: no host
            sync; a CPU tensor is read on the host). It gets no gradient.

    Probability targets that require grad (distillation through both
    sides), or whose class weights do, take a differentiable torch composite
    instead of the fused op. With class indices, a ``weight`` that requires
    grad is an error, as in torch (it gets no gradient). The gradient is not
    itself differentiable (no double backward).

    Class indices outside [0, C) that are not ``ignore_index`` are never used
    as addresses: with the Triton kernels that row's loss and gradient are
    NaN (so a mean becomes NaN); the torch reference path raises IndexError as
    torch does. Rows whose target is ``ignore_index`` have zero loss and zero
    gradient.

    fp16 logits (mixed-precision training with a loss scale known only at
    backward, a ``GradScaler``'s): the gradient is never stored in fp16
    before grad_output is applied, so nothing underflows that torch's fp32
    gradient keeps; it is torch's fp32 gradient rounded once to fp16. With
    class targets the forward writes the loss and lse only (one read of the
    logits) and the backward writes grad_output times the gradient in one
    more pass over the saved logits (``inplace_backward``: over the logits,
    at backward time; under ``torch.compile`` into a new tensor); with
    probability targets the forward writes the gradient in an fp32 buffer
    (not in place) that each backward scales into a new fp16 tensor. bf16,
    fp32 and fp64 logits keep the one-pass forward above.

    Under ``torch.autocast`` (CUDA or CPU), as torch's policy for
    cross-entropy: fp16/bf16 logits give an fp32 loss by default (the
    kernels read the logits as they are and compute in fp32: no fp32 copy),
    also under ``torch.compile``; the gradient is in the logits' dtype.

    Returns:
        the loss, or ``(loss, lse)`` when ``return_lse``.
    """
    if has_torch_function_variadic(input, target, weight):  # a subclass's override, FX: as torch
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight=weight,
            size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, return_lse=return_lse, inplace_backward=inplace_backward,
            loss_dtype=loss_dtype, divisor=divisor)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    ignore_index, eps, zl, cap = _scalar_options(ignore_index, reduction, label_smoothing, z_loss,
                                                 softcap)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor) or \
            not isinstance(weight, (Tensor, type(None))):
        check_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl, softcap)
    if input.layout is not STRIDED or target.layout is not STRIDED or input.is_nested or \
            target.is_nested or (isinstance(weight, Tensor) and weight.layout is not STRIDED):
        check_strided("cross_entropy", input=input, target=target, weight=weight)
    if input.dim() == 1 and target.shape == (1,) != input.shape and \
            not target.is_floating_point():
        target = target.reshape(())  # (C,) input: torch takes a (1,) class index as ()
    div_f, div_t = (None, None) if divisor is None else check_divisor(divisor, input)
    loss_dtype = _loss_dtype(input, loss_dtype, target)
    need_grad = input.requires_grad and torch.is_grad_enabled()
    target_grad = target.requires_grad and torch.is_grad_enabled() and target.is_floating_point()
    if weight is not None:
        if not target.is_floating_point():
            check_weight_takes_no_grad(weight, "cross_entropy")
        elif isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled():
            target_grad = True  # probability targets: torch's weight gradient, as below
    if traced(input) and not target_grad:
        return _traced_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl,
                                     cap, return_lse, inplace_backward, loss_dtype, need_grad,
                                     div_f, div_t)
    if target_grad or backend_for(input) == "torch" or transformed(target, weight, div_t):
        # probability targets (or their class weights) that require grad: a
        # differentiable torch composite (also while a graph is traced: the
        # op's autograd has no gradient for them); the CPU reference (also inside
        # torch.func transforms, whichever argument they wrap)
        check_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl, softcap)
        x, t = _as_rows_input(input, target)
        loss, lse = reference_loss(x, t, weight, ignore_index, reduction, eps, zl, cap,
                                   div_t if div_t is not None else div_f)
        loss = loss.to(loss_dtype)
        if input.dim() < 2 and reduction == "none":  # (C,) input: the row dims are ()
            loss = loss.reshape(())
        if not return_lse:
            return loss
        return loss, lse.to(torch.float32).reshape(_row_dims(input))
    x, t = _as_rows_input(input, target)
    mode = (INPLACE_GRAD if inplace_backward else NEW_GRAD) if need_grad else NO_GRAD
    if mode == INPLACE_GRAD:
        check_not_grad_leaf(input, "input")
    # fp16 logits: a gradient stored at forward time would underflow under a
    # grad_output known only at backward (a loss scale). Class targets: the
    # backward forms it from the logits and the lse; probability targets: the
    # forward keeps it in fp32 (not in place).
    deferred = need_grad and x.dtype == torch.float16 and not t.is_floating_point()
    wide = need_grad and x.dtype == torch.float16 and t.is_floating_point()
    if wide:
        mode = NEW_GRAD

    def checks():
        check_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl, softcap)
        if mode == INPLACE_GRAD:
            check_inplace_rows(input)

    plan = _plan(x, t, weight, ignore_index, reduction, eps, zl, cap, 1.0,
                 NO_GRAD if deferred else mode, checks, _div_kind(div_f, div_t), return_lse)
    w = _weight(weight, plan.acc)
    if deferred:
        if mode == INPLACE_GRAD:
            check_inplace_rows(input)
        loss, lse, _ = _DeferredCrossEntropyFunction.apply(
            x, t, w, plan, mode == INPLACE_GRAD, loss_dtype, div_t,
            (ignore_index, reduction, eps, zl, cap, div_f))
    elif mode == NO_GRAD:
        rows, lse, _ = plan.run(x, t, w, None, div_t)
        loss = plan.reduce(rows, loss_dtype)
    else:
        loss, lse, _ = _CrossEntropyFunction.apply(x, t, w, plan, mode == INPLACE_GRAD,
                                                   loss_dtype, div_t, wide)
    loss = plan.shape(loss, input)
    if not return_lse:
        return loss
    if mode == NEW_GRAD:
        lse = _LseFunction.apply(x, lse, cap)[0]
    elif mode == INPLACE_GRAD:
        lse = _InplaceLseFunction.apply(lse, loss)
    else:
        lse = lse.to(torch.float32)
    return loss, lse.reshape(_row_dims(input))


def cross_entropy_with_grad(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    grad_scale: float = 1.0,
    inplace: bool = False,
    loss_dtype: torch.dtype | None = None,
    divisor: float | Tensor | None = None,
):
    """The loss and its gradient in one launch, for training code that runs
    its own backward.

    Arguments as :func:`cross_entropy` (without the deprecated
    ``size_average`` / ``reduce``). Returns ``(loss, grad_input)`` (or
    ``(loss, grad_input, lse)`` with ``return_lse``): ``grad_input`` has the
    input's shape and dtype and holds ``grad_scale * d(loss)/d(input)`` (for
    ``reduction="none"``, the derivative of the sum of the row losses), where
    the loss, as returned, is divided by ``divisor`` (None: 1; a number or a
    one-element tensor on the input's device, read there). The logits are
    read once where the row fits on chip (or its second read comes from L2);
    the gradient is rounded to its dtype once. Nothing is recorded for
    autograd.

    ``inplace=True`` writes the gradient over ``input`` (no extra memory) and
    returns it as ``grad_input`` (a detached alias of ``input``); the logits
    are gone afterwards and must be writable in place. ``loss_dtype`` None:
    the input's, fp32 for fp16/bf16 logits under ``torch.autocast``.
    """
    ignore_index, eps, zl, cap = _scalar_options(ignore_index, reduction, label_smoothing, z_loss,
                                                 softcap)
    check_cross_entropy(input, target, weight, ignore_index, reduction, eps, zl, softcap)
    gs = as_number(grad_scale, "grad_scale")
    div_f, div_t = check_divisor(divisor, input)
    if inplace:
        check_inplace_rows(input)
    loss_dtype = _loss_dtype(input, loss_dtype, target)
    x, t = _as_rows_input(input.detach(), target.detach())
    w = weight.detach() if weight is not None else None
    batch = _row_dims(input)
    if inplace:
        rows, lse, _ = cross_entropy_forward_(x, t, w, ignore_index, reduction, eps, zl, cap, gs,
                                              div_f, div_t)
        grad = input.detach()
    else:
        rows, lse, grad, _ = cross_entropy_forward(x, t, w, ignore_index, reduction, eps, zl,
                                                   cap, gs, True, div_f, div_t)
        grad = grad.reshape(input.shape)
    loss = _reduce(rows, reduction, batch, loss_dtype)
    if return_lse:
        return loss, grad, lse.to(torch.float32).reshape(batch)
    return loss, grad


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` running
    :func:`cross_entropy`: a subclass of it (``isinstance`` checks hold),
    with torch's constructor (the deprecated ``size_average``/``reduce`` are
    mapped to ``reduction`` as torch does) plus the keyword-only extras
    ``z_loss``, ``softcap``, ``return_lse``, ``inplace_backward`` and
    ``loss_dtype``. ``weight`` is a buffer, as in torch, so a state_dict
    loads across."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 inplace_backward: bool = False, loss_dtype: torch.dtype | None = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.loss_dtype = loss_dtype

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward,
            loss_dtype=self.loss_dtype)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.loss_dtype is not None:
            parts.append(f"loss_dtype={self.loss_dtype}")
        return ", ".join(parts)
