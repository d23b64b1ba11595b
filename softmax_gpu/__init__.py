"""softmax-gpu: Triton kernels for softmax, log-softmax and cross-entropy.

CUDA tensors run the compiled Triton kernels. CPU tensors run a torch
reference implementation, or the same Triton kernels in Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before import. :func:`backend_for` says
which path a tensor takes.

Where things are: each op is two files, its device code in
``softmax_gpu/kernels/<op>.py`` and its whole host side (checks, launch
planning, ``torch.library`` ops, autograd, public functions, modules, torch
reference) in ``softmax_gpu/<op>.py``:

- :mod:`softmax_gpu.softmax`: :func:`softmax`, :func:`log_softmax`,
  :class:`Softmax`, :class:`LogSoftmax`;
- :mod:`softmax_gpu.cross_entropy`: :func:`cross_entropy`,
  :func:`cross_entropy_with_grad`, :class:`CrossEntropyLoss`;
- :mod:`softmax_gpu.linear_cross_entropy`: :func:`linear_cross_entropy`,
  :class:`LinearCrossEntropyLoss` (the LM head's linear + cross-entropy,
  chunked);
- :mod:`softmax_gpu.vocab_parallel`: the vocab-parallel cross-entropy,
  public as :func:`softmax_gpu.distributed.vocab_parallel_cross_entropy`.

Shared by the ops: ``_layout`` (the [OUTER, N, INNER] row view),
``_dispatch`` (backend choice, device guard, outputs, launch recorder),
``_checks`` (common argument checks) and :mod:`softmax_gpu.heuristics`
(tunable limits, :func:`heuristics.override`, the multiprocessor count).
"""

from . import distributed, heuristics
from ._dispatch import backend_for, poison_outputs, record_launches
from .cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .softmax import LogSoftmax, Softmax, log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "cross_entropy",
    "cross_entropy_with_grad",
    "Softmax",
    "LogSoftmax",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "backend_for",
    "record_launches",
    "poison_outputs",
    "heuristics",
    "distributed",
]
