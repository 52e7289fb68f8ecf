"""Fused CPU step of FG-SGD: numba loops that read and write every kernel once per step.

Eager chains of small-axis tensor ops cost 15-40x an SGD update on 3x3 kernels
(docs/performance.md). Each layer takes the path that suits its kernel shape:

* 3x3 kernels (``_fused3x3``): memory order, 16 kernels at a time in vector registers
  (``_fused16``), with entry-major tiles of 128 kernels for what that cannot do; one
  formulation for all four built-in manifolds;
* one-column kernels, i.e. the filter view of 1x1 convs and linear layers
  (``_fused_columns``): memory order, contiguous loops per kernel;
* other small kernels (``n <= SOA_MAX_NUMEL``, e.g. 5x5): blocks of POMs of one manifold
  type gathered into structure-of-arrays buffers (``_fused_soa``);
* other large kernels (e.g. 7x7): a POM at a time, a kernel at a time (``_fused_aos``).

The first two split a layer by kernels and settle the Eq. (7) factors in phases (see
``FusedJob``); ``run_jobs`` runs all layers of a parameter group together, on torch's own OpenMP
threads where it can (``_team``), else on a thread pool. The maths is the batched torch path of
``_batched.py``; tests keep every path equal to ``reference.py``.

This module is the top of the step: it plans, schedules and owns the threads. Its imports run
one way, down: ``_team`` (scheduling on OpenMP), the kernel paths, their shared maths
(``_maths3x3``, ``_fused_soa``) and at the bottom ``_fused_flags`` (codes, flags, layout).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._fused_flags import (
    AVAILABLE,
    EUCLIDEAN,
    FLAG_ADAPTIVE,
    FLAG_CHECK,
    FLAG_OWN,
    FLAG_SCALED,
    FLAG_UNIT,
    FLAG_USE_MOM,
    OBLIQUE,
    SPHERE,
    STIEFEL,
    TEAM_BOUNDS,
    TEAM_NORMS,
    TEAM_UPDATE,
    hyper_array,
)
from ._layout import TILE

if AVAILABLE:  # the kernels; without numba the batched torch path steps everything
    from . import _fused3x3, _fused_columns
    from ._fused_aos import aos_chunk as _aos_chunk
    from ._fused_soa import soa_chunk as _soa_chunk

__all__ = [
    "AVAILABLE",
    "FusedJob",
    "buffer_layout",
    "fused_supported",
    "run_jobs",
]

#: Other kernels (not 3x3, not one column) with at most this many entries use the
#: structure-of-arrays block path (``_fused_soa``); larger ones the per-kernel loops
#: (``_fused_aos``).
SOA_MAX_NUMEL = 64
#: Target number of kernels in one block of the structure-of-arrays path.
BLOCK_KERNELS = 256
#: Steps that skip the gradient bounds of a layer after they settled less than half its POMs.
EXACT_STEPS = 16
#: Key of that count in a parameter's optimizer state (an int: checkpoints carry it).
EXACT_STATE = "exact_norm_steps"
#: Layers with fewer entries stay off torch's OpenMP team (a team call costs microseconds).
TEAM_MIN_NUMEL = 1 << 13
_NO_SUMS = np.zeros((1, 1))
#: Entries per piece of work handed to a thread (smaller layers are one piece).
PIECE_NUMEL = 1 << 19
#: Per-parameter buffer sets kept per collection (``FusedJob``).
_REUSE_MAX = 16

_POOL: ThreadPoolExecutor | None = None


def _parallel(tasks: list) -> list:
    """Run the callables of ``tasks`` on as many threads (the first on the calling one).

    The numba functions release the GIL (``nogil``), so plain Python threads run them in
    parallel; unlike numba's parallel regions this never competes with torch's OpenMP pool
    for the cores (measured: a 5x slower step with the ``omp`` threading layer).
    """
    global _POOL
    if len(tasks) == 1:
        return [tasks[0]()]
    if _POOL is None or _POOL._max_workers < len(tasks) - 1:
        _POOL = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="fgo-fused")
    futures = [_POOL.submit(task) for task in tasks[1:]]
    first = tasks[0]()
    return [first, *(f.result() for f in futures)]


_DUMMY_I32 = np.zeros(1, np.int32)
_ONES = {np.dtype(t): np.ones(1, t) for t in ("f4", "f8")}  # "no scales" placeholders
_DUMMY_F64 = _ONES[np.dtype("f8")]


def _kernel_scales(coll, dtype) -> np.ndarray:
    """The scale of each 3x3 kernel of a weight row (scales are per input channel, so one per
    kernel), in ``dtype``; a dummy where the collection is not scaled."""
    if coll.scale is None:
        return _ONES[np.dtype(dtype)]
    key = ("scale", "per kernel", np.dtype(dtype).str)  # dropped by ``set_scale``
    out = coll._cache.get(key)
    if out is None:
        per_entry = coll.elem_scale("cpu", coll.scale.dtype)
        if coll.kernel_numel != coll.channel_numel:  # not one input channel per kernel
            raise ValueError("the 3x3 path needs one scale per kernel")
        out = coll._cache[key] = np.ascontiguousarray(per_entry[:, 0].numpy(), dtype=dtype)
    return out


def _plan(coll) -> dict:
    """Per-collection constants of the fused step, computed once and cached on the collection."""
    a, b = coll.kernel_shape
    n = a * b
    # Column c, row r of the tall kernel sits at entry c * cst + r * est of the stored kernel.
    ncol, nrow, cst, est = (a, b, b, 1) if a < b else (b, a, 1, b)
    geo = np.empty((4, 4), np.int64)
    geo[OBLIQUE] = (ncol, nrow, cst, est)
    geo[STIEFEL] = (ncol, nrow, cst, est)
    geo[SPHERE] = (1, n, 0, 1)  # the whole kernel is one column
    geo[EUCLIDEAN] = (1, n, 0, 1)
    pom_type = coll.pom_type.numpy()
    codes = np.array([type(m).__dict__["fused_code"] for m in coll.manifolds], np.int64)
    plan = {
        "codes": codes,
        "geo": geo,
        "pom_type": pom_type,
        "pom_ptr": _DUMMY_I32 if coll.pom_ptr is None else coll.pom_ptr.numpy(),
        "pom_kernels": _DUMMY_I32 if coll.pom_kernels is None else coll.pom_kernels.numpy(),
        "path": (
            "3x3"
            if coll.kernel_shape == (3, 3)
            else "columns"
            if min(a, b) == 1
            else "soa"
            if n <= SOA_MAX_NUMEL
            else "aos"
        ),
    }
    if plan["path"] in ("3x3", "columns"):
        # Per kernel, in memory order, an index ``kidx`` and ``tcode`` mapping it to the
        # manifold code. With one kernel per POM the index is the code itself (one byte);
        # otherwise the kernel's POM (two bytes while there are at most 65,536 POMs), the POMs
        # numbered in the order of their codes. Either way ``tcode`` is sorted, so a kernel's
        # code also follows from its index and three bounds, without a lookup (``_fused16``).
        ptype = codes.astype(np.int8)[pom_type]
        if coll.pom_ptr is None:
            plan["kidx"] = codes.astype(np.int8)[coll.kernel_type().numpy()]
            plan["tcode"] = np.arange(4, dtype=np.int8)  # SPHERE, OBLIQUE, STIEFEL, EUCLIDEAN
        else:
            order = np.argsort(ptype, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            small = coll.num_poms <= 1 << 16
            kernel_pom = rank[coll.kernel_pom.numpy()]
            plan["kidx"] = kernel_pom.astype(np.uint16 if small else np.int32)
            plan["tcode"] = ptype[order]
    elif plan["path"] == "soa":
        sizes = coll.pom_sizes.numpy()
        # Blocks: consecutive POMs of one type, cut where the running kernel count crosses a
        # multiple of BLOCK_KERNELS (so a block holds < BLOCK_KERNELS + largest POM kernels).
        start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        cut = np.ones(len(sizes), bool)
        cut[1:] = (start[1:] // BLOCK_KERNELS != start[:-1] // BLOCK_KERNELS) | (
            pom_type[1:] != pom_type[:-1]
        )
        blocks = np.flatnonzero(cut)
        plan["blocks"] = np.concatenate((blocks, [len(sizes)])).astype(np.int64)
        plan["cap"] = int(BLOCK_KERNELS + sizes.max())
    return plan


def _bounds(n: int, part: int, parts: int, align: int = 16) -> tuple[int, int]:
    """Share ``part`` of ``range(n)`` cut in ``parts``; cuts on multiples of ``align`` so that
    two threads never write into the same cache line."""

    def cut(c):
        return n if c >= parts else min(n, n * c // parts // align * align)

    return cut(part), cut(part + 1)


class FusedJob:
    """The fused step of one collection as phases of work, ``(fn, split[, active, kind])``:
    ``fn(c, parts)`` does piece ``c`` of ``parts`` (one piece unless ``split``) and returns the
    number of POMs it skipped; ``active()``, where given, says whether the phase has work at
    all; ``kind`` is the same phase for ``team_phase`` on torch's OpenMP team.

    Phase ``i`` of every job runs before phase ``i + 1`` of any (``run_jobs``): a layer whose
    POMs couple several kernels settles its Eq. (7) factors (gradient bounds, decision, exact
    norms where needed, factors) before its update; other layers take one phase.
    """

    def __init__(
        self,
        coll,
        x2d,
        g2d,
        m2d,
        *,
        lr,
        momentum,
        dampening,
        nesterov,
        maximize,
        weight_decay,
        adaptive,
        first,
        check,
        key=None,
        state=None,
    ):
        plan = coll._cache.get("fused")
        if plan is None:
            plan = coll._cache["fused"] = _plan(coll)
        scale = coll.scale
        if plan["path"] == "3x3":  # one scale per kernel, in the weights' dtype
            s = _kernel_scales(coll, x2d.dtype)
        elif scale is None:
            s = _DUMMY_F64
        else:
            s = coll.elem_scale("cpu", scale.dtype).reshape(-1).numpy()
        use_mom = m2d is not None
        m2d = m2d if use_mom else x2d
        self.numel = x2d.size
        kpr, scaled = coll.kernels_per_row, scale is not None
        c_old, c_new = (0.0, 1.0) if first else (momentum, 1.0 - dampening)
        a_r, a_b = (1.0, momentum) if nesterov else (0.0, 1.0)
        sign = -1.0 if maximize else 1.0
        if plan["path"] in ("3x3", "columns"):
            self._init_in_order(
                _fused3x3 if plan["path"] == "3x3" else _fused_columns,
                coll,
                plan,
                x2d,
                g2d,
                m2d,
                s,
                scaled,
                use_mom,
                adaptive,
                check,
                x2d.ctypes.data if key is None else key,
                state,
                hp=(
                    hyper_array(
                        x2d.dtype,
                        lr=lr,
                        c_old=c_old,
                        c_new=c_new,
                        a_r=a_r,
                        a_b=a_b,
                        weight_decay=weight_decay,
                        sign=sign,
                    )
                ),
            )
            return
        finfo = np.finfo(x2d.dtype)
        common = (
            x2d,
            g2d,
            m2d,
            s,
            kpr,
            scaled,
            plan["pom_ptr"],
            plan["pom_kernels"],
            coll.pom_ptr is None,
            plan["pom_type"],
            plan["codes"],
        )
        hyper = (
            float(lr),
            float(momentum),
            float(dampening),
            bool(nesterov),
            sign,
            float(weight_decay),
            bool(adaptive),
            use_mom,
            bool(first),
            bool(check),
            float(finfo.eps),
            float(finfo.tiny),
        )
        if plan["path"] == "soa":
            chunk, args = _soa_chunk, (*common, plan["blocks"], plan["cap"])
        else:
            chunk, args = _aos_chunk, common
        args = (*args, plan["geo"], *hyper)
        self.phases = [(lambda c, parts: int(chunk(c, *args, parts)), True)]

    def _init_in_order(
        self, module, coll, plan, x, g, m, s, scaled, use_mom, adaptive, check, key, state, hp
    ):
        """Phases of the paths in memory order (``_fused3x3``, ``_fused_columns``): those of
        the parameter's ``_InOrder``, built once per parameter (``key``: its address; several
        parameters may share a collection) and bound to this step's arrays."""
        per_param = plan.setdefault("reuse", {})
        layer = per_param.get(key)
        if layer is None or layer.dtype != x.dtype:
            layer = per_param[key] = _InOrder(module, coll, plan, x.dtype, len(hp))
            while len(per_param) > _REUSE_MAX:  # parameters that moved: the oldest go
                del per_param[next(iter(per_param))]
        self.phases = layer.bind(x, g, m, s, scaled, use_mom, adaptive, check, hp, state)
        self.team = layer.team
        self.team_phase = layer.team_phase
        self.prepare = layer.prepare
        self.release = layer.release

    #: ``(path, kernel index dtype name)`` where the layer may run on torch's OpenMP team.
    team: tuple[str, str] | None = None

    def prepare(self, parts: int) -> None:
        """Called by ``run_jobs`` with the number of pieces of a split phase."""

    def release(self) -> None:
        """Called by ``run_jobs`` when the step is over (also after an error)."""


