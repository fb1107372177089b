"""Plots with scanpy's arguments (``color=``, ``palette=``, ``title=``, ``ax=``, ``show=``, ``save=``); each returns
the matplotlib Figure (``None`` with ``show=True``)."""

from ._embedding import embedding
from ._generated import generated
from ._history import history
from ._imputation import imputation
from ._niches import niches
from ._transition import transition

__all__ = ["niches", "embedding", "history", "imputation", "generated", "transition"]
