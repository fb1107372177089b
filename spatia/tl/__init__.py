"""User-facing tools: fit, embed (annotate, cluster, impute, generate as they land)."""

from ._fit import embed, fit

__all__ = ["fit", "embed"]
