"""Per-kernel sphere: every ``(A, B)`` kernel has unit Frobenius norm."""

from __future__ import annotations

import geoopt
import torch

from ._base import KernelManifoldMixin

__all__ = ["KernelSphere", "normalize"]


def normalize(x: torch.Tensor, dim: tuple[int, ...] | int) -> torch.Tensor:
    """Divide by the l2 norm over ``dim``; a zero slice becomes the constant unit vector."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    if isinstance(dim, int):
        dim = (dim,)
    count = 1
    for d in dim:
        count *= x.shape[d]
    fallback = torch.full((), count**-0.5, dtype=x.dtype, device=x.device)
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(norm > tiny, x / norm.clamp_min(tiny), fallback)


class KernelSphere(KernelManifoldMixin, geoopt.Sphere):
    r"""Unit Frobenius norm per kernel: :math:`\{w \in \mathbb{R}^{A \times B} : \|w\|_F = 1\}`.

    Equal to :class:`geoopt.Sphere` applied to the flattened kernels, with the trailing two
    dimensions as the manifold dimensions, a zero-safe projection and tolerances from
    ``torch.finfo``.
    """

    name = "KernelSphere"

    def __init__(self):
        super().__init__()

    def _check_point_on_manifold(self, x, *, atol=None, rtol=None):
        atol, rtol = self._default_tol(x, atol, rtol)
        _, (x,) = self._upcast(x)
        norm = torch.linalg.vector_norm(x, dim=(-2, -1))
        if not torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol):
            return False, f"`norm(x) != 1` with atol={atol}, rtol={rtol}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=None, rtol=None):
        atol, rtol = self._default_tol(x, atol, rtol)
        _, (x, u) = self._upcast(x, u)
        inner = self.inner(x, x, u)
        if not torch.allclose(inner, torch.zeros_like(inner), atol=atol, rtol=rtol):
            return False, f"`<x, u> != 0` with atol={atol}, rtol={rtol}"
        return True, None

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        dtype, (x,) = self._upcast(x)
        return normalize(x, (-2, -1)).to(dtype)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dtype, (x, u) = self._upcast(x, u)
        return (u - (x * u).sum(dim=(-2, -1), keepdim=True) * x).to(dtype)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dtype, (x, u) = self._upcast(x, u)  # add in float32 for 16-bit inputs
        return self.projx(x + u).to(dtype)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dtype, (x, u) = self._upcast(x, u)
        norm_u = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True)
        tiny = torch.finfo(x.dtype).eps
        exp = x * torch.cos(norm_u) + u * torch.sin(norm_u) / norm_u.clamp_min(tiny)
        return torch.where(norm_u > tiny, exp, normalize(x + u, (-2, -1))).to(dtype)

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps
        return self.inner(x, x, y, keepdim=keepdim).clamp(-1 + eps, 1 - eps).acos()

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = self.proju(x, y - x)
        dist = self.dist(x, y, keepdim=True)
        eps = torch.finfo(x.dtype).eps
        norm_u = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True).clamp_min(eps)
        return torch.where(dist > eps, u * dist / norm_u, u)

    def extra_repr(self) -> str:
        return ""
