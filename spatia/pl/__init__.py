"""Plots: each returns a matplotlib Figure, takes ax= and save=."""

from ._embedding import embedding
from ._history import history
from ._niches import niches
from ._transition import transition

__all__ = ["niches", "embedding", "history", "transition"]
