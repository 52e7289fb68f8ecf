"""Tagging of parameters with their collections, and the guard rails that keep it.

A wrapped weight is a :class:`geoopt.ManifoldParameter` whose manifold is a
:class:`~fgo_geoopt.KernelCollection`. The module that owns it also records the collection in
``module.__dict__["_fgo_collections"]`` (plain data: it follows deepcopy and pickling and never
enters ``state_dict``) and carries a ``load_state_dict`` post hook. Some operations replace a
parameter object by a plain one (``load_state_dict(assign=True)``, ``model.to("meta")``,
conversions under ``torch.__future__.set_swap_module_params_on_conversion(True)``): the record
lets the hook and :func:`fgo_geoopt.reproject` restore the tag, and :func:`fgo_geoopt.check`
report it, instead of the weight silently turning Euclidean.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import geoopt
import torch
from torch import nn

from .collections import KernelCollection

COLLECTIONS_ATTR = "_fgo_collections"


def collection_of(p: torch.Tensor | None) -> KernelCollection | None:
    """The KernelCollection a parameter is tagged with, or None."""
    manifold = getattr(p, "manifold", None)
    return manifold if isinstance(manifold, KernelCollection) else None


def tag(module: nn.Module, attr: str, coll: KernelCollection, data: torch.Tensor) -> None:
    """Make ``module.<attr>`` a ManifoldParameter on ``coll`` holding ``data`` (no copy)."""
    old = module._parameters[attr]
    new = geoopt.ManifoldParameter(data, manifold=coll, requires_grad=old.requires_grad)
    # Keep attributes other code may have set on the parameter (sharding flags and the like).
    for key, value in old.__dict__.items():
        if key != "manifold":
            new.__dict__.setdefault(key, value)
    setattr(module, attr, new)
    record(module, attr, coll)


def record(module: nn.Module, attr: str, coll: KernelCollection) -> None:
    """Remember ``coll`` on ``module`` and make sure its load hook is registered (once)."""
    colls = module.__dict__.setdefault(COLLECTIONS_ATTR, {})
    colls[attr] = coll
    hooks = module._load_state_dict_post_hooks.values()
    if not any(h is after_load for h in hooks):
        module.register_load_state_dict_post_hook(after_load)


def untag(module: nn.Module, attr: str) -> None:
    """Make ``module.<attr>`` a plain parameter (same memory) and forget its collection."""
    old = module._parameters.get(attr)
    if old is not None and collection_of(old) is not None:
        setattr(module, attr, nn.Parameter(old.detach(), requires_grad=old.requires_grad))
    module.__dict__.get(COLLECTIONS_ATTR, {}).pop(attr, None)


@torch.no_grad()
def restore(module: nn.Module, attr: str, coll: KernelCollection, *, force: bool) -> None:
    """Re-tag ``module.<attr>`` on ``coll`` if it lost the tag, and project it if needed.

    A re-tagged weight may share memory with tensors the caller still holds (``assign=True``
    loads do that), so it is projected out of place; a tagged one is projected in place.
    """
    p = module._parameters.get(attr)
    if p is None:
        return
    if collection_of(p) is None:
        if tuple(p.shape) != coll.shape:
            raise ValueError(
                f"cannot restore the manifold of a weight of shape {tuple(p.shape)}: its "
                f"collection expects {coll.shape}"
            )
        data = p.detach()
        if force or coll.violations(data):
            data = coll.projx(data)
        tag(module, attr, coll, data)
    elif force or p.manifold.violations(p.detach()):
        p.copy_(p.manifold.projx(p.detach()))


def after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post hook: keep the tagging and project off-manifold weights."""
    for attr, coll in list(module.__dict__.get(COLLECTIONS_ATTR, {}).items()):
        restore(module, attr, coll, force=False)


def wrapped_entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, KernelCollection]]:
    """``(name, module, attr, collection)`` of every wrapped weight, tagged or not."""
    for mod_name, module in model.named_modules():
        recorded = module.__dict__.get(COLLECTIONS_ATTR, {})
        attrs = list(recorded)
        attrs += [
            a
            for a, p in module._parameters.items()
            if a not in recorded and collection_of(p) is not None
        ]
        for attr in attrs:
            coll = collection_of(module._parameters.get(attr)) or recorded[attr]
            yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, coll


@torch.no_grad()
def restore_or_tag(module: nn.Module, attr: str, coll: KernelCollection) -> None:
    """Project ``module.<attr>`` onto ``coll`` in place and tag it (what ``wrap`` does)."""
    p = module._parameters[attr]
    if collection_of(p) is coll:
        p.copy_(coll.projx(p.detach()))
        record(module, attr, coll)
        return
    data = p.detach()
    # In place: the weight belongs to the model, and wrap's contract is to project it.
    data.copy_(coll.projx(data))
    tag(module, attr, coll, data)


def tag_problem(name: str, p: torch.Tensor | None) -> str | None:
    """Why the wrapped weight ``name`` is no longer a manifold parameter, or None."""
    if p is None:
        return f"{name}: the wrapped weight was removed from its module"
    if collection_of(p) is None:
        return (
            f"{name}: lost its manifold (it is a plain {type(p).__name__} now); "
            "fgo_geoopt.reproject(model) or load_state_dict restores it"
        )
    return None


def lost_tags(model: nn.Module) -> list[str]:
    """The wrapped weights of ``model`` that are no longer manifold parameters (cheap)."""
    found = (
        tag_problem(name, module._parameters.get(attr))
        for name, module, attr, _ in wrapped_entries(model)
    )
    return [msg for msg in found if msg is not None]
