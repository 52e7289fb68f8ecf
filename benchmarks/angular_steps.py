#!/usr/bin/env python3
"""How far each layer turns per step: SGD against FG-SGD with both step geometries.

Trains ``resnet8_cifar`` on the embedded ``mnist5k`` digits for ``--steps`` steps from the same
initialisation and batches (batch 64, momentum 0.9, weight decay 1e-4 on Euclidean weights, one
``lr`` for every row, re-scaling scales set but not updated) and prints, per row, the mean
training loss of the last 50 steps, the mean angle per 3x3 filter and step of each conv (stem
to deepest, last 50 steps) and, for FG rows, the mean angle per kernel by manifold type.
See docs/optimizer.md, "The learning-rate geometry"::

    OMP_NUM_THREADS=1 python benchmarks/angular_steps.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)

import timm  # noqa: E402
import torch  # noqa: E402

import fgo_geoopt  # noqa: E402
import recipes.models  # noqa: E402, F401  (registers resnet8_cifar)
from fgo_geoopt.diagnostics import StepRecorder  # noqa: E402
from fgo_geoopt.rescaling import Rescaler  # noqa: E402
from recipes.data import load_mnist5k  # noqa: E402

ROWS = {
    "euc": None,
    "st-paper": ("st", "fan", "unit"),
    "st-matched": ("st", "matched", "stored"),
    "pio4-paper": ("pio4", "fan", "unit"),
    "pio4-matched": ("pio4", "matched", "stored"),
}


def run(row: str, lr: float, steps: int, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1)
    spec = ROWS[row]
    if spec is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    else:
        strategy, gamma, metric = spec
        fgo_geoopt.wrap(model, strategy, seed=0)
        Rescaler(model, gamma, attach=False)
        groups = fgo_geoopt.param_groups(model, weight_decay=1e-4)
        opt = fgo_geoopt.FGSGD(groups, lr=lr, momentum=0.9, metric=metric)
    recorder = StepRecorder(model)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.record(opt)
        losses.append(float(loss.detach()))
    summary = recorder.summary(last=50)
    convs = [n for n, p in model.named_parameters() if p.ndim == 4 and p.shape[-1] == 3]
    filters = {s["layer"]: s["filter_angle"] for s in summary}
    kinds: dict[str, list[float]] = {}
    for s in summary:
        if s["layer"] in convs:
            kinds.setdefault(s["type"], []).append(s["kernel_angle"])
    return statistics.fmean(losses[-50:]), [filters[n] for n in convs], kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    opts = parser.parse_args()
    images, labels = load_mnist5k()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels)
    print(f"lr {opts.lr}, {opts.steps} steps; angles in rad per step, last 50 steps")
    for row in opts.rows:
        loss, angles, kinds = run(row, opts.lr, opts.steps, x, y)
        by_kind = "  ".join(f"{k} {statistics.fmean(v):.5f}" for k, v in kinds.items())
        print(
            f"{row:13s} loss {loss:.3f}  filter angle stem->deepest "
            + " ".join(f"{a:.4f}" for a in angles)
            + (f"  | kernel angle: {by_kind}" if row != "euc" else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
