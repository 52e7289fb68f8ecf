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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import geoopt
import torch
from torch import nn

from .collections import KernelCollection

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

#: ``gamma_fn(module, collection) -> gamma``: the constant of one wrapped layer.
GammaFn = Callable[[nn.Module, KernelCollection], float]


# ---------------------------------------------------------------------------- gamma choices
def _fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as :func:`torch.nn.init.xavier_uniform_` counts them."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


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
    unit = unit_weight(weight, collection).to(torch.float64)
    mask = _constrained_entries(collection, unit.device)
    if not bool(mask.any()):
        return math.sqrt(2.0 / (fan_in + fan_out))
    rms = float(unit.reshape(mask.shape)[mask].pow(2).mean().sqrt())
    if rms == 0.0:
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
    unit = unit_weight(weight, collection).to(torch.float64)
    mask = _constrained_entries(collection, unit.device)
    if not bool(mask.any()):
        return float(target)
    rms = float(unit.reshape(mask.shape)[mask].pow(2).mean().sqrt())
    return float(target) / rms if rms > 0.0 else float(target)


#: The built-in choices of ``gamma``, by the name :class:`Rescaler` and the recipes accept.
GAMMAS: dict[str, GammaFn] = {"fan": fan_gamma, "glorot": glorot_gamma, "matched": matched_gamma}


# ---------------------------------------------------------------------------- helpers
def _constrained_entries(collection: KernelCollection, device: torch.device) -> torch.Tensor:
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
    mask = _constrained_entries(collection, row.device)
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


def _channel_sums(x: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
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


class _ChannelStats:
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
            s, q, n = _channel_sums(x.detach(), cdim)
            if self.sum.device != s.device:
                self.sum = self.sum.to(s.device)
                self.sumsq = self.sumsq.to(s.device)
            self.sum += s
            self.sumsq += q
            self.count += n


class _Layer:
    """Bookkeeping of one wrapped layer."""

    def __init__(self, name: str, module: nn.Module, gamma: float, record_eval: bool):
        self.name = name
        self.module = module
        self.gamma = gamma
        self.groups = int(getattr(module, "groups", 1))
        channels = self.collection.in_channels * self.groups
        self.stats = _ChannelStats(channels, module.weight.device, record_eval)
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
        self.layers: dict[str, _Layer] = {}
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
            self.layers[name] = _Layer(name, module, gamma, record_eval)
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
        """Under torch.distributed, every rank takes the mean of the ranks' ``gamma``: a
        ``gamma_fn`` that reads the weights (``matched_gamma``) would otherwise give each rank
        its own scales for the same broadcast weights."""
        dist = torch.distributed
        if not (self.layers and dist.is_available() and dist.is_initialized()):
            return
        first = next(iter(self.layers.values()))
        device = first.module.weight.device
        if dist.get_backend(self.process_group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        gammas = torch.tensor(
            [layer.gamma for layer in self.layers.values()], dtype=torch.float64, device=device
        )
        dist.all_reduce(gammas, group=self.process_group)
        gammas /= dist.get_world_size(self.process_group)
        for layer, gamma in zip(self.layers.values(), gammas.tolist(), strict=True):
            layer.gamma = gamma

    def _all_reduce(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        layers = list(self.layers.values())
        device = layers[0].stats.sum.device
        flat = torch.cat(
            [
                torch.cat(
                    [
                        layer.stats.sum.to(device),
                        layer.stats.sumsq.to(device),
                        torch.tensor(
                            [float(layer.stats.count)], dtype=torch.float64, device=device
                        ),
                    ]
                )
                for layer in layers
            ]
        )
        dist.all_reduce(flat, group=self.process_group)
        offset = 0
        for layer in layers:
            c = layer.stats.channels
            layer.stats.sum.copy_(flat[offset : offset + c])
            layer.stats.sumsq.copy_(flat[offset + c : offset + 2 * c])
            layer.stats.count = round(float(flat[offset + 2 * c]))
            offset += 2 * c + 1

    def _std(self, layer: _Layer) -> torch.Tensor | None:
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
    def _apply(layer: _Layer, new: torch.Tensor) -> None:
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
