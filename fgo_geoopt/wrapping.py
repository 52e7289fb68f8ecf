"""Turn the conv / linear weights of any ``nn.Module`` into FG-SGD manifold parameters.

:func:`wrap` replaces each selected weight by a :class:`geoopt.ManifoldParameter` whose manifold
is the layer's :class:`~fgo_geoopt.KernelCollection`, and projects it onto that collection (the
paper initialises weights on the manifolds). Parameter names and ``state_dict`` keys do not
change. Every module that owns a wrapped weight also remembers its collection and carries a
``load_state_dict`` post hook, so that loading (also with ``assign=True``) keeps the tagging and
re-projects off-manifold weights, and :func:`check` can report a weight that lost its manifold.
Checkpoints name their groupings (in ``state_dict._metadata``), and loading one saved on other
groupings raises instead of re-projecting it.

Nothing here imports timm: the classifier head is found from ``model.pretrained_cfg`` when the
model has one (timm models do), and the optimizer registration is delegated to
:mod:`fgo_geoopt.integrations.timm`, which imports timm lazily. Which weights are selected
lives in ``_selection.py``, the per-layer report of :func:`describe` in ``_describe.py``; both
are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import _misuse
from ._describe import describe, format_table, unique_entries
from ._selection import classifier_names, parameter_owners, patterns, select
from ._tagging import (
    COLLECTIONS_ATTR,
    collection_of,
    lost_tags,
    record,
    restore,
    restore_or_tag,
    tag_problem,
    untag,
    wrapped_entries,
)
from .collections import (
    KERNEL_VIEWS,
    KernelCollection,
    build_collection,
    layer_seed,
    resolve_strategy,
)
from .manifolds._base import default_atol

__all__ = [
    "check",
    "classifier_names",
    "describe",
    "format_table",
    "grouping_state",
    "load_grouping_state",
    "lost_tags",
    "reproject",
    "wrap",
]

# The arguments of the last wrap call, on the model (plain data in ``__dict__``).
_CONFIG_ATTR = "_fgo_wrap_config"


def _share(owners: list[tuple[nn.Module, str]], coll: KernelCollection) -> None:
    """Tied weights: give every other owner the first owner's (manifold) parameter."""
    module, attr = owners[0]
    for other, other_attr in owners[1:]:
        setattr(other, other_attr, module._parameters[attr])
        record(other, other_attr, coll)


def _register_optimizers() -> None:
    from .integrations.timm import register_timm_optimizers

    register_timm_optimizers()


