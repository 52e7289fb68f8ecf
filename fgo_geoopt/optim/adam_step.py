"""The batched step of FG-Adam on collection parameters: any device, any dtype.

A layer whose kernels are all single vectors (sphere-like) or Euclidean, as 1x1 convs and
linear layers in the filter view, is stepped row by row in place, the Euclidean rows by a mask.
Any other layer is gathered once in the order of its manifold types (one ``index_select`` per
tensor), each type is stepped as one block in the layout of ``_adam_kernels``, and the result
goes back by the inverse permutation. The squared gradient norms of the POMs are segment sums
(``index_add_``). A step costs O(number of manifold types) tensor ops per layer, never a loop
over kernels or POMs; the index tensors live in the optimizer's workspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..collections import KernelCollection
from ..manifolds._base import compute_dtype
from ._adam_kernels import geometry, is_euclidean, is_row_vector, rowdot
from ._records import Layer
from ._state import Workspace

__all__ = [
    "AdamHyper",
    "advance",
    "init_state",
    "kernel_major",
    "moment_shape",
    "step",
    "to_blocks",
]


@dataclass(frozen=True)
class AdamHyper:
    """The settings of one FG-Adam step of one parameter group (already validated)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    moment: str
    metric: str
    #: Skip (and count) POMs whose gradient has NaN / inf entries.
    check: bool


def moment_shape(coll: KernelCollection, moment: str) -> tuple[int]:
    """Shape of the second moment of a collection parameter: ``(P,)`` or ``(K,)``."""
    return (coll.num_poms,) if moment == "pom" else (coll.num_kernels,)


def init_state(st: dict[str, Any], p: torch.Tensor, coll: KernelCollection, hyper) -> None:
    """Create the moments of a collection parameter (zeros), or check the existing ones."""
    shape = moment_shape(coll, hyper.moment)
    if "exp_avg" not in st:
        st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        st["exp_avg"] = p.new_zeros((coll.num_kernels, coll.kernel_numel))
        st["exp_avg_sq"] = p.new_zeros(shape)
    elif tuple(st["exp_avg_sq"].shape) != shape:
        raise ValueError(
            f"the second moment of a {tuple(p.shape)} parameter has shape "
            f"{tuple(st['exp_avg_sq'].shape)}, moment={hyper.moment!r} needs {shape}: the "
            "moment mode of a group cannot change during training"
        )
    if hyper.amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch's step counters (``torch.optim.AdamW`` keeps the same)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- plans
@dataclass
class _Segment:
    """The kernels of one manifold type: rows ``[k0, k1)`` of the gathered layer."""

    geo: Any
    k0: int
    k1: int
    scale: torch.Tensor | None  # R in the geometry's layout; None where unscaled


@dataclass
class _Rows:
    """A layer of single-vector and Euclidean kernels, stepped row by row in place."""

    lpom: torch.Tensor | None  # (K,) POM of every kernel; None: one kernel each
    inv_count: torch.Tensor  # (P,)
    scale: torch.Tensor | None  # (K, n), 1 on Euclidean rows
    euclid: torch.Tensor | None  # (K, 1), 1.0 on Euclidean rows; None: not a mix
    free: torch.Tensor | None  # 1 - euclid: 1.0 on constrained rows
    constrained: bool  # any row on a sphere


@dataclass
class _Gathered:
    """Any other layer: kernels gathered in type order (``perm``; ``None``: one type, already
    in order), one segment per manifold type."""

    segments: list[_Segment]
    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    pom: torch.Tensor | None  # (K,) POM of every gathered kernel; None: one kernel each
    inv_count: torch.Tensor  # (P,)


def _plan(coll: KernelCollection, device, work, workspace: Workspace):
    cache = workspace.of(coll)
    key = ("adam plan", str(device), work)
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = _build_plan(coll, device, work)
    return plan


