"""One layer's fused step as phases of work (``FusedJob``), for ``_schedule`` to run.

A phase is a :class:`Phase`: ``run(c, parts)`` does piece ``c`` of ``parts`` (one piece unless
``split``) and returns the number of POMs it skipped. Phase ``i`` of every job runs before phase
``i + 1`` of any: a layer whose POMs couple several kernels settles its Eq. (7) factors
(gradient bounds, decision, exact norms where needed, factors) before its update; other layers
take one phase.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._records import Hyper
from . import _bounds3x3, _columns, _factors, _tiles3x3
from ._aos import aos_chunk
from ._flags import (
    FLAG_ADAPTIVE,
    FLAG_CHECK,
    FLAG_NO_REGISTERS,
    FLAG_OWN,
    FLAG_SCALED,
    FLAG_UNIT,
    FLAG_USE_MOM,
    TEAM_BOUNDS,
    TEAM_NORMS,
    TEAM_UPDATE,
    ChunkHyper,
    ChunkLayout,
    hyper_array,
)
from ._layout import TILE
from ._plan import Plan
from ._soa import soa_chunk

__all__ = ["EXACT_STATE", "EXACT_STEPS", "FusedJob", "Phase", "split_bounds"]

#: Steps that skip the gradient bounds of a layer after they settled less than half its POMs.
EXACT_STEPS = 16
#: Key of that count in a parameter's optimizer state (an int: checkpoints carry it).
EXACT_STATE = "exact_norm_steps"
#: Whether coupled layers settle Eq. (7) from gradient bounds first, exact norms only where the
#: bounds leave it open (the same results either way). Opt-in, ``FGO_GRADIENT_BOUNDS=1``: it
#: bought about 1% of a resnet50 training step on 1 and on 2 threads (docs/performance.md).
GRADIENT_BOUNDS = os.environ.get("FGO_GRADIENT_BOUNDS", "0") == "1"
#: The 16-kernel register step of the 3x3 path (a switch for ``benchmarks/accelerations.py``).
REGISTERS = True
#: Per-parameter array sets kept per collection (several parameters may share one).
_REUSE_MAX = 16
_NO_SUMS = np.zeros((1, 1))
_NO_BLOCKS = np.zeros(1, np.int64)
_ONES = {np.dtype(t): np.ones(1, t) for t in ("f4", "f8")}  # "no scales" placeholders


@dataclass(frozen=True)
class Phase:
    """One phase of a layer's step (see the module docstring)."""

    run: Callable[[int, int], int]
    split: bool
    #: Where given: whether the phase has any work this step (decided by an earlier phase).
    active: Callable[[], bool] | None = None
    #: The same phase as a kind of the team descriptors (``_team``), where it can run there.
    team_kind: int | None = None


