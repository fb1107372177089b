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
