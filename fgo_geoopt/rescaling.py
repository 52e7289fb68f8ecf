"""The re-scaling reparameterization of FG-SGD: ``R = gamma / lambda`` per input channel.

Two-stage renormalisation (Ozay 2019; ``docs/rescaling.md``): the manifold constraint
normalises every kernel ``w`` (stage 1), and the layer uses ``R * w`` (stage 2) with
``R[c, l] = gamma[l] / lambda[c, l]``: ``lambda`` is the standard deviation of input channel
``c`` of layer ``l`` measured during the last epoch and ``gamma`` a constant of the layer.
Nothing is learned by backpropagation.

The effective weight ``R * w`` is what the parameter stores, so the forward pass costs nothing
extra; the layer's :class:`~fgo_geoopt.KernelCollection` knows ``R`` and keeps ``W / R`` on the
manifolds. :class:`Rescaler` gathers the statistics with forward pre-hooks (float64 running
sums, no extra forward pass, no stored activations) and, at the end of an epoch,
:meth:`Rescaler.update` recomputes ``R`` and rescales the stored weights.

This module holds the :class:`Rescaler` and re-exports the public helpers it is built on:
the ``gamma`` choices (``_gammas.py``), the coordinates of a re-scaled layer
(``_unit_coords.py``); the per-layer statistics and their all-reduce are in
``_channel_stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._channel_stats import RescaledLayer, all_reduce_stats, mean_gammas
from ._gammas import GAMMAS, GammaFn, fan_gamma, glorot_gamma, matched_gamma
from ._unit_coords import entry_scale, unit_weight, wrapped_layers

__all__ = [
    "GAMMAS",
    "GammaFn",
    "Rescaler",
    "entry_scale",
    "fan_gamma",
    "glorot_gamma",
    "matched_gamma",
    "unit_weight",
    "wrapped_layers",
]


class Rescaler:
    r"""Per-epoch re-scaling ``R = gamma / lambda`` of every wrapped layer of a model.

    A wrapped layer is an ``nn.Conv2d`` or ``nn.Linear`` whose ``weight`` is a
    :class:`geoopt.ManifoldParameter` on a :class:`~fgo_geoopt.KernelCollection`. Input
    channel ``c`` of the module feeds the kernels ``W[:, c]``; its standard deviation
    ``lambda[c]`` over the last epoch (batch and spatial positions) sets their scale

    .. code-block:: text

        lambda[c] = max(std(x[:, c]), floor * mean_c std(x[:, c]))
        R[c]      = gamma / lambda[c]            # Ozay 2019, re-scaling
        W        <- W / R_old * R               # constrained kernels; Euclidean ones untouched

    Grouped convolutions (weight ``(c_out, c_in / groups, k_h, k_w)``): weight channel ``j``
    is fed by the input channels ``g * c_in / groups + j`` of all groups ``g``, and a scale
    can only be set per weight channel, so their statistics are pooled (``lambda[j]`` is the
    standard deviation over all of them). For depthwise convolutions this is one scale for
    the whole layer.

    Construction changes the model in place: every wrapped layer without scales gets
    ``R = gamma`` (``lambda = 1`` until the first update) and its stored weight is rescaled;
    layers that already carry scales keep them. Statistics are gathered by forward pre-hooks
    while modules are in training mode (validation passes do not count), in float64 running
    sums of ``x`` and ``x ** 2``; :meth:`update` consumes them. Under ``torch.distributed``
    the sums are all-reduced first, so every rank computes the same ``R``.

    Args:
        model: The model (or a ``DistributedDataParallel`` wrapper of it).
        gamma_fn: ``gamma_fn(module, collection) -> float``, or the name of a built-in one in
            :data:`GAMMAS` (``"fan"``, ``"glorot"``, ``"matched"``); default :func:`fan_gamma`
            (``sqrt(1 / (fan_in + fan_out))``). :func:`matched_gamma` goes with
            ``FGSGD(metric="stored")``.
        floor: A channel's standard deviation is floored at ``floor`` times the layer's mean
            channel standard deviation, so that dead or constant channels (ReLU outputs that
            never fire, zero padding channels) do not get huge scales.
        record_eval: Also record statistics in eval mode.
        attach: Register the hooks now (otherwise call :meth:`attach`).
        process_group: Process group of the all-reduce (default: the world).

    Example:
        >>> rescaler = Rescaler(model)            # doctest: +SKIP
        >>> for epoch in range(epochs):           # doctest: +SKIP
        ...     train_one_epoch(model, optimizer)
        ...     rescaler.update()
    """

    def __init__(
        self,
        model: nn.Module,
        gamma_fn: GammaFn | str | None = None,
        *,
        floor: float = 0.1,
        record_eval: bool = False,
        attach: bool = True,
        process_group: Any = None,
    ):
        if not (isinstance(floor, (int, float)) and 0.0 <= floor < math.inf):
            raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
        self.model = model
        if isinstance(gamma_fn, str):
            if gamma_fn not in GAMMAS:
                raise ValueError(
                    f"unknown gamma {gamma_fn!r}; valid: {', '.join(sorted(GAMMAS))} or a callable"
                )
            gamma_fn = GAMMAS[gamma_fn]
        self.gamma_fn: GammaFn = fan_gamma if gamma_fn is None else gamma_fn
        self.floor = float(floor)
        self.process_group = process_group
        self.num_updates = 0
        self.layers: dict[str, RescaledLayer] = {}
        self.skipped: dict[str, str] = {}
        for name, module, coll in wrapped_layers(model):
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                self.skipped[name] = (
                    f"{type(module).__name__} is not an nn.Conv2d or nn.Linear: the channel "
                    f"of its input that feeds a kernel is unknown"
                )
                continue
            gamma = float(self.gamma_fn(module, coll))
            if not math.isfinite(gamma) or gamma <= 0:
                raise ValueError(f"gamma_fn gave {gamma!r} for layer {name!r}; need > 0")
            self.layers[name] = RescaledLayer(name, module, gamma, record_eval)
        if not self.layers:
            raise ValueError(
                "the model has no nn.Conv2d / nn.Linear whose weight is a ManifoldParameter on "
                "a KernelCollection; wrap it first (fgo_geoopt.wrap)"
            )
        self._agree_on_gammas()
        with torch.no_grad():
            for layer in self.layers.values():
                if layer.collection.scale is None:
                    ones = torch.ones(layer.collection.in_channels, dtype=torch.float64)
                    self._apply(layer, layer.gamma * ones)
        if attach:
            self.attach()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> Rescaler:
        """Register the statistics hooks (idempotent); returns ``self``."""
        for layer in self.layers.values():
            if layer.handle is None:
                layer.handle = layer.module.register_forward_pre_hook(layer.stats)
        return self

    def remove(self) -> Rescaler:
        """Remove the statistics hooks (idempotent); the running sums are kept."""
        for layer in self.layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        return self

    @property
    def attached(self) -> bool:
        return any(layer.handle is not None for layer in self.layers.values())

    def __enter__(self) -> Rescaler:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def recording(self) -> Iterator[Rescaler]:
        """Record statistics whatever the modules' mode, hooks attached, inside the block."""
        was_attached = {name: layer.handle is not None for name, layer in self.layers.items()}
        self.attach()
        for layer in self.layers.values():
            layer.stats.forced = True
        try:
            yield self
        finally:
            for name, layer in self.layers.items():
                layer.stats.forced = False
                if not was_attached[name] and layer.handle is not None:
                    layer.handle.remove()
                    layer.handle = None

    @torch.no_grad()
    def calibrate(
        self, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """One calibration pass: run ``batches`` through the model, then :meth:`update`.

        The model runs in its current mode under ``torch.no_grad`` (in training mode its
        batch-norm running statistics move, as in any training forward pass).

        Args:
            batches: Model inputs (or anything ``forward`` accepts).
            forward: ``forward(batch)``; default ``model(batch)``.

        Returns:
            The new scales, as :meth:`update`.
        """
        run = self.model if forward is None else forward
        with self.recording():
            for batch in batches:
                run(batch)
        return self.update()

    # ------------------------------------------------------------------ the update
    def reset(self) -> None:
        """Forget the running sums gathered since the last update."""
        for layer in self.layers.values():
            layer.stats.reset()

    def _agree_on_gammas(self) -> None:
        """Under torch.distributed, every rank takes the mean of the ranks' ``gamma``."""
        mean_gammas(self.layers.values(), self.process_group)

    def _all_reduce(self) -> None:
        """Under torch.distributed, sum the running sums of every rank."""
        all_reduce_stats(self.layers.values(), self.process_group)

    def _std(self, layer: RescaledLayer) -> torch.Tensor | None:
        """Standard deviation per weight input channel, or ``None`` without information."""
        st = layer.stats
        if st.count == 0:
            return None
        s, q = st.sum.cpu(), st.sumsq.cpu()
        count = float(st.count)
        if layer.groups > 1:  # pool the channels that meet the same weight channel
            s = s.view(layer.groups, -1).sum(0)
            q = q.view(layer.groups, -1).sum(0)
            count *= layer.groups
        mean = s / count
        return (q / count - mean * mean).clamp_min(0.0).sqrt()

    @torch.no_grad()
    def update(self) -> dict[str, torch.Tensor]:
        """Recompute ``R`` from the statistics since the last update and rescale the weights.

        Call it at the end of every epoch, on every rank. Layers that saw no input, or whose
        channels were all constant, keep their scales (so do constant channels when
        ``floor`` is 0). The running sums are reset. Momentum
        buffers of :class:`~fgo_geoopt.FGSGD` live in unit coordinates and need no change.

        Returns:
            The new scales per layer name (float64, shape ``(c_in,)`` of the weight).
        """
        self._all_reduce()
        for layer in self.layers.values():
            std = self._std(layer)
            if std is None:
                continue
            layer.std = std
            ref = float(std.mean())
            if ref <= 0.0 or not math.isfinite(ref):
                continue
            lam = std.clamp_min(self.floor * ref)
            new = layer.gamma / lam
            # Constant channels with floor = 0 give no information: they keep their scale.
            new = torch.where(lam > 0, new, layer.collection.scale)
            self._apply(layer, new)
        self.reset()
        self.num_updates += 1
        return self.scales()

    @staticmethod
    def _apply(layer: RescaledLayer, new: torch.Tensor) -> None:
        """Set ``R = new`` on a layer and rescale its stored weight: ``W <- W / R_old * R``."""
        coll = layer.collection
        weight = layer.module.weight
        old = coll.scale
        factor = new if old is None else new / old
        mult = entry_scale(coll, dtype=torch.float64, device=weight.device, scale=factor)
        weight.copy_((weight.to(torch.float64) * mult).to(weight.dtype))
        coll.set_scale(new)

    # ------------------------------------------------------------------ state and reporting
    def scales(self) -> dict[str, torch.Tensor]:
        """Current ``R`` per layer name (float64 copies)."""
        return {name: layer.collection.scale.clone() for name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        """Scales, running sums and counts: enough to resume exactly (also mid-epoch).

        Only plain data (tensors, numbers, strings), loadable with
        ``torch.load(weights_only=True)``. Under DDP each rank holds its own running sums
        until :meth:`update`; a checkpoint taken between updates keeps those of the rank
        that saves it.
        """
        return {
            "num_updates": self.num_updates,
            "floor": self.floor,
            "layers": {
                name: {
                    "scale": layer.collection.scale.clone(),
                    "gamma": layer.gamma,
                    "sum": layer.stats.sum.cpu().clone(),
                    "sumsq": layer.stats.sumsq.cpu().clone(),
                    "count": layer.stats.count,
                    "std": None if layer.std is None else layer.std.clone(),
                }
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Only the bookkeeping changes (scales, sums): the stored weights are those of the
        checkpoint's model state dict, loaded by the caller before or after this call.
        """
        layers = state.get("layers")
        if not isinstance(layers, dict):
            raise ValueError("not a Rescaler state: missing 'layers'")
        missing = sorted(set(self.layers) - set(layers))
        unexpected = sorted(set(layers) - set(self.layers))
        if missing or unexpected:
            raise ValueError(
                f"Rescaler state does not match the model: missing layers {missing}, "
                f"unexpected layers {unexpected}"
            )
        for name, layer in self.layers.items():
            entry = layers[name]
            channels = layer.stats.channels
            for key in ("sum", "sumsq"):
                if tuple(torch.as_tensor(entry[key]).shape) != (channels,):
                    raise ValueError(f"layer {name!r}: {key} must have shape ({channels},)")
        for name, layer in self.layers.items():
            entry = layers[name]
            layer.collection.set_scale(entry["scale"])
            layer.gamma = float(entry["gamma"])
            device = layer.stats.sum.device
            layer.stats.sum = torch.as_tensor(entry["sum"], dtype=torch.float64).to(device)
            layer.stats.sumsq = torch.as_tensor(entry["sumsq"], dtype=torch.float64).to(device)
            layer.stats.count = int(entry["count"])
            std = entry.get("std")
            layer.std = None if std is None else torch.as_tensor(std, dtype=torch.float64)
        self.num_updates = int(state.get("num_updates", 0))
        self.floor = float(state.get("floor", self.floor))

    def describe(self) -> list[dict[str, Any]]:
        """One row per wrapped layer: ``gamma``, the scales and the last measured stds."""
        rows = []
        for name, layer in self.layers.items():
            scale = layer.collection.scale
            row: dict[str, Any] = {
                "layer": name,
                "in_channels": layer.collection.in_channels,
                "groups": layer.groups,
                "gamma": layer.gamma,
                "scale_min": float(scale.min()),
                "scale_mean": float(scale.mean()),
                "scale_max": float(scale.max()),
                "std_min": float("nan"),
                "std_mean": float("nan"),
                "std_max": float("nan"),
                "samples": layer.stats.count,
            }
            if layer.std is not None:
                row.update(
                    std_min=float(layer.std.min()),
                    std_mean=float(layer.std.mean()),
                    std_max=float(layer.std.max()),
                )
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        return (
            f"Rescaler(layers={len(self.layers)}, updates={self.num_updates}, "
            f"floor={self.floor}, gamma_fn={getattr(self.gamma_fn, '__name__', self.gamma_fn)}, "
            f"attached={self.attached})"
        )
