"""Who runs each op: one registry of providers.

A provider turns an op *family* (``softmax``, ``log_softmax``,
``cross_entropy``; see :mod:`perf.ops`) into a function, or says why it
cannot:

- :meth:`Provider.availability` returns ``None`` when the provider can run on
  this device, else the reason it is skipped (not importable, needs CUDA...);
  the sweep records a ``skipped`` row with that reason for each case;
- :meth:`Provider.function` returns the function for a family, or raises
  :class:`NotImplementedForOp` (a ``not_implemented`` row, never a fake);
- :meth:`Provider.case_note` adds a remark to the ``note`` column (cuDNN's
  split calls and its cross-entropy recipe, our backend on CPU).

Add a provider with :func:`register_provider`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ProviderContext",
    "Provider",
    "NotImplementedForOp",
    "PROVIDERS",
    "register_provider",
    "make_providers",
]


@dataclasses.dataclass(frozen=True)
class ProviderContext:
    """What a provider may need to know about the run."""

    device: str  # "cuda" or "cpu"
    quick: bool = False


class NotImplementedForOp(Exception):
    """This provider has no implementation of the requested family."""


class Provider:
    """Base class. Subclasses set ``name`` and ``description``."""

    name: str = ""
    description: str = ""

    def availability(self, ctx: ProviderContext) -> str | None:
        """None if the provider can run here, else why it is skipped."""
        return None

    def function(self, family: str) -> Callable:
        """The function for ``family`` (calling convention in :mod:`perf.ops`)."""
        raise NotImplementedForOp(f"{self.name} has no {family}")

    def prepare_case(self) -> None:
        """Called before each case (fresh compile caches and the like)."""

    def case_note(self, family: str, M: int, N: int, device: str) -> str:
        """Extra text for the ``note`` column of this case ('' for none)."""
        return ""


PROVIDERS: dict[str, type[Provider]] = {}


def register_provider(cls: type[Provider]) -> type[Provider]:
    """Class decorator: add a provider to the registry (name must be new)."""
    if not cls.name or cls.name in PROVIDERS:
        raise ValueError(f"provider name {cls.name!r} is empty or already registered")
    PROVIDERS[cls.name] = cls
    return cls


def make_providers(names: list[str] | None = None) -> list[Provider]:
    """Instances of the registered providers (all, or the named ones, in order)."""
    if names is None:
        names = list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise KeyError(f"unknown provider(s) {unknown}; known: {list(PROVIDERS)}")
    return [PROVIDERS[n]() for n in names]


def _import_reason(module: str) -> str | None:
    """None if ``module`` imports, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"not importable: {type(exc).__name__}: {exc}"
    return None


# Torch's own functions, shared by the eager and compiled providers.
TORCH_FUNCTIONS: dict[str, Callable] = {
    "softmax": lambda x: torch.softmax(x, -1),
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    "cross_entropy": lambda x, t: F.cross_entropy(x, t),
    # the single-GPU loss on the whole logits: what vocab parallelism replaces
    "vocab_parallel_ce": lambda x, t: F.cross_entropy(x, t),
    # the LM head as written in a model: the [M, N] logits, then the loss
    "linear_ce": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
}


def _cuda_import_reason(module: str, ctx) -> str | None:
    """Why a CUDA-only third-party provider cannot run here, or None."""
    reason = _import_reason(module)
    if reason is None and ctx.device != "cuda":
        reason = "needs CUDA (this run is on CPU)"
    return reason


@register_provider
class SoftmaxGpuProvider(Provider):
    """Ours: ``softmax_gpu.softmax`` / ``log_softmax`` / ``cross_entropy``."""

    name = "softmax_gpu"
    description = "this project (Triton)"

    def availability(self, ctx):
        return _import_reason("softmax_gpu")

    def function(self, family):
        import softmax_gpu

        if family == "softmax":
            return lambda x: softmax_gpu.softmax(x, dim=-1)
        if family == "log_softmax":
            return lambda x: softmax_gpu.log_softmax(x, dim=-1)
        if family == "cross_entropy":
            # Checked at run time: the op is being written in parallel.
            if not hasattr(softmax_gpu, "cross_entropy"):
                raise NotImplementedForOp("softmax_gpu.cross_entropy does not exist (yet)")
            return lambda x, t: softmax_gpu.cross_entropy(x, t)
        if family == "vocab_parallel_ce":
            from perf.vocab_parallel import ensure_group

            ensure_group(self._device)
            return lambda x, t: softmax_gpu.distributed.vocab_parallel_cross_entropy(x, t)
        if family == "linear_ce":
            if not hasattr(softmax_gpu, "linear_cross_entropy"):
                raise NotImplementedForOp("softmax_gpu.linear_cross_entropy does not exist (yet)")
            options = self._linear_options()
            return lambda x, w, t: softmax_gpu.linear_cross_entropy(x, w, t, options=options)
        raise NotImplementedForOp(f"softmax_gpu has no {family}")

    # the linear op's options (LinearCrossEntropyOptions fields); None: the defaults
    linear_options: dict | None = None

    def _linear_options(self):
        import softmax_gpu

        if self.linear_options is None or not hasattr(softmax_gpu, "LinearCrossEntropyOptions"):
            return None
        return softmax_gpu.LinearCrossEntropyOptions(**self.linear_options)

    _device = "cuda" if torch.cuda.is_available() else "cpu"

    def case_note(self, family, M, N, device):
        import softmax_gpu

        self._device = device
        if family == "vocab_parallel_ce":
            import torch.distributed as dist

            from perf.vocab_parallel import comm_bytes

            world = dist.get_world_size() if dist.is_initialized() else 1
            c = comm_bytes(M, N, 8, torch.bfloat16)
            return (f"world size {world}; at 8 ranks (bf16) a step sends {c['ours_sent_bytes_per_rank']:.0f} B "
                    f"per rank vs {c['gather_logits_sent_bytes_per_rank']:.0f} B to all-gather the logits")
        chunks = _chunk_note(M, N, self._linear_options()) if family == "linear_ce" else ""
        if device == "cuda":
            return chunks
        backend = softmax_gpu.backend_for(torch.empty(0, device=device))
        if backend == "triton":
            where = "Triton interpreter on CPU"
        else:
            where = "torch reference path on CPU (TRITON_INTERPRET was not 1 at import)"
        return f"{chunks}; {where}" if chunks else where


