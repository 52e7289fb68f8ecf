"""Tile-major momentum buffers of 3x3 kernels (torch only: works on any device).

The fused CPU step of 3x3 kernels (``_fused3x3``) works on tiles of ``TILE`` consecutive
kernels, entry-major. Keeping their momentum buffer in that order saves transposing it twice per
step; the optimizer records the tile size in the parameter's state (``"momentum_tiles"``, an int:
``torch.optim.Optimizer.load_state_dict`` would mangle a string) and converts when another path
steps the parameter. ``FGSGD.momentum_buffer`` always returns the
plain ``(K, n)`` layout.
"""

from __future__ import annotations

import torch

__all__ = ["TILE", "from_tiles", "to_tiles"]

#: Kernels per tile: the five entry-major tile buffers of the fused step stay in the L1 cache.
TILE = 128


def to_tiles(buf: torch.Tensor, tile: int = TILE) -> torch.Tensor:
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


def from_tiles(buf: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """The ``(K, 9)`` kernel-major copy of a tile-major buffer (inverse of ``to_tiles``)."""
    out = buf.new_empty(buf.shape)
    flat, k = buf.reshape(-1), buf.shape[0]
    full = k - k % tile
    out[:full].view(-1, tile, 9).copy_(flat[: full * 9].view(-1, 9, tile).transpose(1, 2))
    out[full:].copy_(flat[full * 9 :].view(9, k - full).t())
    return out
