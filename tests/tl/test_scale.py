"""Large-slide paths on small slides: training on a sample of cells, crops spilled to a temporary store,
chunked smoothing and reference mapping (same results as the one-shot computations)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp_sparse
from conftest import _copy, knn_accuracy

import spatia as sp
from spatia import Keys
from spatia.data import CellArrays


@pytest.fixture(scope="module")
def sampled_fit(sim):
    """A tiny fit on 200 of the slide's 700 cells (all cells embedded)."""
    sd = _copy(sim)
    model = sp.tl.fit(sd, image_key="morphology", config=sp.SpatiaConfig.tiny(), n_cells=200, max_epochs=20,
                      random_state=0)
    return sd, model


def test_fit_on_a_sample_embeds_every_cell(sampled_fit):
    sd, model = sampled_fit
    t = sd["table"]
    for key in (Keys.CELL_EMB, Keys.NICHE_EMB, Keys.TISSUE_EMB):
        assert t.obsm[key].shape == (t.n_obs, model.config.embed_dim)
        assert np.isfinite(t.obsm[key]).all()
    assert len(np.unique(t.obsm[Keys.CELL_EMB], axis=0)) == t.n_obs  # no row left at a default value
    uns = t.uns[Keys.UNS]["fit"]
    assert uns["n_cells"] == 200 and uns["n_sampled_cells"] == 200


def test_fit_on_a_sample_learns_cell_types_of_unsampled_cells(sampled_fit, fitted):
    sd, _ = sampled_fit
    t = sd["table"]
    y = t.obs["cell_type"].astype(str).to_numpy()
    chance = t.obs["cell_type"].value_counts(normalize=True).max()
    # the cells training never centred a batch on (the same seeded draw as fit's)
    arrays = CellArrays(counts=sp_sparse.csr_matrix((t.n_obs, 1)), crops=None, xy=np.zeros((t.n_obs, 2)),
                        nbr=np.zeros((t.n_obs, 1), dtype=np.int64), tile=np.zeros(t.n_obs, dtype=np.int64))
    unseen = np.setdiff1d(np.arange(t.n_obs), arrays.sample(200, np.random.default_rng(0)).centres)
    assert len(unseen) == t.n_obs - 200
    sampled = knn_accuracy(t.obsm[Keys.CELL_EMB], y)
    sampled_unseen = knn_accuracy(t.obsm[Keys.CELL_EMB][unseen], y[unseen])
    full = knn_accuracy(fitted[0]["table"].obsm[Keys.CELL_EMB], y)
    noise = knn_accuracy(np.random.default_rng(0).normal(size=(t.n_obs, 16)), y)
    assert sampled > chance + 0.3 and sampled_unseen > chance + 0.3, (sampled, sampled_unseen, chance)
    assert sampled > noise + 0.3, (sampled, noise)
    assert sampled > full - 0.1, (sampled, full)


def test_sample_plans_batches_on_the_sample_only():
    rng = np.random.default_rng(0)
    n = 500
    arrays = CellArrays(counts=sp_sparse.csr_matrix((n, 3)), crops=None, xy=rng.random((n, 2)) * 100,
                        nbr=rng.integers(-1, n, (n, 4)), tile=rng.integers(0, 9, n))
    view = arrays.sample(120, np.random.default_rng(1))
    assert view.nbr is arrays.nbr and view.counts is arrays.counts  # shared, not copied
    again = arrays.sample(120, np.random.default_rng(1))
    np.testing.assert_array_equal(view.centres, again.centres)
    centres = np.concatenate(view.plan(16, np.random.default_rng(2)))
    np.testing.assert_array_equal(np.sort(centres), view.centres)
    some = np.arange(0, n, 2)
    np.testing.assert_array_equal(np.sort(np.concatenate(view.plan(16, None, some))),
                                  np.intersect1d(view.centres, some))
    assert arrays.sample(n, rng) is arrays
    assert len(np.concatenate(arrays.plan(16))) == n  # the full arrays (inference) still cover every cell


def test_fit_n_cells_bad_input(sdata):
    with pytest.raises(ValueError, match="n_cells must be an integer >= 2"):
        sp.tl.fit(sdata, config=sp.SpatiaConfig.tiny(), n_cells=1, max_epochs=1)
    with pytest.raises(ValueError, match="n_cells must be an integer >= 2"):
        sp.tl.fit(sdata, config=sp.SpatiaConfig.tiny(), n_cells=0.5, max_epochs=1)


