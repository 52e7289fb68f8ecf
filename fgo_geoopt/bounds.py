"""Per-POM weight norms and the norm-based generalisation bounds of Ozay (2019), Table 1.

For every conv / linear layer of any model, wrapped or not, the POMs of the layer are
measured: for a wrapped layer the POMs of its :class:`~fgo_geoopt.KernelCollection`, for an
unwrapped one its output filters. Each POM ``g`` of layer ``l`` is a matrix ``Omega_{g,l}``
(orientation below) with

- Frobenius norm ``||Omega||_F``,
- spectral norm ``||Omega||_2`` (largest singular value, batched over POMs),
- ``l2->1`` norm ``||Omega||_{2->1}``: the sum of the Euclidean norms of its rows.

POM matrices. Spatial-view kernels (``(k_h, k_w)`` matrices) are concatenated side by side as
in the paper, ``Omega = (w^1, ..., w^|g|)`` of shape ``(k_h, |g| k_w)``. Filter-view kernels
(1x1 convs, linear layers, unwrapped layers) are output filters ``W[d]`` of length
``c_in k_h k_w``; they are stacked as rows, ``Omega`` of shape ``(|g|, c_in k_h k_w)``, so
that ``l2->1`` sums the norms of output units as in Bartlett et al. (2017) (the transposed
concatenation would make it an l1 norm of the filter). Frobenius and spectral norms do not
depend on the orientation.

Bounds (``docs/bounds.md``; ``delta`` = the measured norms; all reported as ``log10``):

.. code-block:: text

    Neyshabur 2015:  2^L prod_l prod_g delta_F / sqrt(N)
    Bartlett 2017:   prod_l prod_g delta_2 / sqrt(N)
                       * (sum_l prod_g (delta_{2->1} / delta_2)^(2/3))^(3/2)
    Neyshabur 2018:  prod_l prod_g delta_2 / sqrt(N)
                       * sqrt(L^2 width sum_l prod_g delta_F^2 / delta_2^2)

The command line for a saved checkpoint (it builds timm models) is
:mod:`fgo_geoopt.integrations.bounds_cli` (see ``docs/bounds.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import geoopt
import torch
from torch import nn

from .collections import KernelCollection
from .rescaling import unit_weight

__all__ = [
    "BOUNDS",
    "COORDS",
    "NORMS",
    "claim_holds",
    "format_table",
    "generalization_bounds",
    "l21_norm",
    "layer_norms",
    "pom_matrices",
    "pom_norms",
    "spectral_norm",
]

NORMS = ("fro", "spec", "l21")
BOUNDS = ("neyshabur2015", "bartlett2017", "neyshabur2018")
COORDS = ("stored", "unit")
_LOG10_2 = math.log10(2.0)


# ---------------------------------------------------------------------------- matrix norms
def spectral_norm(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value of every matrix of a batch ``(..., r, c)``, batched.

    Computed as the square root of the top eigenvalue of the smaller Gram matrix
    (``m m^T`` or ``m^T m``): one batched ``eigvalsh`` call, accurate to rounding relative to
    the norm itself.
    """
    m = m.to(torch.float64)
    gram = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    if gram.shape[-1] == 1:
        return gram[..., 0, 0].clamp_min(0.0).sqrt()
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def l21_norm(m: torch.Tensor) -> torch.Tensor:
    """``l2->1`` norm of every matrix of a batch ``(..., r, c)``: the sum of its row norms."""
    return torch.linalg.vector_norm(m.to(torch.float64), dim=-1).sum(-1)


