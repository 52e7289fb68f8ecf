"""The torch backend of FG-SGD: any device, any dtype, any manifold.

Layers whose manifolds are all built in take the **flat step**: every such layer of the call on
one (device, dtype) is one flat buffer (``_flat_plan``), stepped by a fixed number of torch ops
per kernel-shape bucket (``_flat_math``): the op count does not grow with the number of layers,
kernels or POMs, and nothing is read on the host, so the step can be captured in a CUDA graph.
Layers on registered (non built-in) manifolds take :func:`batched_collection_step`, per layer,
with O(number of manifold types) ops. Entry points as the CPU backend's: :func:`accepts`
(always) and :func:`step`.
"""

from __future__ import annotations

import math

import torch

from ..collections import KernelCollection
from ..manifolds._base import compute_dtype
from . import _flat_math as fm
from ._flat_plan import FlatPlan, flat_kinds, flat_plan
from ._records import Hyper, Layer
from ._state import Workspace, momentum_buffer

__all__ = ["accepts", "batched_collection_step", "flat_step", "step", "stored_metric_grad"]


def accepts(
    coll: KernelCollection, param: torch.Tensor, workspace: Workspace | None = None
) -> bool:
    """The torch step takes every collection parameter."""
    return True


def step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> list[torch.Tensor]:
    """One FG-SGD step of every layer; returns the skipped POMs as device tensors (no sync),
    one per flat plan or per-layer step (none without the check).

    Momentum buffers are created (zeros) or converted into the plain ``(K, n)`` layout.
    """
    groups: dict[tuple, list[Layer]] = {}
    others = []
    for layer in layers:
        if flat_kinds(layer.coll, workspace) is None:
            others.append(layer)
        else:
            groups.setdefault((layer.param.device, layer.param.dtype), []).append(layer)
    counts = [flat_step(group, hyper, workspace) for group in groups.values()]
    counts += [layer_step(layer, hyper, workspace) for layer in others]
    return [c for c in counts if c is not None]


def prepare(layers: list[Layer], hyper: Hyper, workspace: Workspace):
    """The plan of ``layers`` (one device and dtype), the layers in its order with their
    momentum buffers adopted, and the concatenated weights and gradients."""
    plan = flat_plan(layers, workspace, hyper.momentum != 0)
    ordered = [layers[i] for i in plan.order]
    if hyper.momentum != 0:
        plan.adopt_buffers(ordered)
    x = torch.cat([_flat(layer.param) for layer in ordered])
    g = torch.cat([_flat(layer.grad) for layer in ordered])
    return plan, ordered, x, g


def flat_step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> torch.Tensor | None:
    """The flat step of ``layers`` (one device and dtype, built-in manifolds only)."""
    plan, ordered, x, g = prepare(layers, hyper, workspace)
    x, g = x.to(plan.work), g.to(plan.work)
    if hyper.maximize:
        g = torch.neg(g)
    pom_sq = torch.zeros(plan.num_poms, dtype=torch.float64, device=plan.device)
    parts = []
    for bucket in plan.buckets:
        pass1 = fm.matrix_pass1 if bucket.kind == "matrix" else fm.column_pass1
        span = slice(bucket.start, bucket.stop)
        parts.append(pass1(x[span], g[span], bucket, hyper, pom_sq))
    factors, skipped = eq7_factors(pom_sq, hyper)
    coefs = _coefficients(plan, ordered, hyper)
    sources = []
    for bucket, (xu, r), coef in zip(plan.buckets, parts, coefs, strict=True):
        span = slice(bucket.start, bucket.stop)
        buf = None if plan.buffer is None or hyper.momentum == 0 else plan.buffer[span]
        pass2 = fm.matrix_pass2 if bucket.kind == "matrix" else fm.column_pass2
        y, b = pass2(x[span], xu, r, buf, bucket, hyper, factors, coef)
        if b is not None:
            if bucket.kind == "matrix":
                a, c = bucket.shape
                buf.view(-1, a, c).copy_(fm.untall(b, bucket))
            else:
                buf.view_as(b).copy_(b)
        sources += _per_layer(y, bucket)
    torch._foreach_copy_([layer.param for layer in ordered], sources)
    return skipped


