"""Batched per-kernel geometry of FG-Adam's step: projections, retractions and transports of
the kernels of one manifold type, and the layouts they run in.

The kernels of a gathered type are held entry-major: ``(n, K_t)``, entry ``i`` of every kernel
in one contiguous row, viewed as ``(A, B, K_t)`` (or ``(B, A, K_t)`` where the manifold takes
the kernels transposed). Reductions over a kernel then add a few contiguous rows, and a
per-kernel factor broadcasts along them: both vectorise, where the same ops over the 9 entries
of a 3x3 kernel stored kernel by kernel do not. The built-in manifolds get the formulas below
(the same maps as their own ``proju`` / ``retr``: normalise, normalise the columns,
Gram-Schmidt with a second pass, add); any other registered manifold is called through its own
``egrad2rgrad`` / ``retr`` / ``transp`` on ``(K_t, A, B)`` kernels.
"""

from __future__ import annotations

import torch

from ..manifolds import KernelEuclidean, KernelSphere, KernelStiefel, Oblique

__all__ = ["entry_major", "geometry", "rowdot", "rows_into"]

_BLOCK = 8  # kernels per block of the transposes


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product of every row: ``(K, n), (K, n) -> (K,)``."""
    return torch.linalg.vecdot(a, b)


def entry_major(rows: torch.Tensor) -> torch.Tensor:
    """``(K, n)`` -> contiguous ``(n, K)``, in blocks of 8 kernels (about twice as fast as one
    transpose on a CPU)."""
    k, n = rows.shape
    out = rows.new_empty(n, k)
    if k % _BLOCK == 0:  # the usual case, in fewer ops
        out.view(n, k // _BLOCK, _BLOCK).copy_(rows.view(k // _BLOCK, _BLOCK, n).permute(2, 0, 1))
        return out
    head = k - k % _BLOCK
    if head:
        blocks = rows[:head].view(head // _BLOCK, _BLOCK, n).permute(2, 0, 1)
        out[:, :head].view(n, head // _BLOCK, _BLOCK).copy_(blocks)
    if head < k:
        out[:, head:].copy_(rows[head:].t())
    return out


def rows_into(entries: torch.Tensor, out: torch.Tensor) -> None:
    """Write contiguous ``(n, K)`` entries into the contiguous ``(K, n)`` rows ``out``."""
    n, k = entries.shape
    if k % _BLOCK == 0:
        out.view(k // _BLOCK, _BLOCK, n).copy_(
            entries.view(n, k // _BLOCK, _BLOCK).permute(1, 2, 0)
        )
        return
    head = k - k % _BLOCK
    if head:
        blocks = entries[:, :head].view(n, head // _BLOCK, _BLOCK).permute(1, 2, 0)
        out[:head].view(head // _BLOCK, _BLOCK, n).copy_(blocks)
    if head < k:
        out[head:].copy_(entries[:, head:].t())


class _Columns:
    """Kernels whose columns (in their tall orientation) have unit norm: the sphere (one
    column of ``n`` entries), the oblique manifold, and Stiefel kernels with one column."""

    decays = False
    #: ``view`` of a first-moment block is the block itself (updated in place).
    in_place = True

    def __init__(self, a: int, b: int):
        self.a, self.b = a, b
        self.flip = a < b  # kernels taken transposed, as the manifolds do

    def view(self, block: torch.Tensor) -> torch.Tensor:
        """An entry-major ``(n, K_t)`` block in this geometry's layout (a view)."""
        t = block.view(self.a, self.b, -1)
        return t.permute(1, 0, 2) if self.flip else t

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        """Contiguous ``(K_t, n)`` rows -> this geometry's layout."""
        return self.view(entry_major(rows))

    def put_block(self, t: torch.Tensor, block: torch.Tensor) -> None:
        """Write ``t`` (this geometry's layout) into an entry-major ``(n, K_t)`` block."""
        self.view(block).copy_(t)

    def put(self, t: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``t`` (this geometry's layout) into contiguous ``(K_t, n)`` rows."""
        if self.flip:
            t = t.permute(1, 0, 2)
        rows_into(t.reshape(self.a * self.b, -1), out)

    def bcast(self, c: torch.Tensor) -> torch.Tensor:
        """A per-kernel ``(K_t,)`` tensor, shaped to broadcast against the layout."""
        return c

    def grad(self, x, g):
        """The Riemannian gradient; may overwrite ``g`` (a loaded copy)."""
        return g.addcmul_(x, (x * g).sum(0, keepdim=True), value=-1.0)

    def sq(self, u):
        return (u * u).sum((0, 1))

    def step(self, x, m, c):
        y = torch.addcmul(x, m, c, value=-1.0)
        tiny = torch.finfo(y.dtype).tiny
        return y.mul_((y * y).sum(0, keepdim=True).clamp_min_(tiny).rsqrt_())

    def transp(self, x, y, m):
        """``m`` moved to the tangent space at ``y``, in place."""
        return m.addcmul_(y, (y * m).sum(0, keepdim=True), value=-1.0)


class _Add(_Columns):
    """Euclidean kernels: the identity projection and ``x + u``."""

    decays = True

    def grad(self, x, g):
        return g

    def step(self, x, m, c):
        return torch.addcmul(x, m, c, value=-1.0)

    def transp(self, x, y, m):
        return m


class _Stiefel(_Columns):
    """Stiefel kernels with several columns: ``u - x sym(x^T u)`` and the Q factor of QR with a
    positive diagonal by classical Gram-Schmidt with a second pass, as ``KernelStiefel``
    computes it. Loops run over the ``B`` columns only, each op over every kernel at once."""

    def grad(self, x, g):
        return self._project(x, g)

    def transp(self, x, y, m):
        return self._project(y, m)

    @staticmethod
    def _project(x, u):
        """``u - x sym(x^T u)``, written into ``u``."""
        b = x.shape[1]
        c = torch.stack([(x[:, i : i + 1] * u).sum(0) for i in range(b)])  # x^T u: (B, B, K_t)
        s = (c + c.transpose(0, 1)).mul_(0.5)
        for i in range(b):
            u.addcmul_(x[:, i : i + 1], s[i : i + 1], value=-1.0)
        return u

    def step(self, x, m, c):
        y = torch.addcmul(x, m, c, value=-1.0)
        tiny = torch.finfo(y.dtype).tiny
        out = torch.empty_like(y)
        for j in range(y.shape[1]):
            v = y[:, j]
            for _ in range(2 if j else 0):  # v - Q (Q^T v), twice (in y's own column)
                coefs = [(out[:, i] * v).sum(0) for i in range(j)]
                for i, coef in enumerate(coefs):
                    v.addcmul_(out[:, i], coef, value=-1.0)
            out[:, j] = v * (v * v).sum(0).clamp_min_(tiny).rsqrt_()
        return out


class _Generic(_Columns):
    """Any other manifold: its own maps on ``(K_t, A, B)`` kernels."""

    in_place = False

    def __init__(self, manifold, a: int, b: int):
        super().__init__(a, b)
        self.man = manifold

    def view(self, block):  # the manifold's own maps want kernels: a kernel-major copy
        return block.t().reshape(-1, self.a, self.b)

    def load(self, rows):  # a copy: the manifold's maps may write into their arguments
        return rows.reshape(-1, self.a, self.b).clone()

    def put_block(self, t, block):
        block.copy_(t.reshape(t.shape[0], -1).t())

    def put(self, t, out):
        out.copy_(t.reshape(out.shape))

    def bcast(self, c):
        return c.view(-1, 1, 1)

    def grad(self, x, g):
        return self.man.egrad2rgrad(x, g)

    def sq(self, u):
        return (u * u).sum((-2, -1))

    def step(self, x, m, c):
        return self.man.retr(x, -c * m)

    def transp(self, x, y, m):
        return self.man.transp(x, y, m)


def geometry(manifold, a: int, b: int) -> _Columns:
    """The batched geometry of ``A x B`` kernels on ``manifold``."""
    kind = type(manifold)
    if kind is KernelEuclidean:
        return _Add(a * b, 1)
    if kind is KernelSphere or (kind in (Oblique, KernelStiefel) and min(a, b) == 1):
        return _Columns(a * b, 1)
    if kind is Oblique:
        return _Columns(a, b)
    if kind is KernelStiefel:
        return _Stiefel(a, b)
    return _Generic(manifold, a, b)


def is_row_vector(geo: _Columns) -> bool:
    """Whether every kernel of ``geo`` is one vector (sphere-like) or Euclidean: such layers
    step row by row in place, without gathering."""
    return type(geo) in (_Columns, _Add) and geo.b == 1


def is_euclidean(geo: _Columns) -> bool:
    return type(geo) is _Add
