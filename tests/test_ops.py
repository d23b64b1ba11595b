"""The torch.library ops: opcheck, torch.compile(fullgraph=True), autograd wiring."""

import pytest
import torch

import softmax_gpu
from softmax_gpu import ops
from helpers import DEVICE, assert_close, forced, path_rows, rand


@pytest.mark.parametrize("path", ["single", "split"])
def test_opcheck_forward_and_backward(path):
    n = 13 if path == "single" else 100
    with forced(path):
        for log in (False, True):
            x = rand(path_rows(path), n, dtype=torch.float64).requires_grad_()
            torch.library.opcheck(ops.softmax_forward, (x, 1, log))
            y = ops.softmax_forward(x.detach(), 1, log)
            torch.library.opcheck(ops.softmax_backward, (y, rand(*y.shape, dtype=torch.float64), 1, log))


def test_compile_fullgraph_training_step():
    """A small step compiled with fullgraph=True: no graph breaks, same values and grads."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 24).to(DEVICE)
    x = rand(6, 16)

    def step(inp):
        h = softmax_gpu.log_softmax(lin(inp), dim=-1)
        p = softmax_gpu.softmax(h * 0.5, dim=0)
        return (h * p).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    loss_e = step(x)
    loss_e.backward()
    assert_close(loss_c.detach(), loss_e.detach().double())
    for gc, p in zip(grads_c, lin.parameters()):
        assert_close(gc, p.grad.double(), scale=4)


def test_module_forward_and_repr():
    m, lm = softmax_gpu.Softmax(dim=0), softmax_gpu.LogSoftmax()
    x = rand(5, 7)
    assert_close(m(x), torch.softmax(x.double(), 0))
    assert_close(lm(x), torch.log_softmax(x.double(), -1))
    assert repr(m) == "Softmax(dim=0)" and repr(lm) == "LogSoftmax(dim=-1)"
    assert isinstance(m, torch.nn.Module)


def test_public_api_names():
    for name in ("softmax", "log_softmax", "Softmax", "LogSoftmax", "backend_for"):
        assert name in softmax_gpu.__all__ and hasattr(softmax_gpu, name)
    assert softmax_gpu.kernels.softmax.__name__ == "softmax_gpu.kernels.softmax"
