"""The Triton backend of FG-SGD (its kernels come in a later change): never available yet."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AVAILABLE", "accepts", "reason_refused", "step"]

AVAILABLE = False


def reason_refused(coll: Any, param: torch.Tensor, workspace: Any = None) -> str | None:
    return "the Triton backend is not built yet"


def accepts(coll: Any, param: torch.Tensor, workspace: Any = None) -> bool:
    return False


def step(layers, hyper, workspace) -> list[torch.Tensor]:
    raise RuntimeError("the Triton backend is not built yet")
