"""User-facing tools: fit, embed, cluster, state pairing and transitions."""

from ._cluster import cluster
from ._fit import embed, fit
from ._pairing import PairResult, pair_states
from ._transition import fit_transition, transition

__all__ = ["fit", "embed", "cluster", "pair_states", "PairResult", "fit_transition", "transition"]
