"""A :class:`~fgo_geoopt.KernelCollection`'s constraint checks and random points (mixed into
it): every check runs per manifold type on the unit kernels ``W / R``."""

from __future__ import annotations

import torch

from .manifolds._base import default_atol

__all__ = ["CollectionChecks"]


class CollectionChecks:
    """Point and tangent checks, readable violations, random points."""

    def _check_point_on_manifold(self, x, *, atol=None, rtol=None):
        atol = default_atol(x.dtype) if atol is None else atol
        rtol = default_atol(x.dtype) if rtol is None else rtol
        bad = self.violations(x, atol=atol, rtol=rtol)
        if bad:
            return False, "; ".join(bad)
        return True, None

    def violations(self, x: torch.Tensor, *, atol=None, rtol=None) -> list[str]:
        """Human-readable constraint violations of ``W / R`` per manifold type (empty if none)."""
        atol = default_atol(x.dtype) if atol is None else atol
        rtol = default_atol(x.dtype) if rtol is None else rtol
        reasons = []
        kx = self._kernels(x)
        a, b = self.kernel_shape
        for t, _, _, _, (part,) in self._unit_parts(kx, device=x.device, dtype=x.dtype):
            ok, why = self.manifolds[t].check_point_on_manifold(
                part.view(-1, a, b), explain=True, atol=atol, rtol=rtol
            )
            if not ok:
                reasons.append(f"{self.manifold_names[t]}: {why}")
        return reasons

    def _check_vector_on_tangent(self, x, u, *, atol=None, rtol=None):
        atol = default_atol(x.dtype) if atol is None else atol
        rtol = default_atol(x.dtype) if rtol is None else rtol
        kx, ku = self._kernels(x), self._kernels(u)
        a, b = self.kernel_shape
        for t, _, _, _, (px, pu) in self._unit_parts(kx, ku, device=x.device, dtype=x.dtype):
            ok, why = self.manifolds[t].check_vector_on_tangent(
                px.view(-1, a, b), pu.view(-1, a, b), explain=True, atol=atol, rtol=rtol
            )
            if not ok:
                return False, f"{self.manifold_names[t]}: {why}"
        return True, None

    def random(self, *size, dtype=None, device=None, generator=None, **kwargs) -> torch.Tensor:
        if (
            size
            and tuple(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
            != self.shape
        ):
            raise ValueError(f"a KernelCollection point has shape {self.shape}")
        x = torch.randn(self.shape, dtype=dtype, device=device, generator=generator)
        return self.projx(x)

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> torch.Tensor:
        gen = torch.Generator(device=device or "cpu").manual_seed(0 if seed is None else seed)
        return self.random(dtype=dtype, device=device, generator=gen)
