"""The tile size of the 3x3 path, a constant compiled into its kernels.

The fused CPU step of 3x3 kernels (``_tiles3x3``) works on tiles of ``TILE`` consecutive
kernels, entry-major, and keeps the momentum buffers of those layers in that order (the
conversions are ``optim._state.to_tiles`` / ``from_tiles``): it saves transposing them twice
per step.
"""

from __future__ import annotations

__all__ = ["TILE"]

#: Kernels per tile: the five entry-major tile buffers of the fused step stay in the L1 cache.
TILE = 128
