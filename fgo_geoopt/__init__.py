"""fgo_geoopt: fine-grained optimisation of deep networks on products of weight manifolds."""

from .collections import PRESETS, KernelCollection, build_collection
from .integrations.timm import param_groups
from .manifolds import (
    KernelEuclidean,
    KernelSphere,
    KernelStiefel,
    Oblique,
    get_manifold,
    list_manifolds,
    register_manifold,
)
from .optim import FGSGD, FGAdam
from .rescaling import Rescaler
from .wrapping import (
    check,
    describe,
    format_table,
    grouping_state,
    load_grouping_state,
    reproject,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "FGSGD",
    "PRESETS",
    "FGAdam",
    "KernelCollection",
    "KernelEuclidean",
    "KernelSphere",
    "KernelStiefel",
    "Oblique",
    "Rescaler",
    "__version__",
    "build_collection",
    "check",
    "describe",
    "format_table",
    "get_manifold",
    "grouping_state",
    "list_manifolds",
    "load_grouping_state",
    "param_groups",
    "register_manifold",
    "reproject",
    "wrap",
]
