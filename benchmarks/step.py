"""Optimizer-step benchmark: FG-SGD against ``torch.optim.SGD`` and geoopt's RiemannianSGD.

Run ``python benchmarks/step.py --help``. One run measures, on the chosen device and with the
same initial weights and the same fixed (seeded) gradients for every optimizer:

1. the step time of ``torch.optim.SGD(foreach=True, momentum=0.9)``, the reference;
2. the step time of :class:`fgo_geoopt.FGSGD` on the model wrapped with each preset;
3. the step time of ``geoopt.optim.RiemannianSGD`` with one ``geoopt.Sphere`` per output
   filter (the peer baseline, see :func:`geoopt_sphere_params`);
4. a full training step (forward, backward, step) with SGD and with FG-SGD ``pio4``;
5. the bytes held by optimizer state plus the index tensors and caches of the collections;
6. the time of wrapping a larger model (construction excluded);
7. on CUDA (or with ``--launches``), the device kernels launched by one step for two POM
   counts of the same model, to check that launches do not grow with the number of POMs.

Steps are interleaved (each round times one step of every optimizer, in a rotating order),
and the medians over the rounds after warm-up are reported. The first warm-up step of each
optimizer (which compiles the numba kernels when they are not cached yet) is reported
separately as the first-step time. Targets apply to CPU runs.

Memory allocator (``--malloc``): by default glibc's ``malloc`` hands large blocks back to the
operating system when they are freed (``zero_grad(set_to_none=True)`` frees every gradient, an
optimizer frees its temporaries) and the next allocation faults the pages in again, zeroed. How
much of that hits a case depends on the heap's layout left by the cases timed before it, not on
the case itself: measured here, geoopt's step took 40 or 130 ms and the same training step 0 or
12,000 page faults depending on it. ``keep`` (the default) sets glibc's trim and mmap thresholds
to 1 GiB first, so that freed memory stays with the process and every case runs without those
faults; ``default`` leaves glibc as it is. Minor page faults per timed step are reported either
way.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    # geoopt 0.5.1 decorates functions with torch.jit.script, deprecated on recent torch.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    import geoopt

import fgo_geoopt
from fgo_geoopt import FGSGD, KernelCollection, build_collection
from fgo_geoopt.collections import layer_seed

__all__ = [
    "Config",
    "collection_bytes",
    "count_launches",
    "geoopt_sphere_params",
    "main",
    "optimizer_state_bytes",
    "run",
]

LR = 0.01
MOMENTUM = 0.9
GRAD_SCALE = 1e-2
#: CPU targets of the performance issue: ratios to the SGD step unless said otherwise.
STEP_TARGETS = {"st": 3.0, "poms_st": 3.0, "pio4": 2.5}
TRAIN_TARGET = 1.05
MEMORY_TARGET = 1.1
WRAP_TARGET_S = 2.0
_LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@dataclass
class Config:
    """What one benchmark run measures (the command-line flags, see :func:`main`)."""

    model: str = "resnet50"
    presets: Sequence[str] = ("st", "poms_st", "pio3", "pio4")
    repeats: int = 7
    warmup: int = 2
    geoopt_repeats: int = 5
    train_repeats: int = 21
    batch_size: int = 32
    img_size: int = 64
    threads: int = 2
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0
    skip_train: bool = False
    wrap_model: str | None = "resnet101"
    launches: bool | None = None
    train_preset: str = "pio4"
    malloc: str = "keep"


# ---------------------------------------------------------------------------- set-up helpers
def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and numba (numba cannot exceed its start-up maximum)."""
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:  # the library falls back to torch ops without numba
        return
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def set_malloc(mode: str) -> str:
    """Apply ``--malloc`` (see the module docstring); returns what was done, for the report."""
    if mode not in ("keep", "default"):
        raise ValueError(f"malloc must be 'keep' or 'default', got {mode!r}")
    if mode == "default":
        return "glibc defaults" if platform.libc_ver()[0] == "glibc" else "system allocator"
    if platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator left as it is"
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    ok = mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    return "glibc, trim and mmap thresholds 1 GiB" if ok else "glibc refused mallopt: defaults"


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def machine_info(device: torch.device) -> dict[str, Any]:
    """Date, CPU model, core count and library versions for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "geoopt": getattr(geoopt, "__version__", "?"),
        "fgo_geoopt": fgo_geoopt.__version__,
        "numpy": np.__version__,
        # Other processes on the machine skew every time; the load says how much.
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def make_model(name: str, seed: int) -> torch.nn.Module:
    """A timm model with seeded random weights (never downloads anything)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)


