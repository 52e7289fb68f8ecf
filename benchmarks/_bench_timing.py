"""Timing of interleaved cases: each round times one step of every case, in a rotating order.

A :class:`Case` is one thing timed per round (an optimizer step, a training step); its
``prepare`` runs untimed first. :func:`time_interleaved` reports the median over the rounds
after warm-up, the first step (which compiles the numba kernels when they are not cached yet)
and the minor page faults of a timed round.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Case", "add_ratios", "step_case", "sync", "time_interleaved", "train_case"]


def _faults() -> int:
    """Minor page faults of the process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Case:
    """One thing timed per round: ``prepare`` runs untimed before ``run``."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], Any] = lambda: None
    rounds: int | None = None  # None: every round
    keep: dict[str, Any] = field(default_factory=dict)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
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
            sync(device)
            f0 = _faults()
            t0 = time.perf_counter()
            case.run()
            sync(device)
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


def add_ratios(
    times: dict[str, dict[str, Any]], reference: str = "sgd"
) -> dict[str, dict[str, Any]]:
    """Add ``ratio_to_sgd`` (of the medians) and ``min_ratio_to_sgd`` (of the fastest steps)
    to every case of :func:`time_interleaved`'s result; returns ``times``."""
    ref = times[reference]
    median_ms, min_ms = ref["median_ms"], ref["min_ms"]
    for stats in times.values():
        stats["ratio_to_sgd"] = stats["median_ms"] / median_ms
        stats["min_ratio_to_sgd"] = stats["min_ms"] / min_ms
    return times
