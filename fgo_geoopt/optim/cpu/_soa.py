"""Fused CPU step for other small kernels (not 3x3, not one column; at most
``_plan.SOA_MAX_NUMEL`` entries, e.g. 5x5): blocks of POMs of one manifold type gathered into
structure-of-arrays buffers, entry-major, so that the loops over a block's kernels vectorise.

The helpers (tangent projection, Riemannian gradient, column normalisation, CGS2) also serve
the other paths: ``_tiles3x3`` redoes its degenerate kernels with them, ``_aos`` its
rare multi-column Stiefel kernels. Tests keep this path equal to ``reference.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._flags import EUCLIDEAN, STIEFEL, _inline, _jit

__all__ = ["chunk_hyper", "chunk_layout", "soa_chunk"]


@njit(**_inline)
def _column_dot(X, c, V, c2, out, nk, nrow, cst, est):
    """``out[i] = <column c of X, column c2 of V>`` for each of the ``nk`` kernels."""
    for i in range(nk):
        out[i] = 0.0
    for r in range(nrow):
        j, j2 = c * cst + r * est, c2 * cst + r * est
        for i in range(nk):
            out[i] += X[j, i] * V[j2, i]


@njit(**_jit)
def _soa_project(code, X, V, OUT, C, nk, ncol, nrow, cst, est):
    """Tangent projection of ``V`` at the points ``X`` into ``OUT`` (``OUT`` may be ``V``).

    Stiefel: ``V - X sym(X^T V)``; sphere (one column of n entries), oblique and one-column
    Stiefel: ``V - <X, V> X`` per column. The coefficients are computed from ``V`` before
    any entry is written, so the projection can run in place.
    """
    if code == STIEFEL and ncol > 1:
        for c1 in range(ncol):
            for c2 in range(ncol):
                row = C[c1 * ncol + c2]
                for i in range(nk):
                    row[i] = 0.0
                for r in range(nrow):
                    j1, j2 = c1 * cst + r * est, c2 * cst + r * est
                    for i in range(nk):
                        row[i] += X[j1, i] * V[j2, i]
        for c1 in range(ncol):
            for c2 in range(c1 + 1, ncol):
                a, b = C[c1 * ncol + c2], C[c2 * ncol + c1]
                for i in range(nk):
                    v = 0.5 * (a[i] + b[i])
                    a[i] = v
                    b[i] = v
        for r in range(nrow):
            for c in range(ncol):
                j = c * cst + r * est
                for i in range(nk):
                    OUT[j, i] = V[j, i]
                for c2 in range(ncol):
                    j2 = c2 * cst + r * est
                    coef = C[c2 * ncol + c]
                    for i in range(nk):
                        OUT[j, i] -= X[j2, i] * coef[i]
    else:
        for c in range(ncol):
            a = C[0]
            _column_dot(X, c, V, c, a, nk, nrow, cst, est)
            for r in range(nrow):
                j = c * cst + r * est
                for i in range(nk):
                    OUT[j, i] = V[j, i] - a[i] * X[j, i]


@njit(**_jit)
def _soa_rgrad(code, X, G, R, C, sq, nk, ncol, nrow, cst, est):
    """Riemannian gradient of the ``nk`` kernels of a block into ``R``; ``sq`` = |R|^2."""
    n = X.shape[0]
    if code == EUCLIDEAN:
        for j in range(n):
            for i in range(nk):
                R[j, i] = G[j, i]
    else:
        _soa_project(code, X, G, R, C, nk, ncol, nrow, cst, est)
    for i in range(nk):
        sq[i] = 0.0
    for j in range(n):
        for i in range(nk):
            sq[i] += R[j, i] * R[j, i]


@njit(**_jit)
def _soa_normalize_columns(X, C, nk, ncol, nrow, cst, est, tiny):
    for c in range(ncol):
        a = C[0]
        _column_dot(X, c, X, c, a, nk, nrow, cst, est)
        fill = 1.0 / math.sqrt(nrow)
        for i in range(nk):
            a[i] = 1.0 / math.sqrt(a[i]) if a[i] > tiny * tiny else -1.0
        for r in range(nrow):
            j = c * cst + r * est
            for i in range(nk):
                X[j, i] = X[j, i] * a[i] if a[i] > 0.0 else fill


@njit(**_jit)
def _soa_gram_schmidt(X, C, nk, ncol, nrow, cst, est, eps):
    """CGS2 on the columns of every kernel of the block (as ``orthonormalize``)."""
    ref, d = C[0], C[1]
    for c in range(ncol):
        _column_dot(X, c, X, c, ref, nk, nrow, cst, est)
        for _ in range(2):
            for c2 in range(c):
                _column_dot(X, c, X, c2, d, nk, nrow, cst, est)
                for r in range(nrow):
                    j, j2 = c * cst + r * est, c2 * cst + r * est
                    for i in range(nk):
                        X[j, i] -= d[i] * X[j2, i]
        _column_dot(X, c, X, c, d, nk, nrow, cst, est)
        for i in range(nk):
            nrm = math.sqrt(d[i])
            if not nrm > 16.0 * eps * max(math.sqrt(ref[i]), 1.0):
                nrm = _fallback_column(X, i, c, nrow, cst, est)
            d[i] = 1.0 / nrm
        for r in range(nrow):
            j = c * cst + r * est
            for i in range(nk):
                X[j, i] *= d[i]


@njit(**_jit)
def _fallback_column(X, i, c, nrow, cst, est):
    """Degenerate column ``c`` of kernel ``i``: the basis vector with most mass outside the
    span of the previous columns (as ``orthonormalize``); returns its remaining norm."""
    best, best_n = 0, -1.0
    for e in range(nrow):
        tot = 0.0
        for r in range(nrow):
            v = 1.0 if r == e else 0.0
            for c2 in range(c):
                v -= X[c2 * cst + e * est, i] * X[c2 * cst + r * est, i]
            tot += v * v
        if tot > best_n:
            best, best_n = e, tot
    for r in range(nrow):
        v = 1.0 if r == best else 0.0
        for c2 in range(c):
            v -= X[c2 * cst + best * est, i] * X[c2 * cst + r * est, i]
        X[c * cst + r * est, i] = v
    return math.sqrt(best_n)


@njit(**_inline)
def chunk_layout(lay):
    """The fields of a ``ChunkLayout``, in order, as locals of the caller (inlined)."""
    return (
        lay.kpr,
        lay.scaled,
        lay.pom_ptr,
        lay.pom_kernels,
        lay.singleton,
        lay.pom_type,
        lay.codes,
        lay.geo,
        lay.blocks,
        lay.cap,
    )


@njit(**_inline)
def chunk_hyper(hyp):
    """The fields of a ``ChunkHyper``, in order, as locals of the caller (inlined)."""
    return (
        hyp.lr,
        hyp.mu,
        hyp.damp,
        hyp.nesterov,
        hyp.sign,
        hyp.wd,
        hyp.adaptive,
        hyp.use_mom,
        hyp.first,
        hyp.check,
        hyp.eps,
        hyp.tiny,
    )


@njit(**_jit)
def _soa_chunk(ch, x, g, m, s, lay, hyp, nchunks):
    """Piece ``ch`` of ``nchunks`` of a layer, a block of POMs at a time; returns the POMs
    skipped."""
    kpr, scaled, pom_ptr, pom_kernels, singleton, pom_type, codes, geo, blocks, cap = chunk_layout(
        lay
    )
    lr, mu, damp, nesterov, sign, wd, adaptive, use_mom, first, check, eps, tiny = chunk_hyper(hyp)
    n = x.shape[1]
    nblocks = blocks.shape[0] - 1
    dt = x.dtype
    skipped = 0
    X = np.empty((n, cap), dt)
    G = np.empty((n, cap), dt)
    R = np.empty((n, cap), dt)
    M = np.empty((n, cap), dt)
    ncoef = max(geo[STIEFEL, 0] * geo[STIEFEL, 0], 2)
    C = np.empty((ncoef, cap), dt)
    sq = np.empty(cap, np.float64)
    itau = np.empty(cap, dt)
    keep = np.empty(cap, np.bool_)
    kid = np.empty(cap, np.int64)
    for bi in range(ch * nblocks // nchunks, (ch + 1) * nblocks // nchunks):
        pa, pb = blocks[bi], blocks[bi + 1]
        code = codes[pom_type[pa]]
        ncol, nrow, cst, est = geo[code, 0], geo[code, 1], geo[code, 2], geo[code, 3]
        q0 = pa if singleton else pom_ptr[pa]
        q1 = pb if singleton else pom_ptr[pb]
        nk = q1 - q0
        sc = scaled and code != EUCLIDEAN
        # gather: unit coordinates, entry-major (branches hoisted out of the entry loops)
        for i in range(nk):
            k = q0 + i if singleton else pom_kernels[q0 + i]
            kid[i] = k
            off = (k % kpr) * n
            if sc:
                for j in range(n):
                    sv = s[off + j]
                    X[j, i] = x[k, j] / sv
                    G[j, i] = sign * g[k, j] * sv
            elif code == EUCLIDEAN:
                for j in range(n):
                    X[j, i] = x[k, j]
                    G[j, i] = sign * g[k, j] + wd * x[k, j]
            else:
                for j in range(n):
                    X[j, i] = x[k, j]
                    G[j, i] = sign * g[k, j]
            if use_mom:
                for j in range(n):
                    M[j, i] = m[k, j]
        _soa_rgrad(code, X, G, R, C, sq, nk, ncol, nrow, cst, est)
        # Eq. (7), Ozay 2019, per POM: tau = max(1, R (2 + R)), R = |grad| over the POM
        for p in range(pa, pb):
            lo = (p if singleton else pom_ptr[p]) - q0
            hi = (p + 1 if singleton else pom_ptr[p + 1]) - q0
            r2 = 0.0
            for i in range(lo, hi):
                r2 += sq[i]
            ok = not check or math.isfinite(r2)
            inv_tau = 1.0
            if adaptive and ok:
                big_r = math.sqrt(r2)
                tau = big_r * (2.0 + big_r)
                if tau > 1.0:
                    inv_tau = 1.0 / tau
            if not ok:
                skipped += 1
            for i in range(lo, hi):
                itau[i] = inv_tau
                keep[i] = ok
        # momentum and the step in the tangent space: b = c_old * b + c_new * r,
        # d = a_r * r + a_b * b (the buffer starts at zero, so the first step is exact)
        c_old, c_new = (0.0, 1.0) if first else (mu, 1.0 - damp)
        a_r, a_b = (1.0, mu) if nesterov else (0.0, 1.0)
        if use_mom:
            for j in range(n):
                for i in range(nk):
                    r = R[j, i] * itau[i]
                    b = c_old * M[j, i] + c_new * r
                    M[j, i] = b
                    X[j, i] = X[j, i] - lr * (a_r * r + a_b * b)
        else:
            for j in range(n):
                for i in range(nk):
                    X[j, i] = X[j, i] - lr * R[j, i] * itau[i]
        # retraction
        if code == STIEFEL and ncol > 1:
            _soa_gram_schmidt(X, C, nk, ncol, nrow, cst, est, eps)
        elif code != EUCLIDEAN:
            _soa_normalize_columns(X, C, nk, ncol, nrow, cst, est, tiny)
        if use_mom and code != EUCLIDEAN:
            _soa_project(code, X, M, M, C, nk, ncol, nrow, cst, est)  # transport
        # scatter
        for i in range(nk):
            if not keep[i]:
                continue  # skipped POM: weights and (zero-initialised) buffer unchanged
            k = kid[i]
            off = (k % kpr) * n
            if sc:
                for j in range(n):
                    x[k, j] = X[j, i] * s[off + j]
            else:
                for j in range(n):
                    x[k, j] = X[j, i]
            if use_mom:
                for j in range(n):
                    m[k, j] = M[j, i]
    return skipped


soa_chunk = _soa_chunk
