"""Run FG-SGD or FG-Adam from timm's own ``train.py`` (``--device-modules`` plugin).

Usage: ``train.py ... --opt fgsgd --device-modules fgo_geoopt.integrations.timm_plugin``
(or ``--opt fgadam``).

timm's training script imports the modules named by ``--device-modules`` before it builds the
model, and hands the model to exactly one function we can reach afterwards: the optimizer
factory (``create_optimizer_v2(model, ...)``), called before checkpoint resume, before the EMA
copy and before DDP / ``torch.compile``. Importing this module therefore

1. registers ``fgsgd`` / ``nfgsgd`` / ``fgadam`` with timm's optimizer registry, and
2. makes that registry wrap an unwrapped model (:func:`fgo_geoopt.wrap`) when one of these
   optimizers is requested for it, configured by environment variables:

   ============== ======================================= ==========
   variable       meaning                                 default
   ============== ======================================= ==========
   FGO_STRATEGY   preset or strategy (``wrap(strategy)``) ``pio4``
   FGO_MANIFOLDS  comma-separated manifolds (plain         (none)
                  strategies only)
   FGO_SEED       base seed of the groupings              ``0``
   FGO_KERNEL     kernel view                             ``auto``
   FGO_INCLUDE    comma-separated fnmatch patterns        (none)
   FGO_EXCLUDE    comma-separated fnmatch patterns        (none)
   ============== ======================================= ==========

Importing it changes timm's process-wide registry object (an instance attribute that wraps
its ``create_optimizer``); :func:`uninstall` undoes that. A model that is already wrapped, and
every other optimizer, go through timm untouched. Groupings depend only on the
seed, the parameter names and the shapes, so ``--resume`` rebuilds the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .._tagging import lost_tags, wrapped_entries
from ..wrapping import _CONFIG_ATTR, wrap
from .timm import OPTIMIZER_NAMES, _timm_registry, register_timm_optimizers

__all__ = ["config_from_env", "install", "uninstall"]

_MARK = "_fgo_plugin_original"


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`fgo_geoopt.wrap` from the ``FGO_*`` environment variables."""
    env = os.environ if environ is None else environ
    return {
        "strategy": env.get("FGO_STRATEGY", "pio4"),
        "manifolds": _split(env.get("FGO_MANIFOLDS")),
        "seed": int(env.get("FGO_SEED", "0")),
        "kernel": env.get("FGO_KERNEL", "auto"),
        "include": _split(env.get("FGO_INCLUDE")),
        "exclude": _split(env.get("FGO_EXCLUDE")),
    }


def _is_wrapped(model: nn.Module) -> bool:
    return _CONFIG_ATTR in model.__dict__ or next(wrapped_entries(model), None) is not None


def install() -> None:
    """Register the FG optimizers with timm and wrap models handed to its factory for them
    (idempotent)."""
    if not register_timm_optimizers():
        raise RuntimeError("the FG-SGD timm plugin needs timm >= 1.0.12")
    registry = _timm_registry()
    if _MARK in registry.__dict__:
        return
    original = registry.create_optimizer

    def create_optimizer(model_or_params: Any, *args: Any, **kwargs: Any) -> Any:
        opt = kwargs["opt"] if "opt" in kwargs else args[0]
        if isinstance(model_or_params, nn.Module) and opt.lower().split("_")[-1] in OPTIMIZER_NAMES:
            if not _is_wrapped(model_or_params):
                wrap(model_or_params, **config_from_env())
            elif lost := lost_tags(model_or_params):
                raise ValueError("; ".join(lost))
        return original(model_or_params, *args, **kwargs)

    registry.__dict__[_MARK] = original
    registry.create_optimizer = create_optimizer


def uninstall() -> None:
    """Undo :func:`install`'s change to timm's registry (the registered names stay)."""
    registry = _timm_registry()
    if registry.__dict__.pop(_MARK, None) is not None:
        del registry.__dict__["create_optimizer"]


install()
