"""int64 pointer offsets: rows that start beyond element 2**31.

Run in a subprocess: in Triton's interpreter a 32-bit offset overflow is a
segfault, which must fail this test rather than kill the test session.
Only the touched pages of the 4+ GiB buffer are ever materialised.
"""

from helpers import run_python

CODE = r"""
import os, torch, softmax_gpu
from softmax_gpu import heuristics
from helpers import DEVICE

N = 200
ROW_STRIDE = 2**30 + 64          # fits in int32, so Triton passes it as i32
M = 4                            # rows 2 and 3 start past element 2**31: row * stride overflows int32
base = torch.empty(ROW_STRIDE * (M - 1) + N, dtype=torch.bfloat16, device=DEVICE)
x = base.as_strided((M, N), (ROW_STRIDE, 1))
x.copy_(torch.randn(M, N) * 3)
g = torch.empty_like(base).as_strided((M, N), (ROW_STRIDE, 1))
g.copy_(torch.randn(M, N))
ref_x, ref_g = x.double().cpu(), g.double().cpu()
ok = []
for path, lim in [("single", {}), ("looped", dict(max_single=64, tile=32, split_programs_per_sm=0)),
                  ("split", dict(max_single=64, tile=32, sm_count=8))]:
    with heuristics.override(**lim), softmax_gpu.record_launches() as names:
        for log in (False, True):
            xr = x.detach().requires_grad_()
            y = (softmax_gpu.log_softmax if log else softmax_gpu.softmax)(xr)
            (dx,) = torch.autograd.grad(y, xr, g)
            r = ref_x.clone().requires_grad_()
            yr = (torch.log_softmax if log else torch.softmax)(r, -1)
            (dr,) = torch.autograd.grad(yr, r, ref_g)
            # bf16: one ulp (2^-7) relative, as helpers.TOL
            assert ((y.double().cpu() - yr).abs() / (yr.abs() + 1)).max() < 2e-2, (path, log)
            assert ((dx.double().cpu() - dr).abs() / (dr.abs().max() + 1e-3)).max() < 2e-2, (path, log)
    assert any(path in n for n in names), (path, names)
    ok.append(path)
print("OK", ok)
"""


def test_rows_beyond_2_pow_31_every_path():
    out = run_python(CODE)
    assert "OK ['single', 'looped', 'split']" in out
