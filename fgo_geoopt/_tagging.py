"""Tagging of parameters with their collections, and the guard rails that keep it.

A wrapped weight is a :class:`geoopt.ManifoldParameter` whose manifold is a
:class:`~fgo_geoopt.KernelCollection`. The module that owns it also records the collection in
``module.__dict__["_fgo_collections"]`` (plain data: it follows deepcopy and pickling and never
enters ``state_dict``) and carries a ``load_state_dict`` post hook. Some operations replace a
parameter object by a plain one (``load_state_dict(assign=True)``, ``model.to("meta")``,
conversions under ``torch.__future__.set_swap_module_params_on_conversion(True)``): the record
lets the hook and :func:`fgo_geoopt.reproject` restore the tag, and :func:`fgo_geoopt.check`
report it, instead of the weight silently turning Euclidean.

Checkpoints carry their groupings' fingerprints: a ``state_dict`` hook writes one per wrapped
weight into the state dict's ``_metadata`` (which ``torch.save`` and ``torch.load(weights_only=
True)`` keep; the keys stay those of the plain model), and a ``load_state_dict`` pre hook
refuses weights saved on another grouping, whose re-projection would silently move them.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import geoopt
import torch
from torch import nn

from . import _misuse
from .collections import KernelCollection

COLLECTIONS_ATTR = "_fgo_collections"
#: Key of the grouping fingerprints in a module's entry of ``state_dict._metadata``.
METADATA_KEY = "fgo_groupings"
#: The fix, named once in the errors of a load on other groupings.
LOAD_FIX = (
    "rebuild the saved groupings first: fgo_geoopt.load_grouping_state(model, grouping_state) "
    "with the grouping_state(model) saved next to the weights, or wrap(model, strategy, "
    "seed=...) with the arguments the checkpoint was trained with; to start from these "
    "weights on new groupings, load them into the unwrapped model and wrap it afterwards"
)


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
        if key not in ("manifold", _misuse.REPLACED_ATTR, _misuse.STEPPED_ATTR):
            new.__dict__.setdefault(key, value)
    _misuse.retire(old, f"{type(module).__name__}.{attr} of shape {tuple(old.shape)}")
    setattr(module, attr, new)
    record(module, attr, coll)


def record(module: nn.Module, attr: str, coll: KernelCollection) -> None:
    """Remember ``coll`` on ``module`` and make sure its load hook is registered (once)."""
    colls = module.__dict__.setdefault(COLLECTIONS_ATTR, {})
    colls[attr] = coll
    hooks = module._load_state_dict_post_hooks.values()
    if not any(h is after_load for h in hooks):
        module.register_load_state_dict_post_hook(after_load)
    if not any(h is before_load for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(before_load)
    if not any(h is save_groupings for h in module._state_dict_hooks.values()):
        module._register_state_dict_hook(save_groupings)  # public only since torch 2.5


def untag(module: nn.Module, attr: str) -> None:
    """Make ``module.<attr>`` a plain parameter (same memory) and forget its collection."""
    old = module._parameters.get(attr)
    if old is not None and collection_of(old) is not None:
        _misuse.retire(old, f"{type(module).__name__}.{attr} of shape {tuple(old.shape)}")
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


def fingerprint(coll: KernelCollection) -> dict[str, Any]:
    """Plain data that tells whether two collections group a weight the same way.

    ``crc`` is a checksum of the canonical grouping (POMs are relabelled at construction, so
    equal groupings give equal arrays); the other fields make error messages readable.
    """
    crc = zlib.crc32(f"{coll.shape}|{coll.view}|{coll.manifold_names}".encode())
    for t in (coll.pom_type, coll.pom_ptr, coll.pom_kernels):
        if t is not None:
            crc = zlib.crc32(t.numpy().tobytes(), crc)
    return {
        "strategy": coll.strategy,
        "manifolds": list(coll.manifold_names),
        "seed": int(coll.seed),
        "crc": int(crc),
    }


def _describe(fp: dict[str, Any]) -> str:
    manifolds = "+".join(fp.get("manifolds", []))
    return f"strategy {fp.get('strategy')!r} on {manifolds}, layer seed {fp.get('seed')}"


def save_groupings(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """``state_dict`` hook: the fingerprint of every wrapped weight of ``module``."""
    colls = module.__dict__.get(COLLECTIONS_ATTR, {})
    if colls:
        local_metadata[METADATA_KEY] = {attr: fingerprint(c) for attr, c in colls.items()}


@torch.no_grad()
def before_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre hook: refuse weights saved on another grouping.

    A checkpoint of a wrapped model names its groupings (:func:`save_groupings`): a mismatch
    is an error in torch's ``error_msgs`` (``load_state_dict`` raises ``RuntimeError``, as for
    a size mismatch). A plain checkpoint (metadata without fingerprints) is projected silently:
    that is how pretrained weights start FG-SGD. Without any metadata (a state dict rebuilt as a
    plain ``dict``) the source is unknown, so off-manifold weights are projected with a warning.
    """
    saved = local_metadata.get(METADATA_KEY, {})
    for attr, coll in module.__dict__.get(COLLECTIONS_ATTR, {}).items():
        value = state_dict.get(prefix + attr)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != coll.shape:
            continue  # missing or mis-shaped: torch reports it
        if attr in saved:
            here = fingerprint(coll)
            if saved[attr].get("crc") != here["crc"]:
                fix = "" if any(LOAD_FIX in m for m in error_msgs) else f"; {LOAD_FIX}"
                error_msgs.append(
                    f"{prefix}{attr} was saved on another grouping ({_describe(saved[attr])}) "
                    f"than this model's ({_describe(here)}){fix}"
                )
        elif not local_metadata and value.device.type != "meta" and coll.violations(value):
            warnings.warn(
                "load_state_dict: weights without grouping metadata (a state dict copied into "
                "a plain dict) are off this model's manifolds and were projected onto them. "
                "That is expected for a plain (for example pretrained) checkpoint; if it was "
                f"saved from a wrapped model, {LOAD_FIX}",
                UserWarning,
                stacklevel=2,
            )


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
