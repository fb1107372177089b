"""Batches of (source crop, matched target crop) pairs for the state-transition flow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler


@dataclass
class TransitionPairs:
    """What a state-transition flow learns of one ``source -> target`` transition.

    Attributes
    ----------
    name
        ``"source->target"``.
    source, target
        The two states (values of the ``groupby`` column).
    source_rows, target_rows
        ``(P,)`` table rows of the training pairs: each source cell and its matched target cell.
    confidence
        ``(P,)`` OT confidence of each pair (its weight in the loss).
    delta_g
        Mean expression shift per gene (genes missing from it count as 0).
    delta_m
        Standardised mean morphology shift per feature (features missing from it count as 0).
    summary
        Description of the pairing kept with the flow (``n_pairs``, ``mean_confidence``, ``pairing``...).
    """

    name: str
    source: str
    target: str
    source_rows: np.ndarray
    target_rows: np.ndarray
    confidence: np.ndarray
    delta_g: pd.Series
    delta_m: pd.Series
    summary: dict


@dataclass
class PairArrays:
    """Training pairs over one crop store.

    Attributes
    ----------
    crops
        :class:`~spatia.pp.CropStore` (``.get(rows) -> (n, C, S, S)`` uint8) of the table's cells.
    cell_emb
        ``(n_cells, E)`` SPATIA cell embeddings of the table's cells.
    source, target
        ``(P,)`` table rows of each pair's source and matched target cell.
    transition
        ``(P,)`` transition index of each pair.
    confidence
        ``(P,)`` OT confidence of each pair.
    """

    crops: object
    cell_emb: np.ndarray
    source: np.ndarray
    target: np.ndarray
    transition: np.ndarray
    confidence: np.ndarray

    def __len__(self) -> int:
        return len(self.source)

    def plan(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled pair indices cut into batches (a last batch of one pair is merged into the previous)."""
        order = rng.permutation(len(self))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2] = np.concatenate(batches[-2:])
            batches.pop()
        return batches

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        s, t = self.source[idx], self.target[idx]
        return {
            "x0": torch.from_numpy(np.asarray(self.crops.get(s), dtype=np.float32) / 255.0),
            "x1": torch.from_numpy(np.asarray(self.crops.get(t), dtype=np.float32) / 255.0),
            "cell_emb": torch.from_numpy(np.asarray(self.cell_emb[s], dtype=np.float32)),
            "transition": torch.from_numpy(self.transition[idx].astype(np.int64)),
            "confidence": torch.from_numpy(self.confidence[idx].astype(np.float32)),
        }


class PairBatchSampler(Sampler):
    """Cuts the shuffled pairs into new batches every epoch; yields each batch's pair indices.

    Epoch ``e``'s batches are drawn from ``(seed, e)``: a run is reproducible, and each epoch mixes the pairs
    differently. Lightning sets the epoch (:meth:`set_epoch`) before each one; iterated by hand, each pass is
    the next epoch.
    """

    def __init__(self, pairs: PairArrays, batch_size: int, seed: int) -> None:
        self.pairs, self.batch_size, self.seed, self.epoch = pairs, batch_size, seed, 0
        self._len = len(pairs.plan(batch_size, np.random.default_rng(0)))  # the same number every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        batches = self.pairs.plan(self.batch_size, np.random.default_rng([self.seed, self.epoch]))
        self.epoch += 1
        return iter(batches)


class PairDataset(Dataset):
    """Map-style dataset of pair batches: item ``idx`` (an array of pair indices) is one collated batch.

    Load it with its sampler, which draws new batches every epoch (:class:`PairBatchSampler`)::

        DataLoader(dataset, batch_size=None, sampler=dataset.sampler)

    ``len(dataset)`` is the number of batches per epoch.
    """

    def __init__(self, pairs: PairArrays, batch_size: int, seed: int) -> None:
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.sampler = PairBatchSampler(pairs, batch_size, seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return self.pairs.collate(np.asarray(idx))
