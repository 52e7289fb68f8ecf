"""Fused CPU step for one-column kernels: the filter view of 1x1 convs and linear layers.

A kernel is one contiguous column (an output filter), on which the sphere, the oblique manifold
and Stiefel coincide: project out the component along the column, normalise it. Kernels are
visited in memory order with loops over their entries that the compiler vectorises, so the work
splits evenly between threads whatever the POM sizes. The passes match ``_tiles3x3``: squared
gradient norms summed per POM (``pass1``), the Eq. (7) factors (``_factors.pom_factors``) and
the update (``pass2``), or the update alone when every POM holds one kernel. Tests keep this
path equal to ``reference.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._flags import (
    _A_B,
    _A_R,
    _C_NEW,
    _C_OLD,
    _LR,
    _ONE,
    _SIGN,
    _TINY2,
    _TWO,
    _WD,
    _ZERO,
    EUCLIDEAN,
    FLAG_ADAPTIVE,
    FLAG_CHECK,
    FLAG_OWN,
    FLAG_SCALED,
    FLAG_UNIT,
    FLAG_USE_MOM,
    _inline,
    _jit_fm,
)

__all__ = ["bounds", "pass1", "pass2"]


@njit(**_inline)
def _dot(x, g):
    a = x[0] - x[0]
    for j in range(x.shape[0]):
        a += x[j] * g[j]
    return a


@njit(**_inline)
def _sqnorm(x, g, s, sc, eu, sign, wd, a):
    """``|rgrad|^2`` of one column; ``a`` is ``sign * <x, g>`` (scales cancel in it)."""
    n = x.shape[0]
    tot = x[0] - x[0]
    if eu:
        for j in range(n):
            v = sign * g[j] + wd * x[j]
            tot += v * v
    elif sc:
        for j in range(n):
            v = sign * g[j] * s[j] - a * (x[j] / s[j])
            tot += v * v
    else:
        for j in range(n):
            v = sign * g[j] - a * x[j]
            tot += v * v
    return tot


@njit(**_jit_fm)
def bounds(x, g, s, kpr, scaled, kidx, tcode, k0, k1, hp, r2):
    """Upper bounds of the squared Riemannian gradient norms of the kernels in ``[k0, k1)``,
    summed per POM into ``r2``: ``|g|^2`` in unit coordinates (a tangent projection never
    lengthens a vector), exact for Euclidean kernels (``|g + wd x|^2``, no projection).

    Only Euclidean kernels under weight decay read ``x``: the pass costs one read of ``g``."""
    n = x.shape[1]
    wd = hp[_SIGN] * hp[_WD]  # (sign g + wd x)^2 == (g + sign wd x)^2
    for k in range(k0, k1):
        p = kidx[k]
        eu = tcode[p] == EUCLIDEAN
        t = hp[_ZERO]
        if scaled and not eu:
            off = (k % kpr) * n
            for j in range(n):
                v = g[k, j] * s[off + j]
                t += v * v
        elif eu and wd != 0:
            for j in range(n):
                v = g[k, j] + wd * x[k, j]
                t += v * v
        else:
            for j in range(n):
                t += g[k, j] * g[k, j]
        r2[p] += t


@njit(**_jit_fm)
def pass1(x, g, s, kpr, scaled, kidx, tcode, need, k0, k1, hp, r2):
    """Squared Riemannian gradient norms of the kernels in ``[k0, k1)`` whose POM is marked
    in ``need``, summed per POM."""
    sign, wd, n = hp[_SIGN], hp[_WD], x.shape[1]
    for k in range(k0, k1):
        if not need[kidx[k]]:
            continue
        eu = tcode[kidx[k]] == EUCLIDEAN
        sc = scaled and not eu
        sk = s[(k % kpr) * n : (k % kpr + 1) * n] if sc else s
        a = sign * _dot(x[k], g[k])
        r2[kidx[k]] += _sqnorm(x[k], g[k], sk, sc, eu, sign, wd, a)


@njit(**_inline)
def _step(x, g, m, s, sc, eu, f, a, hp, use_mom):
    """Momentum and step in unit coordinates, in place. Returns ``|y|^2`` and ``<y, b>`` of
    the moved column ``y`` and the new buffer ``b`` (the transport needs ``<y / |y|, b>``).

    The branches are hoisted out of the loops, which then vectorise.
    """
    n = x.shape[0]
    lr, c_old, c_new, a_r, a_b = hp[_LR], hp[_C_OLD], hp[_C_NEW], hp[_A_R], hp[_A_B]
    sign, wd = hp[_SIGN], hp[_WD]
    nrm, yb = hp[_ZERO], hp[_ZERO]
    if eu and use_mom:
        for j in range(n):
            r = f * (sign * g[j] + wd * x[j])
            b = c_old * m[j] + c_new * r
            m[j] = b
            x[j] = x[j] - lr * (a_r * r + a_b * b)
    elif eu:
        for j in range(n):
            x[j] = x[j] - lr * f * (sign * g[j] + wd * x[j])
    elif sc and use_mom:
        for j in range(n):
            xu = x[j] / s[j]
            r = f * (sign * g[j] * s[j] - a * xu)
            b = c_old * m[j] + c_new * r
            m[j] = b
            y = xu - lr * (a_r * r + a_b * b)
            x[j] = y
            nrm += y * y
            yb += y * b
    elif sc:
        for j in range(n):
            xu = x[j] / s[j]
            y = xu - lr * f * (sign * g[j] * s[j] - a * xu)
            x[j] = y
            nrm += y * y
    elif use_mom:
        for j in range(n):
            r = f * (sign * g[j] - a * x[j])
            b = c_old * m[j] + c_new * r
            m[j] = b
            y = x[j] - lr * (a_r * r + a_b * b)
            x[j] = y
            nrm += y * y
            yb += y * b
    else:
        for j in range(n):
            y = x[j] - lr * f * (sign * g[j] - a * x[j])
            x[j] = y
            nrm += y * y
    return nrm, yb


@njit(**_inline)
def _update(x, g, m, s, sc, eu, f, a, hp, use_mom):
    """Momentum, step, normalisation and transport of one column in place (factor ``f``)."""
    nrm, yb = _step(x, g, m, s, sc, eu, f, a, hp, use_mom)
    if eu:
        return
    n = x.shape[0]
    one = hp[_ONE]
    if nrm > hp[_TINY2]:
        inv = one / np.sqrt(nrm)
        a2 = yb * inv  # <x_new, b>
        # one loop: normalise, transport (project the buffer), re-apply the scales
        if use_mom and sc:
            for j in range(n):
                v = x[j] * inv
                m[j] -= a2 * v
                x[j] = v * s[j]
        elif use_mom:
            for j in range(n):
                v = x[j] * inv
                m[j] -= a2 * v
                x[j] = v
        elif sc:
            for j in range(n):
                x[j] = x[j] * inv * s[j]
        else:
            for j in range(n):
                x[j] *= inv
        return
    # degenerate: the constant unit column
    size = np.empty(1, x.dtype)
    size[0] = n
    fill = one / np.sqrt(size[0])
    for j in range(n):
        x[j] = fill
    if use_mom:
        a2 = _dot(x, m)
        for j in range(n):
            m[j] -= a2 * x[j]
    if sc:
        for j in range(n):
            x[j] *= s[j]


@njit(**_jit_fm)
def pass2(x, g, m, s, kpr, kidx, tcode, pfac, k0, k1, hp, flags):
    """The update of the kernels in ``[k0, k1)``; returns the number of skipped kernels.
    ``flags``: ``_flags.FLAG_*`` bits, as ``_tiles3x3.pass2``."""
    scaled, own = flags & FLAG_SCALED != 0, flags & FLAG_OWN != 0
    adaptive, check = flags & FLAG_ADAPTIVE != 0, flags & FLAG_CHECK != 0
    use_mom, unit = flags & FLAG_USE_MOM != 0, flags & FLAG_UNIT != 0
    sign, wd, one, two, n = hp[_SIGN], hp[_WD], hp[_ONE], hp[_TWO], x.shape[1]
    skipped = 0
    for k in range(k0, k1):
        eu = tcode[kidx[k]] == EUCLIDEAN
        sc = scaled and not eu
        sk = s[(k % kpr) * n : (k % kpr + 1) * n] if sc else s  # per-entry scales of the kernel
        a = sign * _dot(x[k], g[k])
        if own:
            sq = _sqnorm(x[k], g[k], sk, sc, eu, sign, wd, a)
            big_r = np.sqrt(sq)
            tau = big_r * (two + big_r)  # Eq. (7), Ozay 2019
            f = one / tau if adaptive and tau > one else one
            if check and not np.isfinite(sq):
                f = -one
        else:
            f = one if unit else pfac[kidx[k]]
        if f < 0:  # skipped: weights and buffer unchanged
            skipped += 1
            continue
        _update(x[k], g[k], m[k], sk, sc, eu, f, a, hp, use_mom)
    return skipped
