"""timm integration: parameter groups, and FG-SGD and FG-Adam in timm's optimizer factory.

This is the only module of the package that imports timm, and only inside the functions that
need it: ``import fgo_geoopt`` works without timm installed.

- :func:`param_groups` rewrites a model's parameters into optimizer groups; it is usable as
  ``timm.optim.create_optimizer_v2(..., param_group_fn=param_groups)``.
- :func:`register_timm_optimizers` adds ``fgsgd``, ``nfgsgd`` (Nesterov) and ``fgadam`` to
  timm's optimizer factory. It runs as soon as both ``fgo_geoopt`` and ``timm.optim`` are
  imported, in either order, without importing timm itself (importing timm would double the
  import time of ``fgo_geoopt``): an import hook registers the names right after
  ``timm.optim`` loads. :func:`fgo_geoopt.wrap` calls it too, so there is nothing else to call.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.util
import logging
import re
import sys
from collections.abc import Collection
from typing import Any

import geoopt
import torch
from torch import nn

from ..collections import KernelCollection
from ..optim import FGSGD, FGAdam

__all__ = [
    "OPTIMIZER_NAMES",
    "TIMM_MIN_VERSION",
    "param_groups",
    "register_timm_optimizers",
]

_logger = logging.getLogger(__name__)

#: Names registered with timm's factory. No underscore: timm splits ``opt`` on ``_`` and keeps
#: the last token (``lookahead_fgsgd`` works; ``fg_sgd`` would silently build ``sgd``).
OPTIMIZER_NAMES = ("fgsgd", "nfgsgd", "fgadam")
#: First timm release with the optimizer registry (``timm.optim._optim_factory.default_registry``).
TIMM_MIN_VERSION = (1, 0, 12)


def _is_manifold(p: torch.Tensor) -> bool:
    manifold = getattr(p, "manifold", None)
    return manifold is not None and not isinstance(manifold, geoopt.Euclidean)


def param_groups(
    model: nn.Module,
    weight_decay: float = 1e-4,
    *,
    no_weight_decay_list: Collection[str] | None = None,
    weight_decay_exclude_1d: bool = True,
    euclidean_kernel_decay: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a wrapped model, with timm's weight-decay rules.

    Groups, in order and only when non-empty:

    1. Euclidean parameters without weight decay: 1-D tensors, ``*.bias`` and names matching
       ``no_weight_decay_list`` (default ``model.no_weight_decay()`` when the model has it,
       fnmatch patterns as in timm).
    2. Euclidean parameters with ``weight_decay``.
    3. Manifold parameters whose kernels are all constrained: ``weight_decay=0`` (a fixed-norm
       kernel has nothing to decay, ``docs/design.md``).
    4. Collections that also hold Euclidean kernels (``pio4``): ``weight_decay``, which
       :class:`~fgo_geoopt.FGSGD` and :class:`~fgo_geoopt.FGAdam` apply to their Euclidean
       kernels only. With
       ``euclidean_kernel_decay=False`` these join group 3 instead.

    Group dicts hold only the parameter list and floats, so ``optimizer.state_dict()`` loads
    with ``torch.load(weights_only=True)`` (timm's resume). Frozen parameters are skipped, as
    timm does. Pass another decay with ``functools.partial(param_groups, weight_decay=...)``.

    Raises:
        ValueError: When a wrapped weight lost its manifold tagging (see
            :func:`fgo_geoopt.check`): it would silently be trained as a Euclidean weight.
    """
    from .._tagging import lost_tags

    lost = lost_tags(model)
    if lost:
        raise ValueError("; ".join(lost))
    if no_weight_decay_list is None:
        no_weight_decay_list = set(getattr(model, "no_weight_decay", lambda: ())())
    wd = float(weight_decay)
    no_decay, decay, constrained, mixed = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_manifold(p):
            has_euclidean = (
                isinstance(p.manifold, KernelCollection)
                and "euclidean" in p.manifold.manifold_names
            )
            (mixed if euclidean_kernel_decay and has_euclidean else constrained).append(p)
        elif (weight_decay_exclude_1d and (p.ndim <= 1 or name.endswith(".bias"))) or any(
            fnmatch.fnmatch(name, pattern) for pattern in no_weight_decay_list
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": wd},
        {"params": constrained, "weight_decay": 0.0},
        {"params": mixed, "weight_decay": wd},
    ]
    return [g for g in groups if g["params"]]


