"""Fused CPU step of FG-SGD: numba loops that read and write every kernel once per step.

Eager chains of small-axis tensor ops cost 15-40x an SGD update on 3x3 kernels (PERF_NOTES.md).
Each layer takes the path that suits its kernel shape:

* 3x3 kernels (``_fused3x3``): memory order, 16 kernels at a time in vector registers
  (``_fused16``), with entry-major tiles of 128 kernels for what that cannot do; one
  formulation for all four built-in manifolds;
* one-column kernels, i.e. the filter view of 1x1 convs and linear layers
  (``_fused_columns``): memory order, contiguous loops per kernel;
* other small kernels (``n <= SOA_MAX_NUMEL``, e.g. 7x7 or 5x5): blocks of POMs of one manifold
  type gathered into structure-of-arrays buffers (``_soa_chunk`` here);
* other large kernels: a POM at a time, a kernel at a time (``_aos_chunk`` here).

The first two split a layer by kernels and settle the Eq. (7) factors in phases (see
``FusedJob``); ``run_jobs`` runs all layers of a parameter group together, on torch's own OpenMP
threads where it can (``_team``), else on a thread pool. The maths is the batched torch path of
``_batched.py``; tests keep every path equal to ``reference.py``.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._layout import TILE

try:  # numba is a declared dependency, but the library keeps working without it
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
else:  # before any function below is decorated: numba picks its cache locator then
    from . import _numba_cache

    _numba_cache.install()

__all__ = [
    "AVAILABLE",
    "FusedJob",
    "buffer_layout",
    "fused_supported",
    "run_jobs",
]

AVAILABLE = numba is not None and os.environ.get("FGO_DISABLE_NUMBA", "0") != "1"

SPHERE, OBLIQUE, STIEFEL, EUCLIDEAN = 0, 1, 2, 3
#: Other kernels (not 3x3, not one column) with at most this many entries use the
#: structure-of-arrays block path; larger ones the per-kernel loops (``_aos_chunk``).
SOA_MAX_NUMEL = 64
#: Target number of kernels in one block of the structure-of-arrays path.
BLOCK_KERNELS = 256
#: Steps that skip the gradient bounds of a layer after they settled less than half its POMs.
EXACT_STEPS = 16
#: Key of that count in a parameter's optimizer state (an int: checkpoints carry it).
EXACT_STATE = "exact_norm_steps"
#: Layers with fewer entries stay off torch's OpenMP team (a team call costs microseconds).
TEAM_MIN_NUMEL = 1 << 13
# team phase kinds (``_team``)
TEAM_BOUNDS, TEAM_NORMS, TEAM_UPDATE = 0, 1, 2
#: Bits of a layer's step flags, one set for the team descriptors, ``pass2`` of both memory-order
#: paths and ``_fused16.step16``: scales, one kernel per POM, Eq. (7) on, momentum, non-finite
#: steps skipped, every POM's factor 1.
FLAG_SCALED, FLAG_OWN, FLAG_ADAPTIVE, FLAG_USE_MOM, FLAG_CHECK, FLAG_UNIT = 1, 2, 4, 8, 16, 32
_NO_SUMS = np.zeros((1, 1))
#: Entries per piece of work handed to a thread (smaller layers are one piece).
PIECE_NUMEL = 1 << 19
#: Per-parameter buffer sets kept per collection (``FusedJob``).
_REUSE_MAX = 16

if numba is not None:
    _jit = {"cache": True, "nogil": True, "error_model": "numpy"}
    # Reassociation lets the per-kernel reductions vectorise; NaN/inf semantics stay IEEE, so
    # the non-finite checks keep working.
    _jit_fm = dict(_jit, fastmath={"reassoc", "contract"})

    # ------------------------------------------------------------ structure-of-arrays helpers
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
                for i in range(nk):
                    a[i] = 0.0
                for r in range(nrow):
                    j = c * cst + r * est
                    for i in range(nk):
                        a[i] += X[j, i] * V[j, i]
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
            for i in range(nk):
                a[i] = 0.0
            for r in range(nrow):
                j = c * cst + r * est
                for i in range(nk):
                    a[i] += X[j, i] * X[j, i]
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
            for i in range(nk):
                ref[i] = 0.0
            for r in range(nrow):
                j = c * cst + r * est
                for i in range(nk):
                    ref[i] += X[j, i] * X[j, i]
            for _ in range(2):
                for c2 in range(c):
                    for i in range(nk):
                        d[i] = 0.0
                    for r in range(nrow):
                        j, j2 = c * cst + r * est, c2 * cst + r * est
                        for i in range(nk):
                            d[i] += X[j2, i] * X[j, i]
                    for r in range(nrow):
                        j, j2 = c * cst + r * est, c2 * cst + r * est
                        for i in range(nk):
                            X[j, i] -= d[i] * X[j2, i]
            for i in range(nk):
                d[i] = 0.0
            for r in range(nrow):
                j = c * cst + r * est
                for i in range(nk):
                    d[i] += X[j, i] * X[j, i]
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

    @njit(**_jit)
    def _soa_chunk(
        ch,
        x,
        g,
        m,
        s,
        kpr,
        scaled,
        pom_ptr,
        pom_kernels,
        singleton,
        pom_type,
        codes,
        blocks,
        cap,
        geo,
        lr,
        mu,
        damp,
        nesterov,
        sign,
        wd,
        adaptive,
        use_mom,
        first,
        check,
        eps,
        tiny,
        nchunks,
    ):
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

    # ------------------------------------------------------------ per-kernel (large) helpers
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
    def _aos_update(
        x,
        m,
        s,
        off,
        sc,
        code,
        ncol,
        nrow,
        cst,
        est,
        rg,
        inv_tau,
        lr,
        mu,
        damp,
        nesterov,
        use_mom,
        first,
        eps,
        tiny,
    ):
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

    @njit(**_jit)
    def _aos_chunk(
        ch,
        x,
        g,
        m,
        s,
        kpr,
        scaled,
        pom_ptr,
        pom_kernels,
        singleton,
        pom_type,
        codes,
        geo,
        lr,
        mu,
        damp,
        nesterov,
        sign,
        wd,
        adaptive,
        use_mom,
        first,
        check,
        eps,
        tiny,
        nchunks,
    ):
        num_poms = pom_type.shape[0]
        n = x.shape[1]
        skipped = 0
        rg = np.empty(n, x.dtype)
        c_old, c_new = (0.0, 1.0) if first else (mu, 1.0 - damp)
        a_r, a_b = (1.0, mu) if nesterov else (0.0, 1.0)
        for p in range(ch * num_poms // nchunks, (ch + 1) * num_poms // nchunks):
            code = codes[pom_type[p]]
            ncol, nrow, cst, est = geo[code, 0], geo[code, 1], geo[code, 2], geo[code, 3]
            q0 = p if singleton else pom_ptr[p]
            q1 = p + 1 if singleton else pom_ptr[p + 1]
            sc = scaled and code != EUCLIDEAN
            col = ncol == 1  # sphere and Euclidean kernels: the whole kernel is one column
            euc = code == EUCLIDEAN
            inv_tau = 1.0
            have_rg = False
            if adaptive or check:
                r2 = 0.0
                for q in range(q0, q1):
                    k = q if singleton else pom_kernels[q]
                    if col:
                        r2 += _col_rgrad(x[k], g[k], s, (k % kpr) * n, sc, sign, wd, euc, rg)
                    else:
                        r2 += _aos_rgrad(
                            x[k],
                            g[k],
                            s,
                            (k % kpr) * n,
                            sc,
                            code,
                            ncol,
                            nrow,
                            cst,
                            est,
                            sign,
                            wd,
                            rg,
                        )
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
                if not have_rg:
                    if col:
                        _col_rgrad(x[k], g[k], s, (k % kpr) * n, sc, sign, wd, euc, rg)
                    else:
                        _aos_rgrad(
                            x[k],
                            g[k],
                            s,
                            (k % kpr) * n,
                            sc,
                            code,
                            ncol,
                            nrow,
                            cst,
                            est,
                            sign,
                            wd,
                            rg,
                        )
                if col:
                    _col_update(
                        x[k],
                        m[k],
                        s,
                        (k % kpr) * n,
                        sc,
                        euc,
                        rg,
                        inv_tau,
                        lr,
                        c_old,
                        c_new,
                        a_r,
                        a_b,
                        use_mom,
                        tiny,
                    )
                else:
                    _aos_update(
                        x[k],
                        m[k],
                        s,
                        (k % kpr) * n,
                        sc,
                        code,
                        ncol,
                        nrow,
                        cst,
                        est,
                        rg,
                        inv_tau,
                        lr,
                        mu,
                        damp,
                        nesterov,
                        use_mom,
                        first,
                        eps,
                        tiny,
                    )
        return skipped


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
                    _fused3x3.hyper_array(
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


if numba is not None:  # the paths in memory order share the helpers above
    from . import _fused3x3, _fused_columns
