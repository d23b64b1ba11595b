"""Distributed ops: the public namespace ``softmax_gpu.distributed``.

- :func:`vocab_parallel_cross_entropy`: cross-entropy of logits sharded over
  the vocabulary across a process group;
- :func:`vocab_parallel_linear_cross_entropy`: the lm_head's linear +
  cross-entropy with the projection sharded by vocabulary rows and the input
  replicated, chunked over the tokens (no [N, V] tensor anywhere);
- :func:`clear_width_cache`: forget the cached shard layouts.

Host side in :mod:`softmax_gpu.vocab_parallel`, kernels in
``softmax_gpu/kernels/vocab_parallel.py``.
"""

from .vocab_parallel import (clear_width_cache, vocab_parallel_cross_entropy,
                             vocab_parallel_linear_cross_entropy)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "clear_width_cache"]
