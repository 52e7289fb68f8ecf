"""The FG-SGD optimizer."""

from .fgsgd import FGSGD, NONFINITE_POLICIES, fgsgd

__all__ = ["FGSGD", "NONFINITE_POLICIES", "fgsgd"]