def eq7_factors(pom_sq: torch.Tensor, hyper: Hyper):
    """``((inv_tau, ok), skipped)`` per POM from the squared norms: Eq. (7)'s
    ``1 / max(1, R (2 + R))`` (``None`` without ``adaptive``) and the finite flags with their
    count (``None`` without the check)."""
    inv_tau = ok = skipped = None
    if hyper.adaptive:
        big_r = pom_sq.sqrt()
        inv_tau = (big_r * (big_r + 2.0)).clamp_min(1.0).reciprocal()  # Eq. (7), Ozay 2019
    if hyper.check:
        ok = pom_sq.isfinite()
        skipped = ok.logical_not().sum()
    return (inv_tau, ok), skipped


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def _per_layer(y: torch.Tensor, bucket) -> list[torch.Tensor]:
    """The new weights of a bucket, one tensor per layer in its parameter's shape (views)."""
    if bucket.kind == "column":
        flat = y.reshape(-1)
        sizes = [math.prod(shape) for _, shape in bucket.layers]
        return [
            v.view(shape) for v, (_, shape) in zip(flat.split(sizes), bucket.layers, strict=True)
        ]
    rows = [k for k, _ in bucket.layers]
    return [
        v.unflatten(0, tuple(shape[:2]))
        for v, (_, shape) in zip(y.split(rows), bucket.layers, strict=True)
    ]


def _coefficients(plan: FlatPlan, ordered: list[Layer], hyper: Hyper) -> list:
    """Per bucket, the factor of ``r`` in the momentum update (``_flat_math.momentum_update``):
    ``None`` when every layer takes its first step, ``1 - dampening`` when none does, and a
    per-row tensor when some do and dampening is not zero (cached by the pattern)."""
    if hyper.momentum == 0:
        return [None] * len(plan.buckets)
    firsts = [layer.first for layer in ordered]
    if all(firsts):
        return [None] * len(plan.buckets)
    coef = 1.0 - hyper.dampening
    if not any(firsts) or coef == 1.0:
        return [coef] * len(plan.buckets)
    out, i = [], 0
    for bucket in plan.buckets:
        mine = tuple(firsts[i : i + len(bucket.layers)])
        i += len(bucket.layers)
        key = ("coef", mine, coef)
        if key not in bucket.cache:
            per_row = torch.cat(
                [
                    torch.full((k,), 1.0 if f else coef, dtype=torch.float64)
                    for (k, _), f in zip(bucket.layers, mine, strict=True)
                ]
            ).to(device=plan.device, dtype=plan.work)
            if bucket.kind == "column":
                if bucket.sub_row is not None:
                    per_row = per_row.index_select(0, bucket.sub_row)
                per_row = per_row.unsqueeze(1)
            else:
                per_row = per_row.view(-1, 1, 1)
            bucket.cache[key] = per_row
        out.append(bucket.cache[key])
    return out


def stored_metric_grad(coll: KernelCollection, grad: torch.Tensor, workspace: Workspace):
    """``grad / R^2`` on constrained entries (``metric="stored"``), the factor kept in the
    workspace until the scales change."""
    from ..rescaling import entry_scale

    cache = workspace.of(coll)
    key = ("inverse square scale", str(grad.device), grad.dtype)
    factor = cache.get(key)
    if factor is None:
        factor = entry_scale(coll, dtype=torch.float64, device=grad.device)
        factor = cache[key] = factor.pow(-2).to(grad.dtype)
    return grad * factor


def layer_step(
    layer: Layer, hyper: Hyper, workspace: Workspace, only_above: float | None = None
) -> torch.Tensor | None:
    """The per-layer batched step (layers on registered manifolds); returns the skipped count
    where it was checked. ``only_above``: see :func:`batched_collection_step` (the CPU
    backend's re-step of POMs its float32 kernels could not square)."""
    p, coll = layer.param, layer.coll
    grad = layer.grad
    if hyper.metric == "stored" and coll.scale is not None:
        grad = stored_metric_grad(coll, grad, workspace)
    buf = None
    if hyper.momentum != 0:
        buf = momentum_buffer(layer.state, p, (coll.num_kernels, coll.kernel_numel), None)
    cache = workspace.of(coll)
    key = ("torch indices", str(p.device))
    indices = cache.get(key)
    if indices is None:
        indices = cache[key] = coll._indices(p.device)["per_type"]
    skipped = batched_collection_step(
        coll,
        p,
        grad,
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
        only_above=only_above,
    )
    return skipped if hyper.check or only_above is not None else None


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
