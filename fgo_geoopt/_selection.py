"""Which weights of a model :func:`fgo_geoopt.wrap` puts on kernel collections.

Eligible: every 4-D ``nn.Conv2d`` and 2-D ``nn.Linear`` weight; by default all of them outside
the classifier head, otherwise those the ``include`` / ``exclude`` fnmatch patterns pick. Tied
weights are found once, with every module that holds them. Nothing here imports timm: a timm
model names its head in ``model.pretrained_cfg``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["classifier_names", "eligible", "parameter_owners", "patterns", "select"]

# Root attributes tried, in order, when a model has no ``pretrained_cfg``: the names
# torchvision's classification models give their classifier.
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")

#: ``{first parameter name: [(owning module, attribute), ...]}`` of the weights to wrap.
Selection = dict[str, list[tuple[nn.Module, str]]]


def patterns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    """``include`` / ``exclude`` as a tuple of fnmatch patterns; ``what`` names the argument
    in the error for anything but a string or a sequence of strings."""
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


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every ``(full name, module, attribute)`` holding each parameter, keyed by ``id``."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                name = f"{mod_name}.{attr}" if mod_name else attr
                out.setdefault(id(p), []).append((name, module, attr))
    return out


def eligible(model: nn.Module) -> Selection:
    """Weights that can carry a collection: 2-D ``nn.Linear`` and 4-D ``nn.Conv2d`` weights.

    Conv1d / Conv3d, transposed convs, embeddings and other tensors stay Euclidean. Tied
    weights appear once, under their first name, with all their owners.
    """
    holders = parameter_owners(model)
    out: Selection = {}
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
        entries = holders[id(p)]
        out[entries[0][0]] = [(m, a) for _, m, a in entries]
    return out


def select(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> Selection:
    """The eligible weights that ``include`` (default: all outside the classifier head) and
    ``exclude`` leave; an ``include`` pattern that matches no eligible weight raises."""
    found = eligible(model)
    if include:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in found):
                raise ValueError(
                    f"include pattern {pattern!r} matches no conv / linear weight of the model"
                )
        chosen = {n: o for n, o in found.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    else:
        heads = classifier_names(model)
        chosen = {n: o for n, o in found.items() if not _under(n, heads)}
    return {n: o for n, o in chosen.items() if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
