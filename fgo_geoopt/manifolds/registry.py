"""Registry of per-kernel manifolds, by name, for collections and user extensions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import geoopt

from .euclidean import KernelEuclidean
from .oblique import Oblique
from .sphere import KernelSphere
from .stiefel import KernelStiefel

__all__ = ["canonical_name", "get_manifold", "list_manifolds", "register_manifold"]

ManifoldFactory = Callable[[], geoopt.Manifold]

_FACTORIES: dict[str, ManifoldFactory] = {}
_ALIASES: dict[str, str] = {}
_BUILTINS = frozenset({"sphere", "oblique", "stiefel", "euclidean"})


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"manifold names are non-empty lowercase strings, got {name!r}")
    return name


def register_manifold(
    name: str,
    factory: ManifoldFactory,
    *,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> None:
    """Register a per-kernel manifold under ``name`` (and optional ``aliases``).

    Args:
        name: Lowercase registry name, used in ``build_collection(manifolds=...)`` and in
            saved groupings.
        factory: Zero-argument callable returning a fresh :class:`geoopt.Manifold` that acts
            on the trailing two dimensions ``(A, B)`` of its inputs (see
            ``fgo_geoopt.testing.check_manifold_contract`` for the contract).
        aliases: Other names resolving to ``name``.
        overwrite: Replace an existing user registration of the same name. Built-in names
            can never be replaced.

    Raises:
        ValueError: For a bad name, a taken name or alias, or a factory that does not build a
            ``geoopt.Manifold``.
    """
    name = _check_name(name)
    aliases = tuple(_check_name(a) for a in aliases)
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    for key in (name, *aliases):
        if key in _BUILTINS or _ALIASES.get(key) in _BUILTINS:
            raise ValueError(f"{key!r} is a built-in manifold name and cannot be re-registered")
        taken = key in _FACTORIES or key in _ALIASES
        if taken and not overwrite:
            raise ValueError(f"manifold name {key!r} is already registered (pass overwrite=True)")
    probe = factory()
    if not isinstance(probe, geoopt.Manifold):
        raise ValueError(
            f"factory for {name!r} returned {type(probe).__name__}, not a geoopt.Manifold"
        )
    _FACTORIES[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name


def unregister_manifold(name: str) -> None:
    """Remove a user registration (built-ins cannot be removed)."""
    name = canonical_name(name)
    if name in _BUILTINS:
        raise ValueError(f"{name!r} is a built-in manifold and cannot be removed")
    del _FACTORIES[name]
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def canonical_name(name: str) -> str:
    """Resolve an alias to its registered name; ``ValueError`` listing valid names if unknown."""
    if isinstance(name, str):
        key = name.strip().lower()
        if key in _FACTORIES:
            return key
        if key in _ALIASES:
            return _ALIASES[key]
    valid = ", ".join(_describe_names())
    raise ValueError(f"unknown manifold {name!r}; valid names: {valid}")


def get_manifold(name: str) -> geoopt.Manifold:
    """A fresh instance of the manifold registered as ``name`` (aliases accepted)."""
    return _FACTORIES[canonical_name(name)]()


def list_manifolds() -> list[str]:
    """Registered manifold names (aliases not included), sorted."""
    return sorted(_FACTORIES)


def _describe_names() -> list[str]:
    out = []
    for name in sorted(_FACTORIES):
        alias = sorted(a for a, t in _ALIASES.items() if t == name)
        out.append(f"{name} ({', '.join(alias)})" if alias else name)
    return out


for _name, _factory, _alias in (
    ("sphere", KernelSphere, ("sp",)),
    ("oblique", Oblique, ("ob",)),
    ("stiefel", KernelStiefel, ("st",)),
    ("euclidean", KernelEuclidean, ("euc",)),
):
    _FACTORIES[_name] = _factory
    for _a in _alias:
        _ALIASES[_a] = _name
