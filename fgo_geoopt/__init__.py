"""fgo_geoopt: fine-grained optimisation of deep networks on products of weight manifolds."""

from .collections import PRESETS, KernelCollection, build_collection
from .manifolds import (
    KernelEuclidean,
    KernelSphere,
    KernelStiefel,
    Oblique,
    get_manifold,
    list_manifolds,
    register_manifold,
)
from .optim import FGSGD

__version__ = "0.1.0"

__all__ = [
    "FGSGD",
    "PRESETS",
    "KernelCollection",
    "KernelEuclidean",
    "KernelSphere",
    "KernelStiefel",
    "Oblique",
    "__version__",
    "build_collection",
    "get_manifold",
    "list_manifolds",
    "register_manifold",
]
