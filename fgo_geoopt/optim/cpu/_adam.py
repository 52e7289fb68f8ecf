"""The kernels of FG-Adam's fused CPU step: numba passes over a layer's ``(K, n)`` rows.

A step takes three passes:

1. norms (split over kernels): every kernel's Riemannian gradient in unit coordinates and its
   squared norm in the step's metric, ``ksq``;
2. :func:`adam_moments` (one call per layer): the squared norms summed per POM in kernel
   order, the finite check, the second moments (per POM or per kernel) and every step size;
3. update (split over kernels): the Riemannian gradient again (reading ``x`` and ``g`` twice
   costs less than writing it and reading it back), the first moment, the decay of Euclidean
   kernels, the retraction, the transport of the first moment, and ``R * w``.

Passes 1 and 3 come in two forms, by kernel shape:

* :func:`adam_rows` - one-column kernels (1x1 convs and linear layers in the filter view, 1x7
  kernels): kernel by kernel, each one a contiguous loop over its entries that vectorises;
* :func:`adam_lanes` - any other kernels (3x3, 5x5, 7x7, 2x3, ...): a chunk of consecutive
  kernels at a time (``lanes_for``), in blocks of one manifold code (``order``, ``bstart``,
  ``bcode``: the plan's), each block loaded entry-major into scratch (``X[entry, lane]``) so
  that every op runs over the block's lanes, vectorised, with no branch per kernel. Threads
  take whole chunks (never two threads on one cache line).

Helpers that take arrays are called once per block, never per kernel: such a numba call costs
reference counting, several times the maths of a 3x3 kernel. The maths is that of
``adam_step`` (tests keep both equal to ``reference_adam.py``); the sums run in the
parameter's dtype, as there. ``geo`` gives, per code, the columns, rows and strides of the
kernel seen as a tall matrix (``_plan``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._flags import EUCLIDEAN, STIEFEL, _jit, _jit_fm

__all__ = [
    "ADAM_HYPER",
    "LANES",
    "adam_hyper",
    "adam_lanes",
    "adam_moments",
    "adam_rows",
    "lanes_for",
]

#: Kernels per chunk of :func:`adam_lanes` (the most lanes of one block), for kernels of up to
#: 64 entries; fewer for larger kernels (:func:`lanes_for`). With 3x3 kernels on four manifolds
#: a block holds about 64 kernels: fewer cost more per kernel (per-block calls, short loops).
LANES = 256


def lanes_for(n: int) -> int:
    """Kernels per chunk for kernels of ``n`` entries: ``LANES``, halved until the scratch of
    one entry-major array (``n * lanes`` entries) is at most 16,384 entries (16 at least)."""
    lanes = LANES
    while lanes > 16 and n * lanes > 16384:
        lanes //= 2
    return lanes


#: Layout of the hyper-parameter array of the kernel passes (in the parameter's dtype).
ADAM_HYPER = ("zero", "sign", "w1", "w1c", "decay", "tiny", "half", "one")
_ZERO, _SIGN, _W1, _W1C, _DECAY, _TINY, _HALF, _ONE = range(len(ADAM_HYPER))


def adam_hyper(dtype, *, sign: float, w1: float, decay: float) -> np.ndarray:
    """The passes' scalars: the gradient's sign, the first moment's weight ``1 - beta1`` (and
    ``beta1``, for torch.lerp's second formula), the factor of decoupled weight decay
    (``1 - lr * weight_decay``), and constants."""
    w1c = 1.0 - float(np.array(w1, dtype))
    values = [0.0, sign, w1, w1c, decay, np.finfo(dtype).tiny, 0.5, 1.0]
    return np.array(values, dtype=dtype)


# ---------------------------------------------------------------- one-column kernels
@njit(**_jit_fm)
def adam_rows(
    update, x, g, m, s, kcode, kpom, singleton, per_pom, coef, ok, scaled, stored, hp, lo, hi, ksq
):
    """Kernels ``[lo, hi)`` of a layer of one-column kernels (every code a unit vector or
    Euclidean). Without ``update``: the squared norm of every kernel's Riemannian gradient into
    ``ksq`` (``|r|^2``, or ``|R r|^2`` in the stored weights' metric). With ``update``: the
    step from the step sizes ``coef`` (per POM or per kernel); kernels of a POM that is not
    ``ok`` keep their weights and first moment. Returns 0."""
    n = x.shape[1]
    kpr = s.shape[0]
    zero, sign, w1, w1c = hp[_ZERO], hp[_SIGN], hp[_W1], hp[_W1C]
    decay, tiny, half, one = hp[_DECAY], hp[_TINY], hp[_HALF], hp[_ONE]
    small_w = abs(w1) < half  # torch.lerp's two formulas
    xu = np.empty(n, x.dtype)  # the unit kernel, then the new point
    rg = np.empty(n, x.dtype)  # its Riemannian gradient, then its first moment
    for k in range(lo, hi):
        p = k if singleton else kpom[k]
        if update and not ok[p]:
            continue
        euc = kcode[k] == EUCLIDEAN
        sc = scaled and not euc
        srow = k % kpr
        if sc:  # unit coordinates: w = W / R, gradient dL/dW * R (dL/dW / R: stored metric)
            for j in range(n):
                sj = s[srow, j]
                xu[j] = x[k, j] / sj
                gj = sign * g[k, j]
                rg[j] = gj / sj if stored else gj * sj
        else:
            for j in range(n):
                xu[j] = x[k, j]
                rg[j] = sign * g[k, j]
        if not euc:  # the tangent projection u - x <x, u>
            a = zero
            for j in range(n):
                a += xu[j] * rg[j]
            for j in range(n):
                rg[j] -= xu[j] * a
        if not update:
            tot = zero
            if sc and stored:
                for j in range(n):
                    v = rg[j] * s[srow, j]
                    tot += v * v
            else:
                for j in range(n):
                    tot += rg[j] * rg[j]
            ksq[k] = tot
            continue
        ck = coef[p] if per_pom else coef[k]
        for j in range(n):  # first moment (into rg), decay (Euclidean kernels), step
            mj = m[k, j]
            d = rg[j] - mj
            mj = mj + w1 * d if small_w else rg[j] - d * w1c
            rg[j] = mj
            y = xu[j] * decay if euc else xu[j]
            xu[j] = y - mj * ck
        if not euc:  # normalise, and move the first moment to the new point
            nrm = zero
            for j in range(n):
                nrm += xu[j] * xu[j]
            inv = one / math.sqrt(max(nrm, tiny))
            a = zero
            for j in range(n):
                xu[j] *= inv
                a += xu[j] * rg[j]
            for j in range(n):
                rg[j] -= xu[j] * a
        for j in range(n):
            m[k, j] = rg[j]
        if sc:
            for j in range(n):
                x[k, j] = xu[j] * s[srow, j]
        else:
            for j in range(n):
                x[k, j] = xu[j]
    return 0


# ---------------------------------------------------------------- other kernels, in lanes
@njit(**_jit_fm)
def _load(x, g, s, order, b0, nb, sc, stored, sign, X, G):
    """Lanes ``[0, nb)``: kernels ``order[b0:b0 + nb]`` in unit coordinates into ``X``, their
    gradients there into ``G`` (entry-major)."""
    n = x.shape[1]
    kpr = s.shape[0]
    for b in range(nb):
        k = order[b0 + b]
        if sc:
            srow = k % kpr
            for j in range(n):
                sj = s[srow, j]
                X[j, b] = x[k, j] / sj
                gj = sign * g[k, j]
                G[j, b] = gj / sj if stored else gj * sj
        else:
            for j in range(n):
                X[j, b] = x[k, j]
                G[j, b] = sign * g[k, j]


@njit(**_jit_fm)
def _project(Y, U, nb, ncol, nrow, cst, est, stiefel, C, A, zero, half):
    """``U <- U - Y sym(Y^T U)`` (Stiefel, several columns) or ``U <- U - Y diag(Y^T U)``
    (unit columns) on lanes ``[0, nb)``; ``C``, ``A``: scratch."""
    if stiefel and ncol > 1:
        for i in range(ncol):
            for j in range(ncol):
                ij = i * ncol + j
                for b in range(nb):
                    C[ij, b] = zero
                for r in range(nrow):
                    ei, ej = i * cst + r * est, j * cst + r * est
                    for b in range(nb):
                        C[ij, b] += Y[ei, b] * U[ej, b]
        for i in range(ncol):
            for j in range(i + 1, ncol):
                ij, ji = i * ncol + j, j * ncol + i
                for b in range(nb):
                    sym = (C[ij, b] + C[ji, b]) * half
                    C[ij, b] = sym
                    C[ji, b] = sym
        for i in range(ncol):  # column by column of Y, as the batched step adds them
            for j in range(ncol):
                ij = i * ncol + j
                for r in range(nrow):
                    ei, ej = i * cst + r * est, j * cst + r * est
                    for b in range(nb):
                        U[ej, b] -= Y[ei, b] * C[ij, b]
        return
    for col in range(ncol):
        for b in range(nb):
            A[b] = zero
        for r in range(nrow):
            e = col * cst + r * est
            for b in range(nb):
                A[b] += Y[e, b] * U[e, b]
        for r in range(nrow):
            e = col * cst + r * est
            for b in range(nb):
                U[e, b] -= Y[e, b] * A[b]


@njit(**_jit_fm)
def _retract(Y, nb, ncol, nrow, cst, est, stiefel, C, A, zero, tiny, one):
    """Unit columns (normalised one by one), or the Q factor by classical Gram-Schmidt with a
    second pass (Stiefel), on lanes ``[0, nb)``, in place."""
    for j in range(ncol):
        if stiefel and j > 0:
            for _ in range(2):
                for i in range(j):
                    for b in range(nb):
                        C[i, b] = zero
                    for r in range(nrow):
                        ei, ej = i * cst + r * est, j * cst + r * est
                        for b in range(nb):
                            C[i, b] += Y[ei, b] * Y[ej, b]
                for i in range(j):
                    for r in range(nrow):
                        ei, ej = i * cst + r * est, j * cst + r * est
                        for b in range(nb):
                            Y[ej, b] -= Y[ei, b] * C[i, b]
        for b in range(nb):
            A[b] = zero
        for r in range(nrow):
            e = j * cst + r * est
            for b in range(nb):
                A[b] += Y[e, b] * Y[e, b]
        for b in range(nb):
            A[b] = one / math.sqrt(max(A[b], tiny))
        for r in range(nrow):
            e = j * cst + r * est
            for b in range(nb):
                Y[e, b] *= A[b]


@njit(**_jit_fm)
def adam_lanes(
    update,
    x,
    g,
    m,
    s,
    order,
    bstart,
    bcode,
    lanes,
    geo,
    kpom,
    singleton,
    per_pom,
    coef,
    ok,
    scaled,
    stored,
    hp,
    blo,
    bhi,
    ksq,
):
    """Blocks ``[blo, bhi)`` of a layer (block ``i``: kernels ``order[bstart[i]:bstart[i +
    1]]``, all of code ``bcode[i]``, at most ``lanes`` of them), as :func:`adam_rows` does
    kernels. Returns 0."""
    n = x.shape[1]
    kpr = s.shape[0]
    zero, sign, w1, w1c = hp[_ZERO], hp[_SIGN], hp[_W1], hp[_W1C]
    decay, tiny, half, one = hp[_DECAY], hp[_TINY], hp[_HALF], hp[_ONE]
    small_w = abs(w1) < half  # torch.lerp's two formulas
    X = np.empty((n, lanes), x.dtype)  # unit kernels, then the new points
    G = np.empty((n, lanes), x.dtype)  # their Riemannian gradients
    M = np.empty((n, lanes), x.dtype)  # their first moments
    C = np.empty((n, lanes), x.dtype)  # Stiefel: Y^T U, Gram-Schmidt coefficients
    A = np.empty(lanes, x.dtype)  # per-lane sums
    CK = np.empty(lanes, x.dtype)  # per-lane step sizes
    for blk in range(blo, bhi):
        b0 = bstart[blk]
        nb = bstart[blk + 1] - b0
        code = bcode[blk]
        euc = code == EUCLIDEAN
        stiefel = code == STIEFEL
        sc = scaled and not euc
        ncol, nrow, cst, est = geo[code, 0], geo[code, 1], geo[code, 2], geo[code, 3]
        _load(x, g, s, order, b0, nb, sc, stored, sign, X, G)
        if not euc:
            _project(X, G, nb, ncol, nrow, cst, est, stiefel, C, A, zero, half)
        if not update:
            for b in range(nb):
                A[b] = zero
            if sc and stored:  # |R r|^2
                for b in range(nb):
                    srow = order[b0 + b] % kpr
                    for j in range(n):
                        v = G[j, b] * s[srow, j]
                        A[b] += v * v
            else:
                for j in range(n):
                    for b in range(nb):
                        A[b] += G[j, b] * G[j, b]
            for b in range(nb):
                ksq[order[b0 + b]] = A[b]
            continue
        for b in range(nb):
            k = order[b0 + b]
            p = k if singleton else kpom[k]
            CK[b] = coef[p] if per_pom else coef[k]
            for j in range(n):
                M[j, b] = m[k, j]
        for j in range(n):  # first moment, decay (Euclidean kernels), step
            for b in range(nb):
                mj = M[j, b]
                d = G[j, b] - mj
                mj = mj + w1 * d if small_w else G[j, b] - d * w1c
                M[j, b] = mj
                y = X[j, b] * decay if euc else X[j, b]
                X[j, b] = y - mj * CK[b]
        if not euc:  # retract, and move the first moment to the new point
            _retract(X, nb, ncol, nrow, cst, est, stiefel, C, A, zero, tiny, one)
            _project(X, M, nb, ncol, nrow, cst, est, stiefel, C, A, zero, half)
        for b in range(nb):  # write back the kernels of finite POMs
            k = order[b0 + b]
            p = k if singleton else kpom[k]
            if not ok[p]:
                continue
            for j in range(n):
                m[k, j] = M[j, b]
            if sc:
                srow = k % kpr
                for j in range(n):
                    x[k, j] = X[j, b] * s[srow, j]
            else:
                for j in range(n):
                    x[k, j] = X[j, b]
    return 0


@njit(**_jit)
def adam_moments(
    ksq, kpom, singleton, inv_count, n, v, vmax, amsgrad, per_pom, check, moments, ok, coef, psq
):
    """From every kernel's ``ksq``: the POMs' squared norms (``psq``, summed in kernel order),
    whether each is finite (``ok``, where ``check``), the second moments ``v`` (and their
    running maxima ``vmax``, ``amsgrad``) updated in place where finite, and the step size of
    every POM (``per_pom``) or kernel into ``coef``. ``moments``: ``beta2``, ``lr / (1 -
    beta1^t)``, ``sqrt(1 - beta2^t)``, ``eps``. Returns the number of non-finite POMs."""
    beta2, step_size, bias2_sqrt, eps = moments[0], moments[1], moments[2], moments[3]
    num_poms = inv_count.shape[0]
    if singleton:
        for p in range(num_poms):
            psq[p] = ksq[p]
    else:
        for p in range(num_poms):
            psq[p] = 0.0
        for k in range(ksq.shape[0]):
            psq[kpom[k]] += ksq[k]
    skipped = 0
    for p in range(num_poms):
        fine = not check or np.isfinite(psq[p])
        ok[p] = fine
        if not fine:
            skipped += 1
    count = num_poms if per_pom else ksq.shape[0]
    for i in range(count):
        p = i if per_pom or singleton else kpom[i]
        vi = v[i]
        if ok[p]:
            sq = psq[i] * inv_count[i] if per_pom else ksq[i] / n
            vi = vi * beta2 + sq * (1.0 - beta2)
            v[i] = vi
        if amsgrad:
            vm = vmax[i]
            if vi != vi or vm != vm:
                vi = vi + vm  # NaN, as torch.maximum propagates it
            elif vm > vi:
                vi = vm
            vmax[i] = vi
        coef[i] = step_size / (math.sqrt(vi) / bias2_sqrt + eps)
    return skipped
