"""Device kernels (CUDA) or ATen ops (CPU) dispatched by one optimizer step.

:func:`launch_check` counts them for FG-SGD ``pio4`` at two POM counts of the same model: the
fused and batched steps work per manifold type, so the count must not grow with the POMs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._bench_config import LR, MOMENTUM, Config
from benchmarks._bench_models import kernel_collections, wrap_local
from benchmarks._bench_timing import step_case, sync
from fgo_geoopt import FGSGD

__all__ = ["count_launches", "launch_check"]

_LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def count_launches(run_step: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Profile one call of ``run_step`` and count what it dispatched.

    Returns:
        On CUDA: ``kernels`` (device-side kernel and memcpy/memset events) and
        ``launch_calls`` (host-side launch API calls). On CPU: ``aten_ops``, the top-level
        ATen operators called (a proxy for per-op overhead; a fused kernel counts as none).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        run_step()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return {
            "kernels": sum(1 for e in events if e.device_type == DeviceType.CUDA),
            "launch_calls": sum(1 for e in events if e.name in _LAUNCH_NAMES),
        }
    # The step runs inside a ``record_function`` range: count the ATen ops whose caller is not
    # itself an ATen op (the ops Python dispatched, not their internal sub-ops).
    top = [
        e
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    return {"aten_ops": len(top)}


def launch_check(
    base: torch.nn.Module, grads: dict[str, torch.Tensor], cfg: Config, device: torch.device
) -> dict[str, Any]:
    """Launches of one FG-SGD ``pio4`` step for two POM counts of the same model (and SGD)."""
    variants = {"pio4": {}, "pio4_more_poms": {"pi_parts": 16, "po_parts": 4}}
    out: dict[str, Any] = {}
    sgd_model = copy.deepcopy(base).to(device)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)
    case = step_case("sgd", sgd, dict(sgd_model.named_parameters()), grads)
    for _ in range(2):  # the first step allocates the momentum buffers
        case.prepare()
        case.run()
    case.prepare()
    out["sgd"] = count_launches(case.run, device)
    for label, sizes in variants.items():
        model = wrap_local(copy.deepcopy(base), "pio4", cfg.seed, **sizes).to(device)
        colls = [c for _, c in kernel_collections(model.parameters())]
        opt = FGSGD(model.parameters(), lr=LR, momentum=MOMENTUM, backend=cfg.backend)
        case = step_case(label, opt, dict(model.named_parameters()), grads)
        for _ in range(2):
            case.prepare()
            case.run()
        case.prepare()
        out[label] = {
            **count_launches(case.run, device),
            "layers": len(colls),
            "layers_x_types": sum(len(c.manifold_names) for c in colls),
            "poms": sum(c.num_poms for c in colls),
            "kernels_total": sum(c.num_kernels for c in colls),
        }
    key = "kernels" if device.type == "cuda" else "aten_ops"
    out["metric"] = key
    out["independent_of_poms"] = out["pio4"][key] == out["pio4_more_poms"][key]
    return out
