"""Eq. (7) per POM from the per-piece sums of squared gradient norms (both memory-order paths).

``decide`` settles what the gradient bounds prove (Euclidean POMs exactly, and every POM whose
bound shows that Eq. (7) cannot shrink its step) and marks the rest for exact norms;
``pom_factors`` turns those exact norms into factors.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._flags import EUCLIDEAN, _jit

__all__ = ["CERTAIN", "all_one", "decide", "pom_factors"]


@njit(**_jit)
def all_one(pfac):
    """Whether every factor in ``pfac`` is 1."""
    return np.all(pfac == 1)


@njit(**_jit)
def pom_factors(partials, adaptive, check, out, need):
    """Eq. (7) factor ``1 / tau`` of the POMs marked in ``need`` from the per-piece sums of
    ``pass1`` into ``out`` (``-1``: a non-finite norm, the POM is skipped); returns the
    skipped count."""
    skipped = 0
    for p in range(partials.shape[1]):
        if not need[p]:
            continue
        r2 = 0.0
        for c in range(partials.shape[0]):
            r2 += partials[c, p]
        factor, skip = _factor(r2, adaptive, check)
        out[p] = factor
        skipped += skip
    return skipped


@njit(**_jit)
def _factor(r2, adaptive, check):
    """Eq. (7), Ozay 2019: ``1 / tau`` with ``tau = max(1, R (2 + R))``; ``-1`` to skip."""
    if check and not math.isfinite(r2):
        return -1.0, 1
    if adaptive:
        big_r = math.sqrt(r2)
        tau = big_r * (2.0 + big_r)
        if tau > 1.0:
            return 1.0 / tau, 0
    return 1.0, 0


#: ``R^2`` below which Eq. (7) leaves the step alone, with a margin against rounding:
#: ``R (2 + R) <= 1`` for ``R^2 <= 3 - 2 sqrt(2)``.
CERTAIN = 0.9 * (3.0 - 2.0 * math.sqrt(2.0))


@njit(**_jit)
def decide(partials, tcode, adaptive, check, out, need):
    """Step factors from the per-POM sums of ``bounds``: exact for Euclidean POMs, ``1`` for
    POMs whose bound proves that Eq. (7) cannot shrink their step; the others are marked in
    ``need`` for the exact norms of ``pass1``. Returns ``(marked, skipped)``."""
    marked = skipped = 0
    for p in range(partials.shape[1]):
        r2 = 0.0
        for c in range(partials.shape[0]):
            r2 += partials[c, p]
        need[p] = 0
        if tcode[p] == EUCLIDEAN:
            factor, skip = _factor(r2, adaptive, check)
            out[p] = factor
            skipped += skip
        elif math.isfinite(r2) and (r2 <= CERTAIN or not adaptive):
            out[p] = 1.0
        else:
            need[p] = 1
            marked += 1
    return marked, skipped
