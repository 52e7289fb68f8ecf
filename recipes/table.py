"""Rows x seeds of the paper's Table 3 as a markdown table of mean +- std top-1 error.

Usage (from the repository root)::

    # the rows and seeds of one config (the same as train.py with that config)
    python recipes/table.py --config recipes/configs/cifar10/resnet20.yaml --seeds 0 1 2
    # several configs, one column each (Table 3 layout: rows x models)
    python recipes/table.py --configs recipes/configs/imagenet/resnet50.yaml \
        recipes/configs/imagenet/seresnet50.yaml --data-dir /data/imagenet
    # no training: the table of finished experiment folders
    python recipes/table.py --collect output/train/EXP1 output/train/EXP2

Errors are ``100 - top-1 accuracy`` of the final epoch on the evaluation split, mean +- sample
standard deviation over seeds. The paper's ImageNet numbers (Ozay 2019, Table 3) stand in a
column beside each ImageNet model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.tables import (
    PAPER_TABLE3,
    ROW_ORDER,
    collect,
    format_table,
    mean_std,
    results_table,
)

__all__ = [
    "PAPER_TABLE3",
    "ROW_ORDER",
    "collect",
    "format_table",
    "main",
    "mean_std",
    "results_table",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or collect) experiments and print their table; see the module docstring."""
    from .config import parse_args
    from .experiment import run_experiment
    from .outputs import write_text

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--collect", nargs="+", default=None)
    own, rest = parser.parse_known_args(argv)
    if own.collect:
        results = collect(own.collect)
        if not results:
            raise SystemExit("error: no finished runs found")
        print(results_table(results))
        return 0
    if not own.configs:
        args, text = parse_args(rest)
        return 0 if run_experiment(args, text) is not None else 1
    results = []
    output = None
    for config in own.configs:
        args, text = parse_args(["--config", config, *rest])
        output = Path(args.output)
        run = run_experiment(args, text)
        if run is None:
            return 1
        results += run
    table = results_table(results)
    print(table)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "table.md", table + "\n")
        print(f"table written to {output / 'table.md'}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        from recipes.table import main as _main
    else:
        _main = main
    raise SystemExit(_main())
