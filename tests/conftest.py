"""Test setup: kernels run on CUDA when there is a GPU, else in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 is set here, before
softmax_gpu is imported, if the caller did not set it). The session refuses
to run if the kernels would silently fall back to the torch reference."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import softmax_gpu  # noqa: E402

from helpers import DEVICE  # noqa: E402


def pytest_sessionstart(session):
    probe = torch.empty(0, device=DEVICE)
    if softmax_gpu.backend_for(probe) != "triton":
        pytest.exit(
            f"tensors on {DEVICE} would take the torch reference path, not the Triton kernels: "
            "set TRITON_INTERPRET=1 before running the tests on a machine without a GPU",
            returncode=3,
        )


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts as NaN, so an unwritten element fails the test."""
    with softmax_gpu.poison_outputs():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """On CUDA, a test that left the device in an error state (a device-side
    assert poisons the whole CUDA context) ends this process after its
    report, instead of failing every later test with the same error: under
    pytest-xdist the worker is replaced by a fresh one and the run goes on;
    without it the session stops, naming the test."""
    yield
    if DEVICE != "cuda":
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # torch.AcceleratorError on torch >= 2.9
        message = f"{item.nodeid} left the CUDA context unusable: {type(exc).__name__}: {exc}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(message, flush=True)
            os._exit(3)
        pytest.exit(message, returncode=3)
