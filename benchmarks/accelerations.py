"""What each acceleration of the fused CPU step buys on a full training step.

Run ``python benchmarks/accelerations.py`` (about 3 minutes on 2 cores). For 1 and 2 threads,
timm ``resnet50`` (batch 32, 64x64, the step benchmark's training case), FG-SGD ``pio4``
with momentum, times interleaved training steps (zero_grad, forward, backward, step) of:

* ``sgd``: ``torch.optim.SGD(foreach=True)``, the baseline;
* ``fg``: FG-SGD with every acceleration (the library's default);
* ``fg -team``: torch's OpenMP team off (the step's split phases on the thread pool);
* ``fg +bounds``: Eq. (7) from gradient bounds first, exact norms only where needed (opt-in,
  ``FGO_GRADIENT_BOUNDS=1``);
* ``fg -registers``: the 3x3 path without its 16-kernel register step (all in the tile code);
* ``fg torch``: the batched torch backend instead of the fused one.

For each switch it prints the training-step time and what the acceleration buys, as a share of
the accelerated training step: ``(t_without - t_with) / t_with``. The acceptance rule of the
project: an acceleration that buys less than 2% on both thread counts is removed or opt-in.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    import timm

    import fgo_geoopt
    from fgo_geoopt import FGSGD
    from fgo_geoopt.optim.cpu import _jobs, _schedule

LR, MOMENTUM = 0.01, 0.9


def _variants(base, preset, seed):
    """name -> (model, optimizer, switch): ``switch(on)`` turns the variant's setting on / off
    around its own steps only."""
    out = {}
    sgd_model = copy.deepcopy(base)
    out["sgd"] = (sgd_model, torch.optim.SGD(sgd_model.parameters(), LR, MOMENTUM, foreach=True))

    def fg(backend="auto"):
        model = fgo_geoopt.wrap(copy.deepcopy(base), preset, seed=seed)
        return model, FGSGD(model.parameters(), lr=LR, momentum=MOMENTUM, backend=backend)

    out["fg"] = fg()
    out["fg -team"] = fg()
    out["fg +bounds"] = fg()
    out["fg -registers"] = fg()
    out["fg torch"] = fg("torch")
    return out


def _switch(name, on):
    """Apply (``on``) or undo the setting of variant ``name``."""
    if name == "fg -team":
        if on:
            _switch.saved_team = list(_schedule._TEAM)
            _schedule._TEAM[:] = [None]
        else:
            _schedule._TEAM[:] = _switch.saved_team
    elif name == "fg +bounds":
        _jobs.GRADIENT_BOUNDS = on
    elif name == "fg -registers":
        _jobs.REGISTERS = not on


def measure(threads: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median training-step milliseconds per variant at ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base = timm.create_model("resnet50", num_classes=1000)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(32, 3, 64, 64, generator=gen)
    y = torch.randint(0, 1000, (32,), generator=gen)
    variants = _variants(base, "pio4", seed)
    names = list(variants)
    samples = {n: [] for n in names}
    for r in range(repeats + 2):  # two warm-up rounds (compilation, first buffers)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            model, opt = variants[name]
            _switch(name, True)
            try:
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                dt = time.perf_counter() - t0
            finally:
                _switch(name, False)
            if r >= 2:
                samples[name].append(dt * 1e3)
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per variant")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    print(f"team available: {_schedule._team_module() is not None}")
    rows = {}
    for threads in args.threads:
        ms = measure(threads, args.repeats)
        rows[threads] = ms
        print(f"\n{threads} thread(s): training step, median of {args.repeats} (ms)")
        for name, value in ms.items():
            print(f"  {name:12s} {value:8.1f}  ({value / ms['sgd']:.3f}x SGD)")
        for name, what, sign in (
            ("fg -team", "OpenMP team", 1),
            ("fg +bounds", "gradient bounds", -1),
            ("fg -registers", "3x3 registers", 1),
            ("fg torch", "fused backend", 1),
        ):
            # what the acceleration buys: the step without it minus the step with it
            gain = sign * (ms[name] - ms["fg"]) / ms["fg"] * 100
            print(f"  {what:16s} buys {gain:+6.1f}% of the FG-SGD training step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
