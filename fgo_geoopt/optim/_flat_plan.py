"""Index sets of the flat step: all collection layers of one call on one (device, dtype) as one
flat buffer, with the bookkeeping built once and kept in the optimizer's ``Workspace``.

Layers are ordered by *bucket*, so that every bucket is one contiguous slice of the flat buffer:

* a **matrix** bucket holds the layers whose kernels share a shape ``a x b`` with
  ``min(a, b) > 1`` (3x3, 5x5, 7x7 spatial kernels): its slice is ``(N, a, b)``;
* a **column** bucket holds the layers whose kernels are single columns (filter view, ``1 x k``
  and ``k x 1`` kernels), of any lengths that share a *width* ``w`` (a power of two up to 64
  dividing the length, or the length itself): its slice is ``(M, w)``, every kernel a run of
  sub-rows. Sphere, oblique and Stiefel are one and the same manifold on a column.

Per bucket, the plan holds the global POM id of every row (POM ids of all layers in one
space, so Eq. (7) sums with one ``index_add_``), boolean masks of the manifold kinds (the step
is written once for all kinds, selected per row, so nothing is gathered or scattered by kind),
and the per-row or per-entry scales of re-scaled layers. Momentum buffers are views of one
flat tensor in the parameters' dtype; the optimizer state holds those ``(K, n)`` views.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..manifolds import KernelEuclidean, KernelSphere, KernelStiefel, Oblique
from ..manifolds._base import compute_dtype
from ._state import Workspace, plain_buffer

__all__ = ["KINDS", "Bucket", "FlatPlan", "flat_kinds", "flat_plan"]

#: The manifolds the flat steps implement (the classes exactly: a subclass may change them).
KINDS = {KernelSphere: "sphere", Oblique: "oblique", KernelStiefel: "stiefel"}
KINDS[KernelEuclidean] = "euclidean"
_CODES = {"sphere": 0, "oblique": 1, "stiefel": 2, "euclidean": 3}
#: Widest sub-row of a column bucket.
COLUMN_WIDTH = 64


def flat_kinds(coll: Any, workspace: Workspace) -> tuple[str, ...] | None:
    """The kind of every manifold of ``coll``, or ``None`` where one is not built in (those
    layers take the per-layer torch step)."""
    cache = workspace.of(coll)
    if "flat kinds" not in cache:
        kinds = tuple(KINDS.get(type(m)) for m in coll.manifolds)
        cache["flat kinds"] = None if None in kinds else kinds
    return cache["flat kinds"]


def _bucket_key(coll: Any) -> tuple:
    a, b = coll.kernel_shape
    if min(a, b) > 1:
        return ("matrix", a, b)
    length = a * b
    width = min(length & -length, COLUMN_WIDTH)  # largest power of two dividing the length
    return ("column", width if width >= 8 else length)


@dataclass
class Bucket:
    """One contiguous slice ``[start, stop)`` of the flat buffer and its index tensors."""

    kind: str  # "matrix" or "column"
    start: int
    stop: int
    rows: int  # kernels
    shape: tuple[int, ...]  # (a, b) for a matrix bucket, (w,) for a column bucket
    #: Global POM of every row (matrix) or sub-row (column).
    pom: torch.Tensor
    #: Bool masks: matrix ``st``, ``ob``, ``sp``, ``eu``, ``so`` (sphere or oblique) of shape
    #: (N, 1, 1); column ``con`` and ``st`` (N,) (constrained, Stiefel kernel), ``eu`` and
    #: ``st_sub`` (M, 1) (sub-row of a Euclidean, Stiefel kernel), ``head`` (M, 1) (a kernel's
    #: first sub-row).
    masks: dict[str, torch.Tensor]
    #: Matrix: (N, 1, 1) per-row scale; column: (M, w) per-entry scale; None when unscaled.
    scale: torch.Tensor | None
    #: Column: the row of every sub-row (None when every row is one sub-row).
    sub_row: torch.Tensor | None = None
    #: Kernels and parameter shape of each layer, in flat order.
    layers: list[tuple[int, torch.Size]] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)


class FlatPlan:
    """The flat layout of some layers (``_records.Layer``) on one device and dtype."""

    def __init__(self, layers: list, workspace: Workspace, momentum: bool):
        first = layers[0].param
        self.device, self.dtype = first.device, first.dtype
        self.work = compute_dtype(self.dtype)
        keys = [_bucket_key(layer.coll) for layer in layers]
        self.order = sorted(range(len(layers)), key=lambda i: (keys[i], i))
        self.refs = [weakref.ref(layer.param) for layer in layers]
        self.colls = [layer.coll for layer in layers]
        self.scales = [layer.coll.scale for layer in layers]
        ordered = [layers[i] for i in self.order]
        self.sizes = [layer.param.numel() for layer in ordered]
        self.shapes = [(layer.coll.num_kernels, layer.coll.kernel_numel) for layer in ordered]
        self.total = sum(self.sizes)
        self.buckets: list[Bucket] = []
        pom_base, start, i = 0, 0, 0
        while i < len(ordered):
            j = i
            while j < len(ordered) and keys[self.order[j]] == keys[self.order[i]]:
                j += 1
            members = [(layer, flat_kinds(layer.coll, workspace)) for layer in ordered[i:j]]
            bucket, pom_base = _build(keys[self.order[i]], members, start, pom_base, self)
            self.buckets.append(bucket)
            start, i = bucket.stop, j
        self.num_poms = pom_base
        self.buffer: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        if momentum:
            self.make_buffers()

    def make_buffers(self) -> None:
        self.buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        self.views = list(self.buffer.split(self.sizes))
        self.views = [v.view(shape) for v, shape in zip(self.views, self.shapes, strict=True)]

    def valid(self, layers: list) -> bool:
        """Whether this plan still describes ``layers`` (same tensors, collections, scales)."""
        return len(layers) == len(self.refs) and all(
            ref() is layer.param and coll is layer.coll and scale is layer.coll.scale
            for ref, coll, scale, layer in zip(
                self.refs, self.colls, self.scales, layers, strict=True
            )
        )

    def adopt_buffers(self, ordered: list) -> None:
        """Make every layer's momentum buffer its view of the flat buffer: a no-op after the
        first step; a copy after ``load_state_dict``, another backend or a new plan."""
        if self.buffer is None:
            self.make_buffers()
        for layer, view in zip(ordered, self.views, strict=True):
            st = layer.state
            buf = st.get("momentum_buffer")
            if buf is view and "momentum_tiles" not in st:
                continue
            if buf is None:
                view.zero_()
            else:
                view.copy_(plain_buffer(st).reshape(view.shape))
                st.pop("momentum_tiles", None)
            st["momentum_buffer"] = view


def flat_plan(layers: list, workspace: Workspace, momentum: bool) -> FlatPlan:
    """The cached plan of ``layers`` (one device and dtype), built on first use."""
    p = layers[0].param
    key = ("flat", str(p.device), p.dtype, tuple(id(layer.param) for layer in layers))
    plan = workspace.plan(
        key, lambda plan: plan.valid(layers), lambda: FlatPlan(layers, workspace, momentum)
    )
    return plan


def _layer_rows(layer, kinds: tuple[str, ...], pom_base: int):
    """Per kernel of one layer: global POM id, kind code, and its scale data (CPU)."""
    coll = layer.coll
    codes = torch.tensor([_CODES[k] for k in kinds], dtype=torch.int64)
    code = codes[coll.kernel_type()]
    pom = coll.kernel_pom + pom_base
    scale = None
    if coll.scale is not None:
        rows = coll.elem_scale("cpu", torch.float64)  # (kernels_per_row, kernel_numel)
        scale = rows.repeat(coll.num_kernels // coll.kernels_per_row, 1)
        scale[code == _CODES["euclidean"]] = 1.0
    return pom, code, scale


def _build(key: tuple, members: list, start: int, pom_base: int, plan: FlatPlan):
    device, work = plan.device, plan.work
    poms, codes, scales, counts = [], [], [], []
    for layer, kinds in members:
        pom, code, scale = _layer_rows(layer, kinds, pom_base)
        pom_base += layer.coll.num_poms
        poms.append(pom)
        codes.append(code)
        scales.append(scale)
        counts.append(layer.coll.num_kernels)
    layer_info = [(layer.coll.num_kernels, layer.param.shape) for layer, _ in members]
    pom, code = torch.cat(poms), torch.cat(codes)
    rows = int(pom.numel())
    stop = start + sum(layer.param.numel() for layer, _ in members)
    if any(s is not None for s in scales):
        n_of = [layer.coll.kernel_numel for layer, _ in members]
        full = [
            torch.ones(k, n, dtype=torch.float64) if s is None else s
            for s, k, n in zip(scales, counts, n_of, strict=True)
        ]
    else:
        full = None
    if key[0] == "matrix":
        a, b = key[1], key[2]
        masks = {
            name: (code == c).view(rows, 1, 1).to(device)
            for name, c in (("sp", 0), ("ob", 1), ("st", 2), ("eu", 3))
        }
        masks["so"] = masks["sp"] | masks["ob"]
        scale = None
        if full is not None:  # spatial kernels: one scale per kernel
            scale = torch.cat(full)[:, :1].view(rows, 1, 1).to(device=device, dtype=work)
        bucket = Bucket("matrix", start, stop, rows, (a, b), pom.to(device), masks, scale)
        bucket.layers = layer_info
        tall, short = max(a, b), min(a, b)
        f64 = {"dtype": torch.float64, "device": device}
        bucket.cache["eye"] = torch.eye(short, **f64)
        bucket.cache["identity"] = torch.eye(tall, short, **f64)  # Stiefel fallback
        bucket.cache["sphere fallback"] = torch.tensor((a * b) ** -0.5, **f64)
        bucket.cache["oblique fallback"] = torch.tensor(tall**-0.5, **f64)
        return bucket, pom_base
    width = key[1]
    per_row = torch.cat(
        [
            torch.full((k,), layer.coll.kernel_numel // width)
            for (layer, _), k in zip(members, counts, strict=True)
        ]
    )
    sub_row = torch.repeat_interleave(torch.arange(rows), per_row)
    euclid, stiefel = code == _CODES["euclidean"], code == _CODES["stiefel"]
    head = torch.ones(sub_row.numel(), dtype=torch.bool)
    head[1:] = sub_row[1:] != sub_row[:-1]  # the first sub-row of every kernel
    masks = {
        "con": (~euclid).to(device),
        "st": stiefel.to(device),
        "eu": euclid[sub_row].view(-1, 1).to(device),
        "st_sub": stiefel[sub_row].view(-1, 1).to(device),
        "head": head.view(-1, 1).to(device),
    }
    scale = None
    if full is not None:
        flat = torch.cat([s.reshape(-1) for s in full])
        scale = flat.view(-1, width).to(device=device, dtype=work)
    trivial = bool((per_row == 1).all())
    lengths = (per_row * width).to(torch.float64)
    fallback = lengths.pow(-0.5)[sub_row].view(-1, 1).to(device=device, dtype=work)
    bucket = Bucket(
        "column",
        start,
        stop,
        rows,
        (width,),
        pom[sub_row].to(device),
        masks,
        scale,
        sub_row=None if trivial else sub_row.to(device),
        layers=layer_info,
    )
    bucket.cache["column fallback"] = fallback  # 1 / sqrt(length) on every sub-row
    bucket.cache["entry 0"] = (torch.arange(width) == 0).view(1, -1).to(device)
    return bucket, pom_base
