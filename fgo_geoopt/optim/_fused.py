"""Fused CPU step of FG-SGD: one numba loop per layer, parallel over POMs.

For every POM the kernel loop reads ``x``, ``g`` (and ``m``) once from memory: the first
sweep over the POM's kernels computes the Riemannian-gradient norm of Eq. (7), the second
(served from cache, a POM is a few KB) applies momentum, retraction and transport and writes
``x`` and ``m`` once. That is the memory traffic of ``torch.optim.SGD`` (PERF_NOTES.md),
instead of the dozen passes of a chain of eager tensor ops.

The maths is the same as the batched torch path in ``_batched.py`` (tests keep them equal).
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # numba is a hard dependency, but the library must keep working without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["AVAILABLE", "fused_collection_step", "fused_supported"]

AVAILABLE = numba is not None and os.environ.get("FGO_DISABLE_NUMBA", "0") != "1"

SPHERE, OBLIQUE, STIEFEL, EUCLIDEAN = 0, 1, 2, 3

if numba is not None:

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _rgrad(x, g, s, s_off, scaled, code, ncol, cst, est, sign, wd, rg, coef):
        """Riemannian gradient of one kernel in unit coordinates into ``rg``; returns |rg|^2."""
        n = x.shape[0]
        nrow = n // ncol
        # unit point xu = x / s, unit gradient gu = sign * g * s (+ wd * x on Euclidean kernels)
        if code == EUCLIDEAN:
            tot = 0.0
            for j in range(n):
                v = sign * g[j] + wd * x[j]
                rg[j] = v
                tot += v * v
            return tot
        for j in range(n):
            if scaled:
                rg[j] = sign * g[j] * s[s_off + j]
            else:
                rg[j] = sign * g[j]
        if code == SPHERE:
            a = 0.0
            for j in range(n):
                xu = x[j] / s[s_off + j] if scaled else x[j]
                a += xu * rg[j]
            tot = 0.0
            for j in range(n):
                xu = x[j] / s[s_off + j] if scaled else x[j]
                v = rg[j] - a * xu
                rg[j] = v
                tot += v * v
            return tot
        if code == OBLIQUE:
            tot = 0.0
            for c in range(ncol):
                a = 0.0
                for r in range(nrow):
                    j = c * cst + r * est
                    xu = x[j] / s[s_off + j] if scaled else x[j]
                    a += xu * rg[j]
                for r in range(nrow):
                    j = c * cst + r * est
                    xu = x[j] / s[s_off + j] if scaled else x[j]
                    v = rg[j] - a * xu
                    rg[j] = v
                    tot += v * v
            return tot
        # Stiefel: rg = gu - xu sym(xu^T gu)
        for c1 in range(ncol):
            for c2 in range(ncol):
                a = 0.0
                for r in range(nrow):
                    j1 = c1 * cst + r * est
                    j2 = c2 * cst + r * est
                    xu = x[j1] / s[s_off + j1] if scaled else x[j1]
                    a += xu * rg[j2]
                coef[c1 * ncol + c2] = a
        for c1 in range(ncol):
            for c2 in range(c1 + 1, ncol):
                m = 0.5 * (coef[c1 * ncol + c2] + coef[c2 * ncol + c1])
                coef[c1 * ncol + c2] = m
                coef[c2 * ncol + c1] = m
        tot = 0.0
        for r in range(nrow):
            for c in range(ncol):
                j = c * cst + r * est
                v = rg[j]
                for c2 in range(ncol):
                    j2 = c2 * cst + r * est
                    xu = x[j2] / s[s_off + j2] if scaled else x[j2]
                    v -= xu * coef[c2 * ncol + c]
                rg[j] = v
        for j in range(n):
            tot += rg[j] * rg[j]
        return tot

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _normalize(x, off, stride, count, tiny):
        nrm = 0.0
        for i in range(count):
            v = x[off + i * stride]
            nrm += v * v
        nrm = math.sqrt(nrm)
        if nrm > tiny:
            for i in range(count):
                x[off + i * stride] = x[off + i * stride] / nrm
        else:
            fill = 1.0 / math.sqrt(count)
            for i in range(count):
                x[off + i * stride] = fill

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _gram_schmidt(x, ncol, cst, est, eps):
        """CGS2 on the columns of one tall kernel, in place (see ``orthonormalize``)."""
        nrow = x.shape[0] // ncol
        for c in range(ncol):
            ref = 0.0
            for r in range(nrow):
                v = x[c * cst + r * est]
                ref += v * v
            ref = math.sqrt(ref)
            for _ in range(2):
                for c2 in range(c):
                    d = 0.0
                    for r in range(nrow):
                        d += x[c2 * cst + r * est] * x[c * cst + r * est]
                    for r in range(nrow):
                        x[c * cst + r * est] -= d * x[c2 * cst + r * est]
            nrm = 0.0
            for r in range(nrow):
                v = x[c * cst + r * est]
                nrm += v * v
            nrm = math.sqrt(nrm)
            if not nrm > 16.0 * eps * max(ref, 1.0):
                # Degenerate column: the basis vector with most mass outside the span.
                best, best_n = 0, -1.0
                for i in range(nrow):
                    tot = 0.0
                    for r in range(nrow):
                        v = 1.0 if r == i else 0.0
                        for c2 in range(c):
                            v -= x[c2 * cst + i * est] * x[c2 * cst + r * est]
                        tot += v * v
                    if tot > best_n:
                        best, best_n = i, tot
                for r in range(nrow):
                    v = 1.0 if r == best else 0.0
                    for c2 in range(c):
                        v -= x[c2 * cst + best * est] * x[c2 * cst + r * est]
                    x[c * cst + r * est] = v
                nrm = math.sqrt(best_n)
            for r in range(nrow):
                x[c * cst + r * est] /= nrm

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _update(x, m, s, s_off, scaled, code, ncol, cst, est, rg, coef, inv_tau, lr, mu,
                damp, nesterov, use_mom, first, eps, tiny):
        n = x.shape[0]
        nrow = n // ncol
        scaled = scaled and code != EUCLIDEAN
        for j in range(n):
            r = rg[j] * inv_tau
            if use_mom:
                b = r if first else mu * m[j] + (1.0 - damp) * r
                m[j] = b
                d = r + mu * b if nesterov else b
            else:
                d = r
            xu = x[j] / s[s_off + j] if scaled else x[j]
            x[j] = xu - lr * d
        if code == SPHERE:
            _normalize(x, 0, 1, n, tiny)
        elif code == OBLIQUE:
            for c in range(ncol):
                _normalize(x, c * cst, est, nrow, tiny)
        elif code == STIEFEL:
            _gram_schmidt(x, ncol, cst, est, eps)
        if use_mom and code != EUCLIDEAN:  # transport: project the buffer at the new point
            if code == SPHERE:
                a = 0.0
                for j in range(n):
                    a += x[j] * m[j]
                for j in range(n):
                    m[j] -= a * x[j]
            elif code == OBLIQUE:
                for c in range(ncol):
                    a = 0.0
                    for r in range(nrow):
                        a += x[c * cst + r * est] * m[c * cst + r * est]
                    for r in range(nrow):
                        m[c * cst + r * est] -= a * x[c * cst + r * est]
            else:
                for c1 in range(ncol):
                    for c2 in range(ncol):
                        a = 0.0
                        for r in range(nrow):
                            a += x[c1 * cst + r * est] * m[c2 * cst + r * est]
                        coef[c1 * ncol + c2] = a
                for c1 in range(ncol):
                    for c2 in range(c1 + 1, ncol):
                        v = 0.5 * (coef[c1 * ncol + c2] + coef[c2 * ncol + c1])
                        coef[c1 * ncol + c2] = v
                        coef[c2 * ncol + c1] = v
                for r in range(nrow):
                    for c in range(ncol):
                        v = 0.0
                        for c2 in range(ncol):
                            v += x[c2 * cst + r * est] * coef[c2 * ncol + c]
                        rg[c * cst + r * est] = v
                for j in range(n):
                    m[j] -= rg[j]
        if scaled:
            for j in range(n):
                x[j] *= s[s_off + j]

    @njit(cache=True, parallel=True, error_model="numpy")
    def _step(x, g, m, s, kpr, scaled, pom_ptr, pom_kernels, singleton, pom_type, codes, ncol,
              cst, est, lr, mu, damp, nesterov, maximize, wd, adaptive, use_mom, first, check,
              eps, tiny, nchunks):
        num_poms = pom_type.shape[0]
        n = x.shape[1]
        sign = -1.0 if maximize else 1.0
        skipped = np.zeros(nchunks, np.int64)
        for ch in prange(nchunks):
            p0 = ch * num_poms // nchunks
            p1 = (ch + 1) * num_poms // nchunks
            rg = np.empty(n, np.float64)
            coef = np.empty(ncol * ncol, np.float64)
            for p in range(p0, p1):
                code = codes[pom_type[p]]
                q0 = p if singleton else pom_ptr[p]
                q1 = p + 1 if singleton else pom_ptr[p + 1]
                inv_tau = 1.0
                have_rg = False
                if adaptive or check:
                    r2 = 0.0
                    for q in range(q0, q1):
                        k = q if singleton else pom_kernels[q]
                        sc = scaled and code != EUCLIDEAN
                        r2 += _rgrad(x[k], g[k], s, (k % kpr) * n, sc, code, ncol, cst, est,
                                     sign, wd, rg, coef)
                    if check and not math.isfinite(r2):
                        skipped[ch] += 1
                        continue
                    if adaptive:
                        # Eq. (7), Ozay 2019: tau = max(1, R (2 + R)), R = |grad| over the POM
                        big_r = math.sqrt(r2)
                        tau = big_r * (2.0 + big_r)
                        if tau > 1.0:
                            inv_tau = 1.0 / tau
                    have_rg = q1 - q0 == 1
                for q in range(q0, q1):
                    k = q if singleton else pom_kernels[q]
                    sc = scaled and code != EUCLIDEAN
                    if not have_rg:
                        _rgrad(x[k], g[k], s, (k % kpr) * n, sc, code, ncol, cst, est, sign, wd,
                               rg, coef)
                    _update(x[k], m[k], s, (k % kpr) * n, sc, code, ncol, cst, est, rg, coef,
                            inv_tau, lr, mu, damp, nesterov, use_mom, first, eps, tiny)
        return skipped.sum()


_DUMMY_I64 = np.zeros(1, np.int64)
_DUMMY_I32 = np.zeros(1, np.int32)
_DUMMY_F64 = np.ones(1, np.float64)


def fused_collection_step(
    coll,
    x2d: np.ndarray,
    g2d: np.ndarray,
    m2d: np.ndarray | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    weight_decay: float,
    adaptive: bool,
    first: bool,
    check: bool,
) -> int:
    """Run the fused step in place on ``(K, n)`` arrays; returns the number of skipped POMs.

    ``m2d`` is the momentum buffer in unit coordinates, or ``None`` without momentum.
    """
    cache = coll._cache.get("fused")
    if cache is None:
        a, b = coll.kernel_shape
        # Column c, row r of the tall kernel sits at c * cst + r * est of the stored kernel.
        cst, est, ncol = (b, 1, a) if a < b else (1, b, b)
        cache = {
            "codes": np.array([m.fused_code for m in coll.manifolds], np.int64),
            "geometry": (ncol, cst, est),
            "pom_type": coll.pom_type.numpy(),
            "pom_ptr": _DUMMY_I64 if coll.pom_ptr is None else coll.pom_ptr.numpy(),
            "pom_kernels": _DUMMY_I32 if coll.pom_kernels is None else coll.pom_kernels.numpy(),
            "nchunks": max(1, min(coll.num_poms, 64 * numba.get_num_threads())),
        }
        coll._cache["fused"] = cache
    scale = coll.scale
    s = _DUMMY_F64 if scale is None else coll.elem_scale("cpu", scale.dtype).reshape(-1).numpy()
    finfo = np.finfo(x2d.dtype)
    use_momentum = m2d is not None
    ncol, cst, est = cache["geometry"]
    skipped = _step(
        x2d, g2d, m2d if use_momentum else x2d, s, coll.kernels_per_row, scale is not None,
        cache["pom_ptr"], cache["pom_kernels"], coll.pom_ptr is None, cache["pom_type"],
        cache["codes"], ncol, cst, est, float(lr), float(momentum), float(dampening),
        bool(nesterov), bool(maximize), float(weight_decay), bool(adaptive), use_momentum,
        bool(first), bool(check), float(finfo.eps), float(finfo.tiny), cache["nchunks"],
    )
    return int(skipped)


def fused_supported(coll) -> bool:
    """True when every manifold of the collection has a fused implementation."""
    # A subclass that overrides the maths without declaring its own code must not be fused.
    return AVAILABLE and all(
        type(m).__dict__.get("fused_code") is not None for m in coll.manifolds
    )
