"""Device code: Triton kernels and their launch functions, one module per op.

Installed as ``softmax_gpu.kernels``. The launchers take tensors that the host
side (``softmax_gpu/<op>.py``) has already validated, plus launch parameters
planned there.
"""
