"""The step of one 3x3 kernel, written once: lane helpers shared by the tile code of
``_tiles3x3`` (numba loops over the kernels of a tile) and the register code of ``_vec16``
(which evaluates the same Python functions on vectors of 16 lanes).

A kernel is a tuple of nine entries, ``X[r, c] = x[3 r + c]``; its manifold is the code ``tp``.
The four built-in manifolds share one formulation (see ``_tiles3x3``), so the helpers branch
only through ``_where``, ``_and`` and ``_not``, which ``_vec16`` turns into selects and mask
operations, and take their square roots and reciprocals through ``_rsqrt``, ``_sqrt`` and
``_recip``, which it turns into the target's fast estimates on float32 vectors.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._flags import EUCLIDEAN, SPHERE, STIEFEL, _inline

__all__: list[str] = []


# Lane logic through these three helpers (no ``if``/``and``/``not`` on lane values in the
# helpers below): ``_vec16`` evaluates the same helpers on vectors of 16 lanes.
@njit(**_inline)
def _where(c, a, b):
    return a if c else b


@njit(**_inline)
def _and(a, b):
    return a and b


@njit(**_inline)
def _not(a):
    return not a


@njit(**_inline)
def _normal(tp, zero, half, x, v):
    """``N`` of the normal part ``X N`` of ``v``, as ``(n00, n11, n22, n01, n02, n12)``."""
    c00 = x[0] * v[0] + x[3] * v[3] + x[6] * v[6]
    c11 = x[1] * v[1] + x[4] * v[4] + x[7] * v[7]
    c22 = x[2] * v[2] + x[5] * v[5] + x[8] * v[8]
    tr = c00 + c11 + c22
    sp, st, eu = tp == SPHERE, tp == STIEFEL, tp == EUCLIDEAN
    n00 = _where(sp, tr, _where(eu, zero, c00))
    n11 = _where(sp, tr, _where(eu, zero, c11))
    n22 = _where(sp, tr, _where(eu, zero, c22))
    n01 = (x[0] * v[1] + x[3] * v[4] + x[6] * v[7] + x[1] * v[0] + x[4] * v[3] + x[7] * v[6]) * half
    n02 = (x[0] * v[2] + x[3] * v[5] + x[6] * v[8] + x[2] * v[0] + x[5] * v[3] + x[8] * v[6]) * half
    n12 = (x[1] * v[2] + x[4] * v[5] + x[7] * v[8] + x[2] * v[1] + x[5] * v[4] + x[8] * v[7]) * half
    return n00, n11, n22, _where(st, n01, zero), _where(st, n02, zero), _where(st, n12, zero)


@njit(**_inline)
def _minus_xn(v, x, n):
    """``V - X N`` for the symmetric ``N`` given as ``(n00, n11, n22, n01, n02, n12)``."""
    n00, n11, n22, n01, n02, n12 = n
    return (
        v[0] - (x[0] * n00 + x[1] * n01 + x[2] * n02),
        v[1] - (x[0] * n01 + x[1] * n11 + x[2] * n12),
        v[2] - (x[0] * n02 + x[1] * n12 + x[2] * n22),
        v[3] - (x[3] * n00 + x[4] * n01 + x[5] * n02),
        v[4] - (x[3] * n01 + x[4] * n11 + x[5] * n12),
        v[5] - (x[3] * n02 + x[4] * n12 + x[5] * n22),
        v[6] - (x[6] * n00 + x[7] * n01 + x[8] * n02),
        v[7] - (x[6] * n01 + x[7] * n11 + x[8] * n12),
        v[8] - (x[6] * n02 + x[7] * n12 + x[8] * n22),
    )


@njit(**_inline)
def _rgrad(tp, zero, half, wd, x, g):
    """Riemannian gradient in unit coordinates; weight decay on Euclidean kernels only."""
    r = _minus_xn(g, x, _normal(tp, zero, half, x, g))
    e = _where(tp == EUCLIDEAN, wd, zero)
    return (
        r[0] + e * x[0],
        r[1] + e * x[1],
        r[2] + e * x[2],
        r[3] + e * x[3],
        r[4] + e * x[4],
        r[5] + e * x[5],
        r[6] + e * x[6],
        r[7] + e * x[7],
        r[8] + e * x[8],
    )


@njit(**_inline)
def _scale9(a, v):
    return (
        a * v[0],
        a * v[1],
        a * v[2],
        a * v[3],
        a * v[4],
        a * v[5],
        a * v[6],
        a * v[7],
        a * v[8],
    )


@njit(**_inline)
def _col(v, c):
    return v[c], v[c + 3], v[c + 6]


@njit(**_inline)
def _dot3(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@njit(**_inline)
def _axpy3(a, u, v):
    """``v - a u`` on 3-vectors."""
    return v[0] - a * u[0], v[1] - a * u[1], v[2] - a * u[2]


@njit(**_inline)
def _scale3(a, v):
    return a * v[0], a * v[1], a * v[2]


@njit(**_inline)
def _retract(tp, zero, one, tiny2, eps16sq, y):
    """Retraction of the moved kernel ``y``; returns the new point and whether it degenerated."""
    sp, st, eu = tp == SPHERE, tp == STIEFEL, tp == EUCLIDEAN
    y0, y1, y2 = _col(y, 0), _col(y, 1), _col(y, 2)
    q0, q1, q2 = _dot3(y0, y0), _dot3(y1, y1), _dot3(y2, y2)
    qq = q0 + q1 + q2
    f0 = _where(eu, one, one / np.sqrt(_where(sp, qq, q0)))
    u0 = _scale3(f0, y0)
    for _ in range(2):  # CGS2: two passes against the normalised previous columns
        d = _dot3(u0, y1)
        y1 = _axpy3(_where(st, d, zero), u0, y1)
    p1 = _dot3(y1, y1)
    f1 = _where(eu, one, one / np.sqrt(_where(sp, qq, p1)))
    u1 = _scale3(f1, y1)
    for _ in range(2):
        d = _dot3(u0, y2)
        y2 = _axpy3(_where(st, d, zero), u0, y2)
        d = _dot3(u1, y2)
        y2 = _axpy3(_where(st, d, zero), u1, y2)
    p2 = _dot3(y2, y2)
    f2 = _where(eu, one, one / np.sqrt(_where(sp, qq, p2)))
    u2 = _scale3(f2, y2)
    # as ``orthonormalize`` on Stiefel: a column that lost (almost) everything is degenerate
    ok_st = _and(
        _and(q0 > eps16sq * max(q0, one), p1 > eps16sq * max(q1, one)),
        p2 > eps16sq * max(q2, one),
    )
    ok_ob = _and(_and(q0 > tiny2, q1 > tiny2), q2 > tiny2)
    ok = _where(st, ok_st, _where(sp, qq > tiny2, _where(eu, eu, ok_ob)))
    out = (u0[0], u1[0], u2[0], u0[1], u1[1], u2[1], u0[2], u1[2], u2[2])
    return out, _not(ok)


# ``_vec16`` evaluates these three with the target's fast estimates on float32 vectors.
@njit(**_inline)
def _rsqrt(one, v):
    return one / np.sqrt(v)


@njit(**_inline)
def _sqrt(v):
    return np.sqrt(v)


@njit(**_inline)
def _recip(one, v):
    return one / v


@njit(**_inline)
def _retract_gram(tp, zero, one, quarter, tiny2, eps16sq, y):
    """The retraction of ``_retract`` from the Gram matrix ``Y^T Y`` (Cholesky QR), for the
    registers of ``_vec16``; returns the new point and whether the group must go to
    ``_retract`` instead.

    Gram-Schmidt is a chain: each column waits for the normalised previous ones, twice (CGS2).
    Here the six column products are independent, and the chain is three reciprocal square
    roots with a few products in between: about half the latency of ``_retract``. For the
    Stiefel kernels the result is the same ``Q`` (that of the QR decomposition with a positive
    diagonal), with a rounding error that grows as ``cond(Y)^2`` instead of ``cond(Y)``; so a
    Stiefel kernel whose second or third column loses more than three quarters of its squared
    norm to the earlier ones (``cond(Y)`` of about 2 or more, far from a step's usual
    ``1 + O(lr)``) is handed back, as are the kernels ``_retract`` finds degenerate. Sphere,
    oblique and Euclidean kernels use only the column norms, as in ``_retract``.
    """
    sp, st, eu = tp == SPHERE, tp == STIEFEL, tp == EUCLIDEAN
    y0, y1, y2 = _col(y, 0), _col(y, 1), _col(y, 2)
    q0, q1, q2 = _dot3(y0, y0), _dot3(y1, y1), _dot3(y2, y2)
    q01, q02, q12 = _dot3(y0, y1), _dot3(y0, y2), _dot3(y1, y2)
    qq = q0 + q1 + q2
    f0 = _where(eu, one, _rsqrt(one, _where(sp, qq, q0)))
    l10 = _where(st, q01 * f0, zero)  # R^T = L, the Cholesky factor of the Gram matrix
    l20 = _where(st, q02 * f0, zero)
    p1 = q1 - l10 * l10  # |column 1 without its part along column 0|^2
    f1 = _where(eu, one, _rsqrt(one, _where(sp, qq, p1)))
    l21 = _where(st, (q12 - l20 * l10) * f1, zero)
    p2 = q2 - l20 * l20 - l21 * l21
    f2 = _where(eu, one, _rsqrt(one, _where(sp, qq, p2)))
    u0 = _scale3(f0, y0)
    u1 = _scale3(f1, _axpy3(l10, u0, y1))
    u2 = _scale3(f2, _axpy3(l21, u1, _axpy3(l20, u0, y2)))
    ok_st = _and(
        _and(q0 > eps16sq * max(q0, one), p1 > eps16sq * max(q1, one)),
        p2 > eps16sq * max(q2, one),
    )
    ok_st = _and(ok_st, _and(p1 > quarter * q1, p2 > quarter * q2))
    ok_ob = _and(_and(q0 > tiny2, q1 > tiny2), q2 > tiny2)
    ok = _where(st, ok_st, _where(sp, qq > tiny2, _where(eu, eu, ok_ob)))
    out = (u0[0], u1[0], u2[0], u0[1], u1[1], u2[1], u0[2], u1[2], u2[2])
    return out, _not(ok)


@njit(**_inline)
def _own_factor(sq, adaptive, check, one, two):
    """Eq. (7) factor of a kernel that is its own POM, from ``|rgrad|^2``; ``-1``: skipped."""
    big_r = _sqrt(sq)
    tau = big_r * (two + big_r)  # Eq. (7), Ozay 2019
    f = _where(_and(adaptive, tau > one), _recip(one, tau), one)
    return _where(_and(check, _not(np.isfinite(sq))), -one, f)


@njit(**_inline)
def _move(xi, r, mi, hp_step):
    """Momentum ``b`` and moved point ``y`` of one kernel (before the retraction)."""
    lr, c_old, c_new, a_r, a_b = hp_step
    b = (
        c_old * mi[0] + c_new * r[0],
        c_old * mi[1] + c_new * r[1],
        c_old * mi[2] + c_new * r[2],
        c_old * mi[3] + c_new * r[3],
        c_old * mi[4] + c_new * r[4],
        c_old * mi[5] + c_new * r[5],
        c_old * mi[6] + c_new * r[6],
        c_old * mi[7] + c_new * r[7],
        c_old * mi[8] + c_new * r[8],
    )
    y = (
        xi[0] - lr * (a_r * r[0] + a_b * b[0]),
        xi[1] - lr * (a_r * r[1] + a_b * b[1]),
        xi[2] - lr * (a_r * r[2] + a_b * b[2]),
        xi[3] - lr * (a_r * r[3] + a_b * b[3]),
        xi[4] - lr * (a_r * r[4] + a_b * b[4]),
        xi[5] - lr * (a_r * r[5] + a_b * b[5]),
        xi[6] - lr * (a_r * r[6] + a_b * b[6]),
        xi[7] - lr * (a_r * r[7] + a_b * b[7]),
        xi[8] - lr * (a_r * r[8] + a_b * b[8]),
    )
    return y, b


@njit(**_inline)
def _transport(tp, zero, half, xn, b):
    """The buffer projected onto the tangent space at the new point."""
    return _minus_xn(b, xn, _normal(tp, zero, half, xn, b))


@njit(**_inline)
def _sqnorm(r):
    return (r[0] * r[0] + r[1] * r[1] + r[2] * r[2] + r[3] * r[3] + r[4] * r[4]) + (
        r[5] * r[5] + r[6] * r[6] + r[7] * r[7] + r[8] * r[8]
    )
