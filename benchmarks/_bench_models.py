"""The models and gradients every timed case starts from, and the peer baseline's parameters.

Models are timm models with seeded random weights (nothing is downloaded); the gradients are
seeded too, so every optimizer steps the same weights with the same gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import geoopt
import torch

from benchmarks._bench_config import GRAD_SCALE
from fgo_geoopt import KernelCollection, build_collection
from fgo_geoopt.collections import layer_seed

__all__ = [
    "fixed_grads",
    "geoopt_sphere_params",
    "kernel_collections",
    "make_model",
    "wrap_local",
]


def make_model(name: str, seed: int) -> torch.nn.Module:
    """A timm model with seeded random weights (never downloads anything)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)


def _head_name(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    return head if isinstance(head, str) else None


def wrap_local(model: torch.nn.Module, preset: str, seed: int, **sizes: Any) -> torch.nn.Module:
    """Every 4-D (conv) weight outside the head on a collection with these sizes, in place.

    Used by the launch check, which needs other POM counts than the presets give (``wrap``
    takes no size options).
    """
    head = _head_name(model)
    for name, module in model.named_modules():
        if head is not None and (name == head or name.startswith(head + ".")):
            continue
        w = module._parameters.get("weight")
        if w is None or w.ndim != 4:
            continue
        coll = build_collection(w.shape, preset, seed=layer_seed(seed, name), **sizes)
        with torch.no_grad():
            point = coll.projx(w.detach())
        module.weight = geoopt.ManifoldParameter(point, manifold=coll)
    return model


def kernel_collections(
    params: Iterable[torch.Tensor],
) -> list[tuple[torch.Tensor, KernelCollection]]:
    """``(parameter, collection)`` of every parameter on a :class:`KernelCollection`."""
    return [
        (p, p.manifold)
        for p in params
        if isinstance(getattr(p, "manifold", None), KernelCollection)
    ]


def geoopt_sphere_params(
    model: torch.nn.Module, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The peer baseline's parameters: one ``geoopt.Sphere`` per output filter.

    geoopt's ``Sphere`` acts on the last dimension, so a sphere per output filter needs the conv
    weight viewed as ``(c_out, c_in * k_h * k_w)``; such a parameter can no longer run the
    conv's forward, so the baseline is a standalone list with the same tensors (same numel) as
    the model: 4-D weights reshaped and normalised on ``Sphere``, everything else plain. Only its
    optimizer step is timed.
    """
    out: dict[str, torch.Tensor] = {}
    sphere = geoopt.Sphere()
    for name, p in model.named_parameters():
        data = p.detach().to(device, copy=True)
        if data.ndim == 4:
            rows = data.reshape(data.shape[0], -1)
            out[name] = geoopt.ManifoldParameter(sphere.projx(rows), manifold=sphere)
        else:
            out[name] = torch.nn.Parameter(data)
    return out


def fixed_grads(model: torch.nn.Module, seed: int, device: torch.device) -> dict[str, Any]:
    """Seeded random gradients, one per named parameter (the same for every optimizer)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        name: (torch.randn(p.shape, generator=gen, dtype=p.dtype) * GRAD_SCALE).to(device)
        for name, p in model.named_parameters()
    }
