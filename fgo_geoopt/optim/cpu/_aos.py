"""Fused CPU step for other large kernels (not 3x3, not one column, more than
``_plan.SOA_MAX_NUMEL`` entries, e.g. 7x7): a POM at a time, a kernel at a time, with
contiguous loops over each kernel's entries. Tests keep this path equal to ``reference.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._flags import EUCLIDEAN, STIEFEL, _inline, _jit, _jit_fm
from ._soa import _soa_gram_schmidt, _soa_project, chunk_hyper, chunk_layout

__all__ = ["aos_chunk"]


@njit(**_jit_fm)
def _col_rgrad(x, g, s, off, sc, sign, wd, euc, rg):
    """Riemannian gradient of a one-column kernel (sphere-like, contiguous); |rg|^2."""
    n = x.shape[0]
    tot = 0.0
    if euc:
        for j in range(n):
            v = sign * g[j] + wd * x[j]
            rg[j] = v
            tot += v * v
        return tot
    a = 0.0
    if not sc:  # unscaled: no per-entry scale at all
        for j in range(n):
            a += x[j] * g[j]
        a *= sign
        for j in range(n):
            v = sign * g[j] - a * x[j]
            rg[j] = v
            tot += v * v
        return tot
    for j in range(n):
        a += (x[j] / s[off + j]) * (sign * g[j] * s[off + j])
    for j in range(n):
        sj = s[off + j]
        v = sign * g[j] * sj - a * (x[j] / sj)
        rg[j] = v
        tot += v * v
    return tot


@njit(**_jit_fm)
def _col_update(x, m, s, off, sc, euc, rg, inv_tau, lr, c_old, c_new, a_r, a_b, use_mom, tiny):
    """Momentum, step, normalisation and transport of a one-column kernel, in place."""
    n = x.shape[0]
    nrm = 0.0
    if use_mom and euc:
        for j in range(n):
            r = rg[j] * inv_tau
            b = c_old * m[j] + c_new * r
            m[j] = b
            x[j] = x[j] - lr * (a_r * r + a_b * b)
        return
    if euc:
        for j in range(n):
            x[j] = x[j] - lr * rg[j] * inv_tau
        return
    if use_mom:
        for j in range(n):
            r = rg[j] * inv_tau
            b = c_old * m[j] + c_new * r
            m[j] = b
            xu = x[j] / s[off + j] if sc else x[j]
            y = xu - lr * (a_r * r + a_b * b)
            x[j] = y
            nrm += y * y
    else:
        for j in range(n):
            xu = x[j] / s[off + j] if sc else x[j]
            y = xu - lr * rg[j] * inv_tau
            x[j] = y
            nrm += y * y
    if nrm > tiny * tiny:
        inv = 1.0 / math.sqrt(nrm)
        for j in range(n):
            x[j] = x[j] * inv
    else:
        fill = 1.0 / math.sqrt(n)
        for j in range(n):
            x[j] = fill
    if use_mom:
        a = 0.0
        for j in range(n):
            a += x[j] * m[j]
        for j in range(n):
            m[j] = m[j] - a * x[j]
    if sc:
        for j in range(n):
            x[j] = x[j] * s[off + j]


@njit(**_jit_fm)
def _aos_rgrad(x, g, s, off, sc, code, ncol, nrow, cst, est, sign, wd, rg):
    """Riemannian gradient of one large kernel (contiguous entries) into ``rg``; |rg|^2."""
    n = x.shape[0]
    if code == EUCLIDEAN:
        tot = 0.0
        for j in range(n):
            v = sign * g[j] + wd * x[j]
            rg[j] = v
            tot += v * v
        return tot
    # Large kernels are (L, 1) filter columns or tall matrices; per column c the entries
    # are c * cst + r * est.
    tot = 0.0
    if code == STIEFEL and ncol > 1:
        # rare for large kernels (a user-forced spatial view of a big matrix): scalar code
        for j in range(n):
            rg[j] = sign * g[j] * s[off + j] if sc else sign * g[j]
        coef = np.empty((ncol, ncol))
        for c1 in range(ncol):
            for c2 in range(ncol):
                a = 0.0
                for r in range(nrow):
                    j1, j2 = c1 * cst + r * est, c2 * cst + r * est
                    a += (x[j1] / s[off + j1] if sc else x[j1]) * rg[j2]
                coef[c1, c2] = a
        for r in range(nrow):
            for c in range(ncol):
                j = c * cst + r * est
                v = rg[j]
                for c2 in range(ncol):
                    j2 = c2 * cst + r * est
                    xu = x[j2] / s[off + j2] if sc else x[j2]
                    v -= xu * 0.5 * (coef[c2, c] + coef[c, c2])
                rg[j] = v
        for j in range(n):
            tot += rg[j] * rg[j]
        return tot
    for c in range(ncol):
        a = 0.0
        for r in range(nrow):
            j = c * cst + r * est
            gu = sign * g[j] * s[off + j] if sc else sign * g[j]
            xu = x[j] / s[off + j] if sc else x[j]
            rg[j] = gu
            a += xu * gu
        for r in range(nrow):
            j = c * cst + r * est
            xu = x[j] / s[off + j] if sc else x[j]
            v = rg[j] - a * xu
            rg[j] = v
            tot += v * v
    return tot


@njit(**_jit_fm)
def _aos_update(x, m, s, off, sc, code, ncol, nrow, cst, est, rg, inv_tau, hyp):
    """Momentum, step, retraction and transport of one kernel, in place (``hyp``: the step's
    ``ChunkHyper``)."""
    lr, mu, damp, nesterov, _, _, _, use_mom, first, _, eps, tiny = chunk_hyper(hyp)
    n = x.shape[0]
    for j in range(n):
        r = rg[j] * inv_tau
        if use_mom:
            b = r if first else mu * m[j] + (1.0 - damp) * r
            m[j] = b
            d = r + mu * b if nesterov else b
        else:
            d = r
        xu = x[j] / s[off + j] if sc else x[j]
        x[j] = xu - lr * d
    if code == STIEFEL and ncol > 1:
        X = x.reshape((n, 1))
        C = np.empty((2, 1), x.dtype)
        _soa_gram_schmidt(X, C, 1, ncol, nrow, cst, est, eps)
    elif code != EUCLIDEAN:
        for c in range(ncol):
            nrm = 0.0
            for r in range(nrow):
                v = x[c * cst + r * est]
                nrm += v * v
            if nrm > tiny * tiny:
                inv = 1.0 / math.sqrt(nrm)
                for r in range(nrow):
                    x[c * cst + r * est] *= inv
            else:
                fill = 1.0 / math.sqrt(nrow)
                for r in range(nrow):
                    x[c * cst + r * est] = fill
    if use_mom and code != EUCLIDEAN:
        if code == STIEFEL and ncol > 1:
            X = x.reshape((n, 1))
            M = m.reshape((n, 1))
            C = np.empty((ncol * ncol, 1), x.dtype)
            _soa_project(code, X, M, M, C, 1, ncol, nrow, cst, est)
        else:
            for c in range(ncol):
                a = 0.0
                for r in range(nrow):
                    j = c * cst + r * est
                    a += x[j] * m[j]
                for r in range(nrow):
                    j = c * cst + r * est
                    m[j] -= a * x[j]
    if sc:
        for j in range(n):
            x[j] *= s[off + j]


@njit(**_inline)
def _kernel_rgrad(x, g, s, off, geom, sign, wd, rg):
    """Riemannian gradient of one kernel into ``rg``; returns its squared norm. ``geom``:
    ``(scaled, code, ncol, nrow, cst, est)`` of the kernel."""
    sc, code, ncol, nrow, cst, est = geom
    if ncol == 1:  # sphere and Euclidean kernels: the whole kernel is one column
        return _col_rgrad(x, g, s, off, sc, sign, wd, code == EUCLIDEAN, rg)
    return _aos_rgrad(x, g, s, off, sc, code, ncol, nrow, cst, est, sign, wd, rg)


@njit(**_inline)
def _kernel_update(x, m, s, off, geom, rg, inv_tau, hyp, mix):
    """Momentum, step, retraction and transport of one kernel, in place. ``mix``:
    ``(c_old, c_new, a_r, a_b)``, how the buffer and the direction combine this step."""
    sc, code, ncol, nrow, cst, est = geom
    if ncol == 1:
        c_old, c_new, a_r, a_b = mix
        euc = code == EUCLIDEAN
        _col_update(
            x,
            m,
            s,
            off,
            sc,
            euc,
            rg,
            inv_tau,
            hyp.lr,
            c_old,
            c_new,
            a_r,
            a_b,
            hyp.use_mom,
            hyp.tiny,
        )
    else:
        _aos_update(x, m, s, off, sc, code, ncol, nrow, cst, est, rg, inv_tau, hyp)


@njit(**_jit)
def _aos_chunk(ch, x, g, m, s, lay, hyp, nchunks):
    """Piece ``ch`` of ``nchunks`` of a layer, a POM at a time; returns the POMs skipped."""
    kpr, scaled, pom_ptr, pom_kernels, singleton, pom_type, codes, geo, _, _ = chunk_layout(lay)
    _, mu, damp, nesterov, sign, wd, adaptive, use_mom, first, check, _, _ = chunk_hyper(hyp)
    num_poms = pom_type.shape[0]
    n = x.shape[1]
    skipped = 0
    rg = np.empty(n, x.dtype)
    c_old, c_new = (0.0, 1.0) if first else (mu, 1.0 - damp)
    a_r, a_b = (1.0, mu) if nesterov else (0.0, 1.0)
    mix = (c_old, c_new, a_r, a_b)
    for p in range(ch * num_poms // nchunks, (ch + 1) * num_poms // nchunks):
        code = codes[pom_type[p]]
        geom = (
            scaled and code != EUCLIDEAN,
            code,
            geo[code, 0],
            geo[code, 1],
            geo[code, 2],
            geo[code, 3],
        )
        q0 = p if singleton else pom_ptr[p]
        q1 = p + 1 if singleton else pom_ptr[p + 1]
        inv_tau = 1.0
        have_rg = False
        if adaptive or check:
            r2 = 0.0
            for q in range(q0, q1):
                k = q if singleton else pom_kernels[q]
                r2 += _kernel_rgrad(x[k], g[k], s, (k % kpr) * n, geom, sign, wd, rg)
            if check and not math.isfinite(r2):
                skipped += 1
                if use_mom and first:
                    for q in range(q0, q1):
                        k = q if singleton else pom_kernels[q]
                        m[k, :] = 0.0
                continue
            if adaptive:
                big_r = math.sqrt(r2)  # Eq. (7)
                tau = big_r * (2.0 + big_r)
                if tau > 1.0:
                    inv_tau = 1.0 / tau
            have_rg = q1 - q0 == 1
        for q in range(q0, q1):
            k = q if singleton else pom_kernels[q]
            off = (k % kpr) * n
            if not have_rg:
                _kernel_rgrad(x[k], g[k], s, off, geom, sign, wd, rg)
            _kernel_update(x[k], m[k], s, off, geom, rg, inv_tau, hyp, mix)
    return skipped


aos_chunk = _aos_chunk
