"""The step of parameters outside collections: plain tensors (``torch.optim.SGD``'s step, on one
flat buffer per device and dtype) and tensors on other geoopt manifolds (the whole tensor as one
POM). Neither reads a value on the host.

The flat SGD step makes the element-wise operations of ``torch.optim.SGD(foreach=True)`` in
the same order with the same scalars, on the concatenation of the parameters instead of on the
list: a fixed number of ops whatever the number of parameters, and the same numbers (the tests
compare the bits on CPU). On a CPU with the fused backend (``flat=False``), where ops cost no
launches and the concatenations would cost copies, torch's own ``foreach`` step runs instead
(the non-finite check then reads one flag per parameter on the host).
"""

from __future__ import annotations

import weakref
from typing import Any

import geoopt
import torch
from torch.optim.sgd import sgd as _torch_sgd

from ..collections import KernelCollection
from ._checks import finite_flags
from ._flat_math import lr_step
from ._records import Hyper
from ._state import Workspace

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


class _PlainPlan:
    """Sizes and the flat momentum buffer of some plain parameters on one device and dtype."""

    def __init__(self, params: list[torch.Tensor]):
        self.refs = [weakref.ref(p) for p in params]
        self.sizes = [p.numel() for p in params]
        self.total = sum(self.sizes)
        device = params[0].device
        # the parameter of every entry (int32: index_select takes it); a repeat_interleave
        # would do without it, but enters a parallel region even for a few entries, which
        # hangs in a forked child of a process that ran one (GNU OpenMP)
        counts = torch.tensor(self.sizes)
        self.owner = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), counts)
        self.owner = self.owner.to(device)
        self.buffer = torch.zeros(self.total, dtype=params[0].dtype, device=device)
        self.views = [
            v.view(p.shape) for v, p in zip(self.buffer.split(self.sizes), params, strict=True)
        ]
        self.masks: dict[tuple[bool, ...], torch.Tensor] = {}

    def valid(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.refs) and all(
            r() is p for r, p in zip(self.refs, params, strict=True)
        )

    def per_entry(self, flags: tuple[bool, ...]) -> torch.Tensor:
        """A per-entry mask from per-parameter flags (cached: the flags rarely change)."""
        mask = self.masks.get(flags)
        if mask is None:
            per = torch.tensor(flags, device=self.buffer.device)
            mask = self.masks[flags] = per.index_select(0, self.owner)
        return mask


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def plain_step(
    params, state, hyper: Hyper, workspace: Workspace, flat: bool = True
) -> list[torch.Tensor | int]:
    """SGD on plain parameters; returns the skipped counts (device tensors on the flat step),
    one per device and dtype (none without the check). ``flat=False``: CPU parameters take
    torch's ``foreach`` step."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.numel():
            by_kind.setdefault((p.device, p.dtype), []).append(p)
    counts = []
    for group in by_kind.values():
        if not flat and group[0].device.type == "cpu" and not isinstance(hyper.lr, torch.Tensor):
            counts.append(_foreach_sgd(group, state, hyper))
            continue
        key = ("plain", str(group[0].device), group[0].dtype, tuple(id(p) for p in group))
        plan = workspace.plan(key, lambda pl, g=group: pl.valid(g), lambda g=group: _PlainPlan(g))
        skipped = _flat_sgd(group, state, hyper, plan)
        if skipped is not None:
            counts.append(skipped)
    return counts


def _foreach_sgd(params, state, hyper: Hyper) -> int:
    """torch's ``foreach`` SGD step on CPU parameters; returns how many were skipped (a
    parameter with a NaN / inf gradient keeps its value, and a zero buffer on its first step,
    as on the flat step)."""
    if hyper.check:
        finite = finite_flags([p.grad for p in params])
        skipped = finite.count(False)
        if skipped and hyper.momentum != 0:
            for p, ok in zip(params, finite, strict=True):
                if not ok and "momentum_buffer" not in state[p]:
                    state[p]["momentum_buffer"] = torch.zeros_like(p)
        params = [p for p, ok in zip(params, finite, strict=True) if ok]
    else:
        skipped = 0
    if not params:
        return skipped
    bufs = [state[p].get("momentum_buffer") for p in params]
    _torch_sgd(
        params,
        [p.grad for p in params],
        bufs,
        weight_decay=hyper.weight_decay,
        momentum=hyper.momentum,
        lr=hyper.lr,
        dampening=hyper.dampening,
        nesterov=hyper.nesterov,
        maximize=hyper.maximize,
        foreach=True,
        has_sparse_grad=False,
    )
    if hyper.momentum != 0:
        for p, buf in zip(params, bufs, strict=True):
            state[p]["momentum_buffer"] = buf
    return skipped


def _momentum_scalar(momentum: float, like: torch.Tensor) -> float:
    """The momentum factor as ``torch._foreach_mul_`` applies it: on CPU a 16-bit tensor is
    multiplied by the factor rounded to its dtype."""
    if like.device.type == "cpu" and torch.finfo(like.dtype).bits <= 16:
        return float(torch.tensor(momentum, dtype=like.dtype))
    return momentum


def _flat_sgd(params, state, hyper: Hyper, plan: _PlainPlan) -> torch.Tensor | None:
    grads = [p.grad for p in params]
    x = torch.cat([_flat(p) for p in params])
    g = torch.cat([_flat(t) for t in grads])
    ok = keep = None
    if hyper.check:  # the largest magnitude is finite exactly when every entry is
        ok = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite()
        keep = ok.index_select(0, plan.owner)
    if hyper.maximize:
        g = torch.neg(g)
    if hyper.weight_decay != 0:
        g = torch.add(g, x, alpha=hyper.weight_decay)
    old = b = None
    if hyper.momentum != 0:
        states = [state[p] for p in params]
        firsts = tuple("momentum_buffer" not in st for st in states)
        _adopt(states, plan)
        old = plan.buffer
        if all(firsts):
            b = g  # torch.optim.SGD: the first buffer is the gradient itself
        else:
            b = old.mul(_momentum_scalar(hyper.momentum, old))
            b = b.add_(g, alpha=1.0 - hyper.dampening)
            if any(firsts):
                b = torch.where(plan.per_entry(firsts), g, b)
        g = torch.add(g, b, alpha=hyper.momentum) if hyper.nesterov else b
    new = lr_step(x, g, hyper.lr)
    if keep is not None:
        new = torch.where(keep, new, x)
        if b is not None:
            b = torch.where(keep, b, old)
    sources = [v.view(p.shape) for v, p in zip(new.split(plan.sizes), params, strict=True)]
    torch._foreach_copy_(params, sources)
    if b is not None:
        plan.buffer.copy_(b)
    return None if ok is None else ok.logical_not().sum()


def _adopt(states: list[dict[str, Any]], plan: _PlainPlan) -> None:
    """Make every momentum buffer its view of the plan's flat buffer (a copy only after a
    load, a new plan or a buffer set from outside)."""
    for st, view in zip(states, plan.views, strict=True):
        buf = st.get("momentum_buffer")
        if buf is view:
            continue
        if buf is None:
            view.zero_()
        else:
            view.copy_(buf)
        st["momentum_buffer"] = view


def generic_step(p, state, hyper: Hyper) -> torch.Tensor | None:
    """Any other geoopt manifold: the same step with the whole tensor as a single POM.
    Skipping a non-finite POM selects the old values on the device (no host read); a POM
    skipped on its first step keeps a zero momentum buffer."""
    manifold = p.manifold
    grad = -p.grad if hyper.maximize else p.grad
    rg = manifold.egrad2rgrad(p, grad.clone())
    sq = rg.to(torch.float64).pow(2).sum()
    if hyper.adaptive:
        big_r = sq.sqrt()
        rg = rg / (big_r * (2.0 + big_r)).clamp_min(1.0).to(rg.dtype)  # Eq. (7)
    ok = torch.isfinite(sq) if hyper.check else None
    st = state[p]
    lr, momentum = hyper.lr, hyper.momentum
    if momentum != 0:
        old = st.get("momentum_buffer")
        if old is None:
            old = torch.zeros_like(p)
            buf = rg.clone()
        else:
            buf = old.mul(momentum).add_(rg, alpha=1.0 - hyper.dampening)
        direction = rg + momentum * buf if hyper.nesterov else buf
        new_p, new_buf = manifold.retr_transp(p, -lr * direction, buf)
        st["momentum_buffer"] = new_buf if ok is None else torch.where(ok, new_buf, old)
    else:
        new_p = manifold.retr(p, -lr * rg)
    p.copy_(new_p if ok is None else torch.where(ok, new_p, p))
    return None if ok is None else ok.logical_not().long()
