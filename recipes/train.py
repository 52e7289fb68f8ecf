#!/usr/bin/env python3
"""Train timm models with FG-SGD and compare rows of the paper's Table 3.

With no arguments: the offline default experiment, Euc. vs PIO (Sp+Ob+St+Euc.) on 5,000 real
MNIST digits that ship inside an installed package (no download), then a table::

    python recipes/train.py
    python recipes/train.py --config recipes/configs/cifar10/resnet20.yaml --data-dir /data/cifar
    torchrun --nproc_per_node 4 recipes/train.py --config recipes/configs/imagenet/resnet50.yaml \
        --data-dir /data/imagenet --fg-strategy pio4

Flags follow timm's ``train.py`` (``--config`` YAML whose keys are the argument names); see
``docs/recipes.md``. Run from the repository root, as a script or with ``python -m recipes.train``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the experiment; returns the exit code."""
    from recipes.config import parse_args
    from recipes.data import DataError
    from recipes.experiment import run_experiment

    args, args_text = parse_args(argv)
    try:
        run_experiment(args, args_text)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    import warnings

    # geoopt 0.5.1 decorates functions with torch.jit.script, deprecated on recent torch.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    raise SystemExit(main())
