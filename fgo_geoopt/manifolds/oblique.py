"""Oblique manifold: matrices with unit-norm columns (geoopt has none)."""

from __future__ import annotations

import geoopt
import torch

from ._base import KernelManifoldMixin, tall, untall
from .sphere import normalize

__all__ = ["Oblique"]


class Oblique(KernelManifoldMixin, geoopt.Manifold):
    r"""Unit-norm columns per kernel: :math:`\{w \in \mathbb{R}^{A \times B} :
    \operatorname{diag}(w^\top w) = 1\}`, a product of ``B`` spheres :math:`S^{A-1}`.

    Acts on the trailing two dimensions. A kernel with ``A < B`` (for example a ``1 x 7``
    kernel) is taken in its tall orientation, so that its columns have ``max(A, B)`` entries:
    otherwise every column would be a single entry of ``+-1`` and nothing could move.
    The metric is the Euclidean one inherited from the ambient space.
    """

    name = "Oblique"
    reversible = False

    def _check_point_on_manifold(self, x, *, atol=None, rtol=None):
        atol, rtol = self._default_tol(x, atol, rtol)
        _, (x,) = self._upcast(x)
        norm = torch.linalg.vector_norm(tall(x), dim=-2)
        if not torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol):
            return False, f"column norms of `x` != 1 with atol={atol}, rtol={rtol}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=None, rtol=None):
        atol, rtol = self._default_tol(x, atol, rtol)
        _, (x, u) = self._upcast(x, u)
        dots = (tall(x) * tall(u)).sum(dim=-2)
        if not torch.allclose(dots, torch.zeros_like(dots), atol=atol, rtol=rtol):
            return False, f"column-wise `<x_j, u_j> != 0` with atol={atol}, rtol={rtol}"
        return True, None

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        dtype, (x,) = self._upcast(x)
        return untall(normalize(tall(x), -2), x).to(dtype)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dtype, (x, u) = self._upcast(x, u)
        xt, ut = tall(x), tall(u)
        return untall(ut - (xt * ut).sum(dim=-2, keepdim=True) * xt, x).to(dtype)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dtype, (x, u) = self._upcast(x, u)  # add in float32 for 16-bit inputs
        return self.projx(x + u).to(dtype)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # Exact geodesic of the product of spheres, one great circle per column.
        dtype, (x, u) = self._upcast(x, u)
        xt, ut = tall(x), tall(u)
        norm_u = torch.linalg.vector_norm(ut, dim=-2, keepdim=True)
        eps = torch.finfo(xt.dtype).eps
        exp = xt * torch.cos(norm_u) + ut * torch.sin(norm_u) / norm_u.clamp_min(eps)
        out = torch.where(norm_u > eps, exp, normalize(xt + ut, -2))
        return untall(out, x).to(dtype)

    def extra_repr(self) -> str:
        return ""