def _build_plan(coll: KernelCollection, device, work):
    a, b = coll.kernel_shape
    inv_count = (1.0 / (coll.pom_sizes.double() * coll.kernel_numel)).to(device, work)
    escale = coll.elem_scale(device, work)
    per_type = coll._indices(device)["per_type"]
    geos = [geometry(coll.manifolds[t], a, b) for t, *_ in per_type]
    if all(is_row_vector(g) for g in geos):
        constrained = not all(is_euclidean(g) for g in geos)
        euclid = scale = None
        if constrained and "euclidean" in coll.manifold_names:
            euc = coll.kernel_type() == coll.manifold_names.index("euclidean")
            euclid = euc.to(device, work).unsqueeze(1)
        if escale is not None:
            rows = torch.arange(coll.num_kernels, device=device) % coll.kernels_per_row
            scale = escale.index_select(0, rows)
            if euclid is not None:
                scale = torch.where(euclid.bool(), torch.ones_like(scale), scale)
        lpom = None if coll.pom_kernels is None else coll.kernel_pom.to(device)
        free = None if euclid is None else 1.0 - euclid
        return _Rows(lpom, inv_count, scale, euclid, free, constrained)
    segments, k0 = [], 0
    for geo, (t, idx, _, row_pos) in zip(geos, per_type, strict=True):
        k1 = k0 + idx.numel()
        scale = None
        if escale is not None and coll.manifold_names[t] != "euclidean":
            scale = geo.load(escale.index_select(0, row_pos))
        segments.append(_Segment(geo, k0, k1, scale))
        k0 = k1
    # POMs are numbered by manifold type, then by first kernel: with one kernel each, the
    # gathered order is the POMs' order.
    pom = None if coll.pom_kernels is None else torch.cat([q for _, _, q, _ in per_type])
    if len(per_type) == 1:
        return _Gathered(segments, None, None, pom, inv_count)
    perm = torch.cat([idx for _, idx, _, _ in per_type])
    return _Gathered(segments, perm, torch.argsort(perm), pom, inv_count)


# ---------------------------------------------------------------------------- the step
def step(layers: list[Layer], hyper: AdamHyper, workspace: Workspace) -> torch.Tensor | int:
    """One FG-Adam step of every layer; returns the skipped POMs (a device tensor: no sync).

    Each layer's state holds ``step`` and the moments (created by :func:`init_state`).
    """
    skipped: torch.Tensor | int = 0
    for layer in layers:
        t = advance(layer, hyper)
        skipped = skipped + collection_step(
            layer.coll, layer.param, layer.grad, layer.state, hyper, t, workspace
        )
    return skipped


def advance(layer: Layer, hyper: AdamHyper) -> float:
    """Create or check the layer's moments (:func:`init_state`) and count this step; returns
    the step number ``t`` (both backends start a layer's step here)."""
    st = layer.state
    init_state(st, layer.param, layer.coll, hyper)
    st["step"] += 1
    return float(st["step"])


def collection_step(
    coll: KernelCollection,
    x: torch.Tensor,
    grad: torch.Tensor,
    st: dict[str, Any],
    hyper: AdamHyper,
    t: float,
    workspace: Workspace,
) -> torch.Tensor:
    """Step ``x`` and its moments in ``st`` in place (``t``: the step number, from 1)."""
    work = compute_dtype(x.dtype)
    plan = _plan(coll, x.device, work, workspace)
    set_layout(st, plan)
    kx = coll._kernels(x).to(work)
    kg = coll._kernels(grad).to(work)
    m, v = st["exp_avg"].to(work), st["exp_avg_sq"].to(work)
    vmax = st["max_exp_avg_sq"].to(work) if hyper.amsgrad else None
    moments = _Moments(hyper, t, coll.kernel_numel, x.device.type == "cpu")
    if isinstance(plan, _Rows):
        skipped = _rows_step(plan, kx, kg, m, v, vmax, hyper, moments)
    else:
        skipped = _gathered_step(plan, kx, kg, m.view(-1), v, vmax, hyper, moments)
    for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
        if value is not None and value is not st[key]:
            st[key].copy_(value)
    if not (x.is_contiguous() and x.dtype == work):  # kx was a copy, not a view of x
        x.copy_(coll._restore(kx, x).to(x.dtype))
    return skipped


