"""Collections of products of manifolds (POMs) over a whole layer weight.

``build_collection`` groups the kernels of one conv / linear weight into POMs (PI, PO, PIO or
one POM per kernel) and returns a :class:`KernelCollection`, a ``geoopt`` manifold over the
full weight tensor. All its operations are batched per manifold type with index tensors built
once: a call costs O(number of manifold types) tensor ops, never a loop over kernels or POMs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import geoopt
import torch

from ._collection_checks import CollectionChecks
from ._collection_data import CollectionData
from ._grouping import Grouping, group_kernels
from ._strategies import KERNEL_VIEWS, PRESETS, layer_seed, pick_view, resolve_strategy
from .manifolds import get_manifold

__all__ = [
    "KERNEL_VIEWS",
    "PRESETS",
    "KernelCollection",
    "build_collection",
    "layer_seed",
    "resolve_strategy",
]
_SIZE_KEYS = ("po_fraction", "po_parts", "pi_parts", "po_channels")


def build_collection(
    shape: Sequence[int] | torch.Size,
    strategy: str = "pio",
    manifolds: Sequence[str] | None = None,
    *,
    seed: int = 0,
    kernel: str = "auto",
    generator: torch.Generator | None = None,
    **sizes: Any,
) -> KernelCollection:
    """Group the kernels of a layer weight into POMs.

    Args:
        shape: ``(c_out, c_in, k_h, k_w)`` for a conv weight or ``(out, in)`` for a linear one.
        strategy: ``pi``, ``po``, ``pio`` or ``single``, or a Table 3 preset (``euc``, ``st``,
            ``poms_st``, ``pio3``, ``pio4``).
        manifolds: Registered manifold names for the POMs (default Sp+Ob+St); not allowed with
            a preset, which fixes its own.
        seed: Seed of the private generator that draws the subsets and the manifold shares.
        kernel: Kernel view: ``auto`` (spatial kernels, filter view for 1x1 convs and linear
            weights), ``spatial``, ``filter``, or ``euclidean`` (every kernel unconstrained).
        generator: Use this generator instead of one seeded with ``seed``.
        **sizes: ``po_fraction``, ``po_parts``, ``pi_parts``, ``po_channels`` (see
            :func:`fgo_geoopt._grouping.group_kernels`).

    Returns:
        A new :class:`KernelCollection`; nothing is mutated.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise ValueError(
            f"expected a (c_out, c_in, k_h, k_w) conv or (out, in) linear weight shape, got {shape}"
        )
    unknown = set(sizes) - set(_SIZE_KEYS)
    if unknown:
        raise ValueError(f"unknown size options {sorted(unknown)}; valid: {list(_SIZE_KEYS)}")
    strategy, names = resolve_strategy(strategy, manifolds)
    view = pick_view(shape, kernel)
    if kernel == "euclidean":
        names = ("euclidean",)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    rows, cols = shape[0], (shape[1] if view == "spatial" else 1)
    # In the filter view every output channel has one kernel: PO has nothing to split.
    strategy_used = "single" if view == "filter" and strategy == "po" else strategy
    grouping = group_kernels(rows, cols, strategy_used, len(names), generator, **sizes)
    return KernelCollection(
        shape, view, names, grouping, strategy=strategy, seed=seed, kernel=kernel, sizes=sizes
    )


