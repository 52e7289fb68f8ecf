"""Triton kernels of the FG-SGD step, one per manifold kind (a ``KIND`` constexpr), in two
passes: pass 1 forms the Riemannian gradient of every kernel and adds its squared norm to its
POM's sum (float64 atomics); pass 2 reads the POM's sum (Eq. (7) and the finite check), forms
the momentum, moves, retracts, transports the momentum and writes weights and buffer in place.

*Matrix* kernels take ``BLOCK_R`` rows of ``A x B`` tall kernels (padded to powers of two) per
program; *column* kernels take one kernel of any length per program, in chunks. Everything is
computed in float32 from the stored dtype; the POM sums in float64. Imported on first use only:
``TRITON_INTERPRET=1`` must be set before these functions are defined to run them on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

SPHERE: tl.constexpr = tl.constexpr(0)
OBLIQUE: tl.constexpr = tl.constexpr(1)
STIEFEL: tl.constexpr = tl.constexpr(2)
EUCLID: tl.constexpr = tl.constexpr(3)


@triton.jit
def _unit(x, g, s, sign, wd, KIND: tl.constexpr, HAS_SCALE: tl.constexpr, STORED: tl.constexpr):
    """Unit point and gradient (re-scaling, metric, maximize, weight decay on Euclidean)."""
    g = g * sign
    if HAS_SCALE:
        x = x / s
        if STORED:  # noqa: SIM108 (a constexpr branch, resolved when the kernel is compiled)
            g = g / s
        else:
            g = g * s
    if KIND == EUCLID:
        g = g + wd * x
    return x, g


@triton.jit
def _project(x, v, KIND: tl.constexpr):
    """Tangent projection at ``x`` of ``v`` (both ``(R, AP, BP)``, padded with zeros)."""
    if KIND == SPHERE:
        c = tl.sum(tl.sum(x * v, axis=2), axis=1)
        v = v - c[:, None, None] * x
    elif KIND == OBLIQUE:
        c = tl.sum(x * v, axis=1)
        v = v - c[:, None, :] * x
    elif KIND == STIEFEL:
        c = tl.sum(x[:, :, :, None] * v[:, :, None, :], axis=1)  # (R, BP, BP) = x^T v
        sym = 0.5 * (c + tl.permute(c, (0, 2, 1)))
        v = v - tl.sum(x[:, :, :, None] * sym[:, None, :, :], axis=2)
    return v


@triton.jit
def _retract(y, A: tl.constexpr, B: tl.constexpr, AP: tl.constexpr, BP: tl.constexpr,
             KIND: tl.constexpr, TINY: tl.constexpr, REL: tl.constexpr,
             UNIT: tl.constexpr):  # fmt: skip
    """Zero-safe normalisation (sphere, oblique; ``UNIT`` is the entry of the constant unit
    vector) or Gram-Schmidt twice with the identity fallback of a dependent column
    (Stiefel), as the per-kernel manifolds do."""
    if KIND == SPHERE:
        n = tl.sqrt(tl.sum(tl.sum(y * y, axis=2), axis=1))
        good = n > TINY
        y = tl.where(good[:, None, None], y / tl.where(good, n, 1.0)[:, None, None], UNIT)
    elif KIND == OBLIQUE:
        n = tl.sqrt(tl.sum(y * y, axis=1))
        good = n > TINY
        y = tl.where(good[:, None, :], y / tl.where(good, n, 1.0)[:, None, :], UNIT)
    elif KIND == STIEFEL:
        cols = tl.arange(0, BP)[None, None, :]
        rows = tl.arange(0, AP)[None, :]
        q = y * 0.0
        for j in tl.static_range(B):
            v = tl.sum(tl.where(cols == j, y, 0.0), axis=2)  # (R, AP)
            ref = tl.sqrt(tl.sum(v * v, axis=1))
            for _ in tl.static_range(2):
                coef = tl.sum(q * v[:, :, None], axis=1)  # (R, BP): q_k . v
                v = v - tl.sum(q * coef[:, None, :], axis=2)
            norm = tl.sqrt(tl.sum(v * v, axis=1))
            bad = ~(norm > REL * tl.maximum(ref, 1.0))
            left = tl.where(rows < A, 1.0 - tl.sum(q * q, axis=2), -1.0)  # |(I - QQ^T) e_i|^2
            best = tl.argmax(left, axis=1)
            e = (rows == best[:, None]).to(tl.float32)
            cand = e - tl.sum(q * tl.sum(q * e[:, :, None], axis=1)[:, None, :], axis=2)
            v = tl.where(bad[:, None], cand, v)
            norm = tl.sqrt(tl.sum(v * v, axis=1))
            qj = v / tl.where(norm > 0.0, norm, 1.0)[:, None]
            q = q + tl.where(cols == j, qj[:, :, None], 0.0)
        y = q
    return y


@triton.jit
def matrix_pass1(x_ptr, g_ptr, s_ptr, rows_ptr, pom_ptr, pom_sq_ptr, n_rows, sign, wd,
                 A: tl.constexpr, B: tl.constexpr, AP: tl.constexpr, BP: tl.constexpr,
                 SA: tl.constexpr, SB: tl.constexpr, KIND: tl.constexpr,
                 HAS_SCALE: tl.constexpr, STORED: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = idx < n_rows
    row = tl.load(rows_ptr + idx, mask=live, other=0).to(tl.int64)
    ia = tl.arange(0, AP)[None, :, None]
    jb = tl.arange(0, BP)[None, None, :]
    inside = live[:, None, None] & (ia < A) & (jb < B)
    offs = row[:, None, None] * (A * B) + ia * SA + jb * SB
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s = 1.0
    if HAS_SCALE:
        s = tl.load(s_ptr + row, mask=live, other=1.0).to(tl.float32)[:, None, None]
    x, g = _unit(x, g, s, sign, wd, KIND, HAS_SCALE, STORED)
    r = _project(x, g, KIND).to(tl.float64)
    sq = tl.sum(tl.sum(r * r, axis=2), axis=1)
    pom = tl.load(pom_ptr + row, mask=live, other=0)
    tl.atomic_add(pom_sq_ptr + pom, sq, mask=live)


@triton.jit
def _factors(pom_sq_ptr, pom, live, ADAPTIVE: tl.constexpr):
    """Eq. (7)'s ``1 / max(1, R (2 + R))`` (float32) and the finite flag of every POM."""
    sq = tl.load(pom_sq_ptr + pom, mask=live, other=0.0)
    ok = (sq - sq) == 0.0
    inv_tau = tl.full(sq.shape, 1.0, tl.float32)
    if ADAPTIVE:
        big_r = tl.sqrt(tl.where(ok, sq, 0.0))
        inv_tau = (1.0 / tl.maximum(big_r * (big_r + 2.0), 1.0)).to(tl.float32)
    return inv_tau, ok & live


