"""The records the optimizer hands to its backends: one step's settings and one layer's work.

A backend (``torch_step``, the CPU package ``cpu``) takes a list of :class:`Layer` and one
:class:`Hyper` and steps them; it never sees an optimizer, nor reads a parameter group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Hyper", "Layer"]


@dataclass(frozen=True)
class Hyper:
    """The settings of one step of one parameter group (already validated)."""

    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool
    weight_decay: float
    adaptive: bool
    #: Skip (and count) POMs whose gradient has NaN / inf entries.
    check: bool


@dataclass
class Layer:
    """One parameter on a :class:`~fgo_geoopt.KernelCollection`, ready to be stepped.

    ``grad`` is the gradient the step reads: ``p.grad``, or that of the stored metric
    (``dL/dW / R^2`` on re-scaled collections). ``state`` is the parameter's optimizer state:
    its ``"momentum_buffer"`` (absent before the first step with momentum) is created and kept
    in the layout the backend chooses (``_state.set_layout``).
    """

    param: torch.Tensor
    coll: Any  # KernelCollection (not imported: records sit below the collections)
    grad: torch.Tensor
    state: dict[str, Any]
    #: No momentum buffer yet: this step stores the direction itself as the buffer.
    first: bool