def test_crops_above_the_memory_limit_go_to_a_temporary_store(small_fitted, monkeypatch, tmp_path):
    import tempfile

    from spatia.pp import _crops

    sd, _ = small_fitted
    config = sp.SpatiaConfig.tiny()
    in_memory = sp.tl.fit(_copy(sd), image_key="morphology", config=config, max_epochs=2, random_state=0,
                          inplace=False)
    monkeypatch.setattr(_crops, "MEMORY_CROPS_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    on_disk = sp.tl.fit(_copy(sd), image_key="morphology", config=config, max_epochs=2, random_state=0,
                        inplace=False)
    np.testing.assert_allclose(on_disk["obsm/X_spatia_cell"], in_memory["obsm/X_spatia_cell"], atol=1e-5)
    store = _crops.crops_for(sd, None, image_key="morphology", size=16)
    assert store.path is not None and os.path.isdir(store.path)
    path = store.path
    del store
    gc.collect()
    assert not os.path.exists(path)  # the temporary store goes with its last reference


def test_spatial_smooth_in_chunks_equals_one_pass(monkeypatch):
    from anndata import AnnData
    from sklearn.neighbors import NearestNeighbors

    from spatia.tl import _cluster

    rng = np.random.default_rng(0)
    xy = rng.random((300, 2)) * 100
    emb = rng.normal(size=(300, 5)).astype(np.float32)
    t = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(300)]), obsm={"spatial": xy})
    nb = NearestNeighbors(n_neighbors=8).fit(xy).kneighbors(xy, return_distance=False)
    expected = emb.astype(np.float64)[nb].mean(1).astype(np.float32)
    monkeypatch.setattr(_cluster, "_SMOOTH_CHUNK_BYTES", 8 * 5 * 8 * 7)  # 7 cells per chunk
    np.testing.assert_allclose(_cluster.spatial_smooth(emb, t, 7), expected, rtol=1e-6)


def test_reference_mapping_in_chunks_equals_one_pass(monkeypatch):
    from spatia.tl import _reference_mapping

    rng = np.random.default_rng(0)
    ref = rng.poisson(rng.gamma(1.0, size=(200, 18)) * 5).astype(np.float32)
    query = rng.poisson(rng.gamma(1.0, size=(90, 12))).astype(np.float32)
    rho = rng.dirichlet(np.ones(12), size=90).astype(np.float32)
    genes, ref_genes = [f"g{i}" for i in range(12)], [f"g{i}" for i in range(18)]

    def mapped():
        return _reference_mapping._reference_impute(query, rho, genes, ref, ref_genes, genes, ref_genes[12:], 10, 5, 0)

    one = mapped()
    monkeypatch.setattr(_reference_mapping, "_MAP_CHUNK_BYTES", 16 * 200 * 8)  # 8 cells per chunk
    assert _reference_mapping._reference_map(query, rho, genes, ref, ref_genes, genes, ref_genes[12:], 10, 5,
                                             0).step == 8
    np.testing.assert_allclose(mapped(), one, rtol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_annotate_predicts_in_chunks_as_in_one_pass(monkeypatch, n_classes):
    """annotate's probabilities, a chunk of cells at a time from the float32 embedding, equal those of one
    float64 pass over every cell (what it did before), and a table's embedding is not copied."""
    from anndata import AnnData

    from spatia.tl import _annotate

    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, 500)
    emb = (rng.normal(size=(500, 6)) + y[:, None]).astype(np.float32)
    known = np.where(rng.random(500) < 0.4, y.astype(str), None)
    t = AnnData(obs=pd.DataFrame({"known": known}, index=[str(i) for i in range(500)]), obsm={"X_spatia_cell": emb})
    assert _annotate._features(t, "X_spatia_cell", None, None, None) is t.obsm["X_spatia_cell"]
    one = sp.tl.annotate(t, labels_key="known", morphology=False, inplace=False)
    monkeypatch.setattr(_annotate, "_PREDICT_CHUNK", 37)
    chunked = sp.tl.annotate(t, labels_key="known", morphology=False, inplace=False)
    np.testing.assert_allclose(chunked["obsm/spatia_cell_type_proba"], one["obsm/spatia_cell_type_proba"], rtol=1e-12)
    assert (np.asarray(chunked["obs/spatia_cell_type"]) == np.asarray(one["obs/spatia_cell_type"])).all()
    # the probe learned: its labels on the cells left unlabelled follow the truth
    unl = known == None  # noqa: E711
    assert (np.asarray(one["obs/spatia_cell_type"])[unl] == y[unl].astype(str)).mean() > 0.7
