"""What one run of the step benchmark measures, and the optimizer settings every case shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GRAD_SCALE", "LR", "MOMENTUM", "Config"]

LR = 0.01
MOMENTUM = 0.9
GRAD_SCALE = 1e-2


@dataclass
class Config:
    """What one benchmark run measures (the command-line flags of ``benchmarks/step.py``)."""

    model: str = "resnet50"
    presets: Sequence[str] = ("st", "poms_st", "pio3", "pio4")
    repeats: int = 7
    warmup: int = 2
    geoopt_repeats: int = 5
    train_repeats: int = 21
    batch_size: int = 32
    img_size: int = 64
    threads: int = 2
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0
    skip_train: bool = False
    wrap_model: str | None = "resnet101"
    launches: bool | None = None
    train_preset: str = "pio4"
    malloc: str = "keep"
