"""Retractions of the flat step, every kind of kernel at once, selected per row by masks.

Sphere, oblique and Euclidean rows divide the columns of ``Y`` by one norm, by their own norms,
or by 1; Stiefel rows take ``Y R^-1`` with ``R^T R = Y^T Y`` by Cholesky, twice (CholeskyQR2,
in float64: the first pass loses orthogonality like ``cond(Y)^2 eps``, the second restores it).
That ``R`` has a positive diagonal, so ``Y R^-1`` is the Q factor the other paths compute.

A moved kernel that cannot be normalised becomes what the per-kernel manifolds make of it,
selected on the device, never branched on: a (numerically) zero sphere kernel or oblique column
the constant unit vector (``manifolds.sphere.normalize``), a rank-deficient Stiefel kernel the
leading columns of the identity (what ``manifolds.stiefel.orthonormalize`` gives for a zero
kernel; it keeps the independent columns of a partly dependent one). A tangent step never gets
there (``Y^T Y = I + U^T U``); a momentum buffer edited from outside can.
"""

from __future__ import annotations

import torch

from ._flat_plan import Bucket

__all__ = ["column_retract", "const", "matrix_retract", "per_sub_row", "row_sums"]

F64 = torch.float64


def const(bucket: Bucket, value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor on ``like``'s device and dtype, made once per bucket (a
    Python number in ``torch.where`` costs an op, a fill on the device, every step)."""
    key = ("const", value, like.dtype)
    out = bucket.cache.get(key)
    if out is None:
        out = bucket.cache[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return out


def _limits(dtype: torch.dtype) -> tuple[float, float]:
    """The thresholds of ``normalize`` (``tiny``) and of ``orthonormalize`` (``16 eps``)."""
    info = torch.finfo(dtype)
    return info.tiny, 16.0 * info.eps


def matrix_retract(y: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """The retraction of every tall row ``(N, A, B)`` of a matrix bucket, by its kind."""
    m, cache = bucket.masks, bucket.cache
    tiny, rel = _limits(y.dtype)
    yh = y.to(F64)
    g = torch.bmm(yh.mT, yh)
    col = g.diagonal(dim1=-2, dim2=-1).sqrt()  # (N, B) column norms
    norm = torch.where(m["sp"][:, 0], col.square().sum(-1, keepdim=True).sqrt(), col)
    good = norm > tiny
    scaled = m["so"][:, 0] & good
    q = yh / torch.where(scaled, norm, const(bucket, 1.0, norm)).unsqueeze(-2)
    unit = torch.where(m["sp"], cache["sphere fallback"], cache["oblique fallback"])
    q = torch.where((m["so"][:, 0] & ~good).unsqueeze(-2), unit, q)
    chol = torch.linalg.cholesky_ex(torch.where(m["st"], g, cache["eye"]))
    pivots = chol.L.diagonal(dim1=-2, dim2=-1)  # column norms left after the projections
    full = (pivots > col.clamp_min(1.0) * rel).all(-1) & (chol.info == 0)
    qs = torch.linalg.solve_triangular(chol.L.mT, yh, upper=True, left=False)
    chol = torch.linalg.cholesky_ex(torch.where(m["st"], torch.bmm(qs.mT, qs), cache["eye"]))
    qs = torch.linalg.solve_triangular(chol.L.mT, qs, upper=True, left=False)
    qs = torch.where(full.view(-1, 1, 1), qs, cache["identity"])
    return torch.where(m["st"], qs, q).to(y.dtype)


def row_sums(t: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """Sum over every kernel of a column bucket's ``(M, w)`` tensor: ``(N,)``."""
    part = t.sum(-1)
    if bucket.sub_row is None:
        return part
    out = torch.zeros(bucket.rows, dtype=part.dtype, device=part.device)
    return out.index_add_(0, bucket.sub_row, part)


def per_sub_row(v: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """A per-kernel ``(N,)`` value on every sub-row: ``(M, 1)``."""
    if bucket.sub_row is not None:
        v = v.index_select(0, bucket.sub_row)
    return v.unsqueeze(1)


def column_retract(y: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """The retraction of every kernel of a column bucket (``(M, w)`` sub-rows): a column is a
    sphere for every constrained kind."""
    m = bucket.masks
    tiny, rel = _limits(y.dtype)
    norm = row_sums(y * y, bucket).sqrt()
    good = norm > torch.where(m["st"], norm.clamp_min(1.0) * rel, const(bucket, tiny, norm))
    y = y / per_sub_row(torch.where(m["con"] & good, norm, const(bucket, 1.0, norm)), bucket)
    # the fallback: e_0 on a Stiefel column, the constant unit vector on the others
    first = (m["head"] & bucket.cache["entry 0"]).to(y.dtype)
    unit = torch.where(m["st_sub"], first, bucket.cache["column fallback"].to(y.dtype))
    return torch.where(per_sub_row(m["con"] & ~good, bucket), unit, y)
