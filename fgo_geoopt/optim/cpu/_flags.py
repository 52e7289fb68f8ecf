"""The bottom of the fused CPU step: codes, flag bits, phase kinds, the hyper-parameter layout
and numba's options, shared by every module of the step. It imports none of them, so their
imports run one way: these constants and the maths (``_maths3x3``, ``_soa``) at the
bottom, the kernel paths above them, the plans, jobs and scheduling (``_plan``, ``_jobs``,
``_team``, ``_schedule``) at the top.

Importing it also puts the shared numba cache stamp in place (``_numba_cache``), before any
module of the step decorates a function.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

try:  # numba is a declared dependency, but the library keeps working without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
else:  # before any function of the step is decorated: numba picks its cache locator then
    from . import _numba_cache

    _numba_cache.install()

__all__ = [
    "AVAILABLE",
    "EUCLIDEAN",
    "FLAG_ADAPTIVE",
    "FLAG_CHECK",
    "FLAG_NO_REGISTERS",
    "FLAG_OWN",
    "FLAG_SCALED",
    "FLAG_UNIT",
    "FLAG_USE_MOM",
    "OBLIQUE",
    "SPHERE",
    "STIEFEL",
    "TEAM_BOUNDS",
    "TEAM_NORMS",
    "TEAM_UPDATE",
    "ChunkHyper",
    "ChunkLayout",
    "hyper_array",
]

#: Whether the fused step can run here (numba importable, not switched off).
AVAILABLE = numba is not None and os.environ.get("FGO_DISABLE_NUMBA", "0") != "1"

#: Manifold codes of the kernels (the plan maps each manifold of a collection to one).
SPHERE, OBLIQUE, STIEFEL, EUCLIDEAN = 0, 1, 2, 3
#: Phase kinds of the team descriptors (``_team``).
TEAM_BOUNDS, TEAM_NORMS, TEAM_UPDATE = 0, 1, 2
#: Bits of a layer's step flags, one set for the team descriptors, ``pass2`` of both memory-order
#: paths and ``_vec16.step16``: scales, one kernel per POM, Eq. (7) on, momentum, non-finite
#: steps skipped, every POM's factor 1; and the 3x3 path's register step switched off (the tile
#: code then takes every kernel: ``benchmarks/accelerations.py`` measures what registers buy).
FLAG_SCALED, FLAG_OWN, FLAG_ADAPTIVE, FLAG_USE_MOM, FLAG_CHECK, FLAG_UNIT = 1, 2, 4, 8, 16, 32
FLAG_NO_REGISTERS = 64

_jit = {"cache": True, "nogil": True, "error_model": "numpy"}
# Reassociation lets the per-kernel reductions vectorise; NaN/inf semantics stay IEEE, so the
# non-finite checks keep working.
_jit_fm = dict(_jit, fastmath={"reassoc", "contract"})
# helpers inlined: views passed to called functions cost reference counting per kernel
_inline = dict(_jit_fm, inline="always")

# Layout of the hyper-parameter array of the memory-order paths, in the parameter's dtype so
# that no float64 enters the vectorised loops.
(
    _LR,
    _C_OLD,
    _C_NEW,
    _A_R,
    _A_B,
    _WD,
    _SIGN,
    _EPS,
    _TINY,
    _ZERO,
    _HALF,
    _ONE,
    _TWO,
    _TINY2,
    _EPS16SQ,
) = range(15)
_EPS_TINY = {np.dtype(t): (float(np.finfo(t).eps), float(np.finfo(t).tiny)) for t in ("f4", "f8")}


def hyper_array(dtype, *, lr, c_old, c_new, a_r, a_b, weight_decay, sign) -> np.ndarray:
    """The step's scalars and constants; ``tiny**2`` is 0, so a zero norm is what degenerates."""
    eps, tiny = _EPS_TINY[np.dtype(dtype)]
    values = [lr, c_old, c_new, a_r, a_b, weight_decay, sign, eps, tiny, 0.0, 0.5, 1.0, 2.0]
    return np.array([*values, tiny * tiny, (16.0 * eps) ** 2], dtype=dtype)


class ChunkLayout(NamedTuple):
    """What the POM-at-a-time paths (``_soa``, ``_aos``) read of a collection's layout."""

    kpr: int  # kernels per weight row (scales repeat per row)
    scaled: bool
    pom_ptr: np.ndarray  # kernels of POM p: pom_kernels[pom_ptr[p]:pom_ptr[p + 1]]
    pom_kernels: np.ndarray
    singleton: bool  # one kernel per POM (pom_ptr / pom_kernels unused)
    pom_type: np.ndarray
    codes: np.ndarray  # manifold index -> code
    geo: np.ndarray  # per code: columns, rows and strides of the tall kernel
    blocks: np.ndarray  # ``_soa``: first POM of each block (a dummy for ``_aos``)
    cap: int  # ``_soa``: the most kernels a block holds


class ChunkHyper(NamedTuple):
    """The step's settings as the POM-at-a-time paths read them."""

    lr: float
    mu: float
    damp: float
    nesterov: bool
    sign: float  # -1 when maximising
    wd: float
    adaptive: bool
    use_mom: bool
    first: bool
    check: bool
    eps: float
    tiny: float
