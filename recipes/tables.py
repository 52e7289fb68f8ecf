"""Result tables of the recipes: the paper's Table 3 and mean +- std error per row.

Errors are ``100 - top-1 accuracy`` of the final epoch on the evaluation split, mean +- sample
standard deviation over seeds. The paper's ImageNet numbers (Ozay 2019, Table 3) stand in a
column beside each ImageNet model. ``recipes/table.py`` is the command line over these.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PAPER_TABLE3", "ROW_ORDER", "collect", "format_table", "mean_std", "results_table"]

#: Ozay 2019, Table 3: ImageNet top-1 error (%) as (mean, std) per model and row.
PAPER_TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    "resnet50": {
        "euc": (24.73, 0.32),
        "st": (23.77, 0.27),
        "poms_st": (23.61, 0.22),
        "pio3": (23.04, 0.10),
        "pio4": (22.89, 0.08),
    },
    "seresnet50": {
        "euc": (23.31, 0.55),
        "st": (23.09, 0.41),
        "poms_st": (22.97, 0.29),
        "pio3": (22.67, 0.15),
        "pio4": (22.53, 0.11),
    },
    "resnet101": {"euc": (23.15, 0.09), "pio3": (22.83, 0.06), "pio4": (22.75, 0.02)},
    "seresnet101": {"euc": (22.38, 0.30), "pio3": (21.93, 0.12), "pio4": (21.76, 0.09)},
}
_PAPER_NAMES = {
    "resnet50": "ResNet-50",
    "seresnet50": "SE-ResNet-50",
    "resnet101": "ResNet-101",
    "seresnet101": "SE-ResNet-101",
}
#: Row order of Table 3; other rows follow in the order they were run.
ROW_ORDER = ("euc", "st", "poms_st", "pio3", "pio4")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _cell(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_table(
    columns: Sequence[tuple[str, Mapping[str, str]]], rows: Sequence[tuple[str, str]]
) -> str:
    """A markdown table: one line per ``(row key, label)``, one column per ``(title, cells)``."""
    header = ["Row", *[title for title, _ in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in rows:
        lines.append(
            "| " + " | ".join([label, *[cells.get(key, "") for _, cells in columns]]) + " |"
        )
    return "\n".join(lines)


def is_imagenet(dataset: str) -> bool:
    """True for ImageNet-style image folders, where the paper's numbers apply."""
    return dataset.strip().lower() in ("imagenet", "folder", "", "imagefolder")


def results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Table 3 layout of run results: a column per (model, dataset), paper columns beside.

    Args:
        results: One mapping per finished run with ``row``, ``label``, ``model``,
            ``dataset``, ``seed`` and ``eval_top1``.
    """
    from .config import row_label

    experiments: dict[tuple[str, str], dict[str, list[float]]] = {}
    labels: dict[str, str] = {}
    for r in results:
        cells = experiments.setdefault((r["model"], r["dataset"]), {})
        cells.setdefault(r["row"], []).append(100.0 - float(r["eval_top1"]))
        labels.setdefault(r["row"], r.get("label") or row_label(r["row"]))
    ordered = [k for k in ROW_ORDER if k in labels] + [k for k in labels if k not in ROW_ORDER]
    columns: list[tuple[str, Mapping[str, str]]] = []
    for (model, dataset), cells in experiments.items():
        counts = sorted({len(v) for v in cells.values()})
        n = "/".join(str(c) for c in counts)
        columns.append(
            (f"{model} on {dataset}: top-1 err. % (n={n})", {k: _cell(v) for k, v in cells.items()})
        )
        if is_imagenet(dataset) and model in PAPER_TABLE3:
            paper = PAPER_TABLE3[model]
            columns.append(
                (
                    f"paper: ImageNet {_PAPER_NAMES[model]}",
                    {k: f"{m:.2f} ± {s:.2f}" for k, (m, s) in paper.items()},
                )
            )
    return format_table(columns, [(k, labels[k]) for k in ordered])


def collect(experiment_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Results of the finished runs under experiment folders (from args.yaml + summary.csv)."""
    import yaml

    from .config import row_label
    from .outputs import read_csv

    out = []
    for exp in experiment_dirs:
        exp = Path(exp)
        if not exp.is_dir():
            raise SystemExit(f"error: {exp} is not an experiment folder")
        for run_dir in sorted(p.parent for p in exp.glob("*/summary.csv")):
            with (run_dir / "args.yaml").open() as handle:
                args = yaml.safe_load(handle)
            history = read_csv(run_dir / "summary.csv")
            if not history or int(history[-1]["epoch"]) + 1 < int(args["epochs"]):
                print(f"skipping unfinished run {run_dir}", file=sys.stderr)
                continue
            row = args["fg_strategy"][0]
            out.append(
                {
                    "row": row,
                    "label": row_label(row, args.get("fg_manifolds")),
                    "seed": args["seed"],
                    "model": args["model"],
                    "dataset": args["dataset"],
                    "eval_top1": history[-1]["eval_top1"],
                    "eval_top5": history[-1]["eval_top5"],
                }
            )
    return out