def pom_matrices(
    weight: torch.Tensor,
    collection: KernelCollection | None = None,
    *,
    coords: str = "stored",
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The POM matrices of one layer, batched by POM size.

    Args:
        weight: The layer weight ``(c_out, c_in, k_h, k_w)`` or ``(out, in)``.
        collection: Its collection; ``None``: one POM per output filter.
        coords: ``"stored"`` (the weight the layer uses, ``R * w``) or ``"unit"`` (``W / R``,
            the points on the manifolds; the same as stored without scales).

    Returns:
        A list of ``(pom_ids, s, matrices)``: ``pom_ids`` ``(P_s,)`` and float64 ``matrices``
        ``(P_s, rows, cols)`` for the POMs of ``s`` kernels (a loop over distinct POM sizes,
        never over POMs).
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {', '.join(COORDS)}, got {coords!r}")
    weight = weight.detach()
    if collection is None:  # one POM per output filter, a (1, c_in k_h k_w) row
        mats = weight.to(torch.float64).reshape(weight.shape[0], 1, -1)
        return [(torch.arange(weight.shape[0], device=weight.device), 1, mats)]
    if tuple(weight.shape) != collection.shape:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match the collection's {collection.shape}"
        )
    if coords == "unit":
        weight = unit_weight(weight, collection)
    a, b = collection.kernel_shape
    kernels = weight.to(torch.float64).reshape(collection.num_kernels, a, b)
    sizes = collection.pom_sizes.to(kernels.device)
    # Kernels of POM 0, then of POM 1, ... (the order inside a POM changes no norm).
    order = collection.kernel_pom.to(torch.int32).sort().indices.to(kernels.device)
    start = torch.cumsum(sizes, 0) - sizes
    out = []
    for size in sorted(set(sizes.tolist())):
        poms = torch.nonzero(sizes == size).squeeze(1)
        idx = order[start[poms].unsqueeze(1) + torch.arange(size, device=poms.device)]
        mats = kernels[idx]  # (P_s, s, a, b)
        if collection.view == "spatial":
            mats = mats.permute(0, 2, 1, 3).reshape(len(poms), a, size * b)
        else:
            mats = mats.reshape(len(poms), size, a * b)
        out.append((poms, size, mats))
    return out


def pom_norms(
    weight: torch.Tensor,
    collection: KernelCollection | None = None,
    *,
    coords: str = "stored",
) -> dict[str, torch.Tensor]:
    """Frobenius, spectral and ``l2->1`` norms of every POM of one layer.

    Args:
        weight: The layer weight.
        collection: Its collection; ``None``: one POM per output filter.
        coords: ``"stored"`` or ``"unit"`` (see :func:`pom_matrices`).

    Returns:
        ``{"fro", "spec", "l21", "size"}``: float64 tensors ``(P,)`` in POM order (``size`` is
        the number of kernels, int64).
    """
    parts = pom_matrices(weight, collection, coords=coords)
    num_poms = sum(len(p) for p, _, _ in parts)
    out = {k: torch.empty(num_poms, dtype=torch.float64) for k in NORMS}
    out["size"] = torch.empty(num_poms, dtype=torch.int64)
    for poms, size, mats in parts:
        poms = poms.cpu()
        out["fro"][poms] = torch.linalg.vector_norm(mats, dim=(-2, -1)).cpu()
        out["spec"][poms] = spectral_norm(mats).cpu()
        out["l21"][poms] = l21_norm(mats).cpu()
        out["size"][poms] = size
    return out


