"""One layer's fused FG-Adam step as phases (``AdamJob``), for ``_schedule`` to run.

Three phases, as the kernels of ``_adam`` run them: the gradient norms (split over kernels),
the moments (one piece: a pass over the POMs), the update (split over kernels). Phase ``i`` of
every layer runs before phase ``i + 1`` of any, so the threads share the layers' norms, then
their updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._adam import adam_hyper, adam_lanes, adam_moments, adam_rows, lanes_for
from ._jobs import Phase, split_bounds
from ._plan import build_plan

__all__ = ["AdamJob", "AdamPlan", "adam_plan"]

_DUMMY_KPOM = np.zeros(1, np.int32)
_DUMMY_VMAX = {np.dtype(t): np.zeros(1, t) for t in ("f4", "f8")}


@dataclass
class AdamPlan:
    """Per-collection constants of the fused FG-Adam step."""

    kcode: np.ndarray  # (K,) int8: the kernel code of every kernel
    kpom: np.ndarray  # (K,) int32: the POM of every kernel (a dummy with one kernel per POM)
    singleton: bool
    geo: np.ndarray  # per code: columns, rows and strides of the tall kernel (``_plan``)
    inv_count: np.ndarray  # (P,) float64: 1 / entries of each POM
    scaled: bool
    #: One-column kernels (``_adam.adam_rows``); else the lanes (``_adam.adam_lanes``) of
    #: ``order`` (kernels by chunk of ``lanes``, then by code), cut into blocks of one code
    #: (``bstart``, ``bcode``); chunk ``c`` holds blocks ``[chunk_block[c], chunk_block[c + 1])``.
    rows: bool
    lanes: int
    order: np.ndarray | None
    bstart: np.ndarray | None
    bcode: np.ndarray | None
    chunk_block: np.ndarray | None
    #: Per dtype: the scale of every entry of a weight row, ``(kernels_per_row, n)``, or a
    #: ``(1, n)`` placeholder of ones without re-scaling.
    scales: dict[np.dtype, np.ndarray]

    def scale(self, coll: Any, dtype: np.dtype) -> np.ndarray:
        out = self.scales.get(dtype)
        if out is None:
            if coll.scale is None:
                out = np.ones((1, coll.kernel_numel), dtype)
            else:
                per_entry = coll.elem_scale("cpu", coll.scale.dtype).numpy()
                out = np.ascontiguousarray(per_entry, dtype=dtype)
            self.scales[dtype] = out
        return out


def adam_plan(coll: Any) -> AdamPlan:
    """The plan of ``coll`` (whose manifolds all have kernel codes)."""
    base = build_plan(coll)
    kcode = base.codes.astype(np.int8)[coll.kernel_type().numpy()]
    singleton = coll.pom_kernels is None
    kpom = _DUMMY_KPOM if singleton else coll.kernel_pom.numpy().astype(np.int32)
    sizes = coll.pom_sizes.numpy().astype(np.float64)
    plan = AdamPlan(
        kcode=np.ascontiguousarray(kcode),
        kpom=kpom,
        singleton=singleton,
        geo=base.geo,
        inv_count=1.0 / (sizes * coll.kernel_numel),
        scaled=coll.scale is not None,
        rows=min(coll.kernel_shape) == 1,
        lanes=lanes_for(coll.kernel_numel),
        order=None,
        bstart=None,
        bcode=None,
        chunk_block=None,
        scales={},
    )
    if not plan.rows:
        chunk = np.arange(len(kcode)) // plan.lanes
        key = chunk * 4 + kcode  # by chunk, then by code (codes are 0..3)
        plan.order = np.argsort(key, kind="stable").astype(np.int64)
        sorted_key = key[plan.order]
        starts = np.flatnonzero(np.diff(sorted_key, prepend=-1))
        plan.bstart = np.append(starts, len(kcode)).astype(np.int64)
        plan.bcode = (sorted_key[starts] % 4).astype(np.int64)
        first_chunk = np.searchsorted(sorted_key[starts] // 4, np.arange(chunk[-1] + 2))
        plan.chunk_block = first_chunk.astype(np.int64)
    return plan


class AdamJob:
    """The fused FG-Adam step of one layer. ``x``, ``g``, ``m``: the ``(K, n)`` arrays of the
    weights, the gradient and the first moment; ``v`` (and ``vmax``, or ``None``): the second
    moments, ``(P,)`` or ``(K,)``; ``hyper``: ``adam_step.AdamHyper``; ``t``: the step number."""

    team = None  # never on torch's OpenMP team: the pool shares the pieces out
    on_team = False

    def __init__(self, coll, plan: AdamPlan, x, g, m, v, vmax, hyper, t: float):
        self.numel = x.size
        self.parts = 1
        dtype = x.dtype
        self.x, self.g, self.m, self.v = x, g, m, v
        self.vmax = _DUMMY_VMAX[dtype] if vmax is None else vmax
        self.amsgrad = vmax is not None
        self.plan = plan
        self.s = plan.scale(coll, dtype)
        self.n = coll.kernel_numel
        self.stored = hyper.metric == "stored"
        self.per_pom = hyper.moment == "pom"
        self.check = hyper.check
        decay = 1.0 - hyper.lr * hyper.weight_decay
        self.hp = adam_hyper(
            dtype, sign=-1.0 if hyper.maximize else 1.0, w1=1.0 - hyper.beta1, decay=decay
        )
        self.moments = np.array(
            [
                hyper.beta2,
                hyper.lr / (1.0 - hyper.beta1**t),
                (1.0 - hyper.beta2**t) ** 0.5,
                hyper.eps,
            ]
        )
        k, num_poms = x.shape[0], plan.inv_count.shape[0]
        self.ksq = np.empty(k, dtype)
        self.psq = np.empty(num_poms, dtype)
        self.ok = np.empty(num_poms, np.uint8)
        self.coef = np.empty(num_poms if self.per_pom else k, dtype)
        self.phases = [
            Phase(self._norms, split=True),
            Phase(self._moments, split=False),
            Phase(self._update, split=True),
        ]

    def prepare(self, parts: int) -> None:
        """Nothing to prepare: a piece is a range of kernels (or of chunks of lanes)."""

    def release(self) -> None:
        """Drop this step's arrays (the gradient above all)."""
        self.x = self.g = self.m = self.v = self.vmax = None

    def _norms(self, c: int, parts: int) -> int:
        return self._kernels(False, c, parts)

    def _moments(self, c: int, parts: int) -> int:
        p = self.plan
        return adam_moments(
            self.ksq,
            p.kpom,
            p.singleton,
            p.inv_count,
            self.n,
            self.v,
            self.vmax,
            self.amsgrad,
            self.per_pom,
            self.check,
            self.moments,
            self.ok,
            self.coef,
            self.psq,
        )

    def _update(self, c: int, parts: int) -> int:
        return self._kernels(True, c, parts)

    def _kernels(self, update: bool, c: int, parts: int) -> int:
        p = self.plan
        arrays = (self.x, self.g, self.m, self.s)
        settings = (p.kpom, p.singleton, self.per_pom, self.coef, self.ok, p.scaled, self.stored)
        if p.rows:
            lo, hi = split_bounds(self.x.shape[0], c, parts)
            return adam_rows(update, *arrays, p.kcode, *settings, self.hp, lo, hi, self.ksq)
        c0, c1 = split_bounds(len(p.chunk_block) - 1, c, parts, align=1)
        blocks = (p.order, p.bstart, p.bcode, p.lanes, p.geo)
        lo, hi = p.chunk_block[c0], p.chunk_block[c1]
        return adam_lanes(update, *arrays, *blocks, *settings, self.hp, lo, hi, self.ksq)
