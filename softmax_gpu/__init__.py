"""softmax-gpu: Triton kernels for softmax, log-softmax and cross-entropy.

CUDA tensors run the compiled Triton kernels. CPU tensors run a torch
reference implementation, or the same Triton kernels in Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before import. :func:`backend_for` says
which path a tensor takes.
"""

from . import distributed, heuristics, ops
from ._dispatch import backend_for, poison_outputs, record_launches
from .functional import cross_entropy, cross_entropy_with_grad, log_softmax, softmax
from .modules import CrossEntropyLoss, LogSoftmax, Softmax

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "cross_entropy",
    "cross_entropy_with_grad",
    "Softmax",
    "LogSoftmax",
    "CrossEntropyLoss",
    "backend_for",
    "record_launches",
    "poison_outputs",
    "heuristics",
    "ops",
    "distributed",
]
