"""What the optimizer keeps between steps, besides the parameters: momentum buffers in the
layout a backend chooses, and the backends' caches (``Workspace``).

A backend may keep the momentum buffer of a parameter tile-major (the fused 3x3 path does: tiles
of consecutive kernels stored entry-major, which saves transposing it twice per step); the
parameter's state then records the tile size (``"momentum_tiles"``, an int:
``torch.optim.Optimizer.load_state_dict`` would mangle a string), and every other reader
converts (``plain_buffer``; ``FGSGD.momentum_buffer`` always returns the ``(K, n)`` layout).
Checkpoints hold the buffers and that int; the workspace is rebuilt on demand, never saved.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "Workspace",
    "from_tiles",
    "momentum_buffer",
    "plain_buffer",
    "set_layout",
    "to_tiles",
]


class Workspace:
    """Per-collection caches of one optimizer's backends: plans, index tensors, scale factors
    and the arrays a backend reuses from step to step; and the cross-layer plans of the flat
    steps (``plan``), which hold their layers by weak reference.

    Entries are dropped with their collection (weak keys) and whenever its scales change
    (``KernelCollection.set_scale`` installs a new tensor). Nothing here is state in the
    checkpoint sense: a fresh workspace gives the same steps. (The flat steps keep momentum
    buffers as views of one flat tensor per plan; the state holds those views, so a checkpoint
    still has one ``(K, n)`` buffer per parameter.)
    """

    #: Cross-layer plans kept at most (one per parameter group, device and dtype in practice).
    MAX_PLANS = 16

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._plans: dict[Any, Any] = {}

    def of(self, coll: Any) -> dict[str, Any]:
        """The cache of ``coll`` (a dict the backends fill under their own keys)."""
        entry = self._entries.get(coll)
        if entry is None or entry["scale"] is not coll.scale:
            entry = self._entries[coll] = {"scale": coll.scale}
        return entry

    def plan(self, key: Any, valid: Callable[[Any], bool], build: Callable[[], Any]) -> Any:
        """A plan over several layers (the flat steps' index sets), under ``key``: the cached
        one while ``valid(plan)`` holds, else a new one from ``build()``. A few plans are kept,
        the least recently used are dropped."""
        plan = self._plans.pop(key, None)
        if plan is None or not valid(plan):
            plan = build()
        self._plans[key] = plan  # most recent last
        while len(self._plans) > self.MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        return plan

    def clear(self) -> None:
        self._entries = weakref.WeakKeyDictionary()
        self._plans = {}


def plain_buffer(st: dict[str, Any]) -> torch.Tensor | None:
    """The momentum buffer of ``st`` in the plain ``(K, n)`` layout (a copy when tile-major)."""
    buf = st.get("momentum_buffer")
    if buf is not None and st.get("momentum_tiles") is not None:
        return from_tiles(buf, st["momentum_tiles"])
    return buf


def set_layout(st: dict[str, Any], tiles: int | None, convert: bool = True) -> None:
    """Keep the momentum buffer of ``st`` tile-major with ``tiles`` kernels per tile, or
    kernel-major for ``None``, in place (the tensor object stays)."""
    if convert:
        buf = st["momentum_buffer"]
        plain = plain_buffer(st)
        buf.copy_(plain if tiles is None else to_tiles(plain, tiles))
    if tiles is None:
        st.pop("momentum_tiles", None)
    else:
        st["momentum_tiles"] = int(tiles)


def momentum_buffer(
    st: dict[str, Any], like: torch.Tensor, shape: tuple[int, int], tiles: int | None
) -> torch.Tensor:
    """The momentum buffer of a collection parameter in the layout ``tiles``: zeros on the first
    step (the fused step reads it with a zero weight then, and a skipped POM keeps it; zeros are
    the same in every layout), converted in place where another backend left another layout."""
    if "momentum_buffer" not in st:
        st["momentum_buffer"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        set_layout(st, tiles, convert=False)
    elif st.get("momentum_tiles") != tiles:
        set_layout(st, tiles)
    return st["momentum_buffer"]


def to_tiles(buf: torch.Tensor, tile: int) -> torch.Tensor:
    """Tile-major copy of a ``(K, 9)`` buffer (torch tensor, any device): the kernels
    ``[t, t + tile)`` of every tile stored entry-major, as a contiguous ``(9, nt)`` block.

    The fused step then reads and writes a tile of the buffer without transposing it.
    """
    out = buf.new_empty(buf.shape)
    flat, k = out.view(-1), buf.shape[0]
    full = k - k % tile
    flat[: full * 9].view(-1, 9, tile).copy_(buf[:full].view(-1, tile, 9).transpose(1, 2))
    flat[full * 9 :].view(9, k - full).copy_(buf[full:].t())
    return out


def from_tiles(buf: torch.Tensor, tile: int) -> torch.Tensor:
    """The ``(K, 9)`` kernel-major copy of a tile-major buffer (inverse of ``to_tiles``)."""
    out = buf.new_empty(buf.shape)
    flat, k = buf.reshape(-1), buf.shape[0]
    full = k - k % tile
    out[:full].view(-1, tile, 9).copy_(flat[: full * 9].view(-1, 9, tile).transpose(1, 2))
    out[full:].copy_(flat[full * 9 :].view(9, k - full).t())
    return out
