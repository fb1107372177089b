"""User-facing tools: fit, embed, cluster."""

from ._cluster import cluster
from ._fit import embed, fit

__all__ = ["fit", "embed", "cluster"]
