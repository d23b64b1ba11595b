"""Distributed ops: the public namespace ``softmax_gpu.distributed``.

- :func:`vocab_parallel_cross_entropy`: cross-entropy of logits sharded over
  the vocabulary across a process group (host side in
  :mod:`softmax_gpu.vocab_parallel`, kernels in
  ``softmax_gpu/kernels/vocab_parallel.py``).
"""

from .vocab_parallel import clear_width_cache, vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "clear_width_cache"]
