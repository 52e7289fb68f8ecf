"""Shared plumbing of the per-kernel manifolds.

Every per-kernel manifold acts on the trailing two dimensions ``(A, B)`` of a tensor with any
batch shape: a conv weight ``(c_out, c_in, k_h, k_w)`` is ``c_out * c_in`` points. Half
precision inputs are computed in float32 and cast back, so the maths never runs in bfloat16.
"""

from __future__ import annotations

import torch

__all__ = ["KernelManifoldMixin", "compute_dtype", "default_atol", "tall", "untall"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in: float32 for 16-bit floats, the dtype itself otherwise."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def default_atol(dtype: torch.dtype, factor: float = 50.0) -> float:
    """Tolerance for constraint checks, from ``torch.finfo`` (never a dtype-keyed table)."""
    eps = torch.finfo(dtype).eps
    # 16-bit storage rounds every entry: the constraint holds to about sqrt(eps) there.
    if torch.finfo(dtype).bits <= 16:
        return max(factor * eps, 1e-2)
    return factor * eps


def tall(x: torch.Tensor) -> torch.Tensor:
    """View kernels with ``A < B`` transposed, so that ``A >= B`` (columns are the short axis)."""
    if x.shape[-2] < x.shape[-1]:
        return x.transpose(-1, -2)
    return x


def untall(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`tall` for a result ``y`` computed from the kernels ``like``."""
    if like.shape[-2] < like.shape[-1]:
        return y.transpose(-1, -2)
    return y


class KernelManifoldMixin:
    """Common behaviour of the per-kernel manifolds (``ndim = 2``)."""

    ndim = 2

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        if len(shape) < 2:
            return False, f"`{name}` needs at least 2 dimensions (A, B), got shape {tuple(shape)}"
        return True, None

    @staticmethod
    def _upcast(*tensors: torch.Tensor) -> tuple[torch.dtype, list[torch.Tensor]]:
        dtype = tensors[0].dtype
        work = compute_dtype(dtype)
        return dtype, [t if t.dtype == work else t.to(work) for t in tensors]

    def inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *, keepdim=False
    ) -> torch.Tensor:
        if v is None:
            v = u
        return (u * v).sum(dim=(-2, -1), keepdim=keepdim)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Vector transport by projection onto the tangent space at the new point.
        return self.proju(y, v)

    def retr_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.proju(x, u)

    def random(self, *size, dtype=None, device=None, generator=None, **kwargs) -> torch.Tensor:
        """A random point: a standard normal tensor projected onto the manifold."""
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        x = torch.randn(*size, dtype=dtype, device=device, generator=generator)
        return self.projx(x)

    random_naive = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> torch.Tensor:
        """A deterministic point from a private generator (the global RNG is never touched)."""
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(0 if seed is None else seed)
        return self.random(*size, dtype=dtype, device=device, generator=gen)

    def _default_tol(self, x: torch.Tensor, atol, rtol) -> tuple[float, float]:
        tol = default_atol(x.dtype)
        return (tol if atol is None else atol), (tol if rtol is None else rtol)
