"""sp.tl.cluster: key contract, bad input, and niches that follow the tissue domains."""

from __future__ import annotations

import copy

import pytest
from sklearn.metrics import adjusted_rand_score

import spatia as sp
from spatia import Keys


def test_cluster_contract_and_domains(fitted):
    sd, _ = fitted
    sd = copy.deepcopy(sd)
    t = sd["table"]
    labels = sp.tl.cluster(sd, level="niche", resolution=0.3, inplace=False)
    assert Keys.NICHE not in t.obs and len(labels) == t.n_obs
    sp.tl.cluster(sd, level="niche", resolution=0.3)
    sp.tl.cluster(sd, level="cell", resolution=0.3, key_added="my_clusters")
    assert Keys.NICHE in t.obs and "my_clusters" in t.obs and Keys.CLUSTER not in t.obs
    ari_niche = adjusted_rand_score(t.obs["domain"], t.obs[Keys.NICHE])
    ari_cell = adjusted_rand_score(t.obs["domain"], t.obs["my_clusters"])
    # niches follow tissue domains better than cell clusters do
    assert ari_niche > ari_cell, (ari_niche, ari_cell)


def test_cluster_bad_input(sim):
    with pytest.raises(KeyError, match="run `sp.tl.fit`"):
        sp.tl.cluster(sim, level="niche")
    with pytest.raises(ValueError, match="level must be one of"):
        sp.tl.cluster(sim, level="organ")
