"""Training diagnostics: how far each layer's weights move per step, and why.

:class:`StepRecorder` watches a model's parameters across optimizer steps and records, per
layer and per manifold type:

- ``filter_angle``: mean angle (radians) between an output filter ``W[d]`` of the stored weight
  before and after the step. Behind a normalisation layer the loss does not depend on a
  filter's scale, so this angle, not the length of the update, is the step that matters;
- ``kernel_angle``: mean angle between a kernel before and after the step, in unit coordinates
  (the points on the manifolds; the stored weight for plain parameters);
- ``eff_lr``: mean relative update ``|w' - w| / |w|`` per kernel (per filter for plain tensors);
- ``rgrad``: mean norm of the Riemannian gradient per kernel in unit coordinates (the gradient
  itself for plain parameters);
- ``tau_mean`` and ``tau_gt1``: the mean of Eq. (7)'s ``tau_g = max(1, R_g (2 + R_g))`` over the
  POMs of that type, and the share of those POMs with ``tau_g > 1`` (where Eq. (7) shortens the
  step). Empty for plain parameters, and under FG-Adam (which has no Eq. (7)).

The same numbers are computed for a Euclidean model stepped by ``torch.optim.SGD``, so two runs
can be held side by side. Use it from any training loop::

    recorder = StepRecorder(model, every=10)
    for x, y in loader:
        ...
        optimizer.step()
        recorder.record(optimizer)
    print(recorder.describe())
    recorder.to_csv("diagnostics.csv")

The recorder keeps one copy of the watched weights, taken just before each recorded step (at
the previous call of :meth:`record`), and computes its numbers with a handful of batched ops per
layer: with ``every=10`` it costs well under 1% of a training step. Steps across which a
re-scaling update changed a layer's scales are not recorded for that layer.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .collections import KernelCollection

__all__ = ["DIAGNOSTIC_FIELDS", "StepRecorder", "format_summary", "read_csv", "summarize"]

#: Columns of :meth:`StepRecorder.rows` and of the CSV file.
DIAGNOSTIC_FIELDS = (
    "step",
    "layer",
    "type",
    "kernels",
    "filter_angle",
    "kernel_angle",
    "eff_lr",
    "rgrad",
    "tau_mean",
    "tau_gt1",
    "lr",
)
_METRICS = ("filter_angle", "kernel_angle", "eff_lr", "rgrad", "tau_mean", "tau_gt1")


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise angle between two ``(N, n)`` tensors (0 where a row is zero)."""
    dot = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(den > 0, dot / den.clamp_min(torch.finfo(a.dtype).tiny), 1.0)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def _rel(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    den = old.norm(dim=1)
    return torch.where(den > 0, (new - old).norm(dim=1) / den.clamp_min(1e-30), 0.0)


def _mean(t: torch.Tensor) -> float:
    return float(t.mean()) if t.numel() else float("nan")


class StepRecorder:
    """Record per-layer step diagnostics of a model over training (see the module docstring).

    Args:
        model: The model whose parameters the optimizer steps (wrapped or plain).
        every: Record one step in this many; the others only cost a counter.
        include: Which parameters to watch: ``"weights"`` (default: every parameter with two
            or more dimensions, i.e. conv and linear weights, wrapped or not) or ``"all"``.

    Raises:
        ValueError: For ``every < 1`` or an unknown ``include``.
    """

    def __init__(self, model: nn.Module, *, every: int = 1, include: str = "weights"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if include not in ("weights", "all"):
            raise ValueError(f"include must be 'weights' or 'all', got {include!r}")
        self.every = every
        self.params: dict[str, torch.Tensor] = {
            name: p
            for name, p in model.named_parameters()
            if p.requires_grad and (include == "all" or p.ndim >= 2)
        }
        self.calls = 0
        self._rows: list[dict[str, Any]] = []
        self._before: dict[str, tuple[torch.Tensor, Any]] | None = None

    # ------------------------------------------------------------------ recording
    @torch.no_grad()
    def record(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call right after each ``optimizer.step()``.

        Records the step just taken when a snapshot from the previous call exists, and takes a
        new snapshot when the next step is one to record. ``optimizer`` (optional) supplies the
        learning rate of each parameter's group and whether Eq. (7) is on
        (``adaptive_step``; on when unknown).
        """
        self.calls += 1
        if self._before is not None:
            self._measure(optimizer)
            self._before = None
        if self.calls % self.every == 0:
            self._snapshot()

    def snapshot(self) -> None:
        """Take the weights now as the point before the next step (call before the first step
        to record it too)."""
        self._snapshot()

    def _snapshot(self) -> None:
        self._before = {
            name: (p.detach().clone(), _scale_token(p)) for name, p in self.params.items()
        }

    def _groups(self, optimizer) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        if optimizer is None:
            return out
        for group in optimizer.param_groups:
            for p in group["params"]:
                out[id(p)] = group
        return out

    def _measure(self, optimizer) -> None:
        groups = self._groups(optimizer)
        step = self.calls
        for name, p in self.params.items():
            old, token = self._before[name]
            grad = p.grad
            if grad is None or token != _scale_token(p):
                continue
            group = groups.get(id(p), {})
            lr = float(group.get("lr", float("nan")))
            new = p.detach()
            coll = getattr(p, "manifold", None)
            if isinstance(coll, KernelCollection):
                # Eq. (7) is FG-SGD's (on unless the group says otherwise); FG-Adam, whose
                # groups have betas, has none: its tau columns stay empty.
                adaptive = group.get("adaptive_step", None if "betas" in group else True)
                rows = _collection_rows(coll, old, new, grad, adaptive)
            else:
                rows = [_plain_row(old, new, grad)]
            for row in rows:
                row.update(step=step, layer=name, lr=lr)
                self._rows.append(row)

    # ------------------------------------------------------------------ output
    def rows(self) -> list[dict[str, Any]]:
        """Every recorded ``(step, layer, type)`` row, with :data:`DIAGNOSTIC_FIELDS` keys."""
        return [dict(r) for r in self._rows]

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows recorded earlier (e.g. :func:`read_csv` of a run being resumed)."""
        self._rows.extend(dict(r) for r in rows)

    def clear(self) -> None:
        """Forget the recorded rows (the snapshot, if any, is kept)."""
        self._rows.clear()

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV (written to a temporary file, then renamed); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=DIAGNOSTIC_FIELDS)
            writer.writeheader()
            for row in self._rows:
                writer.writerow({k: row.get(k, "") for k in DIAGNOSTIC_FIELDS})
        tmp.replace(path)
        return path

    def summary(self, last: int | None = None) -> list[dict[str, Any]]:
        """Per ``(layer, type)``: the mean of every metric over the recorded steps (the last
        ``last`` recorded steps of each when given), in order of first appearance."""
        return summarize(self._rows, last=last)

    def describe(self, last: int | None = None) -> str:
        """A fixed-width table of :meth:`summary` (one line per layer and manifold type)."""
        return format_summary(self.summary(last=last))

    def plot(self, path: str | Path, title: str = "") -> Path | None:
        """Plot mean filter angle and share of POMs with ``tau > 1`` over the recorded steps,
        one curve per layer; needs matplotlib (returns ``None`` without it)."""
        return plot_rows(self._rows, path, title=title)


def _scale_token(p: torch.Tensor) -> Any:
    coll = getattr(p, "manifold", None)
    if isinstance(coll, KernelCollection) and coll.scale is not None:
        return id(coll.scale)
    return None


def _plain_row(old: torch.Tensor, new: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
    o = old.reshape(old.shape[0], -1).double() if old.ndim >= 2 else old.reshape(1, -1).double()
    n = new.reshape(o.shape).double()
    g = grad.reshape(o.shape).double()
    angle = _mean(_angle(o, n))
    return {
        "type": "plain",
        "kernels": o.shape[0],
        "filter_angle": angle,
        "kernel_angle": angle,
        "eff_lr": _mean(_rel(n, o)),
        "rgrad": _mean(g.norm(dim=1)),
        "tau_mean": float("nan"),
        "tau_gt1": float("nan"),
    }


def _collection_rows(
    coll: KernelCollection,
    old: torch.Tensor,
    new: torch.Tensor,
    grad: torch.Tensor,
    adaptive: bool | None,
) -> list[dict[str, Any]]:
    from .rescaling import unit_weight

    old64, new64, grad64 = old.double(), new.double(), grad.double()
    c_out = coll.shape[0]
    filter_angle = _mean(_angle(old64.reshape(c_out, -1), new64.reshape(c_out, -1)))
    u_old = coll._kernels(unit_weight(old64, coll))
    u_new = coll._kernels(unit_weight(new64, coll))
    rg = coll.egrad2rgrad(old64, grad64)
    # pom_sqnorm works in unit coordinates: tau_g as the optimizer computes it.
    pom_r = coll.pom_sqnorm(old64, rg).sqrt()
    tau = (pom_r * (2.0 + pom_r)).clamp_min(1.0) if adaptive else torch.ones_like(pom_r)
    if adaptive is None:  # no Eq. (7) in this optimizer
        tau = torch.full_like(pom_r, float("nan"))
    rg_unit = coll._kernels(unit_weight(rg, coll))
    ktype = coll.kernel_type()
    rows = []
    for t, name in enumerate(coll.manifold_names):
        sel = ktype == t
        if not bool(sel.any()):
            continue
        poms = coll.pom_type.long() == t
        rows.append(
            {
                "type": name,
                "kernels": int(sel.sum()),
                "filter_angle": filter_angle,
                "kernel_angle": _mean(_angle(u_old[sel], u_new[sel])),
                "eff_lr": _mean(_rel(u_new[sel], u_old[sel])),
                "rgrad": _mean(rg_unit[sel].norm(dim=1)),
                "tau_mean": _mean(tau[poms]),
                "tau_gt1": (
                    _mean((tau[poms] > 1.0).double()) if adaptive is not None else float("nan")
                ),
            }
        )
    return rows


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV file written by :meth:`StepRecorder.to_csv`."""
    out = []
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            entry: dict[str, Any] = {"layer": row["layer"], "type": row["type"]}
            entry["step"] = int(row["step"])
            entry["kernels"] = int(row["kernels"])
            for key in (*_METRICS, "lr"):
                entry[key] = float(row[key]) if row[key] != "" else float("nan")
            out.append(entry)
    return out


def summarize(rows: Iterable[dict[str, Any]], last: int | None = None) -> list[dict[str, Any]]:
    """Mean of every metric per ``(layer, type)`` over ``rows`` (the last ``last`` of each)."""
    buckets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault((row["layer"], row["type"]), []).append(row)
    out = []
    for (layer, kind), items in buckets.items():
        if last is not None:
            items = items[-last:]
        entry: dict[str, Any] = {
            "layer": layer,
            "type": kind,
            "kernels": items[-1]["kernels"],
            "steps": len(items),
        }
        for key in _METRICS:
            values = [float(r[key]) for r in items if not math.isnan(float(r[key]))]
            entry[key] = sum(values) / len(values) if values else float("nan")
        out.append(entry)
    return out


def format_summary(summary: list[dict[str, Any]]) -> str:
    """The table :meth:`StepRecorder.describe` prints."""
    head = (
        f"{'layer':32s} {'type':9s} {'kernels':>7s} {'filter_ang':>10s} {'kernel_ang':>10s} "
        f"{'eff_lr':>9s} {'rgrad':>9s} {'tau_mean':>8s} {'tau>1':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in summary:
        tau = "" if math.isnan(r["tau_mean"]) else f"{r['tau_mean']:8.3f}"
        share = "" if math.isnan(r["tau_gt1"]) else f"{100 * r['tau_gt1']:5.1f}%"
        lines.append(
            f"{r['layer'][-32:]:32s} {r['type']:9s} {r['kernels']:7d} {r['filter_angle']:10.5f} "
            f"{r['kernel_angle']:10.5f} {r['eff_lr']:9.2e} {r['rgrad']:9.2e} {tau:>8s} "
            f"{share:>6s}"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Filter angle per step and share of POMs with ``tau > 1`` per step, one line per layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    per_layer: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        per_layer.setdefault(row["layer"], {}).setdefault(int(row["step"]), []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer, steps in per_layer.items():
        xs = sorted(steps)
        axes[0].plot(xs, [steps[s][0]["filter_angle"] for s in xs], label=layer, lw=1)
        taus = []
        for s in xs:
            vals = [r["tau_gt1"] * r["kernels"] for r in steps[s] if not math.isnan(r["tau_gt1"])]
            weights = [r["kernels"] for r in steps[s] if not math.isnan(r["tau_gt1"])]
            taus.append(sum(vals) / sum(weights) if weights else float("nan"))
        axes[1].plot(xs, taus, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean angle per filter and step (rad)")
    axes[1].set_ylabel("share of POMs with tau > 1")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    if len(per_layer) <= 12:
        axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
