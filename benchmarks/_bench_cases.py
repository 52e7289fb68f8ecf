"""The cases one run of the step benchmark times, all built from the same seeded model.

:func:`step_cases`: one optimizer step each of ``torch.optim.SGD``, :class:`fgo_geoopt.FGSGD`
per preset and geoopt's ``RiemannianSGD`` (a sphere per output filter), with the same
gradients; :func:`state_memory`: the bytes their optimizers hold; :func:`time_training`: a full
training step of SGD and of FG-SGD; :func:`time_wrap`: wrapping a larger model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import geoopt
import torch

import fgo_geoopt
from benchmarks._bench_config import LR, MOMENTUM, Config
from benchmarks._bench_memory import optimizer_state_bytes
from benchmarks._bench_models import geoopt_sphere_params, make_model
from benchmarks._bench_timing import Case, add_ratios, step_case, time_interleaved, train_case
from fgo_geoopt import FGSGD

__all__ = ["state_memory", "step_cases", "time_training", "time_wrap"]


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)


def step_cases(
    base: torch.nn.Module, grads: dict[str, torch.Tensor], cfg: Config, device: torch.device
) -> tuple[list[Case], dict[str, float], dict[str, torch.nn.Module]]:
    """The optimizer-step cases: SGD, ``fg_<preset>`` per preset, then ``geoopt_sphere``.

    Every case keeps its model, optimizer and parameters alive as long as the case.

    Returns:
        The cases, the seconds ``wrap`` took per preset, and the wrapped, never stepped copy
        of the model for the training step's preset (empty with ``skip_train``).
    """
    sgd_model = copy.deepcopy(base).to(device)
    cases = [step_case("sgd", _sgd(sgd_model), dict(sgd_model.named_parameters()), grads)]
    cases[0].keep["model"] = sgd_model
    wrap_s: dict[str, float] = {}
    fresh: dict[str, torch.nn.Module] = {}
    for preset in cfg.presets:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        fgo_geoopt.wrap(model, preset, seed=cfg.seed)
        wrap_s[preset] = time.perf_counter() - t0
        if preset == cfg.train_preset and not cfg.skip_train:
            fresh[preset] = copy.deepcopy(model)
        model = model.to(device)
        opt = FGSGD(model.parameters(), lr=LR, momentum=MOMENTUM, backend=cfg.backend)
        cases.append(step_case(f"fg_{preset}", opt, dict(model.named_parameters()), grads))
        cases[-1].keep["model"] = model
    sphere_params = geoopt_sphere_params(base, device)
    ropt = geoopt.optim.RiemannianSGD(list(sphere_params.values()), lr=LR, momentum=MOMENTUM)
    rounds = min(cfg.geoopt_repeats, cfg.repeats)
    cases.append(step_case("geoopt_sphere", ropt, sphere_params, grads, rounds=rounds))
    return cases, wrap_s, fresh


def state_memory(cases: Sequence[Case]) -> dict[str, dict[str, Any]]:
    """:func:`optimizer_state_bytes` of every case but geoopt's, with its ratio to SGD's."""
    memory = {
        c.name: optimizer_state_bytes(c.keep["optimizer"])
        for c in cases
        if c.name != "geoopt_sphere"
    }
    for stats in memory.values():
        stats["ratio_to_sgd"] = stats["total_bytes"] / memory["sgd"]["total_bytes"]
    return memory


def time_training(
    base: torch.nn.Module, fg_model: torch.nn.Module | None, cfg: Config, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Time a full training step of SGD and of FG-SGD ``cfg.train_preset`` on one seeded batch.

    ``fg_model`` is the wrapped copy :func:`step_cases` kept (``None``: wrap a new copy).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, base.num_classes, (cfg.batch_size,), generator=gen).to(device)
    sgd_model = copy.deepcopy(base).to(device)
    if fg_model is None:
        fg_model = fgo_geoopt.wrap(copy.deepcopy(base), cfg.train_preset, seed=cfg.seed)
    fg_model = fg_model.to(device)
    cases = [
        train_case("sgd", sgd_model, _sgd(sgd_model), x, y),
        train_case(
            f"fg_{cfg.train_preset}",
            fg_model,
            FGSGD(fg_model.parameters(), lr=LR, momentum=MOMENTUM, backend=cfg.backend),
            x,
            y,
        ),
    ]
    return add_ratios(time_interleaved(cases, cfg.train_repeats, 1, device))


def time_wrap(model_name: str, seed: int) -> dict[str, Any]:
    """Seconds of ``wrap(model, "pio4")`` on a freshly built model (construction excluded)."""
    big = make_model(model_name, seed)
    t0 = time.perf_counter()
    fgo_geoopt.wrap(big, "pio4", seed=seed)
    return {"model": model_name, "preset": "pio4", "seconds": time.perf_counter() - t0}
