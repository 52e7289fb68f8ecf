"""The Triton backend of FG-SGD: the flat step (``_flat_plan``'s layout and index sets) with
the arithmetic of every bucket in two kernels per manifold kind (``_kernels``).

Two entry points, as the CPU backend's:

* :func:`accepts` - can this backend step this parameter (on this collection)?
* :func:`step` - step these layers (``_records.Layer``) with these settings (``Hyper``).

It takes float32 and 16-bit weights on CUDA whose manifolds are all built in, when triton is
importable (the optional dependency ``fgo-geoopt[gpu]``); ``backend="auto"`` picks it there.
With ``TRITON_INTERPRET=1`` set before the first step it also takes CPU tensors and runs the
same kernels in triton's interpreter (how the test suite checks them without a GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from .._flat_plan import flat_kinds
from .._records import Hyper, Layer
from .._state import Workspace
from ._env import AVAILABLE, interpreting

__all__ = ["AVAILABLE", "accepts", "interpreting", "reason_refused", "step"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reason_refused(
    coll: Any, param: torch.Tensor, workspace: Workspace | None = None
) -> str | None:
    """Why :func:`accepts` says no, in words (``None`` where it says yes)."""
    if not AVAILABLE:
        return "triton is not importable (fgo-geoopt[gpu]), or FGO_DISABLE_TRITON is set"
    if param.device.type != "cuda" and not (param.device.type == "cpu" and interpreting()):
        where = "on CUDA, or on CPU with TRITON_INTERPRET=1"
        return f"the Triton kernels run {where}, not on {param.device}"
    if param.dtype not in _DTYPES:
        return f"the Triton kernels take float32 / 16-bit weights, not {param.dtype}"
    if flat_kinds(coll, workspace or Workspace()) is None:
        return f"a manifold of {coll.manifold_names} has no Triton implementation"
    return None


def accepts(coll: Any, param: torch.Tensor, workspace: Workspace | None = None) -> bool:
    """Whether :func:`step` can step ``param`` on ``coll``."""
    return reason_refused(coll, param, workspace) is None


def step(layers: list[Layer], hyper: Hyper, workspace: Workspace) -> list[torch.Tensor]:
    """One FG-SGD step of every layer (all accepted); returns the skipped POMs as device
    tensors, one per device and dtype (none without the check)."""
    from ._launch import triton_step  # defines the kernels: after TRITON_INTERPRET is set

    groups: dict[tuple, list[Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.param.device, layer.param.dtype), []).append(layer)
    counts = [triton_step(group, hyper, workspace) for group in groups.values()]
    return [c for c in counts if c is not None]
