"""Gradient bounds of the 3x3 path: ``|g|^2`` per kernel in unit coordinates (an upper bound of
the squared Riemannian gradient norm), summed per POM, read from 16 kernels at a time in lanes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._flags import _ONE, _SIGN, _WD, _ZERO, EUCLIDEAN, _inline, _jit_fm
from ._lanes import GROUP, to_lanes

__all__ = ["bounds"]


@njit(**_inline)
def _bound(x, g, s, kpr, scaled, eu, wd, k, zero):
    """``|g|^2`` of kernel ``k`` in unit coordinates, ``|g + wd x|^2`` if it is Euclidean."""
    t = zero
    for j in range(9):
        v = g[k, j]
        if eu:
            v = v + wd * x[k, j]
        t += v * v
    if scaled and not eu:
        t = t * (s[k % kpr] * s[k % kpr])
    return t


@njit(**_jit_fm)
def bounds(x, g, s, kpr, scaled, kidx, tcode, k0, k1, hp, r2):
    """Upper bounds of the squared Riemannian gradient norms of the kernels in ``[k0, k1)``,
    summed per POM into ``r2``, as ``_columns.bounds``: ``|g|^2`` of 16 kernels at a
    time from entry-major lanes (``_lanes``), which reads nothing but ``g``; the sums of scaled
    kernels are multiplied by their scale squared, Euclidean kernels under weight decay are
    redone one by one."""
    G = np.empty((9, GROUP), g.dtype)
    sq = np.empty(GROUP, g.dtype)
    zero, one = hp[_ZERO], hp[_ONE]
    wd = hp[_SIGN] * hp[_WD]  # (sign g + wd x)^2 == (g + sign wd x)^2
    general = scaled or wd != 0
    full = k0 + (k1 - k0) // GROUP * GROUP
    for k in range(k0, full, GROUP):
        to_lanes(g, k * 9, G, 0)
        for i in range(GROUP):
            sq[i] = (
                (G[0, i] * G[0, i] + G[1, i] * G[1, i] + G[2, i] * G[2, i])
                + (G[3, i] * G[3, i] + G[4, i] * G[4, i] + G[5, i] * G[5, i])
                + (G[6, i] * G[6, i] + G[7, i] * G[7, i] + G[8, i] * G[8, i])
            )
        c = k % kpr  # kernel k + i sits at c + i of its row (wrapped): no division per kernel
        for i in range(GROUP):
            p = kidx[k + i]
            if general:
                eu = tcode[p] == EUCLIDEAN
                if wd != 0 and eu:
                    sq[i] = _bound(x, g, s, kpr, scaled, eu, wd, k + i, zero)
                elif scaled:  # a select, not a branch on the kernel's type
                    sc = s[c]
                    sq[i] = sq[i] * (one if eu else sc * sc)
            r2[p] += sq[i]
            c += 1
            if c == kpr:
                c = 0
    for k in range(full, k1):
        p = kidx[k]
        r2[p] += _bound(x, g, s, kpr, scaled, tcode[p] == EUCLIDEAN, wd, k, zero)