# ---------------------------------------------------------------------- public API
def wrap(
    model: nn.Module,
    strategy: str = "pio4",
    *,
    manifolds: Sequence[str] | None = None,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    kernel: str = "auto",
    rescale: bool = False,
) -> nn.Module:
    """Put the conv / linear weights of ``model`` on their kernel collections, in place.

    Selected by default: every 4-D ``nn.Conv2d`` and 2-D ``nn.Linear`` weight outside the
    classifier head (see :func:`classifier_names`). Norms, biases, the head, embeddings,
    Conv1d / Conv3d and all other parameters stay Euclidean. Each selected weight becomes a
    :class:`geoopt.ManifoldParameter` on a collection built by
    :func:`~fgo_geoopt.build_collection` with the seed ``layer_seed(seed, name)`` (reproducible
    and independent of module order), and is projected onto it. Grouped and depthwise convs
    work on their ``(c_out, c_in / groups, k_h, k_w)`` weights.

    Calling ``wrap`` again makes the model match the new call: layers whose configuration is
    unchanged keep their collection (and grouping, and scales), weights that lost their tag
    are re-tagged, every wrapped weight is re-projected, and layers no longer selected become
    plain parameters again. ``strategy="euc"`` (the Euclidean baseline) wraps nothing, so the
    model is the plain one and FG-SGD on it is exactly SGD.

    Also registers ``fgsgd`` / ``nfgsgd`` with timm's optimizer factory when timm is
    installed. Optimizers must be created after ``wrap``: it replaces parameter objects. An
    optimizer that still holds replaced ones, and a non-Riemannian optimizer (``AdamW``, ...)
    stepping wrapped weights, warn once on their first step.

    Args:
        model: Any module (timm, torchvision, your own).
        strategy: A Table 3 preset (``euc``, ``st``, ``poms_st``, ``pio3``, ``pio4``) or a plain
            strategy (``pi``, ``po``, ``pio``, ``single``) with ``manifolds``.
        manifolds: Registered manifold names for a plain strategy (default Sp+Ob+St).
        seed: Base seed of the groupings.
        include: fnmatch patterns on parameter names; when given, exactly the eligible
            weights matching one of them are wrapped (the head too, if a pattern matches it).
            A pattern that matches no eligible weight raises ``ValueError``.
        exclude: fnmatch patterns of weights to leave Euclidean.
        kernel: Kernel view passed to :func:`~fgo_geoopt.build_collection` (``auto``,
            ``spatial``, ``filter``, ``euclidean``).
        rescale: Also attach a :class:`fgo_geoopt.rescaling.Rescaler` as
            ``model.fgo_rescaler`` (the re-scaling of ``docs/rescaling.md``; call its
            ``update()`` at the end of every epoch). A later ``wrap`` call without
            ``rescale`` keeps existing scales.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}")
    strategy_key, names = resolve_strategy(strategy, manifolds)
    if kernel not in KERNEL_VIEWS:
        raise ValueError(f"unknown kernel view {kernel!r}; valid: {', '.join(KERNEL_VIEWS)}")
    include_p, exclude_p = patterns(include, "include"), patterns(exclude, "exclude")
    selected = select(model, include_p, exclude_p)
    if (strategy_key, names) == ("single", ("euclidean",)):
        selected = {}
    on_meta = [
        n for n, owners in selected.items() if owners[0][0]._parameters[owners[0][1]].is_meta
    ]
    if on_meta:
        more = f" (and {len(on_meta) - 1} more)" if len(on_meta) > 1 else ""
        raise ValueError(
            f"wrap needs weights with data, but {on_meta[0]}{more} is on the meta device: "
            "materialise the model first (model.to_empty(device=...), then initialise or load "
            "its weights) and call wrap afterwards"
        )
    targets = {(id(m), a) for owners in selected.values() for m, a in owners}
    for _, module, attr, _ in list(wrapped_entries(model)):
        if (id(module), attr) not in targets:
            untag(module, attr)
    for name, owners in selected.items():
        seed_l = layer_seed(seed, name)
        module, attr = owners[0]
        p = module._parameters[attr]
        current = collection_of(p) or module.__dict__.get(COLLECTIONS_ATTR, {}).get(attr)
        if not (
            current is not None
            and current.shape == tuple(p.shape)
            and (current.strategy, current.manifold_names) == (strategy_key, names)
            and current.kernel == kernel
            and current.seed == seed_l
        ):
            current = build_collection(p.shape, strategy_key, names, seed=seed_l, kernel=kernel)
        if getattr(current, "init_rms", None) is None and collection_of(p) is None:
            current.init_rms = _entry_rms(p)
        restore_or_tag(module, attr, current)
        current.projected_dtype = p.dtype
        _share(owners, current)
    model.__dict__[_CONFIG_ATTR] = {
        "strategy": strategy,
        "manifolds": None if manifolds is None else list(manifolds),
        "seed": int(seed),
        "include": list(include_p),
        "exclude": list(exclude_p),
        "kernel": kernel,
        "rescale": bool(rescale),
    }
    _register_optimizers()
    _misuse.install()
    if rescale:
        _attach_rescaler(model)
    return model


def _entry_rms(p) -> float | None:
    """Root mean square entry of a weight as the model initialised it (``None`` on meta)."""
    if p.device.type == "meta" or p.numel() == 0:
        return None
    rms = float(p.detach().to(torch.float64).pow(2).mean().sqrt())
    return rms if math.isfinite(rms) and rms > 0 else None


def _attach_rescaler(model: nn.Module) -> None:
    from .rescaling import Rescaler

    previous = model.__dict__.get("fgo_rescaler")
    if previous is not None:
        previous.remove()  # its statistics hooks would otherwise run twice
    # Through __dict__: the rescaler holds the model and must never become a submodule.
    model.__dict__["fgo_rescaler"] = Rescaler(model)


def check(model: nn.Module, atol: float | None = None, rtol: float | None = None) -> list[str]:
    """Every problem of the weights of ``model`` (empty when all is well).

    Reports wrapped weights whose constraint does not hold within the tolerance (default from
    ``torch.finfo`` of the weight's dtype, or of the dtype ``wrap`` / ``reproject`` projected
    it in where that is coarser, as after ``model.double()``), wrapped weights that lost their
    manifold tagging, for example after ``model.to("meta")`` or a manual replacement (fix both with
    :func:`reproject`), and every parameter with NaN or inf entries, wrapped or not (Euclidean
    kernels of a collection and plain parameters included; no projection fixes those).
    """
    out = []
    bad = _nonfinite(model)
    for name, module, attr, coll in wrapped_entries(model):
        p = module._parameters.get(attr)
        problem = tag_problem(name, p)
        if problem is not None:
            out.append(problem)
            continue
        if id(p) in bad:
            continue  # reported below; NaN makes every constraint fail
        tol_a, tol_r = atol, rtol
        projected = getattr(coll, "projected_dtype", None)
        if projected is not None and torch.finfo(projected).eps > torch.finfo(p.dtype).eps:
            # Projected in a coarser dtype than it is stored in now (``model.double()`` after
            # wrap): the constraint holds to that dtype's rounding until a step or
            # ``reproject`` redoes it in the new one.
            tol = default_atol(projected)
            tol_a = tol if atol is None else atol
            tol_r = tol if rtol is None else rtol
        why = coll.violations(p.detach(), atol=tol_a, rtol=tol_r)
        if why and (by := _misuse.stepped_by(p)) is not None:
            why.append(
                f"it was stepped by {by}, which is not a Riemannian optimizer: "
                "use fgo_geoopt.FGSGD and fgo_geoopt.reproject(model)"
            )
        out.extend(f"{name}: {w}" for w in why)
    out.extend(bad.values())
    return out


def _nonfinite(model: nn.Module) -> dict[int, str]:
    """``{id(p): message}`` of every parameter with NaN / inf entries (a tied one once)."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue
        finite = torch.isfinite(p.detach())
        if not bool(finite.all()):
            count = int((~finite).sum())
            out[id(p)] = f"{name}: {count} non-finite (NaN / inf) entries of {p.numel()}"
    return out


