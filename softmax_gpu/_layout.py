"""Views of a tensor as a batch of rows laid out [OUTER, N, INNER], without copies.

The kernels address row r at (r // INNER) * s_outer + (r % INNER) * s_inner with
elements s_n apart. Any tensor whose dims before ``dim`` collapse into one
strided dim, and whose dims after it do too, is read in place: a contiguous
tensor reduced over any dim, a padded-vocabulary slice ``logits[:, :V]``, a
transposed matrix, an expanded (stride-0) gradient. Anything else is copied
once with ``.contiguous()``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Rows(NamedTuple):
    outer: int
    n: int
    inner: int
    strides: tuple[int, int, int]  # (outer, along the row, inner)

    @property
    def m(self) -> int:
        return self.outer * self.inner


def _collapsed_stride(sizes, strides):
    """Stride of the dims collapsed into one, or None when they do not collapse."""
    kept = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    if not kept:
        return 0
    for (_, st_a), (s_b, st_b) in zip(kept, kept[1:]):
        if st_a != st_b * s_b:
            return None
    return kept[-1][1]


def rows_view(t: torch.Tensor, dim: int) -> Rows | None:
    """The [OUTER, N, INNER] description of ``t`` reduced over ``dim``, or None."""
    sizes, strides = t.shape, t.stride()
    s_o = _collapsed_stride(sizes[:dim], strides[:dim])
    s_i = _collapsed_stride(sizes[dim + 1:], strides[dim + 1:])
    if s_o is None or s_i is None:
        return None
    outer = math.prod(sizes[:dim])
    inner = math.prod(sizes[dim + 1:])
    return Rows(outer, sizes[dim], inner, (s_o, strides[dim], s_i))


def as_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, Rows]:
    """``t`` (copied only if it has no in-place row view) and its row description."""
    r = rows_view(t, dim)
    if r is None:
        t = t.contiguous()
        r = rows_view(t, dim)
    return t, r