def _chunk_note(M: int, N: int, options) -> str:
    """The chunk plan of our linear op at M tokens of an N vocabulary (bf16)."""
    try:
        import softmax_gpu.linear_cross_entropy  # noqa: F401
        import sys

        lce = sys.modules["softmax_gpu.linear_cross_entropy"]
        method = getattr(options, "chunking_method", "auto") or "auto"
        x = torch.empty((M, 4096), dtype=torch.bfloat16, device="meta")
        rows = lce.plan_rows(M, N, x, getattr(options, "batch_chunk_size", None) or 0, method)
    except (ImportError, AttributeError, KeyError):
        return ""
    return f"chunks of {rows} rows ({rows * N * 2 / 2**20:.0f} MiB of bf16 logits)"


class _LinearVariant(Provider):
    """softmax_gpu's linear cross-entropy with other options (the linear op only)."""

    linear_options: dict = {}

    def availability(self, ctx):
        return _import_reason("softmax_gpu")

    def function(self, family):
        if family != "linear_ce":
            raise NotImplementedForOp(f"{self.name} has only linear_ce, not {family}")
        return SoftmaxGpuProvider.function(self, family)

    _linear_options = SoftmaxGpuProvider._linear_options

    def case_note(self, family, M, N, device):
        return _chunk_note(M, N, self._linear_options()) if family == "linear_ce" else ""


@register_provider
class SoftmaxGpuOverlapProvider(_LinearVariant):
    name = "softmax_gpu_overlap"
    description = "ours, each chunk's cross-entropy on a side CUDA stream (overlap=True)"
    linear_options = {"overlap": True}


@register_provider
class SoftmaxGpuLeanProvider(_LinearVariant):
    name = "softmax_gpu_lean"
    description = ("ours, memory first: chunks of logits no larger than the input "
                   "(chunking_method='lean')")
    linear_options = {"chunking_method": "lean"}


@register_provider
class SoftmaxGpuFp32AccProvider(_LinearVariant):
    name = "softmax_gpu_fp32acc"
    description = "ours, the weight gradient accumulated in fp32 (acc_policy='balanced')"
    linear_options = {"acc_policy": "balanced"}


@register_provider
class TorchProvider(Provider):
    """PyTorch eager (the speedup baseline)."""

    name = "torch"
    description = "PyTorch eager"

    def function(self, family):
        if family not in TORCH_FUNCTIONS:
            raise NotImplementedForOp(f"torch has no {family} here")
        return TORCH_FUNCTIONS[family]


@register_provider
class TorchCompileProvider(Provider):
    """``torch.compile(dynamic=False)`` of the eager function, recompiled per case."""

    name = "torch_compile"
    description = "torch.compile(dynamic=False)"

    def availability(self, ctx):
        if ctx.device != "cuda" and ctx.quick:
            return ("skipped on CPU with --quick: Inductor's C++ compile takes longer than "
                    "the whole quick run (run without --quick to include it)")
        return None

    def prepare_case(self):
        # Every case is a new static shape: start from empty caches so that the
        # recompile limit never silently sends a case back to eager.
        torch._dynamo.reset()

    def function(self, family):
        if family not in TORCH_FUNCTIONS:
            raise NotImplementedForOp(f"torch has no {family} here")
        return torch.compile(TORCH_FUNCTIONS[family], dynamic=False)


