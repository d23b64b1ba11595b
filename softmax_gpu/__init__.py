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
  :class:`LinearCrossEntropyLoss`, :class:`LinearCrossEntropyOptions` (the
  LM head's linear + cross-entropy, chunked);
- :mod:`softmax_gpu.vocab_parallel`: the vocab-parallel cross-entropy,
  public as :func:`softmax_gpu.distributed.vocab_parallel_cross_entropy`.

Shared by the ops: ``_layout`` (the [OUTER, N, INNER] row view),
``_dispatch`` (backend choice, device guard, outputs, launch recorder),
``_checks`` (common argument checks) and :mod:`softmax_gpu.heuristics`
(tunable limits, :func:`heuristics.override`, the multiprocessor count).
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _source_kernels() -> None:
    """Make ``softmax_gpu.kernels`` importable from a source checkout.

    The device code sits in the repository's top-level ``kernels/`` folder,
    which has no ``__init__.py``: a namespace portion, so that it never wins
    ``import kernels`` over an installed distribution of that name (a PyPI
    package that transformers requires), from any working directory. A
    built wheel puts it at ``softmax_gpu/kernels/``, where the import finds
    it as usual; an editable install or a run from the repository root finds
    the package here, so its ``kernels`` subpackage is the folder beside it.
    Only ``softmax_gpu.kernels`` is bound: nothing else in the process
    changes.
    """
    name = __name__ + ".kernels"
    if name in _sys.modules or _machinery.PathFinder.find_spec(name, __path__) is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if not _os.path.isfile(_os.path.join(folder, "softmax.py")):
        return  # not a source checkout: the import below reports what is missing
    spec = _machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    globals()["kernels"] = module


_source_kernels()

from . import distributed, heuristics  # noqa: E402
from ._dispatch import backend_for, poison_outputs, record_launches  # noqa: E402
from .cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad  # noqa: E402
from .linear_cross_entropy import (LinearCrossEntropyLoss, LinearCrossEntropyOptions,  # noqa: E402
                                   linear_cross_entropy)
from .softmax import LogSoftmax, Softmax, log_softmax, softmax  # noqa: E402

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
    "LinearCrossEntropyOptions",
    "backend_for",
    "record_launches",
    "poison_outputs",
    "heuristics",
    "distributed",
]
