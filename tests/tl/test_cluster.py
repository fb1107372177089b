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
    out = sp.tl.cluster(sd, level="niche", inplace=False)
    labels = out[f"obs/{Keys.NICHE}"]
    assert Keys.NICHE not in t.obs and len(labels) == t.n_obs
    assert out["params"]["level"] == "niche" and out["params"]["use_rep"] == Keys.CELL_EMB
    sp.tl.cluster(sd, level="niche")
    sp.tl.cluster(sd, level="cell", resolution=0.3, key_added="my_clusters")
    assert Keys.NICHE in t.obs and "my_clusters" in t.obs and Keys.CLUSTER not in t.obs
    rec = t.uns["spatia"]["cluster"]
    assert rec["smooth_k"] == 0 and rec["resolution"] == 0.3  # the latest run (the cell level)
    with pytest.raises(KeyError, match="overwrite=True"):
        sp.tl.cluster(sd, level="niche")
    assert sp.tl.cluster(sd, level="niche", n_clusters=2, inplace=False)["params"]["n_clusters"] == 2  # no write
    sp.tl.cluster(sd, level="niche", n_clusters=3, overwrite=True)
    assert t.obs[Keys.NICHE].nunique() == 3 and t.uns["spatia"]["cluster"]["n_clusters"] == 3
    ari_niche = adjusted_rand_score(t.obs["domain"], t.obs[Keys.NICHE])
    ari_cell = adjusted_rand_score(t.obs["domain"], t.obs["my_clusters"])
    # niches follow tissue domains better than cell clusters do
    assert ari_niche > ari_cell, (ari_niche, ari_cell)


def test_cluster_bad_input(sim):
    with pytest.raises(KeyError, match="run `sp.tl.fit`"):
        sp.tl.cluster(sim, level="niche")
    with pytest.raises(ValueError, match="level must be one of"):
        sp.tl.cluster(sim, level="organ")


def _two_halves(n: int, *, side: float, shift: float):
    """An AnnData of ``n`` cells on a ``side``-µm square whose right half's embeddings are shifted by ``shift``
    (per-cell spread 1), and the half of each cell."""
    import numpy as np
    from anndata import AnnData

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, side, (n, 2))
    dom = (xy[:, 0] > side / 2).astype(int)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[:, 0] += shift * dom
    return AnnData(obs={"domain": dom.astype(str)}, obsm={"X_spatia_cell": emb, "X_spatia_niche": emb, "spatial": xy}), dom


def test_cluster_smoothing_recovers_domains_hidden_by_cell_noise():
    """Two spatial halves whose embeddings differ by a shift well below the per-cell spread: unsmoothed
    Leiden cannot separate them, averaging each cell with its spatial neighbours can."""
    a, dom = _two_halves(600, side=300.0, shift=0.8)

    def labels(**kw):
        return sp.tl.cluster(a, level="niche", resolution=0.1, inplace=False, **kw)["obs/spatia_niche"]

    raw, smooth = labels(smooth_k=0), labels(smooth_k=20)
    ari_raw, ari_smooth = adjusted_rand_score(dom, raw), adjusted_rand_score(dom, smooth)
    assert ari_smooth > 0.5 and ari_smooth > ari_raw + 0.3, (ari_raw, ari_smooth)
    # the default at the niche level smooths the cell embedding over 30 cells; cells and tissue are not smoothed
    assert adjusted_rand_score(dom, labels()) > ari_raw
    assert adjusted_rand_score(dom, labels(use_rep="X_spatia_niche")) > ari_raw
    with pytest.raises(ValueError, match="smooth_k"):
        sp.tl.cluster(a, level="niche", smooth_k=-1)
    with pytest.raises(KeyError, match="use_rep"):
        sp.tl.cluster(a, level="niche", use_rep="X_nope")
    with pytest.raises(ValueError, match="n_clusters"):
        sp.tl.cluster(a, level="niche", n_clusters=0)
    del a.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        sp.tl.cluster(a, level="niche", smooth_k=5)


