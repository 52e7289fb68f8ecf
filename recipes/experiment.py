"""An experiment: every Table 3 row x seed of one config, trained one after another.

Folder layout (``EXP = <output>/<experiment>``)::

    EXP/args.yaml            the invocation's arguments
    EXP/table.md             mean +- std top-1 error per row (also printed)
    EXP/results.csv          one line per finished run
    EXP/curves.png           eval top-1 per epoch, every run
    EXP/bounds.png           log10 norm-based bounds per epoch, every run
    EXP/<row>-seed<S>/       one run: args.yaml, summary.csv, bounds.csv, last.pth,
                             model_best.pth, curves.png, bounds.png
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import yaml

from fgo_geoopt import PRESETS
from fgo_geoopt import bounds as fg_bounds

from .checkpoint import load_checkpoint
from .data import DataError, canonical_dataset, create_datasets
from .distributed import DistEnv, broadcast_object, init_distributed
from .outputs import plot_comparison, write_csv, write_text
from .run import RunSpec, plain_args, run_name, train_run
from .tables import collect, results_table

__all__ = ["plan_runs", "run_experiment", "validate_runs"]


def _experiment_dir(args: argparse.Namespace, env: DistEnv) -> Path:
    if args.resume:
        path = Path(args.resume)
        if path.is_file():
            return path.parent.parent
        if path.is_dir():
            return path
        raise SystemExit(f"error: --resume {args.resume}: no such checkpoint or experiment folder")
    name = args.experiment
    if not name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        dataset = canonical_dataset(args.dataset).replace("/", "_")
        name = broadcast_object(f"{stamp}-{args.model}-{dataset}", env)
    return Path(args.output) / name


def plan_runs(args: argparse.Namespace, exp_dir: Path) -> list[RunSpec]:
    """The runs of an invocation; ``--resume`` picks up existing ``last.pth`` files."""
    if args.resume and Path(args.resume).is_file():
        ckpt = load_checkpoint(args.resume)
        return [
            RunSpec(ckpt["row"], int(ckpt["seed"]), Path(args.resume).parent, Path(args.resume))
        ]
    seeds = args.seeds if args.seeds else [args.seed]
    runs = []
    for row in args.fg_strategy:
        for seed in seeds:
            run_dir = exp_dir / run_name(row, seed)
            last = run_dir / "last.pth"
            runs.append(
                RunSpec(row, seed, run_dir, last if args.resume and last.is_file() else None)
            )
    return runs


# ---------------------------------------------------------------------------- start-up checks
def validate_runs(args: argparse.Namespace, runs: list[RunSpec], data) -> None:
    """Check every row, the model name and the input size before anything trains or any
    folder is written; raises :class:`DataError` with the fix (``train.py`` exits with 2).
    """
    import timm
    import torch

    from fgo_geoopt.collections import resolve_strategy

    from .config import FG_ADAM, fg_optimizer

    problems = _optimizer_problems(args)
    for row in dict.fromkeys(spec.row for spec in runs):
        try:
            name = fg_optimizer(args.opt, row)
            if row != "euc":
                resolve_strategy(row, args.fg_manifolds if row not in PRESETS else None)
        except ValueError as err:
            problems.append(f"--fg-strategy {row}: {err}")
            continue
        if args.fg_moment is not None and row != "euc" and name.split("_")[-1] not in FG_ADAM:
            problems.append(f"--fg-moment applies to FG-Adam rows only; row {row} trains {name}")
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        problems.append(
            f"--model {args.model!r} is not a timm model (nor one of recipes/models.py){hint}"
        )
    if problems:
        raise DataError("; ".join(problems))
    # One forward pass of an untrained copy on one sample: a model whose minimum input is
    # larger than the data fails here, with a message, not inside the first epoch.
    model = timm.create_model(
        args.model,
        pretrained=False,
        num_classes=args.num_classes or data.num_classes,
        in_chans=data.in_chans,
    ).eval()
    x = data.train[0][0].unsqueeze(0).float()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as err:
        raise DataError(
            f"--model {args.model} cannot run on {data.name}'s {tuple(x.shape[1:])} inputs "
            f"({err}); give a larger --img-size (e.g. --img-size 64)"
        ) from None


def _optimizer_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with ``--opt`` and Adam's flags, before anything trains."""
    import math

    from timm.optim import list_optimizers

    problems = []
    known = set(list_optimizers())
    if args.opt.lower().split("_")[-1] not in known:
        problems.append(f"--opt {args.opt!r} is not a timm optimizer")
    if args.opt_betas is not None and not all(0.0 <= b < 1.0 for b in args.opt_betas):
        problems.append(f"--opt-betas must lie in [0, 1), got {args.opt_betas}")
    if args.opt_eps is not None and not (math.isfinite(args.opt_eps) and args.opt_eps > 0):
        problems.append(f"--opt-eps must be positive, got {args.opt_eps}")
    return problems


