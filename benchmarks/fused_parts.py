"""Where the fused FG-SGD step spends its time, and what torch's OpenMP team brings.

Run ``python benchmarks/fused_parts.py`` (CPU, about a minute). Two measurements:

1. One ``512x512x3x3`` layer's update (``st``), timed right after a parallel torch op (when
   torch's OpenMP workers are spinning): on torch's team, on two threads of our own, on one.
2. FG-SGD ``pio4`` steps inside a training loop on timm ``resnet50`` (batch 32, 64x64, gradients
   from the backward pass): the step split into its team calls per phase, the thread pool and
   the rest (plain parameters, Python).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    import timm

    import fgo_geoopt
    from fgo_geoopt import FGSGD, build_collection
    from fgo_geoopt.optim._records import Hyper
    from fgo_geoopt.optim.cpu import _jobs, _schedule
    from fgo_geoopt.optim.cpu._plan import build_plan

HYPER = Hyper(
    lr=0.01,
    momentum=0.9,
    dampening=0.0,
    nesterov=False,
    maximize=False,
    weight_decay=0.0,
    adaptive=True,
    check=True,
)


def layer_update(repeats: int) -> dict[str, float]:
    coll = build_collection((512, 512, 3, 3), "st", seed=0)
    k = coll.num_kernels
    x = coll.projx(torch.randn(512, 512, 3, 3)).view(k, 9).numpy()
    g, m = 0.01 * np.random.default_rng(0).standard_normal(x.shape, np.float32), np.zeros_like(x)
    plan = build_plan(coll)
    busy = torch.randn(4_000_000)
    out = {}
    for name, threads, team in (
        ("team", 2, True),
        ("pool, 2 threads", 2, False),
        ("1 thread", 1, False),
    ):
        saved = list(_schedule._TEAM)
        if not team:
            _schedule._TEAM[:] = [None]
        times = []
        for _ in range(repeats + 1):
            busy.mul_(1.0)  # a parallel torch op: its workers now spin
            job = _jobs.FusedJob(coll, plan, {}, x, g, m, HYPER, False, key=0, state=None)
            t0 = time.perf_counter()
            _schedule.run_jobs([job], threads)
            times.append(time.perf_counter() - t0)
        _schedule._TEAM[:] = saved
        out[name] = statistics.median(times[1:]) * 1e3
    return out


def training_parts(steps: int, rescale: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    fgo_geoopt.wrap(model, "pio4", seed=0, rescale=rescale)
    opt = FGSGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 1000, (32,))
    team = _schedule._team_module()
    parts: dict[str, float] = collections.defaultdict(float)
    names = {0: "bounds", 1: "exact norms", 2: "update"}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name(*args) if callable(name) else name] += time.perf_counter() - t0

        return wrapper

    if team is not None:
        run = team.run
        team.run = timed(
            lambda path, kidx, descs, th: f"team {path} {names[int(descs[0][0])]}", run
        )
    parallel = _schedule._parallel
    _schedule._parallel = timed("thread pool", parallel)
    try:
        for i in range(steps + 2):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i == 2:
                parts.clear()
            t0 = time.perf_counter()
            opt.step()
            parts["whole step"] += time.perf_counter() - t0
    finally:
        _schedule._parallel = parallel
        if team is not None:
            team.run = run
    return {name: total / steps * 1e3 for name, total in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--rescale", action="store_true", help="wrap with re-scaling (scaled kernels)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("team available:", _schedule._team_module() is not None)
    print("512x512x3x3 update right after a torch op, ms:")
    for name, ms in layer_update(args.repeats).items():
        print(f"  {name:18s} {ms:7.2f}")
    scales = ", re-scaled" if args.rescale else ""
    print(
        f"FG-SGD pio4 step in a resnet50 training loop{scales}, ms per step ({args.steps} steps):"
    )
    for name, ms in sorted(training_parts(args.steps, args.rescale).items()):
        print(f"  {name:28s} {ms:7.2f}")


if __name__ == "__main__":
    main()