class _InOrder:
    """One parameter on a memory-order path (``_fused3x3``, ``_fused_columns``): its arrays
    reused from step to step (a team descriptor points at them: the factors per POM, the POMs
    that need exact norms, the hyper-parameters, the per-piece POM sums) and its phases, built
    once; ``bind`` attaches a step's arrays and returns the phases of that step.

    Eq. (7) couples the kernels of a POM. A cheap pass bounds every POM's gradient norm (|g| in
    unit coordinates); where the bound proves the factor is 1 (almost always with real
    gradients) or the POM is Euclidean, the factor is settled, and only the other POMs need the
    exact norms of ``pass1`` before the update. Where the bounds settled less than half of the
    POMs, the next ``EXACT_STEPS`` steps skip them and compute every norm exactly; the results
    are the same either way (up to the last bits). The count of those steps is kept in the
    parameter's optimizer state (``EXACT_STATE``), so that a resumed run takes the same path.
    """

    def __init__(self, module, coll, plan, dtype, hp_len):
        self.module, self.dtype = module, dtype
        self.num_k, self.kpr, self.num_poms = coll.num_kernels, coll.kernels_per_row, coll.num_poms
        self.kidx, self.tcode = plan["kidx"], plan["tcode"]
        self.own = coll.pom_ptr is None  # one kernel per POM: each its own Eq. (7) unit
        size = 1 if self.own else coll.num_poms
        self.pfac = np.ones(size, dtype)
        self.need = np.ones(size, np.uint8)
        self.hp = np.empty(hp_len, dtype)
        self.align = TILE if module is _fused3x3 else 16  # the tiles of the 3x3 buffers
        path = "3x3" if module is _fused3x3 else "columns"
        self.team = (path, self.kidx.dtype.name) if dtype == np.float32 else None
        self.counter: dict = {}  # the exact-norm step count where no optimizer state is given
        self.sums: dict = {}  # per-piece rows of POM sums, "bounds" and "exact"
        self.desc = None  # the team descriptor, built on first use
        self.marked = 0
        self.phases_update = [(self.update, True, None, TEAM_UPDATE)]
        self.phases_exact = [
            (self.norms, True, self.active, TEAM_NORMS),
            (self.factors, False, self.active),
            (self.update_only, True, None, TEAM_UPDATE),
        ]
        self.phases_bounds = [
            (self.bounds, True, None, TEAM_BOUNDS),
            (self.decide, False),
            *self.phases_exact,
        ]

    def bind(self, x, g, m, s, scaled, use_mom, adaptive, check, hp, state):
        """This step's arrays and settings; returns this step's phases."""
        self.x, self.g, self.m, self.s = x, g, m, s
        self.scaled, self.adaptive, self.check = scaled, adaptive, check
        self.hp[:] = hp
        self.flags = (
            scaled * FLAG_SCALED
            + self.own * FLAG_OWN
            + adaptive * FLAG_ADAPTIVE
            + use_mom * FLAG_USE_MOM
            + check * FLAG_CHECK
        )
        self.refreshed = False
        self.coupled = not self.own and (adaptive or check)
        if not self.coupled:
            self.pfac.fill(1)
            return self.phases_update
        counter = self.counter if state is None else state
        self.use_bounds = counter.get(EXACT_STATE, 0) == 0
        if not self.use_bounds:
            counter[EXACT_STATE] -= 1
        self.step_counter = counter
        self.need[:] = 0 if self.use_bounds else 1
        self.marked = 0 if self.use_bounds else self.num_poms
        return self.phases_bounds if self.use_bounds else self.phases_exact

    def release(self) -> None:
        """Drops this step's arrays. Holding on to the gradient would keep every layer's
        ``.grad`` alive after ``zero_grad(set_to_none=True)``: the next backward would then
        allocate all of them afresh, and fault in their pages (measured on resnet50: about 5,000
        page faults and 10 ms per backward). The team descriptor forgets their addresses."""
        self.x = self.g = self.m = self.s = None
        if self.desc is not None:
            from . import _team

            _team.clear(self.desc)

    def prepare(self, parts: int) -> None:
        """Zeroed rows of POM sums for ``parts`` pieces (kept from step to step)."""
        if self.coupled:
            name = "bounds" if self.use_bounds else "exact"
            self.sums[name] = _zeroed(self.sums.get(name), (parts, self.num_poms))

    def factors_are_one(self) -> bool:
        """Whether every POM's factor is 1 (the update then reads none)."""
        return not self.coupled or _fused3x3.all_one(self.pfac)

    def team_phase(self, kind, threads):
        """This layer's part of a team call for phase ``kind`` (``_team``): the descriptor and
        a function that returns the skipped count once the call is done."""
        team = _team_module()
        if self.desc is None:
            self.desc = team.describe(
                **dict(k=self.num_k, n=self.x.shape[1], kpr=self.kpr, align=self.align),
                **dict(kidx=self.kidx, tcode=self.tcode, pfac=self.pfac, need=self.need),
                hp=self.hp,
            )
        if not self.refreshed:  # once a step: what may change from step to step
            team.refresh(self.desc, self.flags, self.x, self.g, self.m, self.s)
            self.refreshed = True
        r2 = self.sums.get("bounds" if kind == team.BOUNDS else "exact", _NO_SUMS)
        out = np.zeros(threads, np.int64)
        unit = kind == team.UPDATE and self.factors_are_one()
        desc = team.phase(self.desc, kind, r2, out, FLAG_UNIT if unit else 0)
        counted = not self.coupled and kind == team.UPDATE

        def skipped():
            return int(out.sum()) if counted else 0

        return desc, skipped

    def update(self, c, parts):
        k0, k1 = _bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.m, self.s, self.kpr, self.kidx, self.tcode, self.pfac)
        flags = self.flags | (FLAG_UNIT if self.factors_are_one() else 0)
        skipped = self.module.pass2(*args, k0, k1, self.hp, flags)
        return 0 if self.coupled else skipped  # coupled: counted per POM by ``factors``

    def bounds(self, c, parts):
        k0, k1 = _bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.s, self.kpr, self.scaled, self.kidx, self.tcode)
        self.module.bounds(*args, k0, k1, self.hp, self.sums["bounds"][c])
        return 0

    def decide(self, c, parts):
        self.marked, skipped = _fused3x3.decide(
            self.sums["bounds"], self.tcode, self.adaptive, self.check, self.pfac, self.need
        )
        if 2 * self.marked > self.num_poms:
            self.step_counter[EXACT_STATE] = EXACT_STEPS
        if self.marked:
            self.sums["exact"] = _zeroed(self.sums.get("exact"), self.sums["bounds"].shape)
        return skipped

    def norms(self, c, parts):
        k0, k1 = _bounds(self.num_k, c, parts, self.align)
        args = (self.x, self.g, self.s, self.kpr, self.scaled, self.kidx, self.tcode, self.need)
        self.module.pass1(*args, k0, k1, self.hp, self.sums["exact"][c])
        return 0

    def factors(self, c, parts):
        return _fused3x3.pom_factors(
            self.sums["exact"], self.adaptive, self.check, self.pfac, self.need
        )

    def update_only(self, c, parts):
        self.update(c, parts)
        return 0  # skipped POMs were counted by ``decide`` and ``factors``

    def active(self):
        return self.marked > 0


