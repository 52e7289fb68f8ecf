"""Which backend steps a collection parameter, and the one warning when ``backend="auto"``
has to fall back to the (much slower on a CPU) flat torch step."""

from __future__ import annotations

import warnings

import torch

from . import cpu, gpu
from ._state import Workspace

__all__ = ["backend_of"]


def backend_of(p: torch.Tensor, backend: str, workspace: Workspace) -> str:
    """Which backend steps the collection parameter ``p``: ``cpu``, ``gpu`` or ``torch``."""
    coll = p.manifold
    if backend == "torch":
        return "torch"
    for name, module in (("triton", gpu), ("fused", cpu)):
        if backend == name and not module.accepts(coll, p, workspace):
            raise ValueError(
                f"backend={name!r} cannot step a {p.dtype} parameter on {p.device} with "
                f"manifolds {coll.manifold_names}: {module.reason_refused(coll, p)}"
            )
    if backend == "triton":
        return "gpu"
    if cpu.accepts(coll, p, workspace):
        return "cpu"
    if p.device.type == "cpu":
        _warn_fallback_once(cpu.reason_refused(coll, p))
        return "torch"
    return "gpu" if gpu.accepts(coll, p, workspace) else "torch"


_FALLBACK_WARNED: set[str] = set()


def _warn_fallback_once(reason: str) -> None:
    """Say once per reason and process that ``backend="auto"`` steps a CPU collection with
    the batched torch ops, tens of times slower there than the fused step."""
    if reason in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(reason)
    warnings.warn(
        f"fgo_geoopt steps CPU collections with the batched torch ops (much slower than the fused "
        f"step): {reason}. backend='torch' says so explicitly and silences this.",
        UserWarning,
        stacklevel=5,
    )