# ---------------------------------------------------------------------------- per layer rows
def _weight_layers(
    model: nn.Module, collections: Mapping[str, KernelCollection] | None
) -> list[tuple[str, torch.Tensor, KernelCollection | None]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() not in (2, 4):
            continue
        coll = None
        if isinstance(weight, geoopt.ManifoldParameter) and isinstance(
            weight.manifold, KernelCollection
        ):
            coll = weight.manifold
        if collections is not None and name in collections:
            coll = collections[name]
        found.append((name, weight, coll))
    return found


def _log10_sum(x: torch.Tensor) -> float:
    """``sum(log10(x))`` with ``log10(0) = -inf``."""
    return float(torch.log10(x).sum())


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # An all-zero POM has every norm 0: its ratio is taken as 1 (it adds nothing).
    return torch.where(
        den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(num)
    )


def layer_norms(
    model: nn.Module,
    *,
    coords: str = "stored",
    collections: Mapping[str, KernelCollection] | None = None,
) -> list[dict[str, Any]]:
    """One row per ``nn.Conv2d`` / ``nn.Linear`` layer of ``model``, in module order.

    Args:
        model: Any model; layers whose weight is a ``ManifoldParameter`` on a
            :class:`~fgo_geoopt.KernelCollection` are measured per POM, the others per output
            filter.
        coords: ``"stored"`` (the weights the layers use, ``R * w``: the two-stage renormalised
            weights) or ``"unit"`` (``W / R``).
        collections: Collections by module name for layers whose weight is a plain tensor
            (e.g. rebuilt from a checkpoint's grouping); they take precedence.

    Returns:
        Rows with ``layer``, ``kind`` (``"fg"`` or ``"plain"``), ``shape``, ``out_channels``,
        ``poms``; per norm ``n`` in ``fro``, ``spec``, ``l21``: ``{n}_max`` over POMs and
        ``log10_prod_{n}`` (``sum_g log10 delta_{g,n}``); ``log10_prod_l21_spec`` and
        ``log10_prod_fro_spec`` (``sum_g log10`` of the ratios the bounds use); and
        ``layer_fro``, ``layer_spec``, ``layer_l21``: the norms of the whole layer matrix
        ``(c_out, c_in k_h k_w)`` (rows = output filters), for the classical per-layer bounds.
    """
    rows = []
    for name, weight, coll in _weight_layers(model, collections):
        norms = pom_norms(weight, coll, coords=coords)
        w = weight.detach()
        if coords == "unit" and coll is not None:
            w = unit_weight(w, coll)
        mat = w.to(torch.float64).reshape(w.shape[0], -1)
        row: dict[str, Any] = {
            "layer": name,
            "kind": "plain" if coll is None else "fg",
            "shape": tuple(weight.shape),
            "out_channels": int(weight.shape[0]),
            "poms": int(norms["fro"].numel()),
        }
        for n in NORMS:
            row[f"{n}_max"] = float(norms[n].max())
            row[f"log10_prod_{n}"] = _log10_sum(norms[n])
        row["log10_prod_l21_spec"] = _log10_sum(_ratio(norms["l21"], norms["spec"]))
        row["log10_prod_fro_spec"] = _log10_sum(_ratio(norms["fro"], norms["spec"]))
        row["layer_fro"] = float(torch.linalg.vector_norm(mat))
        row["layer_spec"] = float(spectral_norm(mat))
        row["layer_l21"] = float(l21_norm(mat))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- the bounds
def _log10_sum_pow10(values: Sequence[float]) -> float:
    """``log10(sum_i 10^{v_i})`` without overflow."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    if top == math.inf:
        return math.inf
    return top + math.log10(sum(10.0 ** (v - top) for v in finite))


def generalization_bounds(
    rows: Sequence[Mapping[str, Any]],
    num_samples: int,
    *,
    width: int | None = None,
    level: str = "pom",
) -> dict[str, float]:
    """``log10`` of the three norm-based bounds of Table 1 (constants of the O() dropped).

    Args:
        rows: Output of :func:`layer_norms` (``L = len(rows)`` layers).
        num_samples: ``N``, the number of training samples.
        width: ``varpi`` of Neyshabur et al. (2018); default the largest number of output
            channels of any layer (the paper assumes one width for all layers).
        level: ``"pom"``: products over the POMs of each layer (the paper's fine-grained
            bounds); ``"layer"``: one group per layer, the whole layer matrix (the classical
            bounds, ``G_l = 1``).

    Returns:
        ``{"neyshabur2015", "bartlett2017", "neyshabur2018"}`` as ``log10`` values.
    """
    if not rows:
        raise ValueError("no layers to bound")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if level not in ("pom", "layer"):
        raise ValueError(f"level must be 'pom' or 'layer', got {level!r}")
    n_layers = len(rows)
    if width is None:
        width = max(int(r["out_channels"]) for r in rows)
    if level == "pom":
        fro = [r["log10_prod_fro"] for r in rows]
        spec = [r["log10_prod_spec"] for r in rows]
        l21_spec = [r["log10_prod_l21_spec"] for r in rows]
        fro_spec = [r["log10_prod_fro_spec"] for r in rows]
    else:
        fro = [math.log10(r["layer_fro"]) if r["layer_fro"] > 0 else -math.inf for r in rows]
        spec = [math.log10(r["layer_spec"]) if r["layer_spec"] > 0 else -math.inf for r in rows]
        l21_spec = [
            math.log10(r["layer_l21"] / r["layer_spec"]) if r["layer_spec"] > 0 else 0.0
            for r in rows
        ]
        fro_spec = [
            math.log10(r["layer_fro"] / r["layer_spec"]) if r["layer_spec"] > 0 else 0.0
            for r in rows
        ]
    half_log_n = 0.5 * math.log10(num_samples)
    log_spec = sum(spec)  # log10 prod_l prod_g delta_2
    # log10 (sum_l prod_g (delta_{2->1} / delta_2)^(2/3))^(3/2)
    bartlett_sum = 1.5 * _log10_sum_pow10([2.0 / 3.0 * v for v in l21_spec])
    # log10 sqrt(L^2 width sum_l prod_g delta_F^2 / delta_2^2)
    neyshabur_sqrt = 0.5 * (
        2.0 * math.log10(n_layers)
        + math.log10(width)
        + _log10_sum_pow10([2.0 * v for v in fro_spec])
    )
    return {
        "neyshabur2015": n_layers * _LOG10_2 + sum(fro) - half_log_n,
        "bartlett2017": log_spec - half_log_n + bartlett_sum,
        "neyshabur2018": log_spec - half_log_n + neyshabur_sqrt,
    }


def claim_holds(rows: Sequence[Mapping[str, Any]], *, kinds: Sequence[str] = ("fg",)) -> bool:
    """The paper's Table 2 claim: every per-POM norm of the given kinds of layers is <= 1.

    Raises:
        ValueError: When no row is of one of ``kinds`` (the claim would hold vacuously).
    """
    chosen = [r for r in rows if r["kind"] in kinds]
    if not chosen:
        raise ValueError(f"no layer of kind {', '.join(kinds)} to check the claim on")
    return all(r[f"{n}_max"] <= 1.0 for r in chosen for n in NORMS)


# ---------------------------------------------------------------------------- reporting
def format_table(
    rows: Sequence[Mapping[str, Any]],
    bounds: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """A plain-text table of :func:`layer_norms` rows, and bounds if given.

    Args:
        rows: Output of :func:`layer_norms`.
        bounds: Optional ``{label: generalization_bounds(...)}``.
    """
    head = (
        "layer",
        "kind",
        "shape",
        "POMs",
        "max F",
        "max 2",
        "max 2->1",
        "log10 prod F",
        "log10 prod 2",
    )
    body = [
        (
            r["layer"] or "(model)",
            r["kind"],
            "x".join(str(s) for s in r["shape"]),
            str(r["poms"]),
            f"{r['fro_max']:.4g}",
            f"{r['spec_max']:.4g}",
            f"{r['l21_max']:.4g}",
            f"{r['log10_prod_fro']:.2f}",
            f"{r['log10_prod_spec']:.2f}",
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    if bounds:
        lines.append("")
        lines.append("log10 bounds: " + ", ".join(BOUNDS))
        for label, values in bounds.items():
            lines.append(f"  {label}: " + ", ".join(f"{values[k]:.3f}" for k in BOUNDS))
    return "\n".join(lines)
