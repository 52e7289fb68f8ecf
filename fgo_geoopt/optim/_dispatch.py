"""Which backend steps a collection parameter, and the one warning when ``backend="auto"``
has to fall back to the (much slower on a CPU) flat torch step."""

from __future__ import annotations

import warnings

import torch

from . import cpu, gpu
from ._state import Workspace

__all__ = ["backend_of", "load_keeping_backends"]


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


def load_keeping_backends(opt: torch.optim.Optimizer, load, state_dict: dict) -> None:
    """``load(state_dict)`` (the parent class's ``load_state_dict``), then every group of
    ``opt`` gets its own ``backend``
    back: it says how this process runs the step, not what the run is (a checkpoint from a GPU
    machine must not switch a CPU run to another backend, nor the reverse)."""
    backends = [group["backend"] for group in opt.param_groups]
    load(state_dict)
    for group, backend in zip(opt.param_groups, backends, strict=True):
        group["backend"] = backend


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
