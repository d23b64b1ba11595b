"""Problem sizes: the N grid, the named LLM shapes, and the ``--quick`` subsets.

Grid rows: M is chosen so that one input is at least ``target_bytes``
(1 GiB by default, several times any L2), so timings measure DRAM, not cache.

The fused linear + cross-entropy op has shapes of its own
(:func:`linear_shapes`): M tokens, N vocabulary, D hidden.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "GRID_N",
    "LLM_TOKENS",
    "LLM_VOCABS",
    "TARGET_INPUT_BYTES",
    "Shape",
    "grid_rows",
    "shapes_for",
    "parse_size",
    "size_label",
    "LCE_TOKENS",
    "LCE_MODELS",
    "LCE_HIDDEN",
    "linear_shapes",
    "lce_model",
]

GRID_N = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
LLM_TOKENS = 16384
LLM_VOCABS = (32000, 50257, 128256, 151936, 256000)
TARGET_INPUT_BYTES = 1 << 30

# --quick on a GPU: two grid points and one LLM vocabulary (under 3 minutes).
QUICK_GPU_GRID_N = (4096, 32768)
QUICK_GPU_LLM_VOCABS = (128256,)
# --quick on CPU: interpreter-sized problems.
QUICK_CPU_M = 64
QUICK_CPU_N = (256, 1024)

# Fused linear + cross-entropy (tokens x hidden x vocabulary): the LM heads of
# real models, (name, hidden D, vocabulary N), at each token count.
LCE_MODELS = (("llama3-8b", 4096, 128256), ("qwen2-7b", 3584, 152064),
              ("gemma2-2b", 2304, 256000), ("llama3-70b", 8192, 128256))
LCE_TOKENS = (4096, 16384)
LCE_HIDDEN = 4096  # hidden size of the --n shapes
# --quick on a GPU: the Llama-3-8B head (the published anchors) at both token counts.
QUICK_GPU_LCE = ((4096, 128256, 4096), (16384, 128256, 4096))
QUICK_CPU_LCE_HIDDEN = 32


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    """One [M, N] problem: M rows of length N (softmax over N)."""

    M: int
    N: int
    kind: str = "grid"  # "grid", "llm" or "custom"
    D: int = 0  # hidden size of the linear ops (0: not a linear op)


def grid_rows(N: int, elem_size: int, target_bytes: int = TARGET_INPUT_BYTES) -> int:
    """Rows so that an [M, N] input of ``elem_size``-byte elements is >= target
    (and less than one row more)."""
    if N <= 0 or elem_size <= 0:
        raise ValueError("N and elem_size must be positive")
    return max(1, math.ceil(target_bytes / (N * elem_size)))


def shapes_for(
    elem_size: int,
    *,
    device: str,
    quick: bool,
    which: str = "all",
    ns: tuple[int, ...] | None = None,
    m: int | None = None,
    target_bytes: int = TARGET_INPUT_BYTES,
) -> list[Shape]:
    """The shapes to run for one dtype.

    ``which``: ``all``, ``grid`` or ``llm``. ``ns`` replaces the N grid (and
    drops the LLM shapes); ``m`` fixes M for every grid shape.
    """
    if which not in ("all", "grid", "llm"):
        raise ValueError(f"unknown shape set {which!r}")
    if ns is not None:
        rows = [Shape(m or grid_rows(n, elem_size, target_bytes), n, "custom") for n in ns]
        return rows
    if quick and device != "cuda":
        return [Shape(m or QUICK_CPU_M, n, "grid") for n in QUICK_CPU_N]
    grid_n = QUICK_GPU_GRID_N if quick else GRID_N
    vocabs = QUICK_GPU_LLM_VOCABS if quick else LLM_VOCABS
    out: list[Shape] = []
    if which in ("all", "grid"):
        out += [Shape(m or grid_rows(n, elem_size, target_bytes), n, "grid") for n in grid_n]
    if which in ("all", "llm"):
        out += [Shape(m or LLM_TOKENS, v, "llm") for v in vocabs]
    return out


def linear_shapes(*, device: str, quick: bool, ns: tuple[int, ...] | None = None,
                  m: int | None = None) -> list[Shape]:
    """Shapes of the fused linear + cross-entropy: M tokens x N vocabulary x
    D hidden. Full: LCE_TOKENS x LCE_MODELS; --quick on a GPU: the Llama-3-8B
    head (4096 x 128256) at 4096 and 16384 tokens; --quick on CPU:
    interpreter-sized (M=64, N in 256 / 1k, D=32). ``ns`` replaces the
    vocabularies (D = LCE_HIDDEN), ``m`` the token counts."""
    cpu_quick = quick and device != "cuda"
    hidden = QUICK_CPU_LCE_HIDDEN if cpu_quick else LCE_HIDDEN
    if ns is not None:
        tokens = (m,) if m else ((QUICK_CPU_M,) if cpu_quick else LCE_TOKENS[:1])
        return [Shape(t, v, "custom", hidden) for t in tokens for v in ns]
    if cpu_quick:
        triples = [(m or QUICK_CPU_M, n, hidden) for n in QUICK_CPU_N]
    elif quick:
        triples = [t for t in QUICK_GPU_LCE if not m or t[0] == m] or \
            [(m, v, d) for _, v, d in QUICK_GPU_LCE[:1]]
    else:
        triples = [(t, v, d) for t in ((m,) if m else LCE_TOKENS) for _, d, v in LCE_MODELS]
    return [Shape(t, v, "llm", d) for t, v, d in triples]


def lce_model(N: int, D: int) -> str:
    """The model whose LM head is D x N (LCE_MODELS), or ''."""
    return next((name for name, d, v in LCE_MODELS if (d, v) == (D, N)), "")


def parse_size(text: str) -> int:
    """``"4096"``, ``"4k"`` (4096) or ``"1m"`` (1048576) -> int."""
    t = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    value = int(t) * mult
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def size_label(n: int) -> str:
    """``4096`` -> ``"4k"``; other numbers as they are."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)
