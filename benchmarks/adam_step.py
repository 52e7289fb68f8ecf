"""FG-Adam step benchmark: FGAdam against ``torch.optim.AdamW`` and geoopt's RiemannianAdam.

Run ``python benchmarks/adam_step.py --help``. One run builds a timm model (default
``resnet50``, random weights), and times, on the same initial weights and the same fixed
(seeded) gradients:

1. ``torch.optim.AdamW(foreach=True)`` on the plain model's parameters, the reference;
2. :class:`fgo_geoopt.FGAdam` on the model wrapped with a preset (default ``pio4``);
3. ``geoopt.optim.RiemannianAdam`` with one ``geoopt.Sphere`` per output filter (conv weights
   viewed as ``(c_out, c_in * k_h * k_w)`` and normalised; everything else plain), the peer
   baseline. Such parameters cannot run the conv's forward pass: only the step is timed;
4. with ``--torch-backend`` only: FGAdam with ``backend="torch"`` (the batched torch step) on
   the same wrapped model, for comparison (FGAdam's own row is ``backend="auto"``, the fused
   numba step on a CPU). Off by default: with two threads its many small torch ops leave
   torch's OpenMP workers spinning, which slows the AdamW step timed after it and flatters the
   ratios.

Steps are interleaved (each round times one step of every optimizer, in a rotating order) and
the medians over the rounds after warm-up are reported, with the ratios to AdamW's step and
the targets: FGAdam at most ``3x`` AdamW, and faster than RiemannianAdam. Exits 1 when a target
line says FAIL unless ``--no-strict``. Threads: ``--threads`` (torch's intra-op threads);
run it as ``OMP_NUM_THREADS=1 python benchmarks/adam_step.py --threads 1`` and with
``--threads 2``. As ``benchmarks/step.py``, it keeps freed memory in the process
(``--malloc keep``) so that no optimizer pays page faults left by another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

with warnings.catch_warnings():
    # geoopt 0.5.1 decorates functions with torch.jit.script, deprecated on recent torch.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    import geoopt

import fgo_geoopt

#: Targets of the FG-Adam issue: FGAdam's step at most this many AdamW (foreach) steps, and
#: below geoopt's RiemannianAdam.
ADAMW_TARGET = 3.0
GRAD_SCALE = 1e-2


def set_malloc(mode: str) -> str:
    """``keep``: glibc keeps freed memory (trim and mmap thresholds 1 GiB); ``default``: as is."""
    if mode == "default" or platform.libc_ver()[0] != "glibc":
        return "allocator left as it is"
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    ok = mallopt(-1, 1 << 30) and mallopt(-3, 1 << 30)  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    return "glibc, trim and mmap thresholds 1 GiB" if ok else "glibc refused mallopt: defaults"


def sphere_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The peer baseline: every 4-D weight as one ``geoopt.Sphere`` point per output filter."""
    sphere = geoopt.Sphere()
    out = []
    for p in model.parameters():
        data = p.detach().clone()
        if data.ndim == 4:
            rows = sphere.projx(data.reshape(data.shape[0], -1))
            out.append(geoopt.ManifoldParameter(rows, manifold=sphere))
        else:
            out.append(torch.nn.Parameter(data))
    return out


def build(args: argparse.Namespace) -> dict[str, tuple[torch.optim.Optimizer, list]]:
    """The three optimizers, each with its parameters' fixed gradients."""
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    grads = [torch.randn(p.shape, generator=gen) * GRAD_SCALE for p in model.parameters()]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    spheres = sphere_params(model)
    fgo_geoopt.wrap(model, args.preset, seed=args.seed)
    wrapped = list(model.parameters())
    wd = args.weight_decay
    cases = {
        "AdamW(foreach)": (
            torch.optim.AdamW(plain, lr=args.lr, weight_decay=wd, foreach=True),
            plain,
        ),
        f"FGAdam {args.preset}": (fgo_geoopt.FGAdam(wrapped, lr=args.lr, weight_decay=wd), wrapped),
        "geoopt RiemannianAdam (Sphere per filter)": (
            geoopt.optim.RiemannianAdam(spheres, lr=args.lr),
            spheres,
        ),
    }
    if args.torch_backend:
        cases[f"FGAdam {args.preset}, backend='torch'"] = (
            fgo_geoopt.FGAdam(wrapped, lr=args.lr, weight_decay=wd, backend="torch"),
            wrapped,
        )
    out = {}
    for name, (opt, params) in cases.items():
        pairs = []
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:  # the two FGAdam cases share the wrapped model's parameters
                p.grad = torch.empty_like(p)
            pairs.append((p.grad, g.reshape(p.shape)))
        out[name] = (opt, pairs)
    return out


def time_interleaved(cases, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Median-ready samples (ms) per case; the order of the cases rotates every round."""
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            opt, pairs = cases[name]
            for dst, src in pairs:  # untimed: the gradient the step reads
                dst.copy_(src)
            t0 = time.perf_counter()
            opt.step()
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                samples[name].append(dt)
    return samples


def report(samples: dict[str, list[float]], args: argparse.Namespace) -> tuple[str, bool]:
    names = list(samples)
    med = {n: statistics.median(s) for n, s in samples.items()}
    base, fg, peer = med[names[0]], med[names[1]], med[names[2]]
    lines = [
        f"{args.model}, {args.preset}, {torch.get_num_threads()} thread(s), {args.repeats} timed "
        f"rounds after {args.warmup} warm-up, lr {args.lr}, weight decay {args.weight_decay} "
        "(AdamW, FGAdam)",
        f"{'optimizer':45s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'x AdamW':>8s}",
    ]
    for n in names:
        s = samples[n]
        lines.append(f"{n:45s} {med[n]:10.1f} {min(s):8.1f} {max(s):8.1f} {med[n] / base:8.2f}")
    ok_adamw = fg <= ADAMW_TARGET * base
    ok_peer = fg < peer
    lines.append(
        f"target FGAdam <= {ADAMW_TARGET:g}x AdamW(foreach): {fg / base:.2f}x "
        f"{'PASS' if ok_adamw else 'FAIL'}"
    )
    lines.append(
        f"target FGAdam faster than RiemannianAdam: {fg:.1f} vs {peer:.1f} ms ({peer / fg:.2f}x) "
        f"{'PASS' if ok_peer else 'FAIL'}"
    )
    return "\n".join(lines), ok_adamw and ok_peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--preset", default="pio4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default: 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default: 2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the samples here")
    parser.add_argument(
        "--torch-backend", action="store_true", help="also time FGAdam with backend='torch'"
    )
    parser.add_argument("--no-strict", action="store_true", help="exit 0 even if a target fails")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--threads, --repeats and --warmup must be >= 1")
    malloc = set_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {load:.2f}, malloc: {malloc}")
    cases = build(args)
    samples = time_interleaved(cases, args.repeats, args.warmup)
    text, ok = report(samples, args)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples_ms": samples}))
    return 0 if ok or args.no_strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
