"""Per-kernel manifolds and their registry."""

from .euclidean import KernelEuclidean
from .oblique import Oblique
from .registry import (
    canonical_name,
    get_manifold,
    list_manifolds,
    register_manifold,
    unregister_manifold,
)
from .sphere import KernelSphere
from .stiefel import KernelStiefel, orthonormalize

__all__ = [
    "KernelEuclidean",
    "KernelSphere",
    "KernelStiefel",
    "Oblique",
    "canonical_name",
    "get_manifold",
    "list_manifolds",
    "orthonormalize",
    "register_manifold",
    "unregister_manifold",
]
