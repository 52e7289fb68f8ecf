"""The FG-SGD and FG-Adam optimizers."""

from .fgadam import FGAdam, fgadam
from .fgsgd import FGSGD, NONFINITE_POLICIES, fgsgd

__all__ = ["FGSGD", "NONFINITE_POLICIES", "FGAdam", "fgadam", "fgsgd"]
