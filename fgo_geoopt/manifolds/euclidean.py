"""Per-kernel Euclidean space: the unconstrained member of a manifold mix."""

from __future__ import annotations

import geoopt
import torch

from ._base import KernelManifoldMixin

__all__ = ["KernelEuclidean"]


class KernelEuclidean(KernelManifoldMixin, geoopt.Euclidean):
    r""":math:`\mathbb{R}^{A \times B}` per kernel: projections are identities, ``retr`` adds."""

    name = "KernelEuclidean"

    def __init__(self):
        super().__init__(ndim=2)

    def _check_point_on_manifold(self, x, *, atol=None, rtol=None):
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=None, rtol=None):
        return True, None

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x + u

    expmap = retr

    def random(self, *size, dtype=None, device=None, generator=None, **kwargs) -> torch.Tensor:
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        return torch.randn(*size, dtype=dtype, device=device, generator=generator)

    def extra_repr(self) -> str:
        return ""
