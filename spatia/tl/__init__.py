"""User-facing tools: fit, embed, cluster, fit_decoder, generate."""

from ._cluster import cluster
from ._fit import embed, fit
from ._generate import fit_decoder, generate

__all__ = ["fit", "embed", "cluster", "fit_decoder", "generate"]
