"""A :class:`~fgo_geoopt.KernelCollection` as data: its grouping saved as plain tensors and
rebuilt exactly, compared, and described (rows, ``repr``)."""

from __future__ import annotations

from typing import Any

import torch

from ._grouping import Grouping
from .manifolds import canonical_name

__all__ = ["CollectionData"]


class CollectionData:
    """Saving, rebuilding, comparing and describing a collection (mixed into it)."""

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # type: ignore[override]
        """The grouping as plain data (tensors, strings, numbers): enough to rebuild exactly."""
        return {
            "shape": list(self.shape),
            "view": self.view,
            "kernel": self.kernel,
            "strategy": self.strategy,
            "seed": int(self.seed),
            "sizes": {
                k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in self.sizes.items()
            },
            "manifolds": list(self.manifold_names),
            "kernel_pom": self.kernel_pom.to(torch.int32),
            "pom_type": self.pom_type.clone(),
            "scale": None if self.scale is None else self.scale.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Any:
        """Rebuild a collection saved by :meth:`state_dict`."""
        try:
            grouping = Grouping(
                kernel_pom=torch.as_tensor(state["kernel_pom"]).long(),
                pom_type=torch.as_tensor(state["pom_type"]).long(),
            )
            out = cls(
                tuple(state["shape"]),
                state["view"],
                tuple(canonical_name(n) for n in state["manifolds"]),
                grouping,
                strategy=state["strategy"],
                seed=state["seed"],
                kernel=state.get("kernel", "auto"),
                sizes=state.get("sizes", {}),
            )
        except KeyError as err:
            raise ValueError(f"not a KernelCollection state: missing key {err}") from None
        out.set_scale(state.get("scale"))
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # type: ignore[override]
        raise TypeError(
            "a KernelCollection's grouping is fixed at construction; rebuild it with "
            "KernelCollection.from_state_dict(state)"
        )

    def same_grouping(self, other: Any) -> bool:
        """True when both collections group the same kernels the same way on the same types."""
        return (
            self.shape == other.shape
            and self.view == other.view
            and self.manifold_names == other.manifold_names
            and torch.equal(self.kernel_pom, other.kernel_pom)
            and torch.equal(self.pom_type, other.pom_type)
        )

    def describe(self) -> list[dict[str, Any]]:
        """One row per manifold type: POM count, kernel count and POM sizes."""
        rows = []
        sizes = self.pom_sizes
        ptype = self.pom_type.long()
        for t, name in enumerate(self.manifold_names):
            sel = sizes[ptype == t]
            rows.append(
                {
                    "manifold": name,
                    "poms": int(sel.numel()),
                    "kernels": int(sel.sum()),
                    "pom_size_min": int(sel.min()) if sel.numel() else 0,
                    "pom_size_max": int(sel.max()) if sel.numel() else 0,
                    "pom_size_mean": float(sel.double().mean()) if sel.numel() else 0.0,
                }
            )
        return rows

    def extra_repr(self) -> str:
        parts = [
            f"shape={self.shape}",
            f"strategy={self.strategy!r}",
            f"view={self.view!r}",
            f"kernel={self.kernel_shape[0]}x{self.kernel_shape[1]}",
            f"poms={self.num_poms}",
        ]
        for row in self.describe():
            parts.append(
                f"{row['manifold']}: {row['poms']} POMs/{row['kernels']} kernels "
                f"(size {row['pom_size_min']}-{row['pom_size_max']})"
            )
        if self.scale is not None:
            parts.append("rescaled")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"KernelCollection({self.extra_repr()})"
