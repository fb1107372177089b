"""Lightning DDP on 2 CPU processes (gloo): trains and writes an embedding for every cell exactly once."""

from __future__ import annotations

import numpy as np

import spatia as sp
from spatia import Keys


def test_ddp_two_cpu_processes(sdata):
    model = sp.tl.fit(sdata, config=sp.SpatiaConfig.tiny(), max_epochs=2, accelerator="cpu", devices=2,
                      strategy="ddp_fork", random_state=0)
    assert model.train_info["world_size"] == 2
    assert model.is_trained and len(model.history) >= 1
    t = sdata["table"]
    emb = t.obsm[Keys.CELL_EMB]
    assert emb.shape == (t.n_obs, model.config.embed_dim)
    # every cell got its own (non-blank, distinct) embedding
    assert np.isfinite(emb).all() and (np.abs(emb).sum(1) > 0).all()
    assert len(np.unique(emb.round(5), axis=0)) == t.n_obs


def _ddp_reads(sdata, log, monkeypatch, random_state):
    """Fit with DDP on 2 forked CPU processes, logging which batch of which dataset each process reads (and
    which crop rows): ``{pid: [(dataset id, dataset length, batch), ...]}`` and ``{pid: [crop rows of each read]}``."""
    import os

    from spatia.data import BatchDataset
    from spatia.pp._crop_store import CropStore

    log.mkdir()
    get_batch, get_crops = BatchDataset.__getitem__, CropStore.get

    def logged_batch(self, i):
        with open(log / f"{os.getpid()}.batches", "a") as f:
            f.write(f"{id(self)} {len(self)} {i}\n")
        return get_batch(self, i)

    def logged_crops(self, rows):
        with open(log / f"{os.getpid()}.crops", "a") as f:
            f.write(" ".join(map(str, np.asarray(rows).tolist())) + "\n")
        return get_crops(self, rows)

    monkeypatch.setattr(BatchDataset, "__getitem__", logged_batch)
    monkeypatch.setattr(CropStore, "get", logged_crops)
    sp.tl.fit(sdata, config=sp.SpatiaConfig.tiny(), max_epochs=2, early_stopping=False, accelerator="cpu",
              devices=2, strategy="ddp_fork", random_state=random_state, overwrite=True, inplace=False)
    monkeypatch.undo()
    batches = {p.stem: [tuple(map(int, line.split())) for line in p.read_text().split("\n") if line]
               for p in log.glob("*.batches")}
    crops = {p.stem: [[int(r) for r in line.split()] for line in p.read_text().split("\n") if line]
             for p in log.glob("*.crops")}
    return batches, crops


def test_ddp_ranks_read_their_own_seeded_shards(sdata, tmp_path, monkeypatch):
    """Under DDP each rank reads its own half of the training batches every epoch (together, all of them; apart,
    at most the one batch a sampler repeats to even the halves out), and only the crops of those batches. The
    split is seeded: the same random_state gives the same shards, another one other shards."""
    reads, crops = _ddp_reads(sdata, tmp_path / "first", monkeypatch, 0)
    again, _ = _ddp_reads(sdata, tmp_path / "again", monkeypatch, 0)
    other, _ = _ddp_reads(sdata, tmp_path / "other", monkeypatch, 1)
    assert len(reads) == 2  # two worker processes read batches; the parent none

    def training(logs):  # per rank, the training batches it read (the largest dataset: validation is smaller)
        train_id = max({(d, n) for log in logs.values() for d, n, _ in log}, key=lambda t: t[1])[0]
        return {pid: [i for d, _, i in log if d == train_id] for pid, log in logs.items()}

    n_batches = max(n for log in reads.values() for _, n, _ in log)
    per_rank = []
    for mine in training(reads).values():
        half = -(-n_batches // 2)  # each rank's share of an epoch
        assert len(mine) == 2 * half
        per_rank.append([mine[:half], mine[half:]])
    for epoch in range(2):
        a, b = (set(r[epoch]) for r in per_rank)
        assert a | b == set(range(n_batches))
        assert len(a & b) <= 1
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled between epochs
    # a rank reads crops only for the batches it reads (one read of their cells and niches per batch), so its
    # crop reads are its shard's; the whole slide's crops are read once, by the parent, to embed every cell
    for pid, log in reads.items():
        assert len(crops[pid]) == len(log), (len(crops[pid]), len(log))
        assert max(len(rows) for rows in crops[pid]) < sdata["table"].n_obs / 2
    # seeded: the same shards with the same random_state, other shards with another one
    assert sorted(training(again).values()) == sorted(training(reads).values())
    assert sorted(training(other).values()) != sorted(training(reads).values())
