"""Loud misuse: optimizers that hold replaced weights, or step manifold weights without a metric.

Two mistakes train silently wrong and are cheap to see on an optimizer's first step:

- an optimizer created before :func:`fgo_geoopt.wrap` holds the parameter objects that ``wrap``
  replaced; they never get a gradient again, so ``step()`` trains nothing;
- a non-Riemannian optimizer (``torch.optim.AdamW``, timm's ``adamw``, ...) steps wrapped
  weights as plain tensors and moves them off their manifolds.

``wrap`` marks every parameter object it replaces, and installs (once per process) a global
``torch.optim`` step pre hook that looks at an optimizer's parameters on its first step, and
again after a later ``wrap``, and warns once per optimizer. Every other step costs one dict
lookup.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .collections import KernelCollection

__all__ = ["install", "retire", "stepped_by"]

#: Attribute set on a parameter object that ``wrap`` replaced: what it was.
REPLACED_ATTR = "_fgo_replaced"
#: Attribute set on a manifold parameter stepped by a non-Riemannian optimizer: its class name.
STEPPED_ATTR = "_fgo_stepped_by"
#: Module prefixes of optimizers that step ``ManifoldParameter`` along their manifold.
_RIEMANNIAN = ("geoopt.optim", "fgo_geoopt.optim")

_state: dict[str, Any] = {"handle": None, "generation": 0}
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install() -> None:
    """Register the step pre hook (idempotent) and have every optimizer looked at again."""
    _state["generation"] += 1
    if _state["handle"] is None:
        _state["handle"] = register_optimizer_step_pre_hook(_before_step)


def retire(old: torch.Tensor, what: str) -> None:
    """Mark a parameter object that ``wrap`` replaced (``what`` names it in the warning)."""
    old.__dict__[REPLACED_ATTR] = what


def stepped_by(p: torch.Tensor) -> str | None:
    """Class name of the non-Riemannian optimizer that stepped ``p``, if one did."""
    return p.__dict__.get(STEPPED_ATTR)


def _is_riemannian(optimizer: torch.optim.Optimizer) -> bool:
    return any(c.__module__.startswith(_RIEMANNIAN) for c in type(optimizer).__mro__)


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    generation = _state["generation"]
    if _checked.get(optimizer) == generation:
        return
    _checked[optimizer] = generation
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stale = [p.__dict__[REPLACED_ATTR] for p in params if REPLACED_ATTR in p.__dict__]
    name = type(optimizer).__name__
    if stale:
        warnings.warn(
            f"{name} holds {len(stale)} parameter(s) that fgo_geoopt.wrap replaced (first: "
            f"{stale[0]}); they get no gradients, so this optimizer does not train them. "
            "Create the optimizer after wrap.",
            UserWarning,
            stacklevel=3,
        )
    # Wrappers such as timm's Lookahead hand the step to a base optimizer, which is hooked too.
    if _is_riemannian(optimizer) or isinstance(
        getattr(optimizer, "base_optimizer", None), torch.optim.Optimizer
    ):
        return
    manifold = [p for p in params if isinstance(getattr(p, "manifold", None), KernelCollection)]
    if manifold:
        for p in manifold:
            p.__dict__[STEPPED_ATTR] = name
        warnings.warn(
            f"{name} is not a Riemannian optimizer: it steps {len(manifold)} weight(s) that "
            "fgo_geoopt.wrap put on manifolds as plain tensors and moves them off their "
            "manifolds. Use fgo_geoopt.FGSGD (timm: opt='fgsgd'), or do not wrap the model.",
            UserWarning,
            stacklevel=3,
        )
