"""Reference implementations in torch: the CPU path when the kernels are not
interpreted, and the ground truth the kernels are tested against.

Same semantics as the kernels: arithmetic in fp32 (fp64 for fp64 tensors),
result cast to the input dtype, output contiguous.
"""

from __future__ import annotations

import torch

__all__ = ["acc_dtype", "softmax_forward", "softmax_backward"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """softmax (or log-softmax) of ``x`` over ``dim``."""
    xa = x.to(acc_dtype(x.dtype))
    y = torch.log_softmax(xa, dim) if log else torch.softmax(xa, dim)
    return y.to(x.dtype).contiguous()


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Vector-Jacobian product at forward output ``y``:
    softmax dx = y * (dy - sum(dy * y)); log-softmax dx = dy - exp(y) * sum(dy)."""
    acc = acc_dtype(y.dtype)
    ya, ga = y.to(acc), dy.to(acc)
    if log:
        dx = ga - torch.exp(ya) * ga.sum(dim, keepdim=True)
    else:
        dx = ya * (ga - (ga * ya).sum(dim, keepdim=True))
    return dx.to(y.dtype).contiguous()


# ----------------------------------------------------------------------------
# Cross-entropy (issue 3): the same outputs as softmax_gpu.ops.cross_entropy_forward
# ----------------------------------------------------------------------------

__all__ += ["cross_entropy_forward", "cross_entropy_scale_grad_", "cross_entropy"]


def _rows_last(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (M, C) with rows ordered like the flattened (N, *) target."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def cross_entropy_forward(x, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                          softcap, grad_scale, with_grad):
    """Reference for ``ops.cross_entropy_forward``: (loss rows already divided by
    the mean's denominators, lse fp32, grad or empty, state or empty).

    Class indices outside [0, C) that are not ignore_index raise IndexError,
    as torch does (the Triton kernels give NaN rows instead)."""
    acc = acc_dtype(x.dtype)
    C = x.shape[1]
    eps = label_smoothing
    z = _rows_last(x.to(acc))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    M = z.shape[0]
    lse = torch.logsumexp(z, -1) if M else z.new_zeros(0)
    logp = z - lse[:, None]
    w = weight.to(acc) if weight is not None else None
    if target.is_floating_point():
        y = (1 - eps) * _rows_last(target.to(acc)) + eps / C
        if w is not None:
            y = y * w
        den = float(M) if reduction == "mean" else 1.0
        loss = (-(y * logp).sum(-1) + z_loss * lse * lse) / den
        kept = torch.ones(M, dtype=torch.bool, device=x.device)
        sig_coef = (y.sum(-1) + 2 * z_loss * lse) / den
        y = y / den
    else:
        t = target.reshape(-1).long()
        kept = t != ignore_index
        bad = kept & ((t < 0) | (t >= C))
        if x.device.type != "meta" and bool(bad.any()):
            raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
        tc = torch.where(kept, t, 0).clamp(0, max(C - 1, 0))
        wc = w if w is not None else z.new_ones(C)
        wt = torch.where(kept, wc[tc], 0)
        zt = z.gather(1, tc[:, None])[:, 0]
        loss = wt * (lse - zt)
        if eps > 0:
            loss = (1 - eps) * loss + (eps / C) * (wc * (lse[:, None] - z)).sum(-1)
        zl = z_loss * lse * lse
        if reduction == "mean":
            dl, dz = (wt.sum(), kept.sum(dtype=acc)) if w is not None else (kept.sum(dtype=acc),) * 2
        else:
            dl = dz = torch.ones((), dtype=acc, device=x.device)
        loss = torch.where(kept, loss / dl + zl / dz, 0 / dl + 0 / dz)
        y = (1 - eps) * wt[:, None] * torch.nn.functional.one_hot(tc, C).to(acc) \
            + (eps / C) * wc * kept[:, None]
        sig_coef = y.sum(-1) / dl + 2 * z_loss * lse / dz
        y = y / dl
    lse32 = lse.to(torch.float32)
    if not with_grad:
        return loss, lse32, x.new_empty(0), loss.new_empty(0)
    g = torch.exp(logp) * sig_coef[:, None] - y
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    g = torch.where(kept[:, None], g * grad_scale, 0)
    shape = (x.shape[0], *x.shape[2:], C)
    g = g.reshape(shape).movedim(-1, 1).to(x.dtype).contiguous()
    return loss, lse32, g, torch.ones(M, dtype=acc, device=x.device)


def cross_entropy_scale_grad_(grad, state, go):
    """Reference for ``ops.cross_entropy_scale_grad_`` (``go`` flat, [M])."""
    go = go.to(state.dtype)
    f = torch.where(go != state, go / state, 1)
    shape = (grad.shape[0], 1, *grad.shape[2:])
    grad.copy_((grad.to(state.dtype) * f.reshape(shape)).to(grad.dtype))
    state.copy_(go)


def cross_entropy(x, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Differentiable torch composite of the whole op (the loss only), for
    the cases the fused op does not differentiate: probability targets that
    require grad. Returns (loss, lse) like softmax_gpu.cross_entropy."""
    acc = acc_dtype(x.dtype)
    z = x.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    w = weight.to(acc) if weight is not None else None
    loss = torch.nn.functional.cross_entropy(
        z, target.to(acc) if target.is_floating_point() else target.long(), w,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1)
    if z_loss:
        zl = z_loss * lse * lse
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.mean()}[reduction]
    return loss.to(x.dtype), lse.to(torch.float32)
