"""Random grouping of a layer's kernels into POMs (PI / PO / PIO / single), vectorised.

The kernels of a layer form a ``D x C`` grid (output x input channels, or ``D x 1`` in the
filter view); kernel ``k = d * C + c``. Every function here is pure and draws its randomness
from the generator it is given, so a seed fixes the grouping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["STRATEGIES", "Grouping", "group_kernels"]

STRATEGIES = ("pi", "po", "pio", "single")


@dataclass(frozen=True)
class Grouping:
    """A partition of ``K`` kernels into ``P`` POMs, each on one manifold type.

    Attributes:
        kernel_pom: ``(K,)`` POM id of every kernel (int64).
        pom_type: ``(P,)`` index of the manifold type of every POM (int64).
    """

    kernel_pom: torch.Tensor
    pom_type: torch.Tensor


def _parts_by_rank(keys: torch.Tensor, parts: int) -> torch.Tensor:
    """Split every row of ``keys`` into ``parts`` near-equal random subsets.

    ``keys`` holds i.i.d. uniform numbers; ranking them gives a uniform random permutation per
    row, and cutting the ranks into consecutive blocks draws the subsets uniformly without
    replacement.
    """
    n = keys.shape[-1]
    order = keys.argsort(dim=-1)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand_as(order))  # inverse permutation
    return rank * parts // n


def group_kernels(
    rows: int,
    cols: int,
    strategy: str,
    num_types: int,
    generator: torch.Generator,
    *,
    po_fraction: float = 0.5,
    po_parts: int | None = None,
    pi_parts: int | None = None,
    po_channels: Sequence[int] | None = None,
) -> Grouping:
    """Group the kernels of a ``rows x cols`` grid and assign POMs to manifold types.

    Args:
        rows: Output channels ``D``.
        cols: Input channels ``C`` (1 in the filter view).
        strategy: One of ``pi``, ``po``, ``pio``, ``single``.
        num_types: Number of manifold types ``M``; POMs are spread over them in near-equal
            random shares.
        generator: Source of all randomness.
        po_fraction: PIO only: fraction of the input channels forming the PO block (the
            paper's example: 2 of 4). Blocks of fewer than 2 channels are treated as PI rows.
        po_parts: Subsets the input channels of each output channel are split into (PO), or
            that the PO block is split into (PIO). Default: ``M`` for PO, 1 for PIO.
        pi_parts: Subsets the output channels of each PI input channel are split into.
            Default ``M`` (the paper's example: 6 outputs in 2 subsets of 3).
        po_channels: PIO only: the input channels of the PO block, instead of a random draw.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if rows < 1 or cols < 1:
        raise ValueError(f"a layer needs at least one kernel, got a {rows} x {cols} grid")
    if num_types < 1:
        raise ValueError("at least one manifold type is needed")
    for name, value in (("po_parts", po_parts), ("pi_parts", pi_parts)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= po_fraction <= 1.0:
        raise ValueError(f"po_fraction must lie in [0, 1], got {po_fraction!r}")

    k = rows * cols
    if strategy == "single":
        kernel_pom = torch.arange(k, dtype=torch.int64)
    elif strategy == "pi":
        parts = min(pi_parts or num_types, rows)
        part = _parts_by_rank(torch.rand(cols, rows, generator=generator), parts)  # (C, D)
        channel = torch.arange(cols).unsqueeze(1)
        kernel_pom = (channel * parts + part).t().reshape(-1)
    elif strategy == "po":
        parts = min(po_parts or num_types, cols)
        part = _parts_by_rank(torch.rand(rows, cols, generator=generator), parts)  # (D, C)
        kernel_pom = (torch.arange(rows).unsqueeze(1) * parts + part).reshape(-1)
    else:
        kernel_pom = _pio(
            rows, cols, num_types, generator, po_fraction, po_parts, pi_parts, po_channels
        )
    num_poms = int(kernel_pom.max()) + 1
    shares = torch.arange(num_poms) % num_types
    pom_type = shares[torch.randperm(num_poms, generator=generator)]
    return Grouping(kernel_pom=kernel_pom, pom_type=pom_type)


def _pio(rows, cols, num_types, generator, po_fraction, po_parts, pi_parts, po_channels):
    order = torch.randperm(cols, generator=generator)
    if po_channels is not None:
        block = torch.as_tensor(list(po_channels), dtype=torch.int64)
        if block.numel() and (block.min() < 0 or block.max() >= cols):
            raise ValueError(f"po_channels must lie in [0, {cols}), got {list(po_channels)}")
        if block.unique().numel() != block.numel():
            raise ValueError("po_channels must not repeat a channel")
        rest = order[~torch.isin(order, block)]
    else:
        n_po = int(po_fraction * cols)
        block, rest = order[:n_po], order[n_po:]
    if block.numel() < 2:  # a one-channel "block" is a PI row
        block, rest = block[:0], torch.cat([block, rest])
    kernel_pom = torch.empty(rows, cols, dtype=torch.int64)
    offset = 0
    if block.numel():
        parts = min(po_parts or 1, block.numel())
        part = _parts_by_rank(torch.rand(rows, block.numel(), generator=generator), parts)
        kernel_pom[:, block] = torch.arange(rows).unsqueeze(1) * parts + part
        offset = rows * parts
    if rest.numel():
        parts = min(pi_parts or num_types, rows)
        part = _parts_by_rank(torch.rand(rest.numel(), rows, generator=generator), parts)
        ids = offset + torch.arange(rest.numel()).unsqueeze(1) * parts + part  # (n_pi, D)
        kernel_pom[:, rest] = ids.t()
    return kernel_pom.reshape(-1)
