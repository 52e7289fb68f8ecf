"""Command-line arguments of the recipes, parsed the way timm's ``train.py`` parses them.

A first parser reads only ``-c/--config``; the YAML file's keys (argument names, with ``_``)
become the defaults of the main parser, and flags given on the command line override them.
Flag names follow timm's where timm has the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "FG_ADAM",
    "FG_OPTIMIZERS",
    "build_parser",
    "fg_optimizer",
    "parse_args",
    "row_label",
]

#: Table 3 labels of the presets, in the paper's row order.
ROW_LABELS = {
    "euc": "Euc.",
    "st": "St",
    "poms_st": "POMs of St",
    "pio3": "PIO (Sp+Ob+St)",
    "pio4": "PIO (Sp+Ob+St+Euc.)",
}
_MANIFOLD_ABBREV = {"sphere": "Sp", "oblique": "Ob", "stiefel": "St", "euclidean": "Euc."}

#: The FG counterpart of each plain optimizer name (FG rows use it instead of ``--opt``).
#: AdamW's is FG-Adam, whose weight decay is decoupled as AdamW's (timm's ``adam`` couples it
#: to the gradient, so it has none).
FG_OPTIMIZERS = {
    "sgd": "nfgsgd",
    "momentum": "fgsgd",
    "fgsgd": "fgsgd",
    "nesterov": "nfgsgd",
    "nfgsgd": "nfgsgd",
    "adamw": "fgadam",
    "fgadam": "fgadam",
}
#: FG optimizers of the Adam family (they take ``--opt-betas``, ``--opt-eps``, ``--fg-moment``).
FG_ADAM = ("fgadam",)


def row_label(row: str, manifolds: Sequence[str] | None = None) -> str:
    """The paper's name of a row (``pio4`` -> ``PIO (Sp+Ob+St+Euc.)``); others are built alike."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    names = [_MANIFOLD_ABBREV.get(m, m) for m in (manifolds or ("sphere", "oblique", "stiefel"))]
    return f"{row.upper()} ({'+'.join(names)})"


def fg_optimizer(opt: str, row: str) -> str:
    """The timm optimizer name a row trains with.

    The Euclidean row trains the plain model with ``--opt`` itself. Every other row trains the
    wrapped model with the FG counterpart of ``--opt`` (``sgd`` / ``momentum`` -> ``fgsgd``,
    ``nesterov`` -> ``nfgsgd``, ``adamw`` -> ``fgadam``).
    """
    key = opt.lower()
    if row == "euc":
        return key
    if key not in FG_OPTIMIZERS:
        raise ValueError(
            f"row {row!r} needs FG-SGD, and --opt {opt!r} has no FG counterpart; "
            f"use one of {', '.join(sorted(FG_OPTIMIZERS))}"
        )
    return FG_OPTIMIZERS[key]


