"""Whether triton is there, and whether it runs its kernels in the interpreter."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["AVAILABLE", "interpreting"]

#: Whether triton is installed (importing it is left to the first step that needs it).
AVAILABLE = importlib.util.find_spec("triton") is not None and not os.environ.get(
    "FGO_DISABLE_TRITON"
)


def interpreting() -> bool:
    """Whether triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
