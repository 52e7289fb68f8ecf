"""The feature statistics behind the re-scaling: per-input-channel running sums of a layer.

A :class:`ChannelStats` is the forward pre-hook of one wrapped layer; it adds the float64 sums
of ``x`` and ``x ** 2`` of every input channel (no extra forward pass, no stored activations).
A :class:`RescaledLayer` is the :class:`~fgo_geoopt.Rescaler`'s record of one layer (module,
``gamma``, hook, last standard deviations). The two functions at the bottom make every rank of
``torch.distributed`` agree on the ``gamma`` and the sums, so that all compute the same ``R``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .collections import KernelCollection

__all__ = ["ChannelStats", "RescaledLayer", "all_reduce_stats", "channel_sums", "mean_gammas"]


def channel_sums(x: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel float64 sums of ``x`` and ``x ** 2`` over all other dims, and the count.

    Written for speed on CPU: reductions over the contiguous trailing axis (or over rows of a
    ``(M, C)`` view) cost about one elementwise pass, unlike ``torch.var_mean`` over dims
    ``(0, 2, 3)``, which costs half a convolution.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # 16-bit activations: accumulate in float32 at least
    channels = x.shape[cdim]
    count = x.numel() // max(channels, 1)
    pre = math.prod(x.shape[:cdim])
    post = math.prod(x.shape[cdim + 1 :])
    if x.is_contiguous() and post > 1:
        v = x.view(pre, channels, post)
        s = v.sum(-1).sum(0, dtype=torch.float64)
        q = torch.linalg.vector_norm(v, dim=-1).square().sum(0, dtype=torch.float64)
        return s, q, count
    rows = x.movedim(cdim, -1).reshape(-1, channels)  # a view for channels_last / (M, C)
    return rows.sum(0).double(), (rows * rows).sum(0).double(), count


class ChannelStats:
    """Forward pre-hook of one layer: running float64 sums of its input channels.

    The hook holds only its own statistics (never the model), so copies of the model (e.g. an
    EMA made by ``deepcopy``) carry a harmless copy of it.
    """

    def __init__(self, channels: int, device: torch.device, record_eval: bool):
        self.channels = channels
        self.record_eval = record_eval
        self.forced = False
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = 0

    def reset(self) -> None:
        self.sum.zero_()
        self.sumsq.zero_()
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training or self.record_eval or self.forced) or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        # Linear: features last; Conv2d: (N, C, H, W) or unbatched (C, H, W).
        cdim = x.dim() - 1 if isinstance(module, nn.Linear) else x.dim() - 3
        with torch.no_grad():
            s, q, n = channel_sums(x.detach(), cdim)
            if self.sum.device != s.device:
                self.sum = self.sum.to(s.device)
                self.sumsq = self.sumsq.to(s.device)
            self.sum += s
            self.sumsq += q
            self.count += n


class RescaledLayer:
    """Bookkeeping of one wrapped layer."""

    def __init__(self, name: str, module: nn.Module, gamma: float, record_eval: bool):
        self.name = name
        self.module = module
        self.gamma = gamma
        self.groups = int(getattr(module, "groups", 1))
        channels = self.collection.in_channels * self.groups
        self.stats = ChannelStats(channels, module.weight.device, record_eval)
        self.handle: Any = None
        self.std: torch.Tensor | None = None  # per weight input channel, last update

    @property
    def collection(self) -> KernelCollection:
        # Looked up on every use: re-wrapping or loading a grouping state gives the weight a
        # new collection object, and the scales must go to the one in use.
        weight = self.module._parameters.get("weight")
        manifold = getattr(weight, "manifold", None)
        if not isinstance(manifold, KernelCollection):
            raise RuntimeError(
                f"layer {self.name!r} is no longer wrapped (its weight is not a "
                f"ManifoldParameter on a KernelCollection); build a new Rescaler"
            )
        return manifold


# ---------------------------------------------------------------------------- torch.distributed
def mean_gammas(layers: Iterable[RescaledLayer], process_group: Any = None) -> None:
    """Under torch.distributed, every rank takes the mean of the ranks' ``gamma``: a
    ``gamma_fn`` that reads the weights (``matched_gamma``) would otherwise give each rank
    its own scales for the same broadcast weights. Does nothing outside torch.distributed."""
    layers = list(layers)
    dist = torch.distributed
    if not (layers and dist.is_available() and dist.is_initialized()):
        return
    device = layers[0].module.weight.device
    if dist.get_backend(process_group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    gammas = torch.tensor([layer.gamma for layer in layers], dtype=torch.float64, device=device)
    dist.all_reduce(gammas, group=process_group)
    gammas /= dist.get_world_size(process_group)
    for layer, gamma in zip(layers, gammas.tolist(), strict=True):
        layer.gamma = gamma


def all_reduce_stats(layers: Iterable[RescaledLayer], process_group: Any = None) -> None:
    """Sum the running sums and counts of every layer over the ranks, in one all-reduce.
    Does nothing outside torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    layers = list(layers)
    device = layers[0].stats.sum.device
    flat = torch.cat(
        [
            torch.cat(
                [
                    layer.stats.sum.to(device),
                    layer.stats.sumsq.to(device),
                    torch.tensor([float(layer.stats.count)], dtype=torch.float64, device=device),
                ]
            )
            for layer in layers
        ]
    )
    dist.all_reduce(flat, group=process_group)
    offset = 0
    for layer in layers:
        c = layer.stats.channels
        layer.stats.sum.copy_(flat[offset : offset + c])
        layer.stats.sumsq.copy_(flat[offset + c : offset + 2 * c])
        layer.stats.count = round(float(flat[offset + 2 * c]))
        offset += 2 * c + 1
