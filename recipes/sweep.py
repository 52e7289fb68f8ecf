#!/usr/bin/env python3
"""A fair tuning study of FG-SGD against SGD: equal budget per row, chosen on validation data.

For every dataset and every row (a Table 3 preset or an ablation of one):

1. **Tuning**: train once (``--tune-seed``) at every learning rate of ``--lrs`` on the training
   split minus a stratified validation part (``--val-fraction`` of it, seeded, never the test
   split), and pick the rate with the lowest validation error at the last epoch (ties: lower
   validation loss). Every row gets the same grid, so the same tuning budget.
2. **Final**: train at the chosen rate with every seed of ``--seeds`` on the whole training
   split, and report the test error at the last epoch (never the best epoch) as mean +- std.

The Adam rows (AdamW on the plain model, FG-Adam on ``pio4``) take their rates from their own
grid, ``--adam-lrs``, of as many rates as ``--lrs``; everything else is the same protocol.

With no arguments it runs the offline study of ``docs/recipes.md`` on the two embedded datasets
(``mnist5k``, ``digits``), every SGD-family row (about half an hour on 2 cores); ``--rows``
picks rows, the Adam ones among them::

    python recipes/sweep.py
    python recipes/sweep.py --rows euc-adamw pio4-fgadam          # the Adam rows only
    python recipes/sweep.py --datasets digits --rows euc pio4 --lrs 0.05 0.1 0.2 --seeds 0 1 2
    python recipes/sweep.py --resume output/sweep/EXP     # reuses every finished run

Flags the sweep does not know go to ``recipes/train.py`` (``--epochs 8 --model resnet8_cifar``
...), so every run is a plain recipe run. Outputs, per dataset under ``EXP/<dataset>/``:
``tuning.csv``, ``results.csv`` (one line per final run), ``table.md`` (also printed),
``curves.png`` (train loss and test error per epoch, mean over seeds, one line per row),
``diagnostics.md`` (per-layer step angles of each row's first final run), and one folder per
run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["ROWS", "Row", "main", "run_sweep"]


@dataclass(frozen=True)
class Row:
    """One row of the study: a preset and the recipe flags that make it."""

    name: str
    label: str
    strategy: str
    flags: dict[str, Any] = field(default_factory=dict)
    #: Tuned on ``--adam-lrs`` instead of ``--lrs``.
    adam: bool = False


#: The rows of the study, in table order.
ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("euc", "Euc. (SGD)", "euc"),
        Row("st", "St", "st"),
        Row("poms_st", "POMs of St", "poms_st"),
        Row("pio3", "PIO (Sp+Ob+St)", "pio3"),
        Row("pio4", "PIO (Sp+Ob+St+Euc.)", "pio4"),
        Row("pio4-paper", "pio4, paper's step geometry", "pio4", {"fg_lr_rule": "paper"}),
        Row("pio4-no-eq7", "pio4 without Eq. (7)", "pio4", {"adaptive_step": False}),
        Row("pio4-no-rescale", "pio4 without re-scaling", "pio4", {"rescale": False}),
        Row("euc-adamw", "Euc. (AdamW)", "euc", {"opt": "adamw"}, adam=True),
        Row("pio4-fgadam", "PIO (Sp+Ob+St+Euc.), FG-Adam", "pio4", {"opt": "adamw"}, adam=True),
    )
}
DEFAULT_DATASETS = ("mnist5k", "digits")
DEFAULT_LRS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
TUNING_FIELDS = ("row", "lr", "val_error", "val_loss", "train_loss", "time_s")
RESULT_FIELDS = ("row", "label", "seed", "lr", "test_error", "test_loss", "train_loss", "time_s")
#: Rows of a plain ``python recipes/sweep.py``: the SGD family (the Adam rows on request, so
#: that the default study stays at about half an hour on 2 cores).
DEFAULT_ROWS = [name for name, row in ROWS.items() if not row.adam]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Equal-budget tuning study of FG-SGD rows against SGD (see docs/recipes.md).",
        epilog="Other flags are passed to every training run (recipes/train.py's flags).",
        # No abbreviations: "--lr" must reach the check below, not become "--lrs".
        allow_abbrev=False,
    )
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(DEFAULT_ROWS),
        help=f"rows, of {' '.join(ROWS)} (default: {' '.join(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=list(DEFAULT_LRS),
        help="the lr grid of the SGD rows",
    )
    parser.add_argument(
        "--adam-lrs",
        type=float,
        nargs="+",
        default=list(DEFAULT_ADAM_LRS),
        help="the lr grid of the Adam rows (AdamW, FG-Adam)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning runs")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the training split held out for tuning (default: 0.2)",
    )
    parser.add_argument("--output", default="output/sweep", help="base folder")
    parser.add_argument("--experiment", default="", help="folder name (default: date-time)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="row studies run in this many processes at once (default: 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run; 0 keeps torch's default (default: 1, which also makes "
        "the numbers independent of the machine's core count)",
    )
    parser.add_argument(
        "--resume",
        default="",
        metavar="DIR",
        help="an earlier sweep folder: finished runs are kept",
    )
    return parser


def _validate(opts: argparse.Namespace, train_argv: Sequence[str]) -> None:
    from recipes.config import parse_args
    from recipes.data import canonical_dataset

    unknown = [r for r in opts.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; valid: {', '.join(ROWS)}")
    for name in opts.datasets:
        try:
            canonical_dataset(name)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    bad = [lr for lr in (*opts.lrs, *opts.adam_lrs) if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise SystemExit(f"error: learning rates must be positive, got {bad}")
    if len(opts.adam_lrs) != len(opts.lrs) and any(ROWS[r].adam for r in opts.rows):
        raise SystemExit(
            f"error: --adam-lrs has {len(opts.adam_lrs)} rates and --lrs {len(opts.lrs)}: every "
            "row gets the same tuning budget"
        )
    if opts.workers < 1 or opts.threads < 0:
        raise SystemExit("error: --workers must be >= 1 and --threads >= 0")
    if not 0.0 < opts.val_fraction < 1.0:
        raise SystemExit(f"error: --val-fraction must be in (0, 1), got {opts.val_fraction}")
    keys = ("--lr", "--fg-strategy", "--seed", "--seeds", "--dataset", "--resume")
    if any(ROWS[r].adam for r in opts.rows):
        keys += ("--opt",)  # the Adam rows set it
    for key in keys:
        if any(a == key or a.startswith(key + "=") for a in train_argv):
            raise SystemExit(f"error: the sweep sets {key} itself; use its own flags")
    parse_args(list(train_argv))  # unknown training flags fail now, not after an hour


def _run_args(train_argv: Sequence[str], row: Row, dataset: str, lr: float, seed: int):
    from recipes.config import parse_args

    args, _ = parse_args(
        [
            *train_argv,
            "--dataset",
            dataset,
            "--fg-strategy",
            row.strategy,
            "--lr",
            str(lr),
            "--seed",
            str(seed),
            "--no-progress",
        ]
    )
    for key, value in row.flags.items():
        setattr(args, key, value)
    return args


def _finished(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The result of a run that completed earlier (its ``last.pth``), or ``None``."""
    from recipes.checkpoint import load_checkpoint

    last = run_dir / "last.pth"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    history = ckpt["history"]
    if len(history) < epochs:
        return None
    final = history[-1]
    diag = []
    if (run_dir / "diagnostics.csv").is_file():
        from fgo_geoopt.diagnostics import read_csv, summarize

        diag = summarize(read_csv(run_dir / "diagnostics.csv"), last=20)
    return {
        "eval_top1": final["eval_top1"],
        "eval_loss": final["eval_loss"],
        "train_loss": final["train_loss"],
        "history": history,
        "time_s": float("nan"),
        "diagnostics": diag,
    }


