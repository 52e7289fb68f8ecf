"""The batched torch backend of FG-SGD: any device, any dtype, any manifold.

Per layer: O(number of manifold types) tensor ops (gather the kernels of a type, one call to
the per-kernel manifold, scatter back), never a loop over kernels or POMs. Entry points as the
CPU backend's: :func:`accepts` (always) and :func:`step`.
"""

from __future__ import annotations

import torch

from ..collections import KernelCollection
from ..manifolds._base import compute_dtype
from ._records import Hyper, Layer
from ._state import Workspace, momentum_buffer

__all__ = ["accepts", "batched_collection_step", "step"]


def accepts(
    coll: KernelCollection, param: torch.Tensor, workspace: Workspace | None = None
) -> bool:
    """The batched torch step takes every collection parameter."""
    return True


def step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> torch.Tensor | int:
    """One FG-SGD step of every layer; returns the skipped POMs (a device tensor: no sync).

    Momentum buffers are created (zeros) or converted into the plain ``(K, n)`` layout.
    """
    skipped: torch.Tensor | int = 0
    for layer in layers:
        p, coll = layer.param, layer.coll
        buf = None
        if hyper.momentum != 0:
            shape = (coll.num_kernels, coll.kernel_numel)
            buf = momentum_buffer(layer.state, p, shape, None)
        cache = workspace.of(coll)
        key = ("torch indices", str(p.device))
        indices = cache.get(key)
        if indices is None:
            indices = cache[key] = coll._indices(p.device)["per_type"]
        skipped = skipped + batched_collection_step(
            coll,
            p,
            layer.grad,
            buf,
            lr=hyper.lr,
            momentum=hyper.momentum,
            dampening=hyper.dampening,
            nesterov=hyper.nesterov,
            maximize=hyper.maximize,
            weight_decay=hyper.weight_decay,
            adaptive=hyper.adaptive,
            first=layer.first,
            check=hyper.check,
            per_type=indices,
        )
    return skipped


def batched_collection_step(
    coll: KernelCollection,
    x: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    weight_decay: float,
    adaptive: bool,
    first: bool,
    check: bool,
    per_type: list | None = None,
    only_above: float | None = None,
) -> torch.Tensor:
    """One FG-SGD step of ``x`` in place; returns the number of skipped POMs (a tensor).

    ``buf`` is the momentum buffer in unit coordinates, shape ``(K, n)``, updated in place
    (its content is ignored when ``first``); ``None`` without momentum. ``only_above``:
    step only the POMs whose squared gradient norm is finite and at least this; the others keep
    their weights and buffers as they are (see ``cpu.step``: POMs that float32 kernels could not
    square).
    """
    work = compute_dtype(x.dtype)
    kx = coll._kernels(x).to(work)
    kg = coll._kernels(grad).to(work)
    if maximize:
        kg = -kg
    a, b = coll.kernel_shape
    escale = coll.elem_scale(x.device, work)
    if per_type is None:
        per_type = coll._indices(x.device)["per_type"]
    pom_sq = torch.zeros(coll.num_poms, dtype=torch.float64, device=x.device)
    parts = []
    for t, idx, pom, row_pos in per_type:
        man = coll.manifolds[t]
        xt, gt = kx.index_select(0, idx), kg.index_select(0, idx)
        scale = None
        if coll.manifold_names[t] == "euclidean":
            if weight_decay:
                gt = gt + weight_decay * xt
        elif escale is not None:
            scale = escale.index_select(0, row_pos)
            xt, gt = xt / scale, gt * scale
        xt, gt = xt.view(-1, a, b), gt.view(-1, a, b)
        rg = man.egrad2rgrad(xt, gt)
        pom_sq.index_add_(0, pom, rg.to(torch.float64).pow(2).sum(dim=(-2, -1)))
        parts.append((t, idx, pom, xt, rg, scale))
    ok = torch.isfinite(pom_sq) if check else None
    if only_above is not None:
        ok = torch.isfinite(pom_sq) & (pom_sq >= only_above)
    if adaptive:
        big_r = pom_sq.sqrt()
        # Eq. (7), Ozay 2019: tau = max(1, R (2 + R))
        inv_tau = 1.0 / (big_r * (2.0 + big_r)).clamp_min(1.0)
    for t, idx, pom, xt, rg, scale in parts:
        man = coll.manifolds[t]
        r = rg * inv_tau[pom].to(work).view(-1, 1, 1) if adaptive else rg
        if buf is not None:
            old = buf.index_select(0, idx).to(work).view(-1, a, b)
            step_buf = r if first else momentum * old + (1.0 - dampening) * r
            direction = r + momentum * step_buf if nesterov else step_buf
        else:
            direction = r
        y = man.retr(xt, -lr * direction)
        new_buf = man.transp(xt, y, step_buf) if buf is not None else None
        if ok is not None:
            keep = ok[pom].view(-1, 1, 1)
            y = torch.where(keep, y, xt)
            if new_buf is not None:
                fallback = torch.zeros_like(old) if first and only_above is None else old
                new_buf = torch.where(keep, new_buf, fallback)
        y = y.reshape(-1, coll.kernel_numel)
        if scale is not None:
            y = y * scale
        kx.index_copy_(0, idx, y)
        if new_buf is not None:
            buf.index_copy_(0, idx, new_buf.reshape(-1, coll.kernel_numel).to(buf.dtype))
    if not (x.is_contiguous() and x.dtype == work):  # kx was a copy, not a view of x
        x.copy_(coll._restore(kx, x).to(x.dtype))
    if ok is None:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return (~ok).sum()