def _zeroed(array, shape):
    """``array`` filled with zeros if it has ``shape``, else a new zero array."""
    if array is None or array.shape != shape:
        return np.zeros(shape)
    array.fill(0)
    return array


def run_jobs(jobs: list[FusedJob], threads: int | None = None) -> int:
    """Run the fused steps of ``jobs`` together; returns the number of skipped POMs.

    Phase by phase: large float32 layers of the memory-order paths run their split phases on
    torch's own OpenMP team (``_team``: one call per layer, every thread a share), where torch
    runs on GNU OpenMP; everything else is cut into pieces of about ``PIECE_NUMEL`` entries
    (a small layer is one piece), largest first, that threads of our own pull from a queue.
    Pulling matters there: after each parallel torch op, torch's OpenMP workers keep spinning
    on their cores for milliseconds, and a thread sharing a core with one runs at half speed.
    """
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    try:
        team = _team_module() if threads > 1 else None
        for job in jobs:
            job.on_team = (
                team is not None
                and job.team is not None
                and job.numel >= TEAM_MIN_NUMEL
                and _team_has(team, job.team)
            )
            if job.on_team:
                job.parts = threads
                job.team_key = job.team
            else:
                job.parts = max(1, job.numel // PIECE_NUMEL) if threads > 1 else 1
            job.prepare(job.parts)
        skipped = 0
        for phase in range(max((len(j.phases) for j in jobs), default=0)):
            pieces, on_team = [], {}
            for job in jobs:
                if phase >= len(job.phases):
                    continue
                fn, split, *rest = job.phases[phase]
                active = rest[0] if rest else None
                if active is not None and not active():
                    continue  # nothing to do in this phase (decided by an earlier one)
                if split and job.on_team:
                    on_team.setdefault(job.team_key, []).append((job, fn, rest[1]))
                    continue
                parts = job.parts if split else 1
                pieces += [(job.numel // parts, fn, c, parts) for c in range(parts)]
            for key, members in on_team.items():  # one team call per path and index type
                count = None if team is None else _run_on_team(team, key, members, threads)
                if count is None:  # the team failed before it ran: these go to the pool
                    team = None
                    for job, fn, _ in members:
                        pieces += [
                            (job.numel // job.parts, fn, c, job.parts) for c in range(job.parts)
                        ]
                    for job in jobs:
                        job.on_team = False
                else:
                    skipped += count
            pieces.sort(key=lambda piece: -piece[0])
            queue = iter(pieces)
            lock = threading.Lock()

            def worker(queue=queue, lock=lock) -> int:
                total = 0
                while True:
                    with lock:
                        piece = next(queue, None)
                    if piece is None:
                        return total
                    _, fn, c, parts = piece
                    total += int(fn(c, parts))

            if pieces:
                skipped += sum(_parallel([worker] * min(threads, len(pieces))))
        return skipped
    finally:  # the jobs must not keep this step's arrays (gradients) alive
        for job in jobs:
            job.release()


def _run_on_team(team, key, members, threads) -> int | None:
    """One team call for the split phase of the jobs in ``members`` (``(job, fn, kind)``, all
    of one ``key``); the number of skipped POMs, or ``None`` where the team failed before any
    work was done (then it is off for the rest of the process, with one warning)."""
    try:
        parts = [job.team_phase(kind, threads) for job, _, kind in members]
        team.run(*key, [desc for desc, _ in parts], threads)
    except Exception as exc:  # only speed is at stake: the thread pool remains
        _team_off(exc)
        return None
    return sum(count() for _, count in parts)


_TEAM: list = []
_TEAM_FAILED: set = set()
_TEAM_WARNED: list = []


def _team_module():
    """``_team`` where torch runs on GNU OpenMP, else ``None`` (checked once per process)."""
    if not _TEAM:
        try:
            from . import _team

            _TEAM.append(_team if _team.load() else None)
        except Exception as exc:  # only speed is at stake: the thread pool remains
            _TEAM.append(None)
            _team_warning(exc)
    return _TEAM[0]


def _team_has(team, key) -> bool:
    """Whether the team runs layers of ``key``: its entry point compiles (on first use)."""
    if key not in team.KEYS or key in _TEAM_FAILED:
        return False
    try:
        team.entry(key)
    except Exception as exc:  # only speed is at stake: the thread pool remains
        _TEAM_FAILED.add(key)
        _team_warning(exc)
        return False
    return True


def _team_off(exc: Exception) -> None:
    """The team failed to run: off for the rest of the process, with one warning."""
    global _TEAM
    _TEAM = [None]
    _team_warning(exc)


def _team_warning(exc: Exception) -> None:
    """One warning per process, whatever failed (finding, compiling or calling the team)."""
    if _TEAM_WARNED:
        return
    _TEAM_WARNED.append(exc)
    warnings.warn(
        f"fgo_geoopt: the fused step cannot use torch's OpenMP threads ({exc!r}); "
        "it runs on its own thread pool (FGO_DISABLE_OMP_TEAM=1 silences this)",
        RuntimeWarning,
        stacklevel=4,
    )


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads. The parent's pool looks idle there (its
    workers released their semaphore before the fork), so it would start no worker and
    ``_parallel`` would wait forever: the child makes its own on first use. GNU OpenMP cannot
    run a team in the child of a process that ran one either (``GOMP_parallel`` waits forever,
    as torch's own parallel ops do there): the child's split phases take the pool instead."""
    global _POOL, _TEAM
    _POOL = None  # dropped, not shut down: shutting down would join threads that do not exist
    _TEAM = [None]


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)


def buffer_layout(coll) -> int | None:
    """Layout the fused step keeps the momentum buffer of ``coll`` in: the tile size for 3x3
    kernels (see ``_layout.to_tiles``), ``None`` for the plain ``(K, n)`` layout."""
    return TILE if AVAILABLE and coll.kernel_shape == (3, 3) else None


def fused_supported(coll) -> bool:
    """True when every manifold of the collection has a fused implementation."""
    # A subclass that overrides the maths without declaring its own code must not be fused.
    ok = coll._cache.get("fused_ok")
    if ok is None:  # the manifolds of a collection are fixed: decide once
        ok = coll._cache["fused_ok"] = all(
            type(m).__dict__.get("fused_code") is not None for m in coll.manifolds
        )
    return AVAILABLE and ok