# ---------------------------------------------------------------------------- layouts
#: ``state["exp_avg_blocks"] == 1``: the first moment of a gathered layer is kept in the
#: step's own layout, one entry-major ``(n, K_t)`` block per manifold type in type order,
#: which saves gathering and transposing it twice per step. An int, as ``momentum_tiles`` of
#: FG-SGD: ``torch.optim.Optimizer.load_state_dict`` keeps ints and would mangle a string.
BLOCKS = "exp_avg_blocks"


def set_layout(st: dict[str, Any], plan) -> None:
    """Convert the first moment in ``st`` in place to the layout ``plan`` steps in."""
    blocks = isinstance(plan, _Gathered)
    if bool(st.get(BLOCKS, 0)) == blocks:
        return
    if not blocks:
        raise ValueError(
            "the first moment of a layer stepped row by row is marked as kept in blocks: the "
            "optimizer state comes from another grouping of this weight"
        )
    st["exp_avg"].copy_(to_blocks(plan, st["exp_avg"]))
    st[BLOCKS] = 1


def set_kernel_major(st: dict[str, Any], coll: KernelCollection, workspace: Workspace) -> None:
    """Convert the first moment in ``st`` in place to the ``(K, n)`` kernel-major layout (the
    fused CPU step's), where it is kept in blocks."""
    if st.get(BLOCKS, 0):
        m = st["exp_avg"]
        m.copy_(from_blocks(plan_of(coll, m, workspace), m))
        st[BLOCKS] = 0


def to_blocks(plan: _Gathered, m: torch.Tensor) -> torch.Tensor:
    """The ``(K, n)`` kernel-major first moment in ``plan``'s blocks (same shape, a copy)."""
    out = torch.empty_like(m)
    flat, n = out.view(-1), m.shape[1]
    rows = m if plan.perm is None else m.index_select(0, plan.perm)
    for seg in plan.segments:
        block = flat[seg.k0 * n : seg.k1 * n].view(n, seg.k1 - seg.k0)
        block.copy_(rows[seg.k0 : seg.k1].t())
    return out


