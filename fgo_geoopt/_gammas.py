"""The built-in choices of the re-scaling constant ``gamma`` of a layer (``R = gamma / lambda``).

Each is a :data:`GammaFn`, ``gamma_fn(module, collection) -> gamma``, called once per wrapped
layer when a :class:`~fgo_geoopt.Rescaler` is built; :data:`GAMMAS` names them for the
``Rescaler`` and the recipes. Why the default is :func:`fan_gamma` and when to use the others is
in ``docs/rescaling.md`` and ``docs/optimizer.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ._unit_coords import constrained_entries, unit_weight
from .collections import KernelCollection

__all__ = ["GAMMAS", "GammaFn", "fan_gamma", "glorot_gamma", "matched_gamma"]

#: ``gamma_fn(module, collection) -> gamma``: the constant of one wrapped layer.
GammaFn = Callable[[nn.Module, KernelCollection], float]


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as :func:`torch.nn.init.xavier_uniform_` counts them."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _constrained_rms(weight: torch.Tensor, collection: KernelCollection) -> float | None:
    """Root mean square entry of the constrained kernels in unit coordinates (``None``
    when the layer has none)."""
    unit = unit_weight(weight, collection).to(torch.float64)
    mask = constrained_entries(collection, unit.device)
    if not bool(mask.any()):
        return None
    return float(unit.reshape(mask.shape)[mask].pow(2).mean().sqrt())


def fan_gamma(module: nn.Module, collection: KernelCollection) -> float:
    r"""The default ``gamma = sqrt(1 / (fan_in + fan_out))`` (``docs/design.md``).

    The paper's own formula for the geometric constant could not be read; this Glorot-like
    constant is our [decision]. With ``R = gamma / lambda`` the effective kernel applied to a
    whitened channel ``x / lambda`` is ``gamma * w``. In the networks of the paper a
    normalisation layer follows every weight layer, which makes the function and the FG-SGD
    iterates invariant to a per-layer constant (see ``docs/rescaling.md``): ``gamma`` then only
    sets the size of the stored weights, and this choice keeps the per-POM norms of Table 2
    below 1. ``fan_in = c_in k_h k_w``, ``fan_out = c_out k_h k_w``.
    """
    fan_in, fan_out = _fans(module.weight)
    return math.sqrt(1.0 / (fan_in + fan_out))


def glorot_gamma(module: nn.Module, collection: KernelCollection) -> float:
    r"""``gamma`` giving the effective weight Glorot's entry variance on whitened input.

    ``gamma = sqrt(2 / (fan_in + fan_out)) / rms(w)``, with ``rms(w)`` the root mean square
    entry of the layer's constrained kernels in unit coordinates (``1 / sqrt(k_h k_w)`` on the
    sphere, ``sqrt(B / (A B))`` on Ob / St, ``1 / sqrt(c_in k_h k_w)`` in the filter view). The
    effective kernel ``gamma * w`` then has the entry variance ``2 / (fan_in + fan_out)`` of
    Glorot initialisation, so a layer fed with whitened channels produces outputs of variance
    ``2 fan_in / (fan_in + fan_out)``. Use it for layers that no normalisation follows (e.g. a
    wrapped classifier, whose logits the default constant would keep small).
    """
    weight = module.weight.detach()
    fan_in, fan_out = _fans(weight)
    rms = _constrained_rms(weight, collection)
    if rms is None or rms == 0.0:
        return math.sqrt(2.0 / (fan_in + fan_out))
    return math.sqrt(2.0 / (fan_in + fan_out)) / rms


def matched_gamma(module: nn.Module, collection: KernelCollection) -> float:
    r"""``gamma`` that gives the stored constrained kernels the scale of the model's own init.

    ``gamma = rms(W_init) / rms(w)``: ``rms(W_init)`` is the root mean square entry of the
    layer's weight before :func:`fgo_geoopt.wrap` projected it (recorded by ``wrap``; for a
    collection built otherwise, the Kaiming ``sqrt(2 / fan_out)`` of timm's ResNets), and
    ``rms(w)`` that of the constrained kernels in unit coordinates. With ``lambda = 1`` the
    stored weight ``R * w`` then has the entry scale that initialisation gave the plain model,
    and so do the Euclidean kernels of a mix, which are never scaled: both kinds of kernel
    contribute to a filter on the same footing. Combined with ``FGSGD(metric="stored")`` a
    step then turns every filter by about the angle SGD turns it at the same ``lr``
    (``docs/optimizer.md``, "The learning-rate geometry").
    """
    weight = module.weight.detach()
    _, fan_out = _fans(weight)
    target = getattr(collection, "init_rms", None)
    if target is None:
        target = math.sqrt(2.0 / fan_out)
    rms = _constrained_rms(weight, collection)
    if rms is None:
        return float(target)
    return float(target) / rms if rms > 0.0 else float(target)


#: The built-in choices of ``gamma``, by the name :class:`Rescaler` and the recipes accept.
GAMMAS: dict[str, GammaFn] = {"fan": fan_gamma, "glorot": glorot_gamma, "matched": matched_gamma}
