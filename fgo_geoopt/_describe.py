"""What :func:`fgo_geoopt.describe` reports of a wrapped model, and its text table.

One row per wrapped weight (a tied weight once, under its first name): shape, strategy, kernel
view, kernels and POMs per manifold, whether it carries scales. :func:`format_table` prints
the rows with a total line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ._tagging import wrapped_entries
from .collections import KernelCollection

__all__ = ["describe", "format_table", "unique_entries"]


def unique_entries(model: nn.Module) -> list[tuple[str, KernelCollection]]:
    """``(name, collection)`` of every wrapped weight, a tied weight once (its first name)."""
    out, seen = [], set()
    for name, module, attr, coll in wrapped_entries(model):
        p = module._parameters.get(attr)
        if p is not None and id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, coll))
    return out


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One row per wrapped weight: name, shape, strategy, kernel view, POMs per manifold.

    Print them with ``print(format_table(rows))``.
    """
    rows = []
    for name, coll in unique_entries(model):
        per = coll.describe()
        rows.append(
            {
                "name": name,
                "shape": coll.shape,
                "strategy": coll.strategy,
                "view": coll.view,
                "kernel_shape": coll.kernel_shape,
                "kernels": coll.num_kernels,
                "poms": coll.num_poms,
                "poms_per_manifold": {r["manifold"]: r["poms"] for r in per},
                "kernels_per_manifold": {r["manifold"]: r["kernels"] for r in per},
                "rescaled": coll.scale is not None,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`describe` rows, with POM counts per manifold."""
    manifold_cols: list[str] = []
    for row in rows:
        manifold_cols += [m for m in row["poms_per_manifold"] if m not in manifold_cols]
    header = ["name", "shape", "strategy", "view", "kernel", "kernels", "POMs", *manifold_cols]
    body = [
        [
            r["name"],
            "x".join(str(s) for s in r["shape"]),
            r["strategy"],
            r["view"],
            "x".join(str(s) for s in r["kernel_shape"]),
            str(r["kernels"]),
            str(r["poms"]),
            *[str(r["poms_per_manifold"].get(m, 0)) for m in manifold_cols],
        ]
        for r in rows
    ]
    totals = [
        "total",
        "",
        "",
        "",
        "",
        str(sum(r["kernels"] for r in rows)),
        str(sum(r["poms"] for r in rows)),
        *[str(sum(r["poms_per_manifold"].get(m, 0) for r in rows)) for m in manifold_cols],
    ]
    table = [header, *body, totals]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 5 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(totals)])