@register_provider
class CudnnProvider(Provider):
    """cuDNN's legacy softmax through ctypes (:mod:`perf.cudnn`)."""

    name = "cudnn"
    description = "cuDNN cudnnSoftmaxForward/Backward (ctypes)"

    def __init__(self):
        self._cudnn = None

    def availability(self, ctx):
        if ctx.device != "cuda":
            return "needs CUDA (this run is on CPU)"
        try:
            from perf.cudnn import Cudnn

            self._cudnn = Cudnn()
            self._cudnn.handle()
        except Exception as exc:
            return f"cannot load cuDNN: {type(exc).__name__}: {exc}"
        return None

    def function(self, family):
        from perf.cudnn import ALGO_ACCURATE, ALGO_LOG, softmax_function

        if family == "softmax":
            return softmax_function(self._cudnn, ALGO_ACCURATE)
        if family == "log_softmax":
            return softmax_function(self._cudnn, ALGO_LOG)
        if family == "cross_entropy":
            log_softmax = softmax_function(self._cudnn, ALGO_LOG)
            return lambda x, t: -log_softmax(x).gather(1, t[:, None]).mean()
        raise NotImplementedForOp(f"cudnn has no {family}")

    def case_note(self, family, M, N, device):
        from perf.cudnn import MAX_DESC_ELEMENTS, row_chunks

        notes = []
        if family == "cross_entropy":
            notes.append("cuDNN has no cross-entropy: LOG softmax + torch gather")
        if M * N >= MAX_DESC_ELEMENTS:
            pieces = row_chunks(M, N)
            notes.append(f"split into {len(pieces)} cuDNN calls of <= {pieces[0][1]} rows "
                         f"(rows*cols >= 2^31)")
        return "; ".join(notes)


@register_provider
class LigerProvider(Provider):
    """Liger-Kernel's softmax and cross-entropy, when importable."""

    name = "liger"
    description = "Liger-Kernel"

    def availability(self, ctx):
        return _cuda_import_reason("liger_kernel", ctx)

    def function(self, family):
        if family == "softmax":
            try:
                from liger_kernel.transformers.functional import liger_softmax

                return liger_softmax
            except ImportError:
                try:
                    from liger_kernel.ops.softmax import LigerSoftmaxFunction
                except ImportError as exc:
                    raise NotImplementedForOp(f"this liger_kernel has no softmax ({exc})") from None
                return LigerSoftmaxFunction.apply
        if family == "cross_entropy":
            from liger_kernel.transformers.functional import liger_cross_entropy

            return lambda x, t: liger_cross_entropy(x, t)
        if family == "linear_ce":
            try:
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            except ImportError as exc:
                raise NotImplementedForOp(f"this liger_kernel has no fused linear CE ({exc})") from None
            return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
        raise NotImplementedForOp(f"liger has no {family}")


@register_provider
class QuackProvider(Provider):
    """QuACK (CuTe-DSL kernels) softmax and cross-entropy, when importable."""

    name = "quack"
    description = "QuACK"

    def availability(self, ctx):
        return _cuda_import_reason("quack", ctx)

    def function(self, family):
        import quack

        if family == "softmax" and hasattr(quack, "softmax"):
            return quack.softmax
        if family == "cross_entropy" and hasattr(quack, "cross_entropy"):
            def ce(x, t):
                loss = quack.cross_entropy(x, t)
                return loss if loss.dim() == 0 else loss.mean()  # older versions: per row

            return ce
        raise NotImplementedForOp(f"quack has no {family}")


@register_provider
class TorchChunkedProvider(Provider):
    """torch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13) with
    ``LinearCrossEntropyOptions()``: its automatic chunk size and precision
    policy for the device and dtype."""

    name = "torch_chunked"
    description = "torch F.linear_cross_entropy(options=LinearCrossEntropyOptions())"

    def availability(self, ctx):
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return (f"torch {torch.__version__} has no F.linear_cross_entropy with "
                    "LinearCrossEntropyOptions (torch >= 2.13)")
        return None

    def function(self, family):
        if family != "linear_ce":
            raise NotImplementedForOp(f"torch_chunked has only linear_ce, not {family}")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


@register_provider
class CutCrossEntropyProvider(Provider):
    """Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``),
    when importable."""

    name = "cce"
    description = "Cut Cross-Entropy"

    def availability(self, ctx):
        return _cuda_import_reason("cut_cross_entropy", ctx)

    def function(self, family):
        if family != "linear_ce":
            raise NotImplementedForOp(f"cce has only linear_ce, not {family}")
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, t: linear_cross_entropy(x, w, t)


def gemm_floor(x, w, t):
    """The three GEMMs of a linear + cross-entropy step and nothing else:
    logits = x @ w^T, dx = logits @ w, dw = logits^T @ x (torch.mm, the
    inputs' dtype). ``t`` is unused."""
    logits = torch.mm(x, w.t())
    torch.mm(logits, w)
    torch.mm(logits.t(), x)


gemm_floor.unchecked = True


@register_provider
class GemmFloorProvider(Provider):
    """The floor of the linear ops: their three GEMMs alone, timed in the same
    run (``vs_floor`` of every row is its time over this one's)."""

    name = "gemm_floor"
    description = "the three GEMMs alone (torch.mm): the floor of linear + CE"

    def function(self, family):
        if family != "linear_ce":
            raise NotImplementedForOp(f"gemm_floor has only linear_ce, not {family}")
        return gemm_floor

    def case_note(self, family, M, N, device):
        return "timing floor: three GEMMs, no loss (not checked)" if family == "linear_ce" else ""
