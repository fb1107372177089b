"""Batches of (source, matched target) pairs for the flow: new batches every epoch, reproducibly."""

from __future__ import annotations

import copy

import numpy as np
import torch

from spatia.data import PairArrays, PairDataset


class _Crops:
    def get(self, rows):
        return np.stack([np.full((1, 4, 4), r % 256, np.uint8) for r in np.asarray(rows)])


def _pairs(n=40):
    rng = np.random.default_rng(0)
    return PairArrays(crops=_Crops(), cell_emb=rng.normal(size=(n, 3)), source=np.arange(n),
                      target=rng.permutation(n), transition=np.zeros(n, int), confidence=np.ones(n))


def _epochs(dataset, n_epochs, lightning=False):
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=dataset.sampler)
    out = []
    for e in range(n_epochs):
        if lightning:  # what Lightning's fit loop does before each epoch
            loader.sampler.set_epoch(e)
        # each batch as the set of its source rows (x0 holds the row in every pixel)
        out.append([frozenset(b["x0"][:, 0, 0, 0].mul(255).round().int().tolist()) for b in loader])
    return out


def test_pair_batches_change_every_epoch_and_cover_every_pair():
    ds = PairDataset(_pairs(40), batch_size=8, seed=3)
    assert len(ds) == 5
    e0, e1, e2 = _epochs(ds, 3)
    for epoch in (e0, e1, e2):
        assert len(epoch) == 5 and sorted(x for b in epoch for x in b) == list(range(40))
    # reshuffled: the pairs are grouped differently from one epoch to the next
    assert set(e0) != set(e1) and set(e1) != set(e2)


def test_pair_batches_are_reproducible():
    a = _epochs(PairDataset(_pairs(40), 8, seed=3), 3)
    b = _epochs(PairDataset(_pairs(40), 8, seed=3), 3, lightning=True)
    assert a == b
    assert a != _epochs(PairDataset(_pairs(40), 8, seed=4), 3)


def test_fit_transition_trains_on_new_batches_every_epoch(fitted, monkeypatch):
    """End to end: the flow's loader draws new batches each epoch (they were fixed once before)."""
    import spatia as sp
    from spatia.module import FlowConfig

    sd, model = fitted
    seen: list[frozenset] = []
    real = PairDataset.__getitem__
    monkeypatch.setattr(PairDataset, "__getitem__", lambda self, idx: seen.append(frozenset(np.asarray(idx).tolist()))
                        or real(self, idx))
    sp.tl.fit_transition(copy.deepcopy(sd), copy.deepcopy(model), groupby="condition", source="control",
                         target="disease", config=FlowConfig.tiny(), max_epochs=2, batch_size=16, gate=None,
                         random_state=0, inplace=False)
    half = len(seen) // 2
    assert half > 1 and len(seen) == 2 * half
    assert set(seen[:half]) != set(seen[half:])
    assert set().union(*seen[:half]) == set().union(*seen[half:])  # each epoch sees every pair