def _train(args, row: Row, seed: int, data, env, run_dir: Path) -> dict[str, Any]:
    from recipes.run import RunSpec, train_run

    done = _finished(run_dir, args.epochs)
    if done is not None:
        return done
    if run_dir.exists():  # an unfinished run: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    result = train_run(args, RunSpec(row.strategy, seed, run_dir), data, env)
    result.pop("model_obj", None)
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row_study(
    opts: argparse.Namespace, train_argv: Sequence[str], dataset: str, row: Row, out: Path
) -> dict[str, Any]:
    """Tune one row on the validation split, then train it with every seed: its part of the
    study (runs in a worker process when ``--workers`` > 1)."""
    from recipes.data import carve_validation, create_datasets
    from recipes.distributed import init_distributed

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    env = init_distributed(None)
    data = create_datasets(dataset)
    tune_data = carve_validation(data, opts.val_fraction)
    tuning: list[dict[str, Any]] = []
    best = None
    for lr in opts.adam_lrs if row.adam else opts.lrs:
        args = _run_args(train_argv, row, dataset, lr, opts.tune_seed)
        run_dir = out / "tune" / f"{row.name}-lr{lr:g}"
        res = _train(args, row, opts.tune_seed, tune_data, env, run_dir)
        entry = {
            "row": row.name,
            "lr": lr,
            "val_error": 100.0 - res["eval_top1"],
            "val_loss": res["eval_loss"],
            "train_loss": res["train_loss"],
            "time_s": res["time_s"],
        }
        tuning.append(entry)
        _report(f"{dataset} tune {row.name} lr {lr:g}", res)
        rank = (entry["val_error"], entry["val_loss"])
        if best is None or rank < best[0]:
            best = (rank, lr)
    lr = best[1]
    results, histories, diagnostics = [], [], []
    for seed in opts.seeds:
        args = _run_args(train_argv, row, dataset, lr, seed)
        res = _train(args, row, seed, data, env, out / "final" / f"{row.name}-seed{seed}")
        results.append(
            {
                "row": row.name,
                "label": row.label,
                "seed": seed,
                "lr": lr,
                "test_error": 100.0 - res["eval_top1"],
                "test_loss": res["eval_loss"],
                "train_loss": res["train_loss"],
                "time_s": res["time_s"],
            }
        )
        histories.append(res["history"])
        if not diagnostics:
            diagnostics = res.get("diagnostics") or []
        _report(f"{dataset} final {row.name} seed {seed}", res)
    return {
        "tuning": tuning,
        "results": results,
        "histories": histories,
        "diagnostics": diagnostics,
    }


