"""FG-SGD on a GPU: step and training-step times against torch's SGD, and launches per step.

For every model (default resnet50 and seresnet50, batch 128, 224x224, bf16 autocast):

* **step**: ``optimizer.step()`` alone on the gradients of one backward pass, for
  ``SGD(fused=True)``, ``SGD(foreach=True)``, FG-SGD ``pio4`` with ``backend="auto"`` (the
  Triton kernels where triton is importable) and ``backend="torch"`` (the flat torch step);
  steps of all optimizers interleaved, medians, ratios against both SGDs;
* **training step**: forward + backward + step under ``torch.autocast(bfloat16)``, FG-SGD
  (auto) against ``SGD(fused=True)``: the overhead in percent;
* **launches**: device kernels per step, from ``torch.profiler`` (on CPU: ATen ops).

    python benchmarks/gpu_bench.py                         # on a CUDA machine
    python benchmarks/gpu_bench.py --device cpu --tiny     # a smoke run anywhere (seconds)

The targets (FG-SGD step at most 2x ``SGD(fused=True)``, training overhead at most 2%) are
printed as PASS / FAIL lines; ``--strict`` makes a FAIL exit with status 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgo_geoopt import FGSGD, wrap

STEP_TARGET = 2.0  # FG-SGD pio4 step / SGD(fused=True) step
TRAIN_TARGET = 0.02  # training-step overhead against SGD(fused=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _optimizers(model: torch.nn.Module, wrapped: torch.nn.Module, device) -> dict[str, Any]:
    """The optimizers compared, each on its own copy of the weights."""
    out: dict[str, Any] = {}
    for name, kwargs in (("SGD fused", {"fused": True}), ("SGD foreach", {"foreach": True})):
        m = copy.deepcopy(model)
        try:
            out[name] = (m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, **kwargs))
        except (RuntimeError, ValueError) as err:  # fused SGD on a device without it
            print(f"# {name}: not available here ({err})")
    for backend in ("auto", "torch"):
        m = copy.deepcopy(wrapped)
        opt = FGSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
        out[f"FG-SGD pio4 {backend}"] = (m, opt)
    return out


def _batch(cfg, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(cfg.batch, 3, cfg.img, cfg.img, generator=gen).to(device)
    y = torch.randint(0, 1000, (cfg.batch,), generator=gen).to(device)
    return x, y


def _train_step(model, opt, batch, device) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def count_launches(step: Callable[[], Any], device: torch.device) -> int:
    """Device kernels (CUDA) or top-level ATen ops (CPU) of one call of ``step``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    _sync(device)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def bench_model(name: str, cfg, device: torch.device) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
    wrapped = wrap(copy.deepcopy(model), "pio4")
    opts = _optimizers(model, wrapped, device)
    gen = torch.Generator().manual_seed(0)
    batch = _batch(cfg, device, gen)
    for m, opt in opts.values():  # warm-up: buffers, index sets, kernel compilation
        for _ in range(cfg.warmup):
            _train_step(m, opt, batch, device)
    steps: dict[str, list[float]] = {k: [] for k in opts}
    launches = {}
    for label, (_, opt) in opts.items():  # gradients stay from the last backward
        launches[label] = count_launches(opt.step, device)
    for _ in range(cfg.repeats):
        for label, (_, opt) in opts.items():
            steps[label].append(_timed(opt.step, device))
    train: dict[str, list[float]] = {k: [] for k in ("SGD fused", "FG-SGD pio4 auto") if k in opts}
    for _ in range(cfg.train_repeats):
        for label in train:
            m, opt = opts[label]
            train[label].append(_timed(lambda m=m, opt=opt: _train_step(m, opt, batch, device),
                                       device))  # fmt: skip
    step_ms = {k: 1e3 * statistics.median(v) for k, v in steps.items()}
    train_ms = {k: 1e3 * statistics.median(v) for k, v in train.items()}
    return {"model": name, "step_ms": step_ms, "train_ms": train_ms, "launches": launches}


def checks(rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    out = []
    for r in rows:
        sgd = r["step_ms"].get("SGD fused")
        fg = r["step_ms"]["FG-SGD pio4 auto"]
        if sgd:
            out.append((f"{r['model']}: pio4 step <= {STEP_TARGET}x SGD fused", fg / sgd <=
                        STEP_TARGET, f"{fg / sgd:.2f}x"))  # fmt: skip
        if "SGD fused" in r["train_ms"]:
            over = r["train_ms"]["FG-SGD pio4 auto"] / r["train_ms"]["SGD fused"] - 1.0
            out.append((f"{r['model']}: training overhead <= {100 * TRAIN_TARGET:.0f}%",
                        over <= TRAIN_TARGET, f"{100 * over:+.1f}%"))  # fmt: skip
    return out


def format_report(rows, results, cfg, device) -> str:
    lines = [f"device {device}, batch {cfg.batch}, {cfg.img}x{cfg.img}, bf16 autocast", ""]
    lines.append("| model | optimizer | step ms | vs SGD fused | vs SGD foreach | launches |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        fused, foreach = r["step_ms"].get("SGD fused"), r["step_ms"].get("SGD foreach")
        for label, ms in r["step_ms"].items():
            a = f"{ms / fused:.2f}x" if fused else "-"
            b = f"{ms / foreach:.2f}x" if foreach else "-"
            lines.append(f"| {r['model']} | {label} | {ms:.2f} | {a} | {b} | "
                         f"{r['launches'][label]} |")  # fmt: skip
    lines += ["", "| model | training step, SGD fused | FG-SGD pio4 auto | ratio |",
              "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        t = r["train_ms"]
        if len(t) == 2:
            sgd, fg = t["SGD fused"], t["FG-SGD pio4 auto"]
            lines.append(f"| {r['model']} | {sgd:.1f} ms | {fg:.1f} ms | {fg / sgd:.3f}x |")
    lines.append("")
    for name, ok, detail in results:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name} ({detail})")
    return "\n".join(lines)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="resnet50,seresnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="test_resnet, batch 2, 32x32, 2 repeats: a smoke run")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a line says FAIL")
    cfg = parser.parse_args(argv)
    if cfg.tiny:
        cfg.models, cfg.batch, cfg.img = "test_resnet", 2, 32
        cfg.warmup, cfg.repeats, cfg.train_repeats = 1, 2, 2
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    rows = [bench_model(name, cfg, device) for name in cfg.models.split(",")]
    results = checks(rows)
    print(format_report(rows, results, cfg, device))
    if cfg.json:
        print(json.dumps({"rows": rows, "checks": results}))
    return 1 if cfg.strict and not all(ok for _, ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
