"""The records the optimizer hands to its backends: one step's settings and one layer's work.

A backend (``torch_step``, the CPU package ``cpu``, the Triton package ``gpu``) takes a list of
:class:`Layer` and one :class:`Hyper` and steps them; it never sees an optimizer, nor reads a
parameter group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Hyper", "Layer", "total_count"]


@dataclass(frozen=True)
class Hyper:
    """The settings of one step of one parameter group (already validated)."""

    #: A number, or (``capturable=True``) a one-element tensor on the parameters' device,
    #: read by the device and never by the host.
    lr: float | torch.Tensor
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool
    weight_decay: float
    adaptive: bool
    #: Skip (and count) POMs whose gradient has NaN / inf entries.
    check: bool
    #: ``"unit"`` or ``"stored"`` (``FGSGD``'s ``metric``), applied by every backend to
    #: ``Layer.grad`` (``torch_step.stored_metric_grad``).
    metric: str = "unit"


@dataclass
class Layer:
    """One parameter on a :class:`~fgo_geoopt.KernelCollection`, ready to be stepped.

    ``grad`` is ``p.grad``; a backend turns it into the gradient of ``Hyper.metric`` itself.
    ``state`` is the parameter's optimizer state:
    its ``"momentum_buffer"`` (absent before the first step with momentum) is created and kept
    in the layout the backend chooses (``_state.set_layout``).
    """

    param: torch.Tensor
    coll: Any  # KernelCollection (not imported: records sit below the collections)
    grad: torch.Tensor
    state: dict[str, Any]
    #: No momentum buffer yet: this step stores the direction itself as the buffer.
    first: bool


def total_count(counts: list[int | torch.Tensor]) -> int | torch.Tensor:
    """The sum of host and device counts, without reading the device ones."""
    host = sum(c for c in counts if not isinstance(c, torch.Tensor))
    tensors = [c for c in counts if isinstance(c, torch.Tensor)]
    if not tensors:
        return host
    total = (
        tensors[0]
        if len(tensors) == 1
        else torch.stack([t.to(tensors[0].device) for t in tensors]).sum()
    )
    return total + host if host else total
