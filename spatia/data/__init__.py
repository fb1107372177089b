"""Torch datasets over crops + tables."""

from ._dataset import BatchDataset, CellArrays, neighbours_from_graph

__all__ = ["CellArrays", "BatchDataset", "neighbours_from_graph"]