def from_blocks(plan: _Gathered, blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: the ``(K, n)`` kernel-major first moment (a copy)."""
    flat, n = blocks.reshape(-1), blocks.shape[1]
    rows = torch.empty_like(blocks)
    for seg in plan.segments:
        rows[seg.k0 : seg.k1].copy_(flat[seg.k0 * n : seg.k1 * n].view(n, -1).t())
    return rows if plan.perm is None else rows.index_select(0, plan.inverse)


def plan_of(coll: KernelCollection, like: torch.Tensor, workspace: Workspace):
    """The step plan of ``coll`` for tensors like ``like``."""
    return _plan(coll, like.device, compute_dtype(like.dtype), workspace)


def kernel_major(st: dict[str, Any], coll: KernelCollection, workspace: Workspace):
    """The first moment of a collection parameter as ``(K, n)`` kernel-major rows (the state's
    own tensor, or a converted copy where it is kept in blocks)."""
    m = st.get("exp_avg")
    if m is None or not st.get(BLOCKS, 0):
        return m
    return from_blocks(plan_of(coll, m, workspace), m)


def _per_kernel(values: torch.Tensor, lpom: torch.Tensor | None) -> torch.Tensor:
    return values if lpom is None else values.index_select(0, lpom)


class _Moments:
    """The second moments and the step size of every kernel, for one step."""

    def __init__(self, hyper: AdamHyper, t: float, n: int, on_cpu: bool):
        self.hyper, self.n, self.on_cpu = hyper, n, on_cpu
        self.step_size = hyper.lr / (1.0 - hyper.beta1**t)
        self.bias2_sqrt = (1.0 - hyper.beta2**t) ** 0.5

    def __call__(self, ksq, lpom, inv_count, v, vmax):
        """From the squared gradient norm of every kernel ``ksq``, update ``v`` (and ``vmax``)
        in place. Returns the step size of every kernel, and whether each POM's gradient is
        finite where some POM must be left as it was (else ``None``): on a CPU asking costs
        nothing, elsewhere it would wait for the device, so there the answer is always given.
        """
        hyper = self.hyper
        per_pom = hyper.moment == "pom"
        pom_sq = ksq if lpom is None else ksq.new_zeros(inv_count.shape).index_add_(0, lpom, ksq)
        ok = None
        if hyper.check:
            ok = pom_sq.isfinite()
            if self.on_cpu and bool(ok.all()):
                ok = None
        sq = pom_sq * inv_count if per_pom else ksq / self.n
        v_new = v * hyper.beta2 + sq * (1.0 - hyper.beta2)
        if ok is not None:
            v_new = torch.where(ok if per_pom else _per_kernel(ok, lpom), v_new, v)
        v.copy_(v_new)
        if vmax is not None:
            v_new = torch.maximum(vmax, v_new, out=vmax)
        coef = self.step_size / (v_new.sqrt().div_(self.bias2_sqrt).add_(hyper.eps))
        return (_per_kernel(coef, lpom) if per_pom else coef), ok


def _skipped(ok: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | int:
    return 0 if ok is None else (~ok).sum()


def _rows_step(plan: _Rows, kx, kg, m, v, vmax, hyper, moments) -> torch.Tensor:
    """Rows of single-vector and Euclidean kernels, in place."""
    x = kx if plan.scale is None else kx / plan.scale  # unit coordinates w = W / R
    g = kg
    if plan.scale is not None:
        g = kg / plan.scale if hyper.metric == "stored" else kg * plan.scale
    if hyper.maximize:
        g = -g
    free = plan.free  # 1 on constrained rows (None: all are)
    rg = g
    if plan.constrained:  # project the constrained rows
        dots = rowdot(x, g).unsqueeze(1)
        rg = torch.addcmul(g, x, dots if free is None else dots.mul_(free), value=-1.0)
    stored = hyper.metric == "stored" and plan.scale is not None
    # The squared norm in the step's metric: |R r|^2 in the stored weights' metric.
    ksq = rowdot(rg, rg * plan.scale.square()) if stored else rowdot(rg, rg)
    coef, ok = moments(ksq, plan.lpom, plan.inv_count, v, vmax)
    x_old, m_old = (x.clone(), m.clone()) if ok is not None else (None, None)
    m.lerp_(rg, 1.0 - hyper.beta1)
    y = x  # x_old keeps the point where POMs may be skipped
    if hyper.weight_decay and (free is not None or not plan.constrained):
        decay = hyper.lr * hyper.weight_decay  # decoupled (AdamW), Euclidean rows only
        y.mul_(1.0 - decay if free is None else 1.0 - decay * plan.euclid)
    y.addcmul_(m, coef.unsqueeze(1), value=-1.0)
    if plan.constrained:
        tiny = torch.finfo(y.dtype).tiny
        inv_norm = rowdot(y, y).clamp_min_(tiny).rsqrt_().unsqueeze(1)
        y.mul_(inv_norm if free is None else torch.lerp(inv_norm, plan.euclid, plan.euclid))
        dots = rowdot(y, m).unsqueeze(1)  # the first moment moves to the new point
        m.addcmul_(y, dots if free is None else dots.mul_(free), value=-1.0)
    if ok is not None:
        keep = _per_kernel(ok, plan.lpom).unsqueeze(1)
        y = torch.where(keep, y, x_old)
        m.copy_(torch.where(keep, m, m_old))
    if plan.scale is not None:
        torch.mul(y, plan.scale, out=kx)
    elif y is not kx:
        kx.copy_(y)
    return _skipped(ok, kx)


def _gathered_step(plan: _Gathered, kx, kg, m, v, vmax, hyper, moments) -> torch.Tensor:
    """Kernels gathered in type order: every type's Riemannian gradient, then the moments of
    the whole layer, then every type's step. ``m``: the first moment in blocks, flat."""
    kernel_v = hyper.moment == "kernel"
    n = kx.shape[1]
    if plan.perm is None:  # one type: the rows are stepped where they are
        xa, ga, vs, vmaxs = kx, kg, v, vmax
    else:
        xa, ga = kx.index_select(0, plan.perm), kg.index_select(0, plan.perm)
        vs = v.index_select(0, plan.perm) if kernel_v else v
        vmaxs = vmax.index_select(0, plan.perm) if kernel_v and vmax is not None else vmax
    ksq = kx.new_empty(kx.shape[0])
    parts = []
    for seg in plan.segments:
        geo = seg.geo
        x, g = geo.load(xa[seg.k0 : seg.k1]), geo.load(ga[seg.k0 : seg.k1])
        if hyper.maximize:
            g = -g
        if seg.scale is not None:  # unit coordinates w = W / R
            x = x / seg.scale
            g = g / seg.scale if hyper.metric == "stored" else g * seg.scale
        rg = geo.grad(x, g)
        # The squared norm in the step's metric: |R r|^2 in the stored weights' metric.
        stored = hyper.metric == "stored" and seg.scale is not None
        ksq[seg.k0 : seg.k1] = geo.sq(rg * seg.scale if stored else rg)
        parts.append((x, rg))
    coef, ok = moments(ksq, plan.pom, plan.inv_count, vs, vmaxs)
    keep = None if ok is None else _per_kernel(ok, plan.pom)
    for seg, (x, rg) in zip(plan.segments, parts, strict=True):
        rows = slice(seg.k0, seg.k1)
        block = m[seg.k0 * n : seg.k1 * n].view(n, seg.k1 - seg.k0)
        _segment_step(seg, x, rg, xa[rows], block, coef[rows], keep, hyper)
    if plan.perm is not None:
        torch.index_select(xa, 0, plan.inverse, out=kx)
        if kernel_v:
            torch.index_select(vs, 0, plan.inverse, out=v)
            if vmax is not None:
                torch.index_select(vmaxs, 0, plan.inverse, out=vmax)
    return _skipped(ok, kx)


def _segment_step(seg: _Segment, x, rg, xr, mb, coef, keep, hyper) -> None:
    """The step of one manifold type of a gathered layer, from its unit kernels ``x`` and their
    Riemannian gradient ``rg``: its rows ``xr`` (contiguous ``(K_t, n)``) and its first moment
    ``mb`` (an entry-major ``(n, K_t)`` block) are overwritten with the new values. ``keep``:
    per gathered kernel, whether it steps (``None``: all do)."""
    geo = seg.geo
    m_old = geo.view(mb)
    # Where no POM is skipped the first moment is updated in its block, in place.
    in_place = keep is None and geo.in_place
    m = m_old.lerp_(rg, 1.0 - hyper.beta1) if in_place else torch.lerp(m_old, rg, 1.0 - hyper.beta1)
    x_step = x
    if geo.decays and hyper.weight_decay:  # decoupled weight decay (AdamW)
        x_step = x * (1.0 - hyper.lr * hyper.weight_decay)
    y = geo.step(x_step, m, geo.bcast(coef))
    m = geo.transp(x, y, m)  # the first moment moves to the new point (in place)
    if keep is not None:
        k = geo.bcast(keep[seg.k0 : seg.k1])
        y = torch.where(k, y, x)
        m = torch.where(k, m, m_old)
    if seg.scale is not None:
        y = y * seg.scale
    geo.put(y, xr)
    if not in_place:
        geo.put_block(m, mb)