def _head_name(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    return head if isinstance(head, str) else None


def _wrap_local(model: torch.nn.Module, preset: str, seed: int, **sizes: Any) -> torch.nn.Module:
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


def _collections(params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, KernelCollection]]:
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


# ---------------------------------------------------------------------------- timing
@dataclass
class Case:
    """One thing timed per round: ``prepare`` runs untimed before ``run``."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], Any] = lambda: None
    rounds: int | None = None  # None: every round
    keep: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_case(
    name: str,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    rounds: int | None = None,
) -> Case:
    """Time ``optimizer.step()``; the fixed gradients are copied into ``.grad`` untimed."""
    pairs = []
    for pname, p in params.items():
        p.grad = torch.empty_like(p)
        pairs.append((p.grad, grads[pname].reshape(p.shape)))

    def prepare() -> None:
        for dst, src in pairs:
            dst.copy_(src)

    return Case(
        name, optimizer.step, prepare, rounds, keep={"optimizer": optimizer, "params": params}
    )


def train_case(
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Case:
    """Time one training step: zero_grad, forward, cross-entropy, backward, optimizer step."""
    model.train()

    def run_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return Case(name, run_step, keep={"optimizer": optimizer, "model": model})


def time_interleaved(
    cases: Sequence[Case], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Time the cases round-robin; the first of the ``warmup`` rounds is the first step.

    The order rotates every round so that no case always runs right after the same other one.

    Returns:
        Per case: ``median_ms`` over the timed rounds, ``first_ms`` (the first step, which
        includes any JIT compilation), the list ``samples_ms`` and ``page_faults``, the median
        count of minor page faults of the process during a timed round.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first step compiles kernels")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    faults: dict[str, list[int]] = {c.name: [] for c in cases}
    first: dict[str, float] = {}
    for r in range(warmup + repeats):
        shift = r % len(cases)
        for case in list(cases[shift:]) + list(cases[:shift]):
            if case.rounds is not None and r >= warmup + case.rounds:
                continue
            case.prepare()
            _sync(device)
            f0 = _faults()
            t0 = time.perf_counter()
            case.run()
            _sync(device)
            dt = (time.perf_counter() - t0) * 1e3
            if r == 0:
                first[case.name] = dt
            elif r >= warmup:
                samples[case.name].append(dt)
                faults[case.name].append(_faults() - f0)
    return {
        name: {
            "median_ms": statistics.median(s),
            "min_ms": min(s),
            "first_ms": first[name],
            "samples_ms": s,
            "page_faults": statistics.median(faults[name]),
        }
        for name, s in samples.items()
    }


# ---------------------------------------------------------------------------- memory
def _spans(obj: Any, out: list[tuple[str, int, int]], seen: set[int]) -> None:
    """Memory ranges of every tensor / array reachable from ``obj`` (storages, not views).

    Ranges are tagged with their device: CPU and GPU addresses may coincide.
    """
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes():
            start = storage.data_ptr()
            out.append((str(obj.device), start, start + storage.nbytes()))
    elif isinstance(obj, np.ndarray):
        root = obj
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root.nbytes:
            start = root.__array_interface__["data"][0]
            out.append(("cpu", start, start + root.nbytes))
    elif isinstance(obj, dict):
        for value in obj.values():
            _spans(value, out, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _spans(value, out, seen)
    elif isinstance(obj, torch.nn.Module):
        _spans(vars(obj), out, seen)


def _union_bytes(spans: list[tuple[str, int, int]]) -> int:
    total, space, end = 0, None, -1
    for where, lo, hi in sorted(spans):
        if where != space:
            space, end = where, -1
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def collection_bytes(colls: Iterable[KernelCollection]) -> int:
    """Bytes of every tensor or array a collection holds (index tensors and ``_cache``).

    Walks all attributes (``pom_type``, ``pom_ptr``, ``pom_kernels``, ``scale``, buffers,
    ``_cache`` with whatever the optimizer backends cached there); arrays that share memory
    (a ``.numpy()`` view of an index tensor) are counted once.
    """
    out: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), out, seen)
    return _union_bytes(out)


def collection_detail(colls: Iterable[KernelCollection]) -> dict[str, int]:
    """Bytes of :func:`collection_bytes` by attribute and ``_cache`` entry (summed over layers).

    A cache entry keyed by a tuple is reported under its first element (``_cache[idx]``).
    Memory shared between two entries is counted in both, so the parts may add up to more
    than :func:`collection_bytes`.
    """
    detail: dict[str, int] = {}
    for coll in colls:
        parts = {k: v for k, v in vars(coll).items() if k != "_cache"}
        for key, value in coll._cache.items():
            parts[f"_cache[{key[0] if isinstance(key, tuple) else key}]"] = value
        for label, value in parts.items():
            spans: list[tuple[str, int, int]] = []
            _spans(value, spans, set())
            if spans:
                detail[label] = detail.get(label, 0) + _union_bytes(spans)
    return detail


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Bytes of the optimizer state plus those of its parameters' collections.

    Returns:
        ``state_bytes`` (every tensor in ``optimizer.state``), ``collection_bytes`` (see
        :func:`collection_bytes`), ``total_bytes`` (their union) and ``collection_detail``
        (see :func:`collection_detail`).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: list[tuple[str, int, int]] = []
    _spans(dict(optimizer.state), state, set())
    colls = [c for _, c in _collections(params)]
    index: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    for coll in colls:
        _spans(vars(coll), index, seen)
    return {
        "state_bytes": _union_bytes(state),
        "collection_bytes": _union_bytes(index),
        "total_bytes": _union_bytes(state + index),
        "collection_detail": collection_detail(colls),
    }


# ---------------------------------------------------------------------------- launches
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
    _sync(device)
    with profile(activities=activities) as prof:
        run_step()
        _sync(device)
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
        model = _wrap_local(copy.deepcopy(base), "pio4", cfg.seed, **sizes).to(device)
        colls = [c for _, c in _collections(model.parameters())]
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


# ---------------------------------------------------------------------------- the run
def _check(what: str, value: float, target: str, ok: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target, "pass": bool(ok)}


def run(cfg: Config, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns a JSON-serialisable result dict."""
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    set_threads(cfg.threads)
    allocator = set_malloc(cfg.malloc)
    result: dict[str, Any] = {"machine": machine_info(device)}
    result["machine"]["allocator"] = allocator
    config = asdict(cfg)
    config["presets"] = list(cfg.presets)
    result["config"] = config
    result["machine"]["threads"] = {"torch": torch.get_num_threads()}
    try:
        import numba

        result["machine"]["threads"]["numba"] = numba.get_num_threads()
    except ImportError:
        pass

    base = make_model(cfg.model, cfg.seed)
    grads = fixed_grads(base, cfg.seed, device)
    result["model"] = {"name": cfg.model, "params": sum(p.numel() for p in base.parameters())}

    # -- optimizer steps, interleaved -------------------------------------------------------
    log(f"building {len(cfg.presets)} wrapped copies of {cfg.model} ...")
    sgd_model = copy.deepcopy(base).to(device)
    cases = [
        step_case(
            "sgd",
            torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True),
            dict(sgd_model.named_parameters()),
            grads,
        )
    ]
    wrap_s: dict[str, float] = {}
    fg_models = {}
    fresh = {}  # wrapped, never stepped: the training step starts from these weights
    for preset in cfg.presets:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        fgo_geoopt.wrap(model, preset, seed=cfg.seed)
        wrap_s[preset] = time.perf_counter() - t0
        if preset == cfg.train_preset and not cfg.skip_train:
            fresh[preset] = copy.deepcopy(model)
        fg_models[preset] = model = model.to(device)
        opt = FGSGD(model.parameters(), lr=LR, momentum=MOMENTUM, backend=cfg.backend)
        cases.append(step_case(f"fg_{preset}", opt, dict(model.named_parameters()), grads))
    result["wrap_impl"] = "fgo_geoopt.wrap"
    sphere_params = geoopt_sphere_params(base, device)
    ropt = geoopt.optim.RiemannianSGD(list(sphere_params.values()), lr=LR, momentum=MOMENTUM)
    cases.append(
        step_case(
            "geoopt_sphere", ropt, sphere_params, grads, rounds=min(cfg.geoopt_repeats, cfg.repeats)
        )
    )
    log(f"timing optimizer steps: {cfg.warmup} warm-up + {cfg.repeats} rounds ...")
    steps = time_interleaved(cases, cfg.repeats, cfg.warmup, device)
    sgd_ms = steps["sgd"]["median_ms"]
    for stats in steps.values():
        stats["ratio_to_sgd"] = stats["median_ms"] / sgd_ms
        stats["min_ratio_to_sgd"] = stats["min_ms"] / steps["sgd"]["min_ms"]
    result["step"] = steps
    result["wrap_s"] = wrap_s

    # -- memory of optimizer state ----------------------------------------------------------
    memory = {
        c.name: optimizer_state_bytes(c.keep["optimizer"])
        for c in cases
        if c.name != "geoopt_sphere"
    }
    for stats in memory.values():
        stats["ratio_to_sgd"] = stats["total_bytes"] / memory["sgd"]["total_bytes"]
    result["memory"] = memory
    if cfg.launches or (cfg.launches is None and device.type == "cuda"):
        log("counting launches per step ...")
        result["launches"] = launch_check(base, grads, cfg, device)
    del cases, fg_models, sgd_model, sphere_params, ropt

    # -- full training step -----------------------------------------------------------------
    if not cfg.skip_train:
        log(f"timing training steps (batch {cfg.batch_size}, {cfg.img_size}x{cfg.img_size}) ...")
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
        y = torch.randint(0, base.num_classes, (cfg.batch_size,), generator=gen).to(device)
        sgd_model = copy.deepcopy(base).to(device)
        fg_model = fresh.pop(cfg.train_preset, None)
        if fg_model is None:
            fg_model = fgo_geoopt.wrap(copy.deepcopy(base), cfg.train_preset, seed=cfg.seed)
        fg_model = fg_model.to(device)
        train_cases = [
            train_case(
                "sgd",
                sgd_model,
                torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True),
                x,
                y,
            ),
            train_case(
                f"fg_{cfg.train_preset}",
                fg_model,
                FGSGD(fg_model.parameters(), lr=LR, momentum=MOMENTUM, backend=cfg.backend),
                x,
                y,
            ),
        ]
        train = time_interleaved(train_cases, cfg.train_repeats, 1, device)
        for stats in train.values():
            stats["ratio_to_sgd"] = stats["median_ms"] / train["sgd"]["median_ms"]
            stats["min_ratio_to_sgd"] = stats["min_ms"] / train["sgd"]["min_ms"]
        result["train"] = train
        del train_cases, sgd_model, fg_model

    # -- wrapping a large model -------------------------------------------------------------
    if cfg.wrap_model:
        log(f"timing wrap({cfg.wrap_model}) ...")
        big = make_model(cfg.wrap_model, cfg.seed)
        t0 = time.perf_counter()
        fgo_geoopt.wrap(big, "pio4", seed=cfg.seed)
        result["wrap_large"] = {
            "model": cfg.wrap_model,
            "preset": "pio4",
            "seconds": time.perf_counter() - t0,
        }
        del big

    result["checks"] = _checks(result, cfg)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def _checks(result: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """Every target of the issue, keyed by the row it belongs to (``what``)."""
    steps = result["step"]
    geo = steps["geoopt_sphere"]["ratio_to_sgd"]
    checks = []
    for preset in cfg.presets:
        ratio = steps[f"fg_{preset}"]["ratio_to_sgd"]
        limit = STEP_TARGETS.get(preset)
        text = f"< geoopt {geo:.2f}x" if limit is None else f"<= {limit:g}x, < geoopt"
        ok = ratio < geo and (limit is None or ratio <= limit)
        checks.append(_check(f"step fg_{preset}", ratio, text, ok))
    for preset in cfg.presets:
        ratio = result["memory"][f"fg_{preset}"]["ratio_to_sgd"]
        checks.append(
            _check(
                f"state memory fg_{preset}", ratio, f"<= {MEMORY_TARGET:g}x", ratio <= MEMORY_TARGET
            )
        )
    if "train" in result:
        ratio = result["train"][f"fg_{cfg.train_preset}"]["ratio_to_sgd"]
        checks.append(
            _check(
                f"train step fg_{cfg.train_preset}",
                ratio,
                f"<= {TRAIN_TARGET:g}x",
                ratio <= TRAIN_TARGET,
            )
        )
    if "wrap_large" in result:
        sec = result["wrap_large"]["seconds"]
        checks.append(
            _check(
                f"wrap({result['wrap_large']['model']}, pio4)",
                sec,
                f"<= {WRAP_TARGET_S:g} s",
                sec <= WRAP_TARGET_S,
            )
        )
    if "launches" in result:
        same = result["launches"]["independent_of_poms"]
        checks.append(_check("launches independent of POMs", float(same), "equal counts", same))
    return checks


# ---------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def format_report(result: dict[str, Any]) -> str:
    """A readable table of the result of :func:`run`."""
    m, cfg = result["machine"], result["config"]
    lines = [
        f"# FG-SGD step benchmark  {m['date']}",
        f"# machine: {m['cpu']}, {m['cores']} cores"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; 1-min load average {_fmt(m['loadavg_start'])} at start, "
        f"{_fmt(m['loadavg_end'])} at end",
        f"# torch {m['torch']}, numba {m['numba']}, geoopt {m['geoopt']}, timm {m['timm']}, "
        f"fgo_geoopt {m['fgo_geoopt']}; threads {m['threads']}",
        f"# model {cfg['model']} ({result['model']['params']:,} params), device {cfg['device']}, "
        f"backend {cfg['backend']}, wrap: {result['wrap_impl']}",
        f"# medians of {cfg['repeats']} interleaved rounds after {cfg['warmup']} warm-up "
        f"(geoopt: {min(cfg['geoopt_repeats'], cfg['repeats'])}); targets are CPU targets",
        f"# memory allocator: --malloc {cfg['malloc']} ({m['allocator']})",
    ]
    load = max(x or 0.0 for x in (m["loadavg_start"], m["loadavg_end"]))
    if load > (m["cores"] or 1):
        lines.append(
            f"# WARNING: the machine was busy (load average {load:.1f} on {m['cores']} cores): "
            "times are unreliable; compare the ratios of the fastest steps below"
        )
    lines.append("")
    checks = {c["what"]: c for c in result["checks"]}

    def row(what: str, value: str, ratio: str, spread: str = "-") -> str:
        c = checks.get(what)
        target = "-" if c is None else c["target"]
        status = "-" if c is None else ("ok" if c["pass"] else "FAIL")
        return f"{what:<30} {value:>12} {spread:>17} {ratio:>9}  {target:<20} {status}"

    def spread(s: dict[str, Any]) -> str:
        return f"{min(s['samples_ms']):.0f}-{max(s['samples_ms']):.0f} ms"

    lines.append(f"{'what':<30} {'median':>12} {'min-max':>17} {'vs SGD':>9}  {'target':<20} pass")
    lines.append("-" * 98)
    for name, s in result["step"].items():
        lines.append(
            row(f"step {name}", f"{s['median_ms']:.1f} ms", f"{s['ratio_to_sgd']:.2f}x", spread(s))
        )
    for name, s in result.get("train", {}).items():
        lines.append(
            row(
                f"train step {name}",
                f"{s['median_ms']:.1f} ms",
                f"{s['ratio_to_sgd']:.3f}x",
                spread(s),
            )
        )
    for name, s in result["memory"].items():
        lines.append(
            row(
                f"state memory {name}",
                f"{s['total_bytes'] / 2**20:.1f} MiB",
                f"{s['ratio_to_sgd']:.3f}x",
            )
        )
    if "wrap_large" in result:
        w = result["wrap_large"]
        lines.append(row(f"wrap({w['model']}, pio4)", f"{w['seconds']:.2f} s", "-"))
    if "launches" in result:
        la = result["launches"]
        lines.append(
            row(
                "launches independent of POMs",
                f"{la['pio4'][la['metric']]}/{la['pio4_more_poms'][la['metric']]}",
                "-",
            )
        )
    lines.append("")
    fastest = [(f"step {k}", v) for k, v in result["step"].items()]
    fastest += [(f"train {k}", v) for k, v in result.get("train", {}).items()]
    lines.append(
        "ratios of the fastest steps to SGD's: "
        + ", ".join(f"{k} {v['min_ratio_to_sgd']:.2f}x" for k, v in fastest)
    )
    lines.append(
        "minor page faults per timed step (median): "
        + ", ".join(f"{k} {v['page_faults']:.0f}" for k, v in fastest)
    )
    lines.append(
        "first-step (compile) time, ms: "
        + ", ".join(f"{k} {v['first_ms']:.0f}" for k, v in result["step"].items())
    )
    lines.append(
        "wrap time of the benchmarked model, s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["wrap_s"].items())
    )
    lines.append(
        "state memory detail, MiB (state + collections): "
        + ", ".join(
            f"{k} {v['state_bytes'] / 2**20:.1f} + {v['collection_bytes'] / 2**20:.2f}"
            for k, v in result["memory"].items()
        )
    )
    for k, v in result["memory"].items():
        if v["collection_detail"]:
            parts = ", ".join(f"{p} {n / 2**20:.2f}" for p, n in v["collection_detail"].items())
            lines.append(f"  {k} collections, MiB: {parts}")
    if "launches" in result:
        la = result["launches"]
        key = la["metric"]
        lines.append(
            f"{key} per step: sgd {la['sgd'][key]}; "
            + "; ".join(
                f"{k} {la[k][key]} ({la[k]['poms']:,} POMs, {la[k]['layers']} layers, "
                f"{la[k]['layers_x_types']} layers x types)"
                for k in ("pio4", "pio4_more_poms")
            )
            + f"; independent of POM count: {la['independent_of_poms']}"
        )
    failed = [c["what"] for c in result["checks"] if not c["pass"]]
    lines.append(
        f"checks: {len(result['checks']) - len(failed)} passed, {len(failed)} failed"
        + (f" ({'; '.join(failed)})" if failed else "")
    )
    lines.append(f"total benchmark time: {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> tuple[Config, bool, bool]:
    d = Config()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--model", default=d.model, help="timm model name")
    ap.add_argument("--presets", default=",".join(d.presets), help="comma-separated FG presets")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds of steps")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first (>= 1)")
    ap.add_argument(
        "--geoopt-repeats",
        type=int,
        default=d.geoopt_repeats,
        help="timed rounds for the geoopt baseline (at most --repeats)",
    )
    ap.add_argument(
        "--train-repeats",
        type=int,
        default=d.train_repeats,
        help="timed training steps per optimizer",
    )
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--img-size", type=int, default=d.img_size)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch and numba threads")
    ap.add_argument("--device", default=d.device)
    ap.add_argument(
        "--backend", choices=("auto", "fused", "torch"), default=d.backend, help="FGSGD backend"
    )
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--skip-train", action="store_true", help="skip the full training step")
    ap.add_argument(
        "--wrap-model", default=d.wrap_model, help="model whose wrap() is timed ('' to skip)"
    )
    ap.add_argument(
        "--launches",
        action="store_true",
        help="count ops per step on CPU too (always done on CUDA)",
    )
    ap.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default=d.malloc,
        help="keep: freed memory stays with the process (glibc thresholds 1 GiB), so no case "
        "pays page faults left by another; default: the allocator as it is",
    )
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    ap.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit 1 when a target line says FAIL (default); --no-strict: exit 0 regardless",
    )
    a = ap.parse_args(argv)
    presets = tuple(p for p in a.presets.split(",") if p)
    cfg = Config(
        model=a.model,
        presets=presets,
        repeats=a.repeats,
        warmup=a.warmup,
        geoopt_repeats=a.geoopt_repeats,
        train_repeats=a.train_repeats,
        batch_size=a.batch_size,
        img_size=a.img_size,
        threads=a.threads,
        device=a.device,
        backend=a.backend,
        seed=a.seed,
        skip_train=a.skip_train,
        wrap_model=a.wrap_model or None,
        launches=True if a.launches else None,
        malloc=a.malloc,
    )
    return cfg, a.json, a.strict


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 1 when a target is missed, unless ``--no-strict``."""
    cfg, as_json, strict = _parse(argv)
    # Keep the profiler's start / stop chatter (and CUDA probing errors on CPU) off stderr.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(result))
    if as_json:
        print(json.dumps(result, sort_keys=True))
    return int(strict and not all(c["pass"] for c in result["checks"]))


if __name__ == "__main__":
    sys.exit(main())
