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

FG-Adam's rows (``FGAdam`` against ``torch.optim.AdamW(foreach=True)`` and geoopt's
RiemannianAdam, same protocol) are ``benchmarks/adam_step.py``.

Steps are interleaved (each round times one step of every optimizer, in a rotating order),
and the medians over the rounds after warm-up are reported. The first warm-up step of each
optimizer (which compiles the numba kernels when they are not cached yet) is reported
separately as the first-step time. Targets apply to CPU runs.

Memory allocator (``--malloc``): by default glibc's ``malloc`` hands large blocks back to the
operating system when they are freed (``zero_grad(set_to_none=True)`` frees every gradient, an
optimizer frees its temporaries) and the next allocation faults the pages in again, zeroed. How
much of that hits a case depends on the heap's layout left by the cases timed before it, not on
the case itself (``docs/performance.md``, "The memory allocator"). ``keep`` (the default) sets
glibc's trim and mmap thresholds to 1 GiB first, so that freed memory stays with the process
and every case runs without those faults; ``default`` leaves glibc as it is. Minor page faults
per timed step are reported either way.

This file is the command line and :func:`run`, the order of the measurements; the pieces live
beside it: ``_bench_config.py`` (:class:`Config`), ``_bench_machine.py`` (threads, allocator,
report header), ``_bench_models.py`` (models, gradients, the geoopt baseline),
``_bench_timing.py`` (interleaved timing), ``_bench_cases.py`` (what is timed),
``_bench_memory.py`` (state bytes), ``_bench_launches.py`` (launch counts) and
``_bench_report.py`` (targets, checks, the report). The names tests and users reach for are
re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    # Run as a script or loaded from its file: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with warnings.catch_warnings():
    # geoopt 0.5.1 decorates functions with torch.jit.script, deprecated on recent torch.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    # Names imported ``as`` themselves are not used here: they are re-exported, for the tests
    # and for code written when every piece lived in this file.
    from benchmarks._bench_cases import state_memory, step_cases, time_training, time_wrap
    from benchmarks._bench_config import GRAD_SCALE as GRAD_SCALE
    from benchmarks._bench_config import LR as LR
    from benchmarks._bench_config import MOMENTUM as MOMENTUM
    from benchmarks._bench_config import Config
    from benchmarks._bench_launches import count_launches, launch_check
    from benchmarks._bench_machine import machine_info, set_malloc, set_threads, thread_counts
    from benchmarks._bench_memory import _spans as _spans
    from benchmarks._bench_memory import _union_bytes as _union_bytes
    from benchmarks._bench_memory import collection_bytes, optimizer_state_bytes
    from benchmarks._bench_memory import collection_detail as collection_detail
    from benchmarks._bench_models import fixed_grads, geoopt_sphere_params, make_model
    from benchmarks._bench_report import MEMORY_TARGET as MEMORY_TARGET
    from benchmarks._bench_report import STEP_TARGETS as STEP_TARGETS
    from benchmarks._bench_report import TRAIN_TARGET as TRAIN_TARGET
    from benchmarks._bench_report import WRAP_TARGET_S as WRAP_TARGET_S
    from benchmarks._bench_report import check_targets, format_report
    from benchmarks._bench_timing import Case as Case
    from benchmarks._bench_timing import _faults as _faults
    from benchmarks._bench_timing import add_ratios, time_interleaved
    from benchmarks._bench_timing import step_case as step_case
    from benchmarks._bench_timing import train_case as train_case

__all__ = [
    "Config",
    "collection_bytes",
    "count_launches",
    "geoopt_sphere_params",
    "main",
    "optimizer_state_bytes",
    "run",
]


def run(cfg: Config, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns a JSON-serialisable result dict."""
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    set_threads(cfg.threads)
    allocator = set_malloc(cfg.malloc)
    result: dict[str, Any] = {"machine": machine_info(device)}
    result["machine"]["allocator"] = allocator
    result["config"] = {**asdict(cfg), "presets": list(cfg.presets)}
    result["machine"]["threads"] = thread_counts()

    base = make_model(cfg.model, cfg.seed)
    grads = fixed_grads(base, cfg.seed, device)
    result["model"] = {"name": cfg.model, "params": sum(p.numel() for p in base.parameters())}

    log(f"building {len(cfg.presets)} wrapped copies of {cfg.model} ...")
    cases, result["wrap_s"], fresh = step_cases(base, grads, cfg, device)
    result["wrap_impl"] = "fgo_geoopt.wrap"
    log(f"timing optimizer steps: {cfg.warmup} warm-up + {cfg.repeats} rounds ...")
    result["step"] = add_ratios(time_interleaved(cases, cfg.repeats, cfg.warmup, device))
    result["memory"] = state_memory(cases)
    if cfg.launches or (cfg.launches is None and device.type == "cuda"):
        log("counting launches per step ...")
        result["launches"] = launch_check(base, grads, cfg, device)
    del cases  # frees the step cases' models and optimizers before the training step

    if not cfg.skip_train:
        log(f"timing training steps (batch {cfg.batch_size}, {cfg.img_size}x{cfg.img_size}) ...")
        result["train"] = time_training(base, fresh.pop(cfg.train_preset, None), cfg, device)
    if cfg.wrap_model:
        log(f"timing wrap({cfg.wrap_model}) ...")
        result["wrap_large"] = time_wrap(cfg.wrap_model, cfg.seed)

    result["checks"] = check_targets(result, cfg)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


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
