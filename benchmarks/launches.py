"""Ops and host syncs per optimizer step: FG-SGD's flat torch step beside torch's SGD.

On a GPU every ATen op of a step is at least one kernel launch, and every host read of a tensor
waits for the device; this counts both for one step (after two warm-up steps: the first builds
the index sets and may read the host), on CPU, where the same code dispatches the same ops.

    python benchmarks/launches.py                        # resnet50 and resnet101, pio4, CPU
    python benchmarks/launches.py --device meta          # the same counts without computing
    python benchmarks/launches.py --models resnet18,resnet34 --presets pio4,st

Targets (a line says PASS or FAIL): at most 400 ops per FG-SGD step, the same count for every
model (it must not grow with depth), and no host sync. The command exits with status 1 when a
line says FAIL, unless ``--no-strict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgo_geoopt import FGSGD, wrap
from fgo_geoopt.optim.counting import DispatchCounter

OP_BUDGET = 400


def parameters(model: torch.nn.Module, device: str) -> list[torch.Tensor]:
    """The model's parameters on ``device``; on ``meta`` new tensors on the same collections
    (the step dispatches the same ops there without computing anything)."""
    import geoopt

    if device != "meta":
        return list(model.to(device).parameters())
    out = []
    for p in model.parameters():
        empty = torch.empty(p.shape, dtype=p.dtype, device="meta")
        manifold = getattr(p, "manifold", None)
        if manifold is None:
            out.append(torch.nn.Parameter(empty))
        else:
            out.append(geoopt.ManifoldParameter(empty, manifold=manifold))
    return out


def count_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """Ops and syncs of the third step of ``optimizer`` (gradients drawn before each)."""
    gen = torch.Generator().manual_seed(0)

    def grads() -> None:
        for p in params:
            if p.device.type == "meta":
                p.grad = torch.empty_like(p)
            else:
                p.grad = (0.01 * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)

    for _ in range(2):
        grads()
        optimizer.step()
    grads()
    counter = DispatchCounter()
    start = time.perf_counter()
    with counter:
        optimizer.step()
    return {
        "ops": counter.ops,
        "syncs": counter.syncs,
        "seconds": time.perf_counter() - start,
        "top": counter.by_name.most_common(6),
        "sync_ops": dict(counter.sync_names),
    }


def measure(model_name: str, preset: str, device: str, backend: str) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    base = parameters(model, device)
    sgd = count_step(torch.optim.SGD(base, lr=0.1, momentum=0.9, foreach=True), base)
    start = time.perf_counter()
    wrap(model, preset)
    wrap_s = time.perf_counter() - start
    params = parameters(model, device)
    opt = FGSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
    fg = count_step(opt, params)
    return {
        "model": model_name,
        "preset": preset,
        "layers": sum(hasattr(p, "manifold") for p in params),
        "poms": sum(p.manifold.num_poms for p in params if hasattr(p, "manifold")),
        "wrap_s": wrap_s,
        "sgd": sgd,
        "fgsgd": fg,
    }


def checks(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    out = []
    for preset in sorted({r["preset"] for r in rows}):
        mine = [r for r in rows if r["preset"] == preset]
        counts = [r["fgsgd"]["ops"] for r in mine]
        out.append((f"{preset}: ops per step <= {OP_BUDGET}", max(counts) <= OP_BUDGET,
                    f"max {max(counts)}"))  # fmt: skip
        if len(mine) > 1:
            same = len(set(counts)) == 1
            out.append((f"{preset}: the same ops for every model", same, str(counts)))
        syncs = [r["fgsgd"]["syncs"] for r in mine]
        out.append((f"{preset}: no host sync", max(syncs) == 0, str(syncs)))
    return out


def format_report(rows: list[dict[str, Any]], results: list[tuple[str, bool, str]]) -> str:
    lines = [
        "| model | preset | wrapped layers | POMs | optimizer | ops / step | host syncs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['preset']} | {r['layers']} | {r['poms']} "
        lines.append(head + f"| FG-SGD | {r['fgsgd']['ops']} | {r['fgsgd']['syncs']} |")
        lines.append(head + f"| SGD foreach | {r['sgd']['ops']} | {r['sgd']['syncs']} |")
    lines.append("")
    for r in rows:
        top = ", ".join(f"{name} {n}" for name, n in r["fgsgd"]["top"])
        lines.append(f"{r['model']} {r['preset']}: most frequent ops: {top}")
    lines.append("")
    for name, ok, detail in results:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name} ({detail})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnet101")
    parser.add_argument("--presets", default="pio4")
    parser.add_argument("--device", default="cpu", help="cpu (default), meta or cuda")
    parser.add_argument("--backend", default="torch", help="FG-SGD backend (default torch)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="exit 0 even when a line says FAIL")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [
        measure(model, preset, args.device, args.backend)
        for preset in args.presets.split(",")
        for model in args.models.split(",")
    ]
    results = checks(rows)
    print(format_report(rows, results))
    if args.json:
        print(json.dumps({"rows": rows, "checks": results}, default=str))
    return 1 if args.strict and not all(ok for _, ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
