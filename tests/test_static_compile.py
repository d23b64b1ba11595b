"""Static check: every kernel configuration the heuristics can pick compiles
for Hopper (sm_90) on the CPU with no register spills (cuobjdump STACK 0).

When a configuration spills, change the heuristics, not this check.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the perf/ folder (not installed)

from perf import static  # noqa: E402


def _kernel_names(module) -> set:
    # JITFunction (compiled) and InterpretedFunction both carry .fn
    return {n for n, f in vars(module).items() if n.endswith("_kernel") and hasattr(f, "fn")}


def test_every_kernel_is_enumerated():
    """A kernel added to softmax_gpu.kernels without a static variant fails here."""
    import importlib
    import pkgutil

    import softmax_gpu.kernels as pkg

    variants = static.all_variants()
    covered = {(v.module, v.kernel) for v in variants}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"softmax_gpu.kernels.{info.name}")
        for name in _kernel_names(mod):
            assert (info.name, name) in covered, f"{info.name}.{name} has no static variant"


def test_no_spills_on_sm90():
    jobs = max(1, min(os.cpu_count() or 1, 16))
    results = static.run(jobs)
    assert results, "no variants compiled"
    spills = [f"{v.label()}: STACK {u['stack']} LOCAL {u['local']}"
              for v, u in results if u["stack"] or u["local"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert all(u["regs"] > 0 for _, u in results)