@triton.jit
def _moved(r, b_old, coef, lr, momentum, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
           NESTEROV: tl.constexpr):  # fmt: skip
    """The new momentum buffer ``b`` and the direction ``d`` of the step."""
    b = r
    if HAS_MOMENTUM:
        if not FIRST:
            b = momentum * b_old + coef * r
        if NESTEROV:  # noqa: SIM108
            d = r + momentum * b
        else:
            d = b
    else:
        d = r
    return b, d


@triton.jit
def matrix_pass2(x_ptr, g_ptr, s_ptr, b_ptr, coef_ptr, lr_ptr, rows_ptr, pom_ptr, pom_sq_ptr,
                 n_rows, sign, wd, lr, momentum, coef,
                 A: tl.constexpr, B: tl.constexpr, AP: tl.constexpr, BP: tl.constexpr,
                 SA: tl.constexpr, SB: tl.constexpr, KIND: tl.constexpr,
                 HAS_SCALE: tl.constexpr, STORED: tl.constexpr, ADAPTIVE: tl.constexpr,
                 HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, ROW_COEF: tl.constexpr,
                 NESTEROV: tl.constexpr, LR_TENSOR: tl.constexpr, TINY: tl.constexpr,
                 REL: tl.constexpr, UNIT: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = idx < n_rows
    row = tl.load(rows_ptr + idx, mask=live, other=0).to(tl.int64)
    ia = tl.arange(0, AP)[None, :, None]
    jb = tl.arange(0, BP)[None, None, :]
    inside = live[:, None, None] & (ia < A) & (jb < B)
    offs = row[:, None, None] * (A * B) + ia * SA + jb * SB
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s = 1.0
    if HAS_SCALE:
        s = tl.load(s_ptr + row, mask=live, other=1.0).to(tl.float32)[:, None, None]
    x, g = _unit(x, g, s, sign, wd, KIND, HAS_SCALE, STORED)
    pom = tl.load(pom_ptr + row, mask=live, other=0)
    inv_tau, ok = _factors(pom_sq_ptr, pom, live, ADAPTIVE)
    r = _project(x, g, KIND) * inv_tau[:, None, None]
    b_old = r
    if HAS_MOMENTUM:
        b_old = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if ROW_COEF:
        coef = tl.load(coef_ptr + row, mask=live, other=1.0)[:, None, None]
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    b, d = _moved(r, b_old, coef, lr, momentum, HAS_MOMENTUM, FIRST, NESTEROV)
    y = _retract(x - lr * d, A, B, AP, BP, KIND, TINY, REL, UNIT)
    keep = inside & ok[:, None, None]
    if HAS_SCALE:
        tl.store(x_ptr + offs, (y * s).to(x_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=keep)
    if HAS_MOMENTUM:
        b = _project(y, b, KIND)
        tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=keep)


@triton.jit
def column_pass1(x_ptr, g_ptr, s_ptr, start_ptr, len_ptr, rows_ptr, pom_ptr, pom_sq_ptr,
                 dot_ptr, sign, wd, KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                 STORED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.load(rows_ptr + tl.program_id(0))
    start = tl.load(start_ptr + row)
    length = tl.load(len_ptr + row)
    xg = tl.sum(tl.zeros([BLOCK], tl.float64), axis=0)
    gg = xg
    xx = xg
    for off in range(0, length, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < length
        x = tl.load(x_ptr + start + i, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + start + i, mask=m, other=0.0).to(tl.float32)
        s = 1.0
        if HAS_SCALE:
            s = tl.load(s_ptr + start + i, mask=m, other=1.0).to(tl.float32)
        x, g = _unit(x, g, s, sign, wd, KIND, HAS_SCALE, STORED)
        x, g = x.to(tl.float64), g.to(tl.float64)
        xg += tl.sum(x * g)
        gg += tl.sum(g * g)
        xx += tl.sum(x * x)
    if KIND == EUCLID:
        sq = gg
        xg = xg * 0.0
    else:  # |g - c x|^2 with c = <x, g>
        sq = gg - 2.0 * xg * xg + xg * xg * xx
        sq = tl.maximum(sq, 0.0)
    tl.store(dot_ptr + row, xg.to(tl.float32))
    tl.atomic_add(pom_sq_ptr + tl.load(pom_ptr + row), sq)


@triton.jit
def _column_step(x_ptr, g_ptr, s_ptr, b_ptr, start, i, m, c, inv_tau, coef, lr, sign, wd,
                 momentum, KIND: tl.constexpr, HAS_SCALE: tl.constexpr, STORED: tl.constexpr,
                 HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                 NESTEROV: tl.constexpr):  # fmt: skip
    """One chunk of a column: the moved point ``y``, the new buffer ``b`` and the scale."""
    x = tl.load(x_ptr + start + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + start + i, mask=m, other=0.0).to(tl.float32)
    s = tl.full(x.shape, 1.0, tl.float32)  # a tensor either way: it is returned
    if HAS_SCALE:
        s = tl.load(s_ptr + start + i, mask=m, other=1.0).to(tl.float32)
    x, g = _unit(x, g, s, sign, wd, KIND, HAS_SCALE, STORED)
    r = g - c * x
    r = r * inv_tau
    b_old = r
    if HAS_MOMENTUM:
        b_old = tl.load(b_ptr + start + i, mask=m, other=0.0).to(tl.float32)
    b, d = _moved(r, b_old, coef, lr, momentum, HAS_MOMENTUM, FIRST, NESTEROV)
    return x - lr * d, b, s


@triton.jit
def column_pass2(x_ptr, g_ptr, s_ptr, b_ptr, coef_ptr, lr_ptr, start_ptr, len_ptr, rows_ptr,
                 pom_ptr, pom_sq_ptr, dot_ptr, sign, wd, lr, momentum, coef,
                 KIND: tl.constexpr, HAS_SCALE: tl.constexpr, STORED: tl.constexpr,
                 ADAPTIVE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                 ROW_COEF: tl.constexpr, NESTEROV: tl.constexpr, LR_TENSOR: tl.constexpr,
                 TINY: tl.constexpr, REL: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.load(rows_ptr + tl.program_id(0))
    start = tl.load(start_ptr + row)
    length = tl.load(len_ptr + row)
    pom = tl.load(pom_ptr + row)
    sq = tl.load(pom_sq_ptr + pom)
    ok = (sq - sq) == 0.0
    if ok:  # a POM with a non-finite gradient keeps its weights and buffer
        inv_tau = 1.0
        if ADAPTIVE:
            big_r = tl.sqrt(sq)
            inv_tau = (1.0 / tl.maximum(big_r * (big_r + 2.0), 1.0)).to(tl.float32)
        c = tl.load(dot_ptr + row)
        if ROW_COEF:
            coef = tl.load(coef_ptr + row)
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float32)
        yy = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        yb = yy
        bs = yy
        b0 = yy
        for off in range(0, length, BLOCK):  # the norm of y and what the transport needs
            i = off + tl.arange(0, BLOCK)
            m = i < length
            y, b, s = _column_step(x_ptr, g_ptr, s_ptr, b_ptr, start, i, m, c, inv_tau, coef,
                                   lr, sign, wd, momentum, KIND, HAS_SCALE, STORED,
                                   HAS_MOMENTUM, FIRST, NESTEROV)  # fmt: skip
            yy += tl.sum(y * y)
            yb += tl.sum(y * b)
            bs += tl.sum(b)
            b0 += tl.sum(tl.where(i == 0, b, 0.0))
        norm = tl.sqrt(yy)
        if KIND == STIEFEL:
            good = norm > REL * tl.maximum(norm, 1.0)
            dot = tl.where(good, yb / tl.where(good, norm, 1.0), b0)  # <q, b>
        else:
            good = norm > TINY
            dot = tl.where(good, yb / tl.where(good, norm, 1.0), bs / tl.sqrt(length * 1.0))
        for off in range(0, length, BLOCK):
            i = off + tl.arange(0, BLOCK)
            m = i < length
            y, b, s = _column_step(x_ptr, g_ptr, s_ptr, b_ptr, start, i, m, c, inv_tau, coef,
                                   lr, sign, wd, momentum, KIND, HAS_SCALE, STORED,
                                   HAS_MOMENTUM, FIRST, NESTEROV)  # fmt: skip
            if KIND == STIEFEL:
                unit = tl.where(i == 0, 1.0, 0.0)
            else:
                unit = tl.full(y.shape, 1.0, tl.float32) / tl.sqrt(length * 1.0)
            q = tl.where(good, y / tl.where(good, norm, 1.0), unit)
            tl.store(x_ptr + start + i, (q * s).to(x_ptr.dtype.element_ty), mask=m)
            if HAS_MOMENTUM:
                tl.store(b_ptr + start + i, (b - dot * q).to(b_ptr.dtype.element_ty), mask=m)


@triton.jit
def euclid_column_pass2(x_ptr, g_ptr, b_ptr, coef_ptr, lr_ptr, start_ptr, len_ptr, rows_ptr,
                        pom_ptr, pom_sq_ptr, sign, wd, lr, momentum, coef,
                        ADAPTIVE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                        ROW_COEF: tl.constexpr, NESTEROV: tl.constexpr,
                        LR_TENSOR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.load(rows_ptr + tl.program_id(0))
    start = tl.load(start_ptr + row)
    length = tl.load(len_ptr + row)
    sq = tl.load(pom_sq_ptr + tl.load(pom_ptr + row))
    if (sq - sq) == 0.0:
        inv_tau = 1.0
        if ADAPTIVE:
            big_r = tl.sqrt(sq)
            inv_tau = (1.0 / tl.maximum(big_r * (big_r + 2.0), 1.0)).to(tl.float32)
        if ROW_COEF:
            coef = tl.load(coef_ptr + row)
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float32)
        for off in range(0, length, BLOCK):
            i = off + tl.arange(0, BLOCK)
            m = i < length
            y, b, _ = _column_step(x_ptr, g_ptr, x_ptr, b_ptr, start, i, m, 0.0, inv_tau, coef,
                                   lr, sign, wd, momentum, EUCLID, False, False, HAS_MOMENTUM,
                                   FIRST, NESTEROV)  # fmt: skip
            tl.store(x_ptr + start + i, y.to(x_ptr.dtype.element_ty), mask=m)
            if HAS_MOMENTUM:
                tl.store(b_ptr + start + i, b.to(b_ptr.dtype.element_ty), mask=m)
