"""The step of parameters outside collections: plain tensors (exactly ``torch.optim.SGD``) and
tensors on other geoopt manifolds (the whole tensor as one POM)."""

from __future__ import annotations

import geoopt
import torch
from torch.optim.sgd import sgd as _torch_sgd

from ..collections import KernelCollection
from ._checks import finite_flags

__all__ = ["generic_step", "plain_step", "split_params"]


def split_params(params: list[torch.Tensor]):
    plain, colls, other = [], [], []
    for p in params:
        manifold = getattr(p, "manifold", None)
        if isinstance(manifold, KernelCollection):
            colls.append(p)
        elif manifold is None or isinstance(manifold, geoopt.Euclidean):
            plain.append(p)
        else:
            other.append(p)
    return plain, colls, other


def plain_step(params, state, lr, momentum, dampening, weight_decay, nesterov, maximize, check):
    grads = [p.grad for p in params]
    skipped = 0
    if check:
        finite = finite_flags(grads)
        if not all(finite):
            skipped = finite.count(False)
            params = [p for p, ok in zip(params, finite, strict=True) if ok]
            grads = [p.grad for p in params]
    if not params:
        return skipped
    bufs = [state[p].get("momentum_buffer") for p in params]
    _torch_sgd(
        params,
        grads,
        bufs,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        foreach=True,
        has_sparse_grad=False,
    )
    if momentum != 0:
        for p, buf in zip(params, bufs, strict=True):
            state[p]["momentum_buffer"] = buf
    return skipped


def generic_step(p, state, lr, momentum, dampening, nesterov, maximize, adaptive, check):
    """Any other geoopt manifold: the same step with the whole tensor as a single POM."""
    manifold = p.manifold
    grad = -p.grad if maximize else p.grad
    rg = manifold.egrad2rgrad(p, grad.clone())
    sq = rg.to(torch.float64).pow(2).sum()
    if check and not bool(torch.isfinite(sq)):
        return 1
    if adaptive:
        big_r = float(sq.sqrt())
        rg = rg / max(1.0, big_r * (2.0 + big_r))  # Eq. (7)
    st = state[p]
    if momentum != 0:
        if "momentum_buffer" not in st:
            buf = rg.clone()
        else:
            buf = st["momentum_buffer"].mul(momentum).add_(rg, alpha=1.0 - dampening)
        direction = rg + momentum * buf if nesterov else buf
        new_p, new_buf = manifold.retr_transp(p, -lr * direction, buf)
        st["momentum_buffer"] = new_buf
    else:
        new_p = manifold.retr(p, -lr * rg)
    p.copy_(new_p)
    return 0