def test_niche_embedding_describes_the_surroundings(fitted):
    """The niche embedding is trained on the neighbours' pooled counts (the centre left out): it predicts
    the neighbours' mean expression better than the cell embedding does."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import NearestNeighbors

    sd, _ = fitted
    t = sd["table"]
    x = t.X.toarray() if hasattr(t.X, "toarray") else np.asarray(t.X)
    ln = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    xy = np.asarray(t.obsm["spatial"])
    nb = NearestNeighbors(n_neighbors=11).fit(xy).kneighbors(xy, return_distance=False)[:, 1:]
    target = PCA(5, random_state=0).fit_transform(ln[nb].mean(1))
    cv = KFold(5, shuffle=True, random_state=0)

    def r2(emb):
        return cross_val_score(RidgeCV(alphas=np.logspace(-2, 3, 6)), emb, target, cv=cv, scoring="r2").mean()

    r_niche, r_cell = r2(t.obsm[Keys.NICHE_EMB]), r2(t.obsm[Keys.CELL_EMB])
    assert r_niche > r_cell, (r_niche, r_cell)


def test_niche_smoothing_without_obsm_spatial_uses_the_segmentation(fitted):
    """A SpatialData whose table has no obsm['spatial'] still clusters niches: positions come from the cells'
    segmentation (centroids within ~2 µm of the simulator's), so the smoothed embedding barely changes."""
    import copy

    import numpy as np

    from spatia.tl._cluster import spatial_smooth

    sd, _ = fitted
    emb = sd["table"].obsm[Keys.NICHE_EMB]
    with_xy = spatial_smooth(emb, sd["table"], 8)
    sd2 = copy.deepcopy(sd)
    del sd2["table"].obsm["spatial"]
    without = spatial_smooth(emb, sd2["table"], 8, data=sd2)
    rel = np.linalg.norm(with_xy - without) / np.linalg.norm(with_xy - with_xy.mean(0))
    assert rel < 0.2, rel
    assert not np.allclose(with_xy, emb)  # it did smooth
    sp.tl.cluster(sd2, level="niche")  # and the default path runs
    assert sd2["table"].obs["spatia_niche"].nunique() > 1


def test_tissue_level_clusters_tiles_not_cells(fitted):
    """The tissue embedding is one vector per tile: clusters group tiles, and a tile is never split."""
    import numpy as np

    sd, _ = fitted
    t = sd["table"]
    emb = t.obsm[Keys.TISSUE_EMB]
    _, tile = np.unique(emb, axis=0, return_inverse=True)
    n_tiles = tile.max() + 1
    assert n_tiles >= 4  # the test slide has several tiles
    labels = np.asarray(sp.tl.cluster(sd, level="tissue", resolution=0.3, inplace=False)["obs/spatia_cluster"])
    # each tile in one cluster ...
    for k in range(n_tiles):
        assert len(set(labels[tile.ravel() == k])) == 1
    # ... and fewer clusters than tiles (a kNN graph over the cells made every tile its own component)
    assert 1 < len(set(labels)) < n_tiles, (len(set(labels)), n_tiles)


def test_niche_defaults_beat_the_neighbourhood_mean_baseline(fitted):
    """Domains as a user gets them (defaults, no k given) against the five-line baseline given the true k:
    the mean log-expression of each cell's 15 nearest cells, PCA, KMeans."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    sd, _ = fitted
    t = sd["table"]
    spatia_ari = adjusted_rand_score(t.obs["domain"], sp.tl.cluster(sd, inplace=False)["obs/spatia_niche"])
    x = t.X.toarray() if hasattr(t.X, "toarray") else np.asarray(t.X)
    ln = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * np.median(x.sum(1)))
    xy = np.asarray(t.obsm["spatial"])
    nb = NearestNeighbors(n_neighbors=16).fit(xy).kneighbors(xy, return_distance=False)
    feats = PCA(20, random_state=0).fit_transform(ln[nb].mean(1))
    k = t.obs["domain"].nunique()
    base_ari = adjusted_rand_score(t.obs["domain"], KMeans(k, n_init=10, random_state=0).fit_predict(feats))
    assert spatia_ari > base_ari, (spatia_ari, base_ari)


def test_cluster_on_more_cells_than_scanpys_exact_knn():
    """Above 4,096 cells scanpy's neighbours go through pynndescent (whose csr_array output scanpy 1.11 cannot
    read under scipy 1.17): clustering still works and finds the two domains."""
    a, dom = _two_halves(4500, side=800.0, shift=1.5)
    sp.tl.cluster(a, level="niche", n_clusters=2)
    assert adjusted_rand_score(dom, a.obs["spatia_niche"]) > 0.8


def _stripes(n: int, n_domains: int, *, shift: float, seed: int = 0):
    """``n`` cells on a square of vertical stripes (domains); each domain shifts its own embedding axis by
    ``shift`` (per-cell spread 1)."""
    import numpy as np
    from anndata import AnnData

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000.0, (n, 2))
    dom = np.minimum((xy[:, 0] / (1000.0 / n_domains)).astype(int), n_domains - 1)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[np.arange(n), dom] += shift
    return AnnData(obs={"domain": dom.astype(str)}, obsm={"X_spatia_cell": emb, "spatial": xy}), dom


def test_cluster_on_a_sample_labels_every_cell_as_the_whole_graph_does():
    """max_cells below the slide: Leiden on a sample, the other cells by a kNN vote. Every cell is labelled,
    the unsampled cells as well as the sampled ones, and the domains come out as with every cell in the graph;
    a vote that ignores the neighbours (each unsampled cell given a random sampled cell's cluster) does not."""
    import numpy as np

    a, dom = _stripes(3000, 4, shift=1.0)
    whole = sp.tl.cluster(a, level="niche", n_clusters=4, max_cells=None, inplace=False)
    out = sp.tl.cluster(a, level="niche", n_clusters=4, max_cells=600, inplace=False)
    p = out["params"]
    assert p["max_cells"] == 600 and p["n_graph_cells"] == 600 and p["assignment"].startswith("kNN vote")
    assert whole["params"]["n_graph_cells"] == 3000 and whole["params"]["assignment"] == "graph"
    lab = np.asarray(out["obs/spatia_niche"]).astype(int)
    ari_whole = adjusted_rand_score(dom, np.asarray(whole["obs/spatia_niche"]))
    ari_sample = adjusted_rand_score(dom, lab)
    assert ari_whole > 0.8 and ari_sample > ari_whole - 0.05, (ari_sample, ari_whole)
    # the same seed draws the same sample: which cells were in the graph is recoverable
    in_graph = np.sort(np.random.default_rng(0).choice(3000, 600, replace=False))
    rest = np.setdiff1d(np.arange(3000), in_graph)
    ari_rest = adjusted_rand_score(dom[rest], lab[rest])
    assert ari_rest > adjusted_rand_score(dom[in_graph], lab[in_graph]) - 0.05, ari_rest
    blind = lab.copy()
    blind[rest] = lab[in_graph][np.random.default_rng(1).integers(0, 600, len(rest))]
    assert ari_rest > adjusted_rand_score(dom[rest], blind[rest]) + 0.5
    # a slide at or below max_cells is clustered whole
    assert sp.tl.cluster(a, level="niche", max_cells=3000, inplace=False)["params"]["n_graph_cells"] == 3000
    with pytest.raises(ValueError, match="max_cells must be"):
        sp.tl.cluster(a, level="niche", max_cells=0)


def test_knn_vote_approximate_index_agrees_with_exact_search(monkeypatch):
    """Above _EXACT_VOTE_MAX reference cells the vote searches a pynndescent index (in chunks): its votes
    agree with exact search on nearly every cell; ties go to the nearest cell's cluster."""
    import numpy as np

    from spatia.tl import _cluster

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (6, 10))
    codes = rng.integers(0, 6, 3000)
    ref = centres[codes] + rng.normal(size=(3000, 10))
    q_codes = rng.integers(0, 6, 2000)
    query = centres[q_codes] + rng.normal(size=(2000, 10))
    exact = _cluster.knn_vote(ref, codes, query, n_neighbors=15)
    monkeypatch.setattr(_cluster, "_EXACT_VOTE_MAX", 100)
    monkeypatch.setattr(_cluster, "_VOTE_CHUNK", 700)
    approx = _cluster.knn_vote(ref, codes, query, n_neighbors=15)
    assert (approx == exact).mean() > 0.98
    # rows= votes for those rows of the query only, read chunk by chunk: the same votes as a copy of them
    rows = np.arange(1, 2000, 3)
    np.testing.assert_array_equal(_cluster.knn_vote(ref, codes, query, n_neighbors=15, rows=rows),
                                  _cluster.knn_vote(ref, codes, query[rows], n_neighbors=15))
    assert (exact == q_codes).mean() > 0.9
    # two neighbours, one vote each: the nearest one's cluster wins
    tie = _cluster.knn_vote(np.array([[0.0], [1.0], [5.0]]), np.array([2, 0, 1]), np.array([[0.4], [0.6]]),
                            n_neighbors=2)
    assert tie.tolist() == [2, 0]
