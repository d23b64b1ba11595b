"""Benchmark harness for softmax-gpu: ``python -m perf`` from the repository root.

It times softmax, log-softmax and cross-entropy (forward, and forward+backward)
for several providers (ours, torch eager, torch.compile, cuDNN called through
ctypes, and Liger / QuACK when they import), against the device-to-device copy
bandwidth measured in the same run, and writes a long-format CSV, one PNG plot
per op and dtype, and a markdown summary.

Modules (one table of ops, one table of providers; nothing per op is copied):

- :mod:`perf.env`       device choice, Triton-interpreter switch, versions
- :mod:`perf.ops`       registry of benchmarked ops, their inputs, references
                        and minimal-bytes model
- :mod:`perf.providers` registry of providers (who implements which op)
- :mod:`perf.cudnn`     cuDNN's legacy softmax through ctypes
- :mod:`perf.timing`    do_bench on CUDA, a wall-clock fallback on CPU,
                        peak extra memory, the copy roofline
- :mod:`perf.sizes`     the N grid, the named LLM shapes, the quick subsets
- :mod:`perf.sweep`     runs every (op, dtype, shape, provider) case
- :mod:`perf.report`    CSV, plots, markdown summary
- :mod:`perf.cli`       the command line (``python -m perf --help``)
- :mod:`perf.gpu_checks` CUDA-graph and sync-debug checks (GPU only)
- ``perf/device_check.sh`` the one prepared script for a GPU machine

(:mod:`perf.static`, the compiled-kernel resource table, :mod:`perf.sass`,
the SASS instruction counts of the hot kernels, and :mod:`perf.tune`, the
tuning run that writes the tuned tables of ``softmax_gpu/tuned/``, stand
apart.)

Importing this package imports neither softmax_gpu nor triton: the command line
first decides the device and, on CPU, sets ``TRITON_INTERPRET=1`` before
softmax_gpu is imported.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
