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
:mod:`fgo_geoopt.integrations.timm`, which imports timm lazily.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import _misuse
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
# Root attributes tried, in order, when a model has no ``pretrained_cfg``: the names
# torchvision's classification models give their classifier.
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")


def _patterns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    if not all(isinstance(p, str) for p in out):
        raise ValueError(f"{what} must be a string or a sequence of strings, got {value!r}")
    return out


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the classifier head(s) of ``model`` (empty when none is found).

    timm models name theirs in ``model.pretrained_cfg["classifier"]`` (a string, or a tuple
    for distilled models); other models are searched for a root attribute called ``fc``,
    ``classifier``, ``head`` or ``heads``, the torchvision convention. "The last Linear" is
    never used: in several families the head is a 1x1 conv, or the last Linear is in the body.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        found = cfg["classifier"]
        return (found,) if isinstance(found, str) else tuple(found)
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(model, attr, None), nn.Module):
            return (attr,)
    return ()


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every ``(full name, module, attribute)`` holding each parameter, keyed by ``id``."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                name = f"{mod_name}.{attr}" if mod_name else attr
                out.setdefault(id(p), []).append((name, module, attr))
    return out


def _eligible(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Weights that can carry a collection: 2-D ``nn.Linear`` and 4-D ``nn.Conv2d`` weights.

    Conv1d / Conv3d, transposed convs, embeddings and other tensors stay Euclidean. Tied
    weights appear once, under their first name, with all their owners.
    """
    owners = _owners(model)
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    seen: set[int] = set()
    for _, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        p = module._parameters.get("weight")
        if p is None or id(p) in seen:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                "wrap needs materialised weights: run a forward pass on lazy modules first"
            )
        if p.ndim not in (2, 4):
            continue
        seen.add(id(p))
        entries = owners[id(p)]
        out[entries[0][0]] = [(m, a) for _, m, a in entries]
    return out


def _select(
    model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]
) -> dict[str, list[tuple[nn.Module, str]]]:
    eligible = _eligible(model)
    if include:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in eligible):
                raise ValueError(
                    f"include pattern {pattern!r} matches no conv / linear weight of the model"
                )
        chosen = {
            n: o for n, o in eligible.items() if any(fnmatch.fnmatchcase(n, p) for p in include)
        }
    else:
        heads = classifier_names(model)
        chosen = {n: o for n, o in eligible.items() if not _under(n, heads)}
    return {n: o for n, o in chosen.items() if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}


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
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    selected = _select(model, include_p, exclude_p)
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


def _unique_entries(model: nn.Module) -> list[tuple[str, KernelCollection]]:
    """``(name, collection)`` of every wrapped weight, a tied weight once (its first name)."""
    out, seen = [], set()
    for name, module, attr, coll in wrapped_entries(model):
        p = module._parameters.get(attr)
        if p is not None and id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, coll))
    return out


def grouping_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: collection.state_dict()}`` of every wrapped weight (plain data)."""
    return {name: coll.state_dict() for name, coll in _unique_entries(model)}


def load_grouping_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-wrap ``model`` with exactly the groupings of ``state`` (from :func:`grouping_state`).

    Weights named in ``state`` are bound to the saved collections (projected only if they are
    off their manifold, so a checkpoint loaded into the unwrapped model before, or into the
    model after, stays bit-exact); wrapped weights not named in ``state`` become plain
    parameters. Loading a wrapped model's checkpoint into a model wrapped on other groupings
    raises, so call this first. Returns ``model``.
    """
    owners = _owners(model)
    by_name = {
        name: (module, attr) for entries in owners.values() for name, module, attr in entries
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
        plan.append((id(p), coll, [(m, a) for _, m, a in owners[id(p)]]))
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


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One row per wrapped weight: name, shape, strategy, kernel view, POMs per manifold.

    Print them with ``print(format_table(rows))``.
    """
    rows = []
    for name, coll in _unique_entries(model):
        per = coll.describe()
        rows.append(
            {
                "name": name,
                "shape": coll.shape,
                "strategy": coll.strategy,
                "view": coll.view,
                "kernel_shape": coll.kernel_shape,
                "kernels": coll.num_kernels,
                "poms": coll.num_poms,
                "poms_per_manifold": {r["manifold"]: r["poms"] for r in per},
                "kernels_per_manifold": {r["manifold"]: r["kernels"] for r in per},
                "rescaled": coll.scale is not None,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`describe` rows, with POM counts per manifold."""
    manifold_cols: list[str] = []
    for row in rows:
        manifold_cols += [m for m in row["poms_per_manifold"] if m not in manifold_cols]
    header = ["name", "shape", "strategy", "view", "kernel", "kernels", "POMs", *manifold_cols]
    body = [
        [
            r["name"],
            "x".join(str(s) for s in r["shape"]),
            r["strategy"],
            r["view"],
            "x".join(str(s) for s in r["kernel_shape"]),
            str(r["kernels"]),
            str(r["poms"]),
            *[str(r["poms_per_manifold"].get(m, 0)) for m in manifold_cols],
        ]
        for r in rows
    ]
    totals = [
        "total",
        "",
        "",
        "",
        "",
        str(sum(r["kernels"] for r in rows)),
        str(sum(r["poms"] for r in rows)),
        *[str(sum(r["poms_per_manifold"].get(m, 0) for r in rows)) for m in manifold_cols],
    ]
    table = [header, *body, totals]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 5 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(totals)])