def _kernel_scales(coll: Any, cache: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """The scale of each 3x3 kernel of a weight row (scales are per input channel, so one per
    kernel) in ``dtype``; a placeholder where the collection is not scaled."""
    if coll.scale is None:
        return _ONES[np.dtype(dtype)]
    key = ("kernel scales", np.dtype(dtype).str)
    out = cache.get(key)
    if out is None:
        per_entry = coll.elem_scale("cpu", coll.scale.dtype)
        out = cache[key] = np.ascontiguousarray(per_entry[:, 0].numpy(), dtype=dtype)
    return out


def split_bounds(n: int, part: int, parts: int, align: int = 16) -> tuple[int, int]:
    """Share ``part`` of ``range(n)`` cut in ``parts``; cuts on multiples of ``align`` so that
    two threads never write into the same cache line."""

    def cut(c):
        return n if c >= parts else min(n, n * c // parts // align * align)

    return cut(part), cut(part + 1)


def _zeroed(array, shape):
    """``array`` filled with zeros if it has ``shape``, else a new zero array."""
    if array is None or array.shape != shape:
        return np.zeros(shape)
    array.fill(0)
    return array


class FusedJob:
    """The fused step of one layer: ``phases``, and what ``_schedule`` needs to share them out.

    ``x``, ``g``, ``m`` are the ``(K, n)`` arrays of the weights, gradient and momentum buffer
    (``m`` is ``None`` without momentum); ``key`` names the parameter (its address), ``state``
    is its optimizer state (``None`` in the functional form).
    """

    #: ``(path, kernel index dtype name)`` where the layer may run on torch's OpenMP team.
    team: tuple[str, str] | None = None

    def __init__(self, coll, plan: Plan, cache, x, g, m, hyper: Hyper, first: bool, key, state):
        self.numel = x.size
        use_mom = m is not None
        m = m if use_mom else x
        c_old, c_new = (0.0, 1.0) if first else (hyper.momentum, 1.0 - hyper.dampening)
        a_r, a_b = (1.0, hyper.momentum) if hyper.nesterov else (0.0, 1.0)
        sign = -1.0 if hyper.maximize else 1.0
        scaled = coll.scale is not None
        if plan.path in ("3x3", "columns"):
            layer = plan.layers.get(key)
            if layer is None or layer.dtype != x.dtype:
                module = _tiles3x3 if plan.path == "3x3" else _columns
                layer = plan.layers[key] = _InOrder(module, coll, plan, x.dtype)
                while len(plan.layers) > _REUSE_MAX:  # parameters that moved: the oldest go
                    del plan.layers[next(iter(plan.layers))]
            hp = hyper_array(
                x.dtype,
                lr=hyper.lr,
                c_old=c_old,
                c_new=c_new,
                a_r=a_r,
                a_b=a_b,
                weight_decay=hyper.weight_decay,
                sign=sign,
            )
            s = (
                _kernel_scales(coll, cache, x.dtype)
                if plan.path == "3x3"
                else (_ONES[np.dtype("f8")] if not scaled else _entry_scales(coll))
            )
            self.phases = layer.bind(x, g, m, s, scaled, use_mom, hyper, hp, state)
            self.team, self.team_phase = layer.team, layer.team_phase
            self.prepare, self.release = layer.prepare, layer.release
            return
        finfo = np.finfo(x.dtype)
        lay = ChunkLayout(
            kpr=coll.kernels_per_row,
            scaled=scaled,
            pom_ptr=plan.pom_ptr,
            pom_kernels=plan.pom_kernels,
            singleton=coll.pom_ptr is None,
            pom_type=plan.pom_type,
            codes=plan.codes,
            geo=plan.geo,
            blocks=_NO_BLOCKS if plan.blocks is None else plan.blocks,
            cap=plan.cap,
        )
        hyp = ChunkHyper(
            lr=float(hyper.lr),
            mu=float(hyper.momentum),
            damp=float(hyper.dampening),
            nesterov=bool(hyper.nesterov),
            sign=sign,
            wd=float(hyper.weight_decay),
            adaptive=bool(hyper.adaptive),
            use_mom=use_mom,
            first=bool(first),
            check=bool(hyper.check),
            eps=float(finfo.eps),
            tiny=float(finfo.tiny),
        )
        s = _entry_scales(coll) if scaled else _ONES[np.dtype("f8")]
        chunk = soa_chunk if plan.path == "soa" else aos_chunk
        self.phases = [Phase(lambda c, parts: int(chunk(c, x, g, m, s, lay, hyp, parts)), True)]

    def prepare(self, parts: int) -> None:
        """Called by ``_schedule`` with the number of pieces of a split phase."""

    def release(self) -> None:
        """Called by ``_schedule`` when the step is over (also after an error)."""


def _entry_scales(coll) -> np.ndarray:
    """The scale of every entry of a weight row, flat, float64 (the collection caches it)."""
    return coll.elem_scale("cpu", coll.scale.dtype).reshape(-1).numpy()


class _InOrder:
    """One parameter on a memory-order path (``_tiles3x3``, ``_columns``): its arrays reused
    from step to step (the factors per POM, the POMs that need exact norms, the
    hyper-parameters, the per-piece POM sums) and its phases, built once; ``bind`` attaches a
    step's arrays and returns the phases of that step.

    Eq. (7) couples the kernels of a POM. A cheap pass bounds every POM's gradient norm (|g| in
    unit coordinates); where the bound proves the factor is 1 (almost always with real
    gradients) or the POM is Euclidean, the factor is settled, and only the other POMs need the
    exact norms of ``pass1`` before the update. Where the bounds settled less than half of the
    POMs, the next ``EXACT_STEPS`` steps skip them and compute every norm exactly; the results
    are the same either way (up to the last bits). The count of those steps is kept in the
    parameter's optimizer state (``EXACT_STATE``), so that a resumed run takes the same path.
    """

    def __init__(self, module, coll, plan: Plan, dtype):
        self.module, self.dtype = module, dtype
        self.bounds_fn = _bounds3x3.bounds if module is _tiles3x3 else _columns.bounds
        self.num_k, self.kpr, self.num_poms = coll.num_kernels, coll.kernels_per_row, coll.num_poms
        self.kidx, self.tcode = plan.kidx, plan.tcode
        self.own = coll.pom_ptr is None  # one kernel per POM: each its own Eq. (7) unit
        size = 1 if self.own else coll.num_poms
        self.pfac = np.ones(size, dtype)
        self.need = np.ones(size, np.uint8)
        self.hp = np.empty(len(hyper_array(dtype, **_ZERO_HYPER)), dtype)
        self.align = TILE if module is _tiles3x3 else 16  # the tiles of the 3x3 buffers
        path = "3x3" if module is _tiles3x3 else "columns"
        self.team = (path, self.kidx.dtype.name) if dtype == np.float32 else None
        self.counter: dict = {}  # the exact-norm step count where no optimizer state is given
        self.sums: dict = {}  # per-piece rows of POM sums, "bounds" and "exact"
        self.desc = None  # this step's team descriptor (``team_phase``), dropped by ``release``
        self.team_module = None
        self.marked = 0
        self.phases_update = [Phase(self.update, True, team_kind=TEAM_UPDATE)]
        self.phases_exact = [
            Phase(self.norms, True, self.active, TEAM_NORMS),
            Phase(self.factors, False, self.active),
            Phase(self.update_only, True, team_kind=TEAM_UPDATE),
        ]
        self.phases_bounds = [
            Phase(self.bounds, True, team_kind=TEAM_BOUNDS),
            Phase(self.decide, False),
            *self.phases_exact,
        ]

    def bind(self, x, g, m, s, scaled, use_mom, hyper: Hyper, hp, state):
        """This step's arrays and settings; returns this step's phases."""
        self.x, self.g, self.m, self.s = x, g, m, s
        adaptive, check = bool(hyper.adaptive), bool(hyper.check)
        self.scaled, self.adaptive, self.check = scaled, adaptive, check
        self.hp[:] = hp
        self.flags = (
            scaled * FLAG_SCALED
            + self.own * FLAG_OWN
            + adaptive * FLAG_ADAPTIVE
            + use_mom * FLAG_USE_MOM
            + check * FLAG_CHECK
            + (not REGISTERS) * FLAG_NO_REGISTERS
        )
        self.coupled = not self.own and (adaptive or check)
        if not self.coupled:
            self.pfac.fill(1)
            return self.phases_update
        counter = self.counter if state is None else state
        self.use_bounds = counter.get(EXACT_STATE, 0) == 0
        if not self.use_bounds:
            counter[EXACT_STATE] -= 1
        self.use_bounds = self.use_bounds and GRADIENT_BOUNDS
        self.step_counter = counter
        self.need[:] = 0 if self.use_bounds else 1
        self.marked = 0 if self.use_bounds else self.num_poms
        return self.phases_bounds if self.use_bounds else self.phases_exact

    def release(self) -> None:
        """Drops this step's arrays and its team descriptor (no address outlives the step).
        Holding on to the gradient would keep every layer's ``.grad`` alive after
        ``zero_grad(set_to_none=True)``: the next backward would then allocate all of them
        afresh and fault in their pages (see docs/performance.md)."""
        self.x = self.g = self.m = self.s = None
        if self.desc is not None:
            self.team_module.clear(self.desc)
            self.desc = None

    def prepare(self, parts: int) -> None:
        """Zeroed rows of POM sums for ``parts`` pieces (kept from step to step)."""
        if self.coupled:
            name = "bounds" if self.use_bounds else "exact"
            self.sums[name] = _zeroed(self.sums.get(name), (parts, self.num_poms))

    def factors_are_one(self) -> bool:
        """Whether every POM's factor is 1 (the update then reads none)."""
        return not self.coupled or _factors.all_one(self.pfac)

    def team_phase(self, team, kind, threads):
        """This layer's part of a call of ``team`` (the ``_team`` module) for phase ``kind``:
        the descriptor and a function that returns the skipped count once the call is done."""
        if self.desc is None:  # once a step; ``release`` clears it
            self.team_module = team
            self.desc = team.describe(
                **dict(k=self.num_k, n=self.x.shape[1], kpr=self.kpr, align=self.align),
                **dict(kidx=self.kidx, tcode=self.tcode, pfac=self.pfac, need=self.need),
                hp=self.hp,
            )
            team.refresh(self.desc, self.flags, self.x, self.g, self.m, self.s)
        r2 = self.sums.get("bounds" if kind == team.BOUNDS else "exact", _NO_SUMS)
        out = np.zeros(threads, np.int64)
        unit = kind == team.UPDATE and self.factors_are_one()
        desc = team.phase(self.desc, kind, r2, out, FLAG_UNIT if unit else 0)
        counted = not self.coupled and kind == team.UPDATE

        def skipped():
            return int(out.sum()) if counted else 0

        return desc, skipped

    def update(self, c, parts):
        k0, k1 = split_bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.m, self.s, self.kpr, self.kidx, self.tcode, self.pfac)
        flags = self.flags | (FLAG_UNIT if self.factors_are_one() else 0)
        skipped = self.module.pass2(*args, k0, k1, self.hp, flags)
        return 0 if self.coupled else skipped  # coupled: counted per POM by ``factors``

    def bounds(self, c, parts):
        k0, k1 = split_bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.s, self.kpr, self.scaled, self.kidx, self.tcode)
        self.bounds_fn(*args, k0, k1, self.hp, self.sums["bounds"][c])
        return 0

    def decide(self, c, parts):
        self.marked, skipped = _factors.decide(
            self.sums["bounds"], self.tcode, self.adaptive, self.check, self.pfac, self.need
        )
        if 2 * self.marked > self.num_poms:
            self.step_counter[EXACT_STATE] = EXACT_STEPS
        if self.marked:
            self.sums["exact"] = _zeroed(self.sums.get("exact"), self.sums["bounds"].shape)
        return skipped

    def norms(self, c, parts):
        k0, k1 = split_bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.s, self.kpr, self.scaled, self.kidx, self.tcode, self.need)
        self.module.pass1(*args, k0, k1, self.hp, self.sums["exact"][c])
        return 0

    def factors(self, c, parts):
        return _factors.pom_factors(
            self.sums["exact"], self.adaptive, self.check, self.pfac, self.need
        )

    def update_only(self, c, parts):
        self.update(c, parts)
        return 0  # skipped POMs were counted by ``decide`` and ``factors``

    def active(self):
        return self.marked > 0


_ZERO_HYPER = dict(lr=0.0, c_old=0.0, c_new=0.0, a_r=0.0, a_b=0.0, weight_decay=0.0, sign=0.0)
