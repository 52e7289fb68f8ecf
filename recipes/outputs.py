"""Files a run writes besides checkpoints: CSV summaries and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SUMMARY_FIELDS",
    "plot_bounds",
    "plot_comparison",
    "plot_curves",
    "read_csv",
    "write_csv",
    "write_text",
]

#: Columns of ``summary.csv``, as in timm's ``train.py``.
SUMMARY_FIELDS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None
) -> None:
    """Write ``rows`` to ``path`` (rewritten whole each time, then renamed into place)."""
    path = Path(path)
    if fields is None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a CSV of numbers written by :func:`write_csv`."""
    with Path(path).open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(path: str | Path, history: Sequence[Mapping[str, float]], title: str = "") -> None:
    """Loss (train, eval) and top-1 accuracy per epoch of one run."""
    if not history:
        return
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["eval_loss"] for r in history], "s-", label="eval")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["eval_top1"] for r in history], "s-", label="eval top-1")
    if "train_top1" in history[0]:
        ax_acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="top-1")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    _save(fig, Path(path))
    plt.close(fig)


def plot_bounds(
    path: str | Path, history: Sequence[Mapping[str, float]], keys: Sequence[str], title: str = ""
) -> None:
    """The ``log10`` norm-based bounds ``keys`` of ``bounds.csv`` per epoch of one run."""
    plot_comparison(path, {title or "run": history}, keys=keys, ylabel="log10 bound")


def plot_comparison(
    path: str | Path,
    series: Mapping[str, Sequence[Mapping[str, float]]],
    *,
    keys: Sequence[str] = ("eval_top1",),
    ylabel: str = "eval top-1 (%)",
) -> None:
    """Curves of several runs in one figure, one panel per column of ``keys``.

    Args:
        path: PNG file to write.
        series: ``{label: per-epoch rows}``.
        keys: Columns to plot.
        ylabel: Label of the y axes.
    """
    series = {k: v for k, v in series.items() if v}
    if not series or not keys:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        for label, rows in series.items():
            pts = [(r["epoch"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=k)
        ax.legend(fontsize="small")
    _save(fig, Path(path))
    plt.close(fig)
