"""The flat FG-SGD step in torch ops: a fixed number of ops per bucket (``_flat_plan``), none
per layer, kernel or POM, and no host synchronisation.

The four built-in manifolds share one formulation, selected per row by boolean masks. For a
tall kernel ``X`` (``A >= B``) and a vector ``V`` with ``C = X^T V``, the normal part of ``V``
is ``X N(C)`` with

.. code-block:: text

    N(C) = tr(C) I  (sphere)   diag(C)  (oblique)   sym(C)  (Stiefel)   0  (Euclidean)

and the retraction (``_flat_retract``) divides columns by norms, or takes the Q factor by
Cholesky on Stiefel rows. Per bucket the ops are the same whatever the layers, and every
row-wise reduction (the norms of Eq. (7), the projections' dot products) is a batched op.
"""

from __future__ import annotations

import torch

from ._flat_plan import Bucket
from ._flat_retract import column_retract, const, matrix_retract, per_sub_row, row_sums
from ._records import Hyper

__all__ = [
    "column_pass1",
    "column_pass2",
    "lr_step",
    "matrix_pass1",
    "matrix_pass2",
    "untall",
]

F64 = torch.float64


def lr_step(x: torch.Tensor, d: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """``x - lr * d`` in one op, for a number or a device tensor ``lr``."""
    if isinstance(lr, torch.Tensor):
        return torch.addcmul(x, d, lr, value=-1)
    return torch.add(x, d, alpha=-lr)


def momentum_update(
    r: torch.Tensor, old: torch.Tensor, hyper: Hyper, coef: float | torch.Tensor | None
) -> torch.Tensor:
    """``b = momentum * old + coef * r`` (``coef`` ``None``: every row on its first step,
    ``b = r``; a tensor: per row, 1 on first steps where the buffer is still zero)."""
    if coef is None:
        return r
    if isinstance(coef, torch.Tensor):
        return torch.addcmul(old * hyper.momentum, r, coef)
    if coef == 1.0:
        return torch.add(r, old, alpha=hyper.momentum)
    return torch.add(old * hyper.momentum, r, alpha=coef)


def _direction(r, b, hyper: Hyper):
    if b is None:
        return r
    return torch.add(r, b, alpha=hyper.momentum) if hyper.nesterov else b


# ----------------------------------------------------------------------------- matrix buckets
def _tall(t: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """``(N, A, B)`` tall view (``A >= B``) of a bucket's ``(N * a * b,)`` slice."""
    a, b = bucket.shape
    v = t.view(-1, a, b)
    return v.mT if a < b else v


def untall(t: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    a, b = bucket.shape
    return t.mT if a < b else t


def _project(x: torch.Tensor, v: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """Tangent projection ``V - X N(X^T V)`` of every row, by its kind."""
    m = bucket.masks
    c = torch.bmm(x.mT, v)
    zero = const(bucket, 0.0, c)
    n = torch.where(m["st"], (c + c.mT) * 0.5, zero)
    d = c.diagonal(dim1=-2, dim2=-1)
    extra = torch.where(m["ob"][:, 0], d, torch.where(m["sp"][:, 0], d.sum(-1, keepdim=True), zero))
    n.diagonal(dim1=-2, dim2=-1).add_(extra)
    return torch.baddbmm(v, x, n, alpha=-1)


def matrix_pass1(x, g, bucket: Bucket, hyper: Hyper, pom_sq: torch.Tensor):
    """Unit point and Riemannian gradient of every row; adds the rows' squared norms to their
    POMs' sums ``pom_sq`` (float64)."""
    m, s = bucket.masks, bucket.scale
    x, g = _tall(x, bucket), _tall(g, bucket)
    if s is not None:
        x = x / s
        g = g / s if hyper.metric == "stored" else g * s
    if hyper.weight_decay:
        g = torch.where(m["eu"], torch.add(g, x, alpha=hyper.weight_decay), g)
    r = _project(x, g, bucket)
    sq = torch.linalg.vector_norm(r.reshape(bucket.rows, -1), dim=1, dtype=F64).square()
    pom_sq.index_add_(0, bucket.pom, sq)
    return x, r


def matrix_pass2(x_stored, x, r, buf, bucket: Bucket, hyper: Hyper, factors, coef):
    """The rest of the step; returns the new stored kernels ``(N, a, b)`` and the new momentum
    buffer (tall, work dtype; ``None`` without momentum). ``factors`` is ``(inv_tau, ok)`` per
    POM (either may be ``None``)."""
    inv_tau, ok = factors
    if inv_tau is not None:
        r = r * inv_tau.index_select(0, bucket.pom).to(r.dtype).view(-1, 1, 1)
    old = b = None
    if buf is not None:
        old = _tall(buf, bucket).to(r.dtype)
        b = momentum_update(r, old, hyper, coef)
    y = matrix_retract(lr_step(x, _direction(r, b, hyper), hyper.lr), bucket)
    if b is not None:
        b = _project(y, b, bucket)
    if bucket.scale is not None:
        y = y * bucket.scale
    if ok is not None:
        keep = ok.index_select(0, bucket.pom).view(-1, 1, 1)
        y = torch.where(keep, y, _tall(x_stored, bucket))
        if b is not None:
            b = torch.where(keep, b, old)
    return untall(y, bucket), b


# ----------------------------------------------------------------------------- column buckets
def _column_project(x, v, bucket: Bucket) -> torch.Tensor:
    c = row_sums(x * v, bucket)
    c = torch.where(bucket.masks["con"], c, const(bucket, 0.0, c))
    return torch.addcmul(v, x, per_sub_row(c, bucket), value=-1)


def column_pass1(x, g, bucket: Bucket, hyper: Hyper, pom_sq: torch.Tensor):
    """As :func:`matrix_pass1` for a column bucket (rows ``(M, w)``)."""
    w = bucket.shape[0]
    x, g = x.view(-1, w), g.view(-1, w)
    s = bucket.scale
    if s is not None:
        x = x / s
        g = g / s if hyper.metric == "stored" else g * s
    if hyper.weight_decay:
        g = torch.where(bucket.masks["eu"], torch.add(g, x, alpha=hyper.weight_decay), g)
    r = _column_project(x, g, bucket)
    sq = torch.linalg.vector_norm(r, dim=1, dtype=F64).square()
    pom_sq.index_add_(0, bucket.pom, sq)
    return x, r


def column_pass2(x_stored, x, r, buf, bucket: Bucket, hyper: Hyper, factors, coef):
    """As :func:`matrix_pass2` for a column bucket; returns ``(M, w)`` tensors."""
    w = bucket.shape[0]
    inv_tau, ok = factors
    if inv_tau is not None:
        r = r * inv_tau.index_select(0, bucket.pom).to(r.dtype).unsqueeze(1)
    old = b = None
    if buf is not None:
        old = buf.view(-1, w).to(r.dtype)
        b = momentum_update(r, old, hyper, coef)
    y = column_retract(lr_step(x, _direction(r, b, hyper), hyper.lr), bucket)
    if b is not None:
        b = _column_project(y, b, bucket)
    if bucket.scale is not None:
        y = y * bucket.scale
    if ok is not None:
        keep = ok.index_select(0, bucket.pom).unsqueeze(1)
        y = torch.where(keep, y, x_stored.view(-1, w))
        if b is not None:
            b = torch.where(keep, b, old)
    return y, b
