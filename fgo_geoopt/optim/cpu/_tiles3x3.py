"""Fused CPU step for 3x3 spatial kernels, the bulk of a ResNet's constrained weights.

Kernels are visited in memory order. The four built-in manifolds share one formulation, so
kernels of different manifolds side by side (a PIO layer) need no branches:

* the normal part of a vector ``V`` at a point ``X`` (both ``3 x 3``, ``X[r, c] = x[3 r + c]``,
  columns are the manifold's columns) is ``X N`` with ``N`` built from ``C = X^T V``:
  ``N = tr(C) I`` on the sphere, ``diag(C)`` on the oblique manifold, ``sym(C)`` on Stiefel and
  ``0`` in Euclidean space; the tangent projection is ``V - X N``;
* the retraction scales the columns: by one norm on the sphere, by their own norms on the
  oblique manifold, and after two Gram-Schmidt passes (CGS2, the projections masked to zero on
  the other manifolds) on Stiefel.

The lane helpers of ``_maths3x3`` write this once, for one kernel; they branch only through
``_where``, ``_and`` and ``_not``. The update (``pass2``) runs them two ways: 16 kernels at a
time in vector registers (``_vec16`` evaluates the same helpers on vectors of 16 lanes), and
through tiles of
``TILE`` kernels transposed into entry-major buffers (``_tile_part``, loops over the kernels of
the tile that the compiler vectorises) for what the registers do not: steps without momentum,
leftover kernels, groups of scaled kernels that straddle two rows, and groups with a degenerate
retraction (a zero column, redone with the general code of ``_soa``) or a skipped kernel.

Scales (the re-scaling reparameterization) are per input channel, so one number per 3x3
kernel: the functions here take them as ``s``, the scale of each kernel of a weight row
(``kernels_per_row`` entries, the parameter's dtype; kernel ``k`` has ``s[k % kpr]``).

Eq. (7) couples the kernels of a POM, so a layer whose POMs hold several kernels takes more
passes: gradient bounds per POM (``_bounds3x3.bounds``), a decision (``_factors.decide``), exact
squared norms where the bound does not settle the factor (``pass1``, ``_factors.pom_factors``),
and the update. One-kernel
POMs fold all of it into ``pass2``. Tests keep this path equal to ``reference.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._flags import (
    _A_B,
    _A_R,
    _C_NEW,
    _C_OLD,
    _EPS,
    _EPS16SQ,
    _HALF,
    _LR,
    _ONE,
    _SIGN,
    _TINY,
    _TINY2,
    _TWO,
    _WD,
    _ZERO,
    EUCLIDEAN,
    FLAG_ADAPTIVE,
    FLAG_CHECK,
    FLAG_NO_REGISTERS,
    FLAG_OWN,
    FLAG_SCALED,
    FLAG_UNIT,
    FLAG_USE_MOM,
    SPHERE,
    STIEFEL,
    _inline,
    _jit,
    _jit_fm,
)
from ._lanes import GROUP, from_lanes, prefetch, to_lanes
from ._layout import TILE
from ._maths3x3 import (
    _move,
    _own_factor,
    _retract,
    _rgrad,
    _scale9,
    _sqnorm,
    _transport,
)
from ._soa import _soa_gram_schmidt, _soa_normalize_columns, _soa_project, _soa_rgrad
from ._vec16 import step16

__all__ = [
    "pass1",
    "pass2",
    "tile_buffers",
]


@njit(**_jit)
def _load_tile(x, g, s, kpr, scaled, kidx, tcode, t0, nt, sign, X, G, typ):
    """Unit coordinates of ``nt`` kernels from ``t0`` into the entry-major buffers.

    Whole groups of ``GROUP`` kernels through ``_lanes``, the rest and the rare scales after.
    """
    full = nt - nt % GROUP
    for c in range(0, full, GROUP):
        to_lanes(x, (t0 + c) * 9, X, c)
        to_lanes(g, (t0 + c) * 9, G, c)
    for i in range(full, nt):
        for j in range(9):
            X[j, i] = x[t0 + i, j]
            G[j, i] = g[t0 + i, j]
    if sign != 1:
        for j in range(9):
            for i in range(nt):
                G[j, i] = sign * G[j, i]
    for i in range(nt):
        typ[i] = tcode[kidx[t0 + i]]
    if scaled:
        for i in range(nt):
            if typ[i] != EUCLIDEAN:
                sc = s[(t0 + i) % kpr]
                for j in range(9):
                    X[j, i] = X[j, i] / sc
                    G[j, i] = G[j, i] * sc


@njit(**_jit)
def _store_tile(XO, x, t0, nt):
    """The kernels of the entry-major buffer ``XO`` back to ``x`` (inverse of the load)."""
    full = nt - nt % GROUP
    for c in range(0, full, GROUP):
        from_lanes(XO, c, x, (t0 + c) * 9)
    for i in range(full, nt):
        for j in range(9):
            x[t0 + i, j] = XO[j, i]


@njit(**_inline)
def _lane(B, i):
    return (B[0, i], B[1, i], B[2, i], B[3, i], B[4, i], B[5, i], B[6, i], B[7, i], B[8, i])


@njit(**_inline)
def _store(B, i, v):
    # constant indices: a loop over a tuple would keep it in memory and stop vectorisation
    B[0, i], B[1, i], B[2, i], B[3, i], B[4, i] = v[0], v[1], v[2], v[3], v[4]
    B[5, i], B[6, i], B[7, i], B[8, i] = v[5], v[6], v[7], v[8]


@njit(**_jit_fm)
def pass1(x, g, s, kpr, scaled, kidx, tcode, need, k0, k1, hp, r2):
    """Squared Riemannian gradient norms of the kernels in ``[k0, k1)`` whose POM is marked
    in ``need``, summed per POM (``kidx``) into ``r2``."""
    dt = x.dtype
    X = np.empty((9, TILE), dt)
    G = np.empty((9, TILE), dt)
    typ = np.empty(TILE, np.int8)
    sq = np.empty(TILE, dt)
    lanes = np.empty(TILE, np.int64)
    wd, sign, zero, half = hp[_WD], hp[_SIGN], hp[_ZERO], hp[_HALF]
    for t0 in range(k0, k1, TILE):
        size, nt = min(TILE, k1 - t0), 0
        for k in range(t0, t0 + size):
            if need[kidx[k]]:
                lanes[nt] = k
                nt += 1
        if nt == 0:
            continue
        if nt == size:  # the whole tile: contiguous copies
            _load_tile(x, g, s, kpr, scaled, kidx, tcode, t0, nt, sign, X, G, typ)
        else:  # the kernels of marked POMs only
            for i in range(nt):
                for j in range(9):
                    X[j, i] = x[lanes[i], j]
            for i in range(nt):
                for j in range(9):
                    G[j, i] = sign * g[lanes[i], j]
            for i in range(nt):
                typ[i] = tcode[kidx[lanes[i]]]
                if scaled and typ[i] != EUCLIDEAN:
                    sc = s[lanes[i] % kpr]
                    for j in range(9):
                        X[j, i] = X[j, i] / sc
                        G[j, i] = G[j, i] * sc
        for i in range(nt):
            r = _rgrad(typ[i], zero, half, wd, _lane(X, i), _lane(G, i))
            sq[i] = _sqnorm(r)
        for i in range(nt):
            r2[kidx[lanes[i]]] += sq[i]


@njit(**_jit)
def _redo_lane(i, code, X, G, M, XO, MO, factor, hp, use_mom):
    """One kernel with the general structure-of-arrays code (degenerate retractions)."""
    dt = X.dtype
    X1 = X[:, i : i + 1].copy()
    R1 = np.empty((9, 1), dt)
    M1 = M[:, i : i + 1].copy()
    C1 = np.empty((9, 1), dt)
    sq = np.empty(1, np.float64)
    ncol, nrow, cst, est = (1, 9, 0, 1) if code == SPHERE else (3, 3, 1, 3)
    _soa_rgrad(code, X1, G[:, i : i + 1].copy(), R1, C1, sq, 1, ncol, nrow, cst, est)
    for j in range(9):
        r = R1[j, 0] * factor
        if use_mom:
            b = hp[_C_OLD] * M1[j, 0] + hp[_C_NEW] * r
            M1[j, 0] = b
            X1[j, 0] = X1[j, 0] - hp[_LR] * (hp[_A_R] * r + hp[_A_B] * b)
        else:
            X1[j, 0] = X1[j, 0] - hp[_LR] * r
    if code == STIEFEL:
        _soa_gram_schmidt(X1, C1, 1, ncol, nrow, cst, est, hp[_EPS])
    else:
        _soa_normalize_columns(X1, C1, 1, ncol, nrow, cst, est, hp[_TINY])
    if use_mom:
        _soa_project(code, X1, M1, M1, C1, 1, ncol, nrow, cst, est)
    for j in range(9):
        XO[j, i] = X1[j, 0]
        MO[j, i] = M1[j, 0]


@njit(**_jit, inline="always")
def tile_buffers(x):
    """The buffers of ``_tile_part`` for kernels like ``x``'s: entry-major ``X``, ``G``,
    ``M``, ``XO``, ``MO``, and per kernel its code, factor and whether it degenerated.

    Inlined, like ``_tile_part``: the compiler then sees that these arrays are fresh and
    overlap neither each other nor the arguments, and vectorises the tile loops. Passed in
    from a caller it could not see that, and the loops ran scalar: the tile code took 9.5
    instead of 1.5 ns per entry."""
    dt = x.dtype
    return (
        np.empty((9, TILE), dt),
        np.empty((9, TILE), dt),
        np.empty((9, TILE), dt),
        np.empty((9, TILE), dt),
        np.empty((9, TILE), dt),
        np.empty(TILE, np.int8),
        np.empty(TILE, dt),
        np.empty(TILE, np.bool_),
    )


@njit(**_inline)
def _tile_part(x, g, mf, s, kpr, kidx, tcode, pfac, t0, nt, c0, cnt, hp, flags, bufs):
    """The update of the kernels ``[t0 + c0, t0 + c0 + cnt)`` of the tile ``[t0, t0 + nt)``
    through the entry-major buffers ``bufs``; returns the number of skipped kernels.

    Every case: scaled kernels, no momentum, degenerate retractions (redone by the general
    code), skipped kernels and POMs (left as they were, bit for bit).
    """
    X, G, M, XO, MO, typ, fac, bad = bufs
    scaled, own = flags & FLAG_SCALED != 0, flags & FLAG_OWN != 0
    adaptive, check = flags & FLAG_ADAPTIVE != 0, flags & FLAG_CHECK != 0
    use_mom = flags & FLAG_USE_MOM != 0
    lr, c_old, c_new, a_r, a_b = hp[_LR], hp[_C_OLD], hp[_C_NEW], hp[_A_R], hp[_A_B]
    wd, sign, zero, half, one, two = hp[_WD], hp[_SIGN], hp[_ZERO], hp[_HALF], hp[_ONE], hp[_TWO]
    tiny2, eps16sq = hp[_TINY2], hp[_EPS16SQ]
    k0 = t0 + c0
    _load_tile(x, g, s, kpr, scaled, kidx, tcode, k0, cnt, sign, X, G, typ)
    # the buffer is tile-major: row j of this tile's (9, nt) block starts at t0 * 9 + j * nt
    base = t0 * 9 + c0
    if use_mom:
        for j in range(9):
            for i in range(cnt):
                M[j, i] = mf[base + j * nt + i]
    if not own:
        for i in range(cnt):
            fac[i] = pfac[kidx[k0 + i]]
    for i in range(cnt):
        tp = typ[i]
        xi = _lane(X, i)
        r = _rgrad(tp, zero, half, wd, xi, _lane(G, i))
        if own:
            fac[i] = _own_factor(_sqnorm(r), adaptive, check, one, two)
        r = _scale9(fac[i], r)
        if use_mom:
            y, b = _move(xi, r, _lane(M, i), (lr, c_old, c_new, a_r, a_b))
        else:
            b = r
            y = _move(xi, r, r, (lr, zero, zero, one, zero))[0]  # x - lr r
        _store(XO, i, y)
        if use_mom:
            _store(MO, i, b)
    # second loop (fewer live values): retraction and transport
    for i in range(cnt):
        tp = typ[i]
        xn, bad[i] = _retract(tp, zero, one, tiny2, eps16sq, _lane(XO, i))
        _store(XO, i, xn)
        if use_mom:  # transport: project the buffer onto the new tangent space
            _store(MO, i, _transport(tp, zero, half, xn, _lane(MO, i)))
    for i in range(cnt):
        if bad[i] and fac[i] >= 0:
            _redo_lane(i, typ[i], X, G, M, XO, MO, fac[i], hp, use_mom)
    if scaled:
        for i in range(cnt):
            if typ[i] != EUCLIDEAN:
                sc = s[(k0 + i) % kpr]
                for j in range(9):
                    XO[j, i] = XO[j, i] * sc
    skipped = 0
    for i in range(cnt):
        if fac[i] < 0:  # skipped: the weights and the buffer stay bit for bit
            skipped += 1
            for j in range(9):
                XO[j, i] = x[k0 + i, j]
                MO[j, i] = M[j, i]
    # plain copies (a select per entry here would cost as much as the whole update)
    _store_tile(XO, x, k0, cnt)
    if use_mom:
        for j in range(9):
            for i in range(cnt):
                mf[base + j * nt + i] = MO[j, i]
    return skipped


@njit(**_jit_fm)
def pass2(x, g, m, s, kpr, kidx, tcode, pfac, k0, k1, hp, flags):
    """The update of the kernels in ``[k0, k1)``; returns the number of skipped kernels.

    ``k0`` is a multiple of ``TILE``, and the momentum buffer ``m`` is tile-major (see
    ``_layout.to_tiles``). ``flags``: ``_flags.FLAG_*`` bits. With ``FLAG_OWN`` every kernel is
    its own POM, and its step factor comes from its own gradient; otherwise from ``pfac`` per
    POM (``pom_factors``), all 1 with ``FLAG_UNIT``.

    Groups of 16 kernels take ``_vec16.step16`` (in registers) where it applies; the rest,
    and groups it hands back, take the tile code (``_tile_part``).
    """
    dt = x.dtype
    bufs = tile_buffers(x)
    fac16 = np.ones(GROUP, dt)  # stays 1 where ``unit``
    # kernel codes from the kernel indices: ``tcode`` is sorted (``_plan.build_plan``)
    bounds = np.searchsorted(tcode, np.arange(1, 4)).astype(np.int64)
    own, unit = flags & FLAG_OWN != 0, flags & FLAG_UNIT != 0
    use_mom, scaled = flags & FLAG_USE_MOM != 0, flags & FLAG_SCALED != 0
    no_regs = flags & FLAG_NO_REGISTERS != 0
    mf = m.reshape(-1)
    # per tile, the parts left to the tile code: groups handed back, then the rest
    part_at, part_len = np.empty(TILE // GROUP + 1, np.int64), np.empty(TILE // GROUP + 1, np.int64)
    skipped = 0
    for t0 in range(k0, k1, TILE):
        nt = min(TILE, k1 - t0)
        done, parts = 0, 0
        if use_mom and not no_regs:  # the registers need momentum; the rest: the tile code
            done = nt - nt % GROUP
            for c0 in range(0, done, GROUP):
                k = t0 + c0
                if not (own or unit):
                    for i in range(GROUP):
                        fac16[i] = pfac[kidx[k + i]]
                # scales: the group's 16 must be in one row (their scales side by side)
                straddles = scaled and k % kpr + GROUP > kpr
                mrow = t0 * 9 + c0
                if straddles or not step16(
                    x, g, mf, s, k, kpr, mrow, nt, kidx, bounds, fac16, hp, flags
                ):
                    part_at[parts], part_len[parts] = c0, GROUP
                    parts += 1
        if done < nt:
            part_at[parts], part_len[parts] = done, nt - done
            parts += 1
            # A whole tile through the tile code: fetch the next one meanwhile. (The groups
            # in registers go without: the processor's own prefetching keeps up with them,
            # and asking for a tile's lines at once, or for the lines of the groups ahead,
            # made a resnet50 step slower: docs/performance.md.)
            if done == 0:
                for e in range(min(k1, t0 + TILE) * 9, min(k1, t0 + 2 * TILE) * 9, 16):
                    prefetch(x, e)
                    prefetch(g, e)
                    if use_mom:
                        prefetch(mf, e)
        for q in range(parts):  # one call site: the tile code is inlined once
            c0, cnt = part_at[q], part_len[q]
            skipped += _tile_part(
                x, g, mf, s, kpr, kidx, tcode, pfac, t0, nt, c0, cnt, hp, flags, bufs
            )
    return skipped