def _report(what: str, result: dict[str, Any]) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')}] {what}: error {100 - result['eval_top1']:.2f} %, "
        f"train loss {result['train_loss']:.4f}",
        flush=True,
    )


def run_sweep(opts: argparse.Namespace, train_argv: Sequence[str]) -> Path:
    """Run the whole study; returns its folder."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from recipes.data import canonical_dataset, create_datasets
    from recipes.outputs import write_csv, write_text

    if opts.resume:
        exp = Path(opts.resume)
        if not exp.is_dir():
            raise SystemExit(f"error: --resume {opts.resume}: no such folder")
    else:
        exp = Path(opts.output) / (opts.experiment or datetime.now().strftime("%Y%m%d-%H%M%S"))
    rows = [ROWS[r] for r in opts.rows]
    tasks = []
    for dataset in opts.datasets:
        out = exp / canonical_dataset(dataset).replace("/", "_")
        out.mkdir(parents=True, exist_ok=True)
        data = create_datasets(dataset)
        n_val = round(len(data.train) * opts.val_fraction)
        print(
            f"{dataset}: tuning on {len(data.train) - n_val} / ~{n_val} (train / validation), "
            f"final runs on {len(data.train)} / {len(data.eval)} (train / test)",
            flush=True,
        )
        tasks.extend((dataset, row, out) for row in rows)
    t0 = time.time()
    print(
        f"{len(tasks) * (len(opts.lrs) + len(opts.seeds))} runs in {len(tasks)} row studies, "
        f"{opts.workers} worker(s); folder {exp}",
        flush=True,
    )
    if opts.workers > 1:
        # Spawned workers: nothing of this process's threads or caches is inherited.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(opts.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_row_study, opts, train_argv, *t) for t in tasks]
            studies = [f.result() for f in futures]
    else:
        studies = [_row_study(opts, train_argv, *t) for t in tasks]
    print(f"all runs done in {(time.time() - t0) / 60:.1f} min", flush=True)
    for dataset in opts.datasets:
        mine = [(t, st) for t, st in zip(tasks, studies, strict=True) if t[0] == dataset]
        out = mine[0][0][2]
        tuning = [e for _, st in mine for e in st["tuning"]]
        results = [e for _, st in mine for e in st["results"]]
        histories = {t[1].name: st["histories"] for t, st in mine}
        diagnostics = {t[1].name: st["diagnostics"] for t, st in mine}
        write_csv(out / "tuning.csv", tuning, TUNING_FIELDS)
        write_csv(out / "results.csv", results, RESULT_FIELDS)
        table = format_table(dataset, rows, results, opts)
        write_text(out / "table.md", table + "\n")
        write_text(out / "diagnostics.md", format_diagnostics(rows, diagnostics) + "\n")
        plot_study(out / "curves.png", rows, histories, dataset)
        print("\n" + table + "\n", flush=True)
    print(f"written: {exp}/<dataset>/table.md, results.csv, tuning.csv, curves.png", flush=True)
    return exp


def format_table(dataset: str, rows: Sequence[Row], results, opts) -> str:
    """Markdown table: chosen lr, test error and final train loss (mean +- std over seeds),
    with the paper's ResNet-50 ImageNet error beside the Table 3 rows."""
    from recipes.tables import PAPER_TABLE3

    paper = PAPER_TABLE3["resnet50"]
    grid, adam_grid = (
        "{" + ", ".join(f"{lr:g}" for lr in g) + "}" for g in (opts.lrs, opts.adam_lrs)
    )
    if all(r.adam for r in rows):
        grid = adam_grid
    elif any(r.adam for r in rows):
        grid = f"{grid} (Adam rows: {adam_grid})"
    lines = [
        f"{dataset}: lr chosen on a validation split of the training data from "
        f"{grid} (seed {opts.tune_seed}); test error and "
        f"train loss at the last epoch, mean ± std over seeds {', '.join(map(str, opts.seeds))}",
        "",
        "| row | lr | test error % | final train loss | paper, ResNet-50 ImageNet error % |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mine = [r for r in results if r["row"] == row.name]
        if not mine:
            continue
        err = _mean_std([r["test_error"] for r in mine])
        loss = _mean_std([r["train_loss"] for r in mine])
        ref = paper.get(row.name)
        ref_text = f"{ref[0]:.2f} ± {ref[1]:.2f}" if ref else ""
        lines.append(
            f"| {row.label} | {mine[0]['lr']:g} | {err[0]:.2f} ± {err[1]:.2f} | "
            f"{loss[0]:.4f} ± {loss[1]:.4f} | {ref_text} |"
        )
    return "\n".join(lines)


def format_diagnostics(rows: Sequence[Row], diagnostics: dict[str, list[dict[str, Any]]]) -> str:
    """Per row: mean angle per filter and step of each layer (last recorded steps of the
    first seed), and the share of POMs where Eq. (7) shortened the step."""
    lines = ["Mean angle per filter and step (rad), last 20 recorded steps of seed 0", ""]
    layers: list[str] = []
    for entries in diagnostics.values():
        for e in entries:
            if e["layer"] not in layers:
                layers.append(e["layer"])
    lines.append("| row | " + " | ".join(layers) + " | POMs with tau > 1 |")
    lines.append("|---" * (len(layers) + 2) + "|")
    for row in rows:
        entries = diagnostics.get(row.name) or []
        if not entries:
            continue
        per_layer = {e["layer"]: e["filter_angle"] for e in entries}
        taus = [e["tau_gt1"] for e in entries if not math.isnan(e["tau_gt1"])]
        tau_text = f"{100 * statistics.fmean(taus):.1f} %" if taus else "-"
        cells = [f"{per_layer[n]:.4f}" if n in per_layer else "" for n in layers]
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {tau_text} |")
    types = ("sphere", "oblique", "stiefel", "euclidean", "plain")
    lines += [
        "",
        "Mean angle per kernel and step (rad) by manifold type, unit coordinates, averaged over "
        "the layers (same steps)",
        "",
        "| row | " + " | ".join(types) + " |",
        "|---" * (len(types) + 1) + "|",
    ]
    for row in rows:
        entries = diagnostics.get(row.name) or []
        if not entries:
            continue
        cells = []
        for kind in types:
            vals = [e["kernel_angle"] for e in entries if e["type"] == kind]
            cells.append(f"{statistics.fmean(vals):.5f}" if vals else "")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(path: Path, rows: Sequence[Row], histories, dataset: str) -> None:
    """Train loss and test error per epoch, mean over seeds, one line per row."""
    from recipes.outputs import _pyplot, _save

    try:
        plt = _pyplot()
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        runs = histories.get(row.name)
        if not runs:
            continue
        n = min(len(h) for h in runs)
        epochs = list(range(1, n + 1))
        loss = [statistics.fmean(h[e]["train_loss"] for h in runs) for e in range(n)]
        err = [statistics.fmean(100 - h[e]["eval_top1"] for h in runs) for e in range(n)]
        axes[0].plot(epochs, loss, label=row.label)
        axes[1].plot(epochs, err, label=row.label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("train loss")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("test error %")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{dataset}: mean over seeds at the chosen lr")
    fig.tight_layout()
    _save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    opts, train_argv = build_parser().parse_known_args(argv)
    _validate(opts, train_argv)
    try:
        run_sweep(opts, train_argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    import warnings

    # geoopt 0.5.1 decorates functions with torch.jit.script, deprecated on recent torch.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    raise SystemExit(main())
