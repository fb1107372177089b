"""Torch datasets over crops + tables."""

from ._dataset import BatchDataset, CellArrays, neighbours_from_graph
from ._pairs import PairArrays, PairBatchSampler, PairDataset

__all__ = ["CellArrays", "BatchDataset", "neighbours_from_graph", "PairArrays", "PairBatchSampler", "PairDataset"]
