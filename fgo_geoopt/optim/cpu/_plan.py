"""What the fused step knows of a collection: which manifolds it can step, the kernel path that
suits the kernel shape, and the per-collection constants of that path, computed once.

This is the one place where manifolds meet the kernels' codes: the manifolds themselves know
nothing of this backend. A manifold class is stepped here only when it *is* one of the
built-in classes below (a subclass may change the maths, so it takes the batched torch step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...manifolds import KernelEuclidean, KernelSphere, KernelStiefel, Oblique
from ._flags import EUCLIDEAN, OBLIQUE, SPHERE, STIEFEL

__all__ = ["BLOCK_KERNELS", "CODES", "SOA_MAX_NUMEL", "Plan", "build_plan", "codes_of"]

#: The manifold classes the kernels implement, and their codes.
CODES: dict[type, int] = {
    KernelSphere: SPHERE,
    Oblique: OBLIQUE,
    KernelStiefel: STIEFEL,
    KernelEuclidean: EUCLIDEAN,
}
#: Other kernels (not 3x3, not one column) with at most this many entries take the
#: structure-of-arrays block path (``_soa``); larger ones the per-kernel loops (``_aos``).
SOA_MAX_NUMEL = 64
#: Target number of kernels in one block of the structure-of-arrays path.
BLOCK_KERNELS = 256

_DUMMY_I32 = np.zeros(1, np.int32)


def codes_of(coll: Any) -> np.ndarray | None:
    """The kernel code of each manifold of ``coll``, or ``None`` if one has none."""
    codes = [CODES.get(type(m)) for m in coll.manifolds]
    if any(c is None for c in codes):
        return None
    return np.array(codes, np.int64)


@dataclass
class Plan:
    """Per-collection constants of the fused step.

    ``path`` is ``"3x3"`` (``_tiles3x3``), ``"columns"`` (one-column kernels, ``_columns``),
    ``"soa"`` (small kernels, ``_soa``) or ``"aos"`` (large kernels, ``_aos``). ``geo`` gives,
    per code, the columns, rows and strides of a kernel seen as a tall matrix.
    """

    path: str
    codes: np.ndarray
    geo: np.ndarray
    pom_type: np.ndarray
    pom_ptr: np.ndarray
    pom_kernels: np.ndarray
    #: Memory-order paths: per kernel an index (its code, or its POM numbered in the order of
    #: the codes) and ``tcode``, the code of each index, sorted.
    kidx: np.ndarray | None = None
    tcode: np.ndarray | None = None
    #: Structure-of-arrays path: the first POM of each block, and the kernels a block holds.
    blocks: np.ndarray | None = None
    cap: int = 0
    #: Per-parameter arrays of the memory-order paths, reused from step to step (``_jobs``).
    layers: dict[int, Any] = field(default_factory=dict)


def _path(kernel_shape: tuple[int, int]) -> str:
    a, b = kernel_shape
    if (a, b) == (3, 3):
        return "3x3"
    if min(a, b) == 1:
        return "columns"
    return "soa" if a * b <= SOA_MAX_NUMEL else "aos"


def build_plan(coll: Any) -> Plan:
    """The plan of ``coll`` (whose manifolds all have codes, see ``codes_of``)."""
    a, b = coll.kernel_shape
    n = a * b
    # Column c, row r of the tall kernel sits at entry c * cst + r * est of the stored kernel.
    ncol, nrow, cst, est = (a, b, b, 1) if a < b else (b, a, 1, b)
    geo = np.empty((4, 4), np.int64)
    geo[OBLIQUE] = (ncol, nrow, cst, est)
    geo[STIEFEL] = (ncol, nrow, cst, est)
    geo[SPHERE] = (1, n, 0, 1)  # the whole kernel is one column
    geo[EUCLIDEAN] = (1, n, 0, 1)
    codes = codes_of(coll)
    pom_type = coll.pom_type.numpy()
    plan = Plan(
        path=_path(coll.kernel_shape),
        codes=codes,
        geo=geo,
        pom_type=pom_type,
        pom_ptr=_DUMMY_I32 if coll.pom_ptr is None else coll.pom_ptr.numpy(),
        pom_kernels=_DUMMY_I32 if coll.pom_kernels is None else coll.pom_kernels.numpy(),
    )
    if plan.path in ("3x3", "columns"):
        # With one kernel per POM the index is the code itself (one byte); otherwise the
        # kernel's POM (two bytes while there are at most 65,536 POMs), the POMs numbered in the
        # order of their codes. Either way ``tcode`` is sorted, so a kernel's code also follows
        # from its index and three bounds, without a lookup (``_vec16``).
        ptype = codes.astype(np.int8)[pom_type]
        if coll.pom_ptr is None:
            plan.kidx = codes.astype(np.int8)[coll.kernel_type().numpy()]
            plan.tcode = np.arange(4, dtype=np.int8)  # SPHERE, OBLIQUE, STIEFEL, EUCLIDEAN
        else:
            order = np.argsort(ptype, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            small = coll.num_poms <= 1 << 16
            kernel_pom = rank[coll.kernel_pom.numpy()]
            plan.kidx = kernel_pom.astype(np.uint16 if small else np.int32)
            plan.tcode = ptype[order]
    elif plan.path == "soa":
        sizes = coll.pom_sizes.numpy()
        # Blocks: consecutive POMs of one type, cut where the running kernel count crosses a
        # multiple of BLOCK_KERNELS (so a block holds < BLOCK_KERNELS + largest POM kernels).
        start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        cut = np.ones(len(sizes), bool)
        cut[1:] = (start[1:] // BLOCK_KERNELS != start[:-1] // BLOCK_KERNELS) | (
            pom_type[1:] != pom_type[:-1]
        )
        blocks = np.flatnonzero(cut)
        plan.blocks = np.concatenate((blocks, [len(sizes)])).astype(np.int64)
        plan.cap = int(BLOCK_KERNELS + sizes.max())
    return plan