def reproject(model: nn.Module) -> nn.Module:
    """Project every wrapped weight onto its collection, in place; re-tag lost ones.

    This is the helper for averaged weights (EMA, SWA, lookahead): an average of points of a
    sphere or a Stiefel manifold is not on it, so call ``reproject(ema_model)`` before using
    the averaged model. Returns ``model``.
    """
    for _, module, attr, coll in list(wrapped_entries(model)):
        restore(module, attr, coll, force=True)
        p = module._parameters.get(attr)
        if p is not None:
            coll.projected_dtype = p.dtype
    return model


def grouping_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: collection.state_dict()}`` of every wrapped weight (plain data)."""
    return {name: coll.state_dict() for name, coll in unique_entries(model)}


def load_grouping_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-wrap ``model`` with exactly the groupings of ``state`` (from :func:`grouping_state`).

    Weights named in ``state`` are bound to the saved collections (projected only if they are
    off their manifold, so a checkpoint loaded into the unwrapped model before, or into the
    model after, stays bit-exact); wrapped weights not named in ``state`` become plain
    parameters. Loading a wrapped model's checkpoint into a model wrapped on other groupings
    raises, so call this first. Returns ``model``.
    """
    holders = parameter_owners(model)
    by_name = {
        name: (module, attr) for entries in holders.values() for name, module, attr in entries
    }
    unknown = sorted(set(state) - set(by_name))
    if unknown:
        raise ValueError(f"grouping state names parameters the model does not have: {unknown}")
    plan = []
    for name, saved in state.items():
        coll = KernelCollection.from_state_dict(saved)
        module, attr = by_name[name]
        p = module._parameters[attr]
        if tuple(p.shape) != coll.shape:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)}, its saved grouping expects {coll.shape}"
            )
        plan.append((id(p), coll, [(m, a) for _, m, a in holders[id(p)]]))
    keep = {pid for pid, _, _ in plan}
    for _, module, attr, _ in list(wrapped_entries(model)):
        if id(module._parameters.get(attr)) not in keep:
            untag(module, attr)
    done: set[int] = set()
    for pid, coll, entries in plan:
        if pid in done:  # a tied weight saved under several names
            continue
        done.add(pid)
        module, attr = entries[0]
        if collection_of(module._parameters[attr]) is not None:
            untag(module, attr)
        restore(module, attr, coll, force=False)
        _share(entries, coll)
    _register_optimizers()
    _misuse.install()
    return model