def _version_tuple(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"cannot parse the timm version {version!r}")
    return tuple(int(x) for x in match.groups())


def _timm_registry() -> Any:
    """timm's global optimizer registry: the one place that touches a private timm module.

    timm has no public registration API; ``default_registry`` lives in
    ``timm.optim._optim_factory`` since timm 1.0.12.

    Raises:
        ImportError: timm is not installed.
        RuntimeError: timm is older than :data:`TIMM_MIN_VERSION` or has moved the registry.
    """
    import timm

    if _version_tuple(timm.__version__) < TIMM_MIN_VERSION:
        need = ".".join(map(str, TIMM_MIN_VERSION))
        raise RuntimeError(f"timm {timm.__version__} has no optimizer registry; need >= {need}")
    try:
        from timm.optim._optim_factory import default_registry
    except ImportError as err:  # pragma: no cover - depends on a future timm layout
        raise RuntimeError(f"timm {timm.__version__} moved its optimizer registry: {err}") from None
    return default_registry


def _optim_infos() -> list[Any]:
    from timm.optim import OptimInfo

    common = {"opt_class": FGSGD, "has_eps": False, "has_momentum": True}
    return [
        OptimInfo(
            name="fgsgd",
            description="FG-SGD: SGD on collections of products of weight manifolds (Ozay 2019)",
            **common,
        ),
        OptimInfo(
            name="nfgsgd",
            description="FG-SGD with Nesterov momentum",
            defaults={"nesterov": True},
            **common,
        ),
        # One name: FG-Adam's weight decay is always decoupled (AdamW's), so an "fgadamw"
        # would be the same optimizer.
        OptimInfo(
            name="fgadam",
            opt_class=FGAdam,
            description="FG-Adam: Adam with one second moment per POM, decoupled weight decay "
            "on Euclidean parameters",
            has_eps=True,
            has_betas=True,
            has_momentum=False,
        ),
    ]


def register_timm_optimizers() -> bool:
    """Register ``fgsgd``, ``nfgsgd`` and ``fgadam`` with timm's optimizer factory (idempotent).

    Afterwards ``timm.optim.create_optimizer_v2(model, opt="fgsgd", lr=..., momentum=...,
    weight_decay=...)`` builds :class:`~fgo_geoopt.FGSGD` (``opt="fgadam"``:
    :class:`~fgo_geoopt.FGAdam`, with ``betas`` and ``eps``), with timm's default weight-decay
    groups or with ``param_group_fn``. Neither optimizer decays constrained kernels, so timm's
    default groups (every weight of ndim > 1 decayed) give the same steps as
    :func:`param_groups`.

    Returns:
        True when the names are registered, False when timm is missing or too old (logged).
    """
    try:
        registry = _timm_registry()
    except ImportError:
        return False
    except RuntimeError as err:
        _logger.warning("FG-SGD not registered with timm: %s", err)
        return False
    for info in _optim_infos():
        try:
            current = registry.get_optimizer_info(info.name)
        except ValueError:
            current = None
        if current != info:
            registry.register(info)
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers FG-SGD with timm right after ``timm.optim`` is imported, then removes itself.

    It finds nothing itself: it asks the other finders for ``timm.optim`` and wraps the
    loader's ``exec_module`` of that one module.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "timm.optim":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            try:
                register_timm_optimizers()
            except Exception as err:  # never break timm's import
                _logger.warning("FG-SGD not registered with timm: %s", err)

        loader.exec_module = exec_and_register
        return spec


def _register_when_timm_is_imported() -> None:
    if "timm.optim" in sys.modules:
        register_timm_optimizers()
    elif importlib.util.find_spec("timm") is not None and not any(  # imports nothing
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


_register_when_timm_is_imported()
