"""Stored and unit coordinates of a re-scaled layer, and the wrapped layers of a model.

A re-scaled layer stores ``R * w``: the constrained kernels of input channel ``c`` carry the
factor ``R[c]`` and Euclidean kernels carry none (``docs/rescaling.md``). The functions here
map between the stored weight and the points on the manifolds, for the :class:`Rescaler`, the
``gamma`` choices, the optimizer, the diagnostics and the bounds, none of which imports
another for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import geoopt
import torch
from torch import nn

from .collections import KernelCollection

__all__ = ["constrained_entries", "entry_scale", "unit_weight", "wrapped_layers"]


def constrained_entries(collection: KernelCollection, device: torch.device) -> torch.Tensor:
    """``(c_out, c_in k_h k_w)`` boolean mask of the entries of non-Euclidean kernels."""
    c_out = collection.shape[0]
    if "euclidean" in collection.manifold_names:
        euc = collection.manifold_names.index("euclidean")
        constrained = collection.kernel_type() != euc
    else:
        constrained = torch.ones(collection.num_kernels, dtype=torch.bool)
    mask = constrained.view(c_out, collection.kernels_per_row)
    mask = mask.repeat_interleave(collection.kernel_numel, dim=1)
    return mask.to(device)


def entry_scale(
    collection: KernelCollection,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The factor of every weight entry, in the layer's weight shape: ``R[c]`` or 1.

    Entries of constrained kernels of input channel ``c`` get ``R[c]``; Euclidean kernels are
    never scaled and get 1.

    Args:
        collection: The layer's collection.
        dtype: Dtype of the result.
        device: Device of the result.
        scale: Use these per-input-channel scales instead of ``collection.scale``.

    Returns:
        A tensor of shape ``collection.shape``, or ``None`` when there are no scales.
    """
    scale = collection.scale if scale is None else scale
    if scale is None:
        return None
    scale = torch.as_tensor(scale, dtype=torch.float64).to(device)
    row = scale.repeat_interleave(collection.channel_numel)
    mask = constrained_entries(collection, row.device)
    out = torch.where(mask, row.unsqueeze(0), torch.ones((), dtype=row.dtype, device=row.device))
    return out.reshape(collection.shape).to(dtype)


def unit_weight(weight: torch.Tensor, collection: KernelCollection) -> torch.Tensor:
    """``W / R``: the stored weight in unit coordinates (the points on the manifolds)."""
    factor = entry_scale(collection, dtype=weight.dtype, device=weight.device)
    return weight if factor is None else weight / factor


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, KernelCollection]]:
    """``(name, module, collection)`` of every module whose ``weight`` is a
    :class:`geoopt.ManifoldParameter` on a :class:`~fgo_geoopt.KernelCollection`."""
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(weight, geoopt.ManifoldParameter) and isinstance(
            weight.manifold, KernelCollection
        ):
            yield name, module, weight.manifold