class KernelCollection(CollectionChecks, CollectionData, geoopt.Manifold):
    r"""The collection of POMs of one layer: a manifold over the whole weight tensor.

    The weight is a ``D x C`` grid of kernels (``D = c_out``; ``C = c_in`` in the spatial view,
    1 in the filter view, where kernel ``d`` is the whole filter ``W[d]`` as an ``(L, 1)``
    column). Each kernel belongs to one POM, and each POM to one registered per-kernel manifold.

    Re-scaling (``docs/rescaling.md``): with scales ``R`` per input channel set by
    :meth:`set_scale`, the stored weight is ``W = R * w`` with ``w`` on the manifolds. Every
    method takes and returns stored (scaled) coordinates and works in unit coordinates inside;
    the metric is the pull-back ``<U, V>_W = <U / R, V / R>``. Euclidean kernels are never
    scaled.
    """

    name = "KernelCollection"
    reversible = False

    def __init__(
        self,
        shape: tuple[int, ...],
        view: str,
        manifolds: tuple[str, ...],
        grouping: Grouping,
        *,
        strategy: str,
        seed: int = 0,
        kernel: str = "auto",
        sizes: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.view = view
        self.kernel = kernel
        self.strategy = strategy
        self.seed = seed
        self.sizes = dict(sizes or {})
        self.manifold_names = tuple(manifolds)
        self.manifolds = torch.nn.ModuleList([get_manifold(n) for n in self.manifold_names])
        if len(self.shape) == 4:
            c_out, c_in, kh, kw = self.shape
        else:
            (c_out, c_in), kh, kw = self.shape, 1, 1
        self.channel_numel = kh * kw
        if view == "spatial":
            self.kernel_shape = (kh, kw)
            self.kernels_per_row = c_in
        else:
            self.kernel_shape = (c_in * kh * kw, 1)
            self.kernels_per_row = 1
        self.num_kernels = c_out * self.kernels_per_row
        self.kernel_numel = self.kernel_shape[0] * self.kernel_shape[1]
        self.in_channels = c_in
        self._set_grouping(grouping.kernel_pom, grouping.pom_type)
        self.scale: torch.Tensor | None = None
        # Entry rms of the weight before it was first projected (set by ``wrap``): what
        # ``rescaling.matched_gamma`` restores the stored weights to.
        self.init_rms: float | None = None
        # ``elem_scale`` per (device, dtype); emptied by ``set_scale``. The optimizer keeps its
        # own caches (plans, index tensors, buffers) in its workspace, not here.
        self._scale_cache: dict[Any, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_scale_cache"] = {}  # copies start empty (rebuilt on first use)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("_cache", None)  # pickles of earlier versions
        state.setdefault("_scale_cache", {})
        super().__setstate__(state)

    # ------------------------------------------------------------------ grouping data
    def _set_grouping(self, kernel_pom: torch.Tensor, pom_type: torch.Tensor) -> None:
        kernel_pom = kernel_pom.to(torch.int64)
        if kernel_pom.shape != (self.num_kernels,):
            raise ValueError(
                f"kernel_pom has shape {tuple(kernel_pom.shape)}, expected ({self.num_kernels},)"
            )
        num_poms = int(pom_type.numel())
        if int(kernel_pom.min()) < 0 or int(kernel_pom.max()) >= num_poms:
            raise ValueError("kernel_pom refers to POMs that pom_type does not describe")
        if int(pom_type.min()) < 0 or int(pom_type.max()) >= len(self.manifold_names):
            raise ValueError("pom_type refers to manifolds that are not in the collection")
        # Relabel POMs by (manifold type, first kernel): the POMs of one type form a contiguous
        # run in memory order, which the fused step processes in homogeneous blocks, and a
        # partition into single kernels on one manifold becomes the identity (stored implicitly).
        first = torch.full((num_poms,), self.num_kernels, dtype=torch.int64)
        first.scatter_reduce_(0, kernel_pom, torch.arange(self.num_kernels), reduce="amin")
        if bool((first == self.num_kernels).any()):
            raise ValueError("every POM must hold at least one kernel")
        order = (pom_type.to(torch.int64) * self.num_kernels + first).argsort()
        relabel = torch.empty_like(order)
        relabel[order] = torch.arange(num_poms)
        kernel_pom = relabel[kernel_pom]
        self.pom_type = pom_type.to(torch.int64)[order].to(torch.int8)
        self.num_poms = num_poms
        if num_poms == self.num_kernels and bool(
            (kernel_pom == torch.arange(self.num_kernels)).all()
        ):
            self.pom_ptr = None  # POM g is kernel g
            self.pom_kernels = None
        else:
            counts = torch.bincount(kernel_pom, minlength=num_poms)
            ptr = torch.zeros(num_poms + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=ptr[1:])
            self.pom_ptr = ptr.to(torch.int32)
            self.pom_kernels = kernel_pom.argsort(stable=True).to(torch.int32)

    @property
    def kernel_pom(self) -> torch.Tensor:
        """``(K,)`` POM id of every kernel (int64, computed on demand)."""
        if self.pom_kernels is None:
            return torch.arange(self.num_kernels)
        # POM id of every CSR position: a step at each POM start, cumulated.
        steps = torch.zeros(self.num_kernels, dtype=torch.int64)
        steps[self.pom_ptr[1:-1].long()] = 1
        out = torch.empty(self.num_kernels, dtype=torch.int64)
        out[self.pom_kernels.long()] = steps.cumsum(0)
        return out

    @property
    def pom_sizes(self) -> torch.Tensor:
        if self.pom_ptr is None:
            return torch.ones(self.num_poms, dtype=torch.int64)
        return (self.pom_ptr[1:] - self.pom_ptr[:-1]).long()

    def kernel_type(self) -> torch.Tensor:
        """``(K,)`` manifold type index of every kernel."""
        return self.pom_type.long()[self.kernel_pom]

    def _indices(self, device: torch.device) -> dict[str, Any]:
        """Index tensors of the batched path on ``device``: per manifold type, its kernels,
        their POMs and their positions in a weight row. Built per call (a host sync on an
        accelerator): the optimizer's backends keep them in their own caches."""
        kernel_pom = self.kernel_pom
        ktype = self.pom_type.long()[kernel_pom]
        per_type = []
        for t in range(len(self.manifold_names)):
            idx = torch.nonzero(ktype == t).squeeze(1)
            if idx.numel():
                per_type.append(
                    (
                        t,
                        idx.to(device),
                        kernel_pom[idx].to(device),
                        (idx % self.kernels_per_row).to(device),
                    )
                )
        return {"per_type": per_type}

    # ------------------------------------------------------------------ re-scaling
    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Set the per-input-channel scales ``R`` (shape ``(c_in,)``), or ``None`` for none.

        Only the bookkeeping changes: rescaling stored weights is the caller's job (see
        :class:`fgo_geoopt.Rescaler`).
        """
        if scale is not None:
            scale = torch.as_tensor(scale).detach()
            if scale.shape != (self.in_channels,):
                raise ValueError(
                    f"scale must have shape ({self.in_channels},), got {tuple(scale.shape)}"
                )
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise ValueError("scales must be finite and positive")
            scale = scale.to(torch.float64).clone()
        self.scale = scale
        self._scale_cache = {}

    def elem_scale(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Scale of every entry of a weight row, ``(kernels_per_row, kernel_numel)``."""
        if self.scale is None:
            return None
        key = (str(device), dtype)
        if key not in self._scale_cache:
            flat = self.scale.repeat_interleave(self.channel_numel)
            self._scale_cache[key] = flat.view(self.kernels_per_row, self.kernel_numel).to(
                device=device, dtype=dtype
            )
        return self._scale_cache[key]

    # ------------------------------------------------------------------ batched dispatch
    def _kernels(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.num_kernels, self.kernel_numel)

    def _restore(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = k.reshape(self.shape)
        if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _unit_parts(self, *kernel_views: torch.Tensor, device, dtype):
        """Per manifold type: ``(t, idx, pom, scale, parts)`` with the rows ``idx`` of every
        ``(K, n)`` view divided by the scales ``R`` (``scale`` is ``None`` where unscaled)."""
        escale = self.elem_scale(device, dtype)
        for t, idx, pom, row_pos in self._indices(device)["per_type"]:
            scale = None
            if escale is not None and self.manifold_names[t] != "euclidean":
                scale = escale.index_select(0, row_pos)
            parts = [k.index_select(0, idx) for k in kernel_views]
            if scale is not None:
                parts = [part / scale for part in parts]
            yield t, idx, pom, scale, parts

    def _map(
        self,
        fn: Callable[..., torch.Tensor],
        points: Sequence[torch.Tensor],
        vectors: Sequence[torch.Tensor] = (),
        out_kind: str = "point",
    ) -> torch.Tensor:
        """Apply ``fn(manifold, *unit_points, *unit_vectors)`` per manifold type.

        Points are divided by ``R``, vectors too (tangent vectors scale like points under
        the isometry ``w -> R * w``); the result is multiplied back.
        """
        like = points[0]
        kp = [self._kernels(p) for p in points]
        kv = [self._kernels(v) for v in vectors]
        out = torch.empty_like(kp[0]) if out_kind != "scalar" else None
        scalars = []
        a, b = self.kernel_shape
        for t, idx, _, scale, parts in self._unit_parts(
            *kp, *kv, device=like.device, dtype=like.dtype
        ):
            res = fn(self.manifolds[t], *(part.view(-1, a, b) for part in parts))
            if out_kind == "scalar":
                scalars.append(res.sum())
                continue
            res = res.reshape(-1, self.kernel_numel)
            if scale is not None:
                res = res * scale
            out.index_copy_(0, idx, res.to(out.dtype))
        if out_kind == "scalar":
            return torch.stack(scalars).sum()
        return self._restore(out, like)

    # ------------------------------------------------------------------ geoopt API
    def _check_shape(self, shape, name):
        if tuple(shape) != self.shape:
            return False, f"`{name}` must have the layer shape {self.shape}, got {tuple(shape)}"
        return True, None

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(lambda m, p: m.projx(p), [x])

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._map(lambda m, p, v: m.proju(p, v), [x], [u])

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient in stored coordinates from the gradient w.r.t. the weight.

        With ``W = R * w``, ``dL/dw = R * dL/dW``; its tangent projection at ``w`` is mapped
        back by ``R``. Without scales this is :meth:`proju`.
        """
        if self.scale is None:
            return self.proju(x, u)
        escale = self.elem_scale(u.device, u.dtype)
        squared = self._restore((self._kernels(u).view(-1, *escale.shape) * escale**2), u)
        euc = self._euclidean_mask(u)
        u_eff = torch.where(euc, u, squared) if euc is not None else squared
        return self.proju(x, u_eff)

    def _euclidean_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        if "euclidean" not in self.manifold_names:
            return None
        t = self.manifold_names.index("euclidean")
        mask = (self.kernel_type() == t).to(like.device)
        mask = mask.view(self.num_kernels, 1).expand(-1, self.kernel_numel)
        return self._restore(mask, like)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._map(lambda m, p, v: m.retr(p, v), [x], [u])

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._map(lambda m, p, v: m.expmap(p, v), [x], [u])

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._map(lambda m, p, q, w: m.transp(p, q, w), [x, y], [v])

    def retr_transp(self, x, u, v):
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def inner(self, x, u, v=None, *, keepdim=False):
        if v is None:
            v = u
        total = self._map(lambda m, p, a, b: m.inner(p, a, b), [x], [u, v], out_kind="scalar")
        if keepdim:
            return total.view((1,) * self.ndim)
        return total

    def component_inner(self, x, u, v=None):
        v = u if v is None else v
        return self._map(lambda m, p, a, b: a * b, [x], [u, v]) / self._unit_factor(x)

    def _unit_factor(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(x)
        return self._map(lambda m, p: p, [ones]) if self.scale is not None else ones

    def unit_proju(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Project ``v``, given in unit coordinates as ``(K, n)`` (the optimizer's momentum
        layout), onto the tangent space at the unit point of ``x``; same layout back."""
        kx, kv = self._kernels(x), v.reshape(self.num_kernels, self.kernel_numel)
        out = torch.empty_like(kv)
        a, b = self.kernel_shape
        for t, idx, _, _, (px,) in self._unit_parts(kx, device=x.device, dtype=x.dtype):
            res = self.manifolds[t].proju(px.view(-1, a, b), kv.index_select(0, idx).view(-1, a, b))
            out.index_copy_(0, idx, res.reshape(-1, self.kernel_numel).to(out.dtype))
        return out.view_as(v)

    def pom_sqnorm(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Squared norm of the tangent vector ``u`` over every POM, shape ``(P,)``.

        A segment sum of the per-kernel squared norms over POM ids (one ``index_add_`` per
        manifold type): what Eq. (7) needs for the POM step sizes.
        """
        ku = self._kernels(u)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros(self.num_poms, dtype=acc, device=x.device)
        for _, _, pom, _, (part,) in self._unit_parts(ku, device=x.device, dtype=x.dtype):
            out.index_add_(0, pom, part.to(out.dtype).pow(2).sum(-1))
        return out