# ---------------------------------------------------------------------------- experiment
def run_experiment(
    args: argparse.Namespace, args_text: str | None = None, env: DistEnv | None = None
) -> list[dict] | None:
    """Train every row x seed of ``args``, print and save the table; returns run results.

    Each result holds ``row``, ``label``, ``seed``, ``model``, ``dataset``, ``eval_top1``,
    ``eval_top5``, ``eval_loss``, ``train_loss``, ``best_top1``, ``time_s``, ``history``,
    ``bounds`` and ``model_obj`` (the trained model).
    """
    env = env or init_distributed(args.device)
    exp_dir = _experiment_dir(args, env)
    runs = plan_runs(args, exp_dir)
    data = create_datasets(
        args.dataset,
        args.data_dir,
        train_split=args.train_split,
        val_split=args.val_split,
        img_size=args.img_size,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
    )
    validate_runs(args, runs, data)
    # Resuming one run's last.pth continues inside an experiment that may hold other runs:
    # its args.yaml stays, and the table covers every finished run of the folder.
    single_resume = bool(args.resume) and Path(args.resume).is_file()
    if env.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        if not single_resume:
            write_text(exp_dir / "args.yaml", args_text or yaml.safe_dump(plain_args(args)))
        print(f"experiment folder: {exp_dir}", flush=True)
        print(
            f"data: {data.name}, {len(data.train)} train / {len(data.eval)} eval samples, "
            f"{data.num_classes} classes; model {args.model}; "
            f"{len(runs)} run(s) x {args.epochs} epochs; world size {env.world_size}",
            flush=True,
        )
    results = []
    try:
        for spec in runs:
            results.append(train_run(args, spec, data, env))
    except KeyboardInterrupt:
        if env.is_main:
            print(
                f"\ninterrupted: finished epochs are saved; continue with the same command "
                f"and --resume {exp_dir}",
                file=sys.stderr,
                flush=True,
            )
        raise
    if env.is_main:
        table = results_table(collect([exp_dir]) if single_resume else results)
        write_text(exp_dir / "table.md", table + "\n")
        fields = (
            "row",
            "label",
            "seed",
            "model",
            "dataset",
            "epochs",
            "eval_top1",
            "eval_top5",
            "eval_loss",
            "train_loss",
            "best_top1",
            "time_s",
        )
        write_csv(exp_dir / "results.csv", results, fields)
        names = {f"{r['label']} s{r['seed']}": r for r in results}
        plot_comparison(exp_dir / "curves.png", {k: r["history"] for k, r in names.items()})
        plot_comparison(
            exp_dir / "bounds.png",
            {k: r["bounds"] for k, r in names.items()},
            keys=fg_bounds.BOUNDS,
            ylabel="log10 bound",
        )
        print()
        print(table)
        print(
            f"\nwritten: {exp_dir}/table.md, results.csv, curves.png, bounds.png and one "
            f"folder per run",
            flush=True,
        )
    return results
