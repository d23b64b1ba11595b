"""Framework adapters (optional extras).

- :mod:`softmax_gpu.integrations.transformers`: Hugging Face transformers
  (``pip install softmax-gpu[transformers]``): ``causal_lm_loss``, and
  ``apply(model)`` / ``revert(model)`` for one loaded ``*ForCausalLM``.
- :mod:`softmax_gpu.integrations.megatron`: Megatron-core's
  ``vocab_parallel_cross_entropy`` signature on the vocab-parallel kernels.

Each submodule imports its framework only when a function needs it, so
importing this package never imports transformers or megatron.
"""
