"""Plots: each returns a matplotlib Figure, takes ax= and save=."""

from ._embedding import embedding
from ._generated import generated
from ._history import history
from ._imputation import imputation
from ._niches import niches
from ._transition import transition

__all__ = ["niches", "embedding", "history", "imputation", "generated", "transition"]
