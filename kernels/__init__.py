"""Device code: Triton kernels and their launch functions, one module per op.

Installed as ``softmax_gpu.kernels``. The launchers take tensors that the host
side (``softmax_gpu``) has already validated, plus launch parameters from
``softmax_gpu.heuristics``.
"""
