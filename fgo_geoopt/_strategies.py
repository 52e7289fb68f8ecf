"""Names of groupings: the Table 3 presets, strategies with their manifolds, kernel views and
the per-layer seeds; resolved here, before any collection is built."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from ._grouping import STRATEGIES
from .manifolds import canonical_name

__all__ = ["KERNEL_VIEWS", "PRESETS", "layer_seed", "pick_view", "resolve_strategy"]

#: Table 3 rows of the paper as (strategy, manifolds).
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "euc": ("single", ("euclidean",)),
    "st": ("single", ("stiefel",)),
    "poms_st": ("pio", ("stiefel",)),
    "pio3": ("pio", ("sphere", "oblique", "stiefel")),
    "pio4": ("pio", ("sphere", "oblique", "stiefel", "euclidean")),
}
DEFAULT_MANIFOLDS = ("sphere", "oblique", "stiefel")
KERNEL_VIEWS = ("auto", "spatial", "filter", "euclidean")


def resolve_strategy(
    strategy: str, manifolds: Sequence[str] | None = None
) -> tuple[str, tuple[str, ...]]:
    """Turn a preset or a strategy plus manifolds into ``(strategy, canonical manifold names)``."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string, got {type(strategy).__name__}")
    key = strategy.strip().lower()
    if key in PRESETS:
        if manifolds is not None:
            raise ValueError(
                f"preset {key!r} fixes its manifolds {PRESETS[key][1]}; pass a plain strategy "
                f"({', '.join(STRATEGIES)}) to choose manifolds yourself"
            )
        return PRESETS[key]
    if key not in STRATEGIES:
        valid = ", ".join((*STRATEGIES, *PRESETS))
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies and presets: {valid}")
    if manifolds is None:
        manifolds = DEFAULT_MANIFOLDS
    if isinstance(manifolds, str):
        manifolds = (manifolds,)
    names = tuple(canonical_name(m) for m in manifolds)
    if not names:
        raise ValueError("manifolds must name at least one manifold")
    if len(set(names)) != len(names):
        raise ValueError(f"manifolds must not repeat a manifold, got {list(manifolds)}")
    return key, names


def pick_view(shape: tuple[int, ...], kernel: str) -> str:
    if kernel not in KERNEL_VIEWS:
        raise ValueError(f"unknown kernel view {kernel!r}; valid: {', '.join(KERNEL_VIEWS)}")
    if kernel in ("spatial", "filter"):
        if kernel == "spatial" and len(shape) == 2:
            raise ValueError("a 2-D (linear) weight has no spatial kernels; use kernel='filter'")
        return kernel
    if kernel == "euclidean":
        return "filter" if len(shape) == 2 or shape[2] * shape[3] == 1 else "spatial"
    # auto: 1x1 convs and linear layers have no spatial kernel worth constraining
    # (a 1x1 kernel on the sphere is +-1), so they use the filter view (docs/design.md).
    if len(shape) == 2 or shape[2] * shape[3] == 1:
        return "filter"
    return "spatial"


def layer_seed(seed: int, name: str) -> int:
    """Seed of one layer's grouping: stable across processes (no Python ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