def _config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training config", add_help=False)
    parser.add_argument(
        "-c",
        "--config",
        default="",
        metavar="FILE",
        help="YAML config file whose keys are argument names (default: none)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The main parser. Its defaults are the offline default experiment."""
    parser = argparse.ArgumentParser(
        description="Train timm models with FG-SGD (Ozay, NeurIPS 2019) and compare Table 3 rows.",
        parents=[_config_parser()],
    )
    group = parser.add_argument_group("Dataset parameters")
    group.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="root of local data (not needed by mnist5k / digits)",
    )
    group.add_argument(
        "--dataset",
        "-d",
        default="mnist5k",
        metavar="NAME",
        help="mnist5k (embedded, default), digits (embedded), torch/cifar10, "
        "torch/cifar100, torch/mnist, torch/fashion_mnist, torch/kmnist, "
        "folder, imagenet",
    )
    group.add_argument(
        "--train-split",
        default="train",
        metavar="NAME",
        help="training sub-folder of an image-folder tree (default: train)",
    )
    group.add_argument(
        "--val-split",
        default="val",
        metavar="NAME",
        help="evaluation sub-folder of an image-folder tree (default: val)",
    )
    group.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="train on a fixed subset of N samples (default: all)",
    )
    group.add_argument(
        "--eval-subset",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on a fixed subset of N samples (default: all)",
    )

    group = parser.add_argument_group("Model parameters")
    group.add_argument(
        "--model",
        default="resnet8_cifar",
        metavar="MODEL",
        help="timm model name, created with pretrained=False (default: resnet8_cifar)",
    )
    group.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help="classifier outputs (default: from the dataset)",
    )
    group.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help="image size of image-folder data (default: 224); resamples the embedded "
        "datasets (default: their own size, 28 for mnist5k, 8 for digits)",
    )
    group.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="training batch size per process (default: 64)",
    )
    group.add_argument(
        "-vb",
        "--validation-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluation batch size (default: 2x batch size)",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        default=False,
        help="use the channels_last memory layout",
    )
    group.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help="resume a run from its last.pth, or every run of an experiment "
        "folder (finished runs are kept)",
    )
    group.add_argument(
        "--drop",
        type=float,
        default=0.0,
        metavar="PCT",
        help="dropout before the classifier (default: 0)",
    )
    group.add_argument(
        "--drop-path",
        type=float,
        default=None,
        metavar="PCT",
        help="stochastic depth rate (default: model default)",
    )

    group = parser.add_argument_group("Optimizer parameters")
    group.add_argument(
        "--opt",
        default="momentum",
        metavar="OPTIMIZER",
        help="timm optimizer of the Euclidean row; FG rows use its FG "
        "counterpart: momentum -> fgsgd, sgd / nesterov (Nesterov "
        "momentum in timm) -> nfgsgd, adamw -> fgadam (default: momentum)",
    )
    group.add_argument(
        "--opt-betas",
        type=float,
        nargs=2,
        default=None,
        metavar="BETA",
        help="Adam's two betas (default: the optimizer's, 0.9 0.999)",
    )
    group.add_argument(
        "--opt-eps",
        type=float,
        default=None,
        metavar="EPSILON",
        help="Adam's epsilon (default: the optimizer's, 1e-8)",
    )
    group.add_argument(
        "--momentum", type=float, default=0.9, metavar="M", help="optimizer momentum (default: 0.9)"
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="weight decay; FG-SGD applies it to Euclidean parameters only (default: 1e-4)",
    )
    group.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the gradient norm (default: no clipping)",
    )

    group = parser.add_argument_group("Learning rate schedule parameters")
    group.add_argument(
        "--sched",
        default="step",
        metavar="SCHEDULER",
        help="timm scheduler: step, multistep, cosine, ... (default: step)",
    )
    group.add_argument(
        "--lr", type=float, default=0.2, metavar="LR", help="base learning rate (default: 0.2)"
    )
    group.add_argument(
        "--epochs", type=int, default=8, metavar="N", help="epochs to train (default: 8)"
    )
    group.add_argument(
        "--decay-epochs",
        type=float,
        default=6,
        metavar="N",
        help="epoch interval of the step decay (default: 6)",
    )
    group.add_argument(
        "--decay-milestones",
        type=int,
        nargs="+",
        default=[90, 180, 270],
        metavar="MILESTONES",
        help="epochs of a multistep decay",
    )
    group.add_argument(
        "--decay-rate",
        "--dr",
        type=float,
        default=0.1,
        metavar="RATE",
        help="learning rate decay factor (default: 0.1)",
    )
    group.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        metavar="N",
        help="linear warm-up epochs (default: 0)",
    )
    group.add_argument(
        "--warmup-lr",
        type=float,
        default=1e-4,
        metavar="LR",
        help="learning rate at the start of warm-up (default: 1e-4)",
    )
    group.add_argument(
        "--min-lr",
        type=float,
        default=0.0,
        metavar="LR",
        help="lower bound of the learning rate (default: 0)",
    )
    group.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=False,
        help="step the schedule every update instead of every epoch",
    )

    group = parser.add_argument_group("Regularization parameters")
    group.add_argument("--smoothing", type=float, default=0.0, help="label smoothing (default: 0)")
    group.add_argument(
        "--model-ema",
        action="store_true",
        default=False,
        help="keep an exponential moving average of the weights (re-projected "
        "onto the manifolds before it is evaluated)",
    )
    group.add_argument(
        "--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)"
    )

    group = parser.add_argument_group("FG-SGD parameters")
    group.add_argument(
        "--fg-strategy",
        nargs="+",
        default=["euc", "pio4"],
        metavar="ROW",
        help="Table 3 presets (euc, st, poms_st, pio3, pio4) or strategies (pi, "
        "po, pio, single); several run one after another and give a table "
        "(default: euc pio4)",
    )
    group.add_argument(
        "--fg-manifolds",
        nargs="+",
        default=None,
        metavar="NAME",
        help="manifolds of plain strategies (default: sphere oblique stiefel)",
    )
    group.add_argument(
        "--fg-seed",
        type=int,
        default=None,
        metavar="S",
        help="seed of the POM groupings (default: the run's seed)",
    )
    group.add_argument(
        "--fg-kernel",
        default="auto",
        metavar="VIEW",
        help="kernel view: auto, spatial, filter, euclidean (default: auto)",
    )
    group.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-scale the unit kernels of FG rows each epoch by R = gamma / lambda, the "
        "paper's two-stage renormalisation (default: on; --no-rescale turns it off: with "
        "--fg-lr-rule matched the scales then stay at R = gamma)",
    )
    group.add_argument(
        "--fg-lr-rule",
        default="matched",
        choices=("matched", "paper"),
        help="step geometry of FG rows: 'matched' (stored weights at the scale of the "
        "model's own initialisation, gamma = rms(W_init) / rms(w), and the step in the metric "
        "of the stored weights, so that a filter turns by about SGD's angle at the same lr) "
        "or 'paper' (gamma = sqrt(1 / (fan_in + fan_out)), the step in unit coordinates); "
        "see docs/optimizer.md (default: matched)",
    )
    group.add_argument(
        "--adaptive-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FG-SGD's per-POM step size, Eq. (7) (default: on)",
    )
    group.add_argument(
        "--fg-moment",
        default=None,
        choices=("pom", "kernel"),
        help="FG-Adam's second moment: one per POM or one per kernel (default: pom); "
        "FG-Adam rows only",
    )
    group.add_argument(
        "--diagnostics-every",
        type=int,
        default=10,
        metavar="N",
        help="record step diagnostics (angles, gradient norms, Eq. (7)) every N steps into "
        "each run's diagnostics.csv / diagnostics.png; 0 turns them off (default: 10)",
    )
    group.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="run every row with each of these seeds (default: --seed)",
    )

    group = parser.add_argument_group("Miscellaneous parameters")
    group.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    group.add_argument(
        "-j",
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="data loading worker processes per rank (default: 0)",
    )
    group.add_argument(
        "--amp", action="store_true", default=False, help="mixed precision with torch.autocast"
    )
    group.add_argument(
        "--amp-dtype",
        default="bfloat16",
        choices=("bfloat16", "float16"),
        help="autocast dtype (default: bfloat16; float16 uses a grad scaler)",
    )
    group.add_argument(
        "--device", default=None, help="device (default: cuda when available, else cpu)"
    )
    group.add_argument(
        "--output",
        default="output/train",
        metavar="PATH",
        help="base folder of experiments (default: output/train)",
    )
    group.add_argument(
        "--experiment",
        default="",
        metavar="NAME",
        help="experiment folder name (default: <date-time>-<model>-<dataset>)",
    )
    group.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Parse ``argv`` with YAML defaults; returns the namespace and its YAML text."""
    config_parser = _config_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    if args_config.config:
        config = load_config(args_config.config, parser)
        parser.set_defaults(**config)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    for key in ("fg_strategy", "fg_manifolds"):
        value = getattr(args, key)
        if isinstance(value, str):
            setattr(args, key, [value])
    return args, yaml.safe_dump(vars(args), sort_keys=False)


def load_config(path: str | Path, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Read a YAML config and check that its keys are argument names."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config file {path} does not exist")
    with path.open() as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of argument names")
    parser = parser or build_parser()
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"error: config file {path} has unknown keys {unknown}")
    return config
