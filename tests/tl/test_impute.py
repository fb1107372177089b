import copy

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

import spatia as sp


@pytest.fixture(scope="module")
def with_reference():
    """(sdata, reference, model): a panel slide, a deeper whole-transcriptome reference, a tiny fit."""
    sd, ref = sp.datasets.simulate_with_reference(1000, random_state=3)
    model = sp.tl.fit(sd, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=15, random_state=0)
    return sd, ref, model


def test_simulate_with_reference_splits_panel_and_cells(with_reference):
    sd, ref, _ = with_reference
    t = sd["table"]
    held = t.uns["simulation"]["held_out_genes"]
    assert not set(held) & set(t.var_names)
    assert set(held) | set(t.var_names) == set(ref.var_names)
    assert not set(ref.obs_names) & set(t.obs_names)
    assert t.uns["simulation"]["held_out_counts"].shape == (t.n_obs, len(held))
    assert np.asarray(ref.X.sum(1)).mean() > 3 * np.asarray(t.X.sum(1)).mean()


def test_simulate_with_reference_capture_efficiency():
    """capture_sd: each panel gene's share on the slide, relative to the reference, follows its efficiency; the
    mean depth is kept; the held-out genes are untouched; a negative value is refused."""
    kw = dict(n_cells=1200, n_genes=40, mean_depth=60.0, random_state=4)
    sd0, ref = sp.datasets.simulate_with_reference(**kw)
    sd1, _ = sp.datasets.simulate_with_reference(capture_sd=0.6, **kw)
    t0, t1 = sd0["table"], sd1["table"]
    eff = t1.uns["simulation"]["capture_efficiency"]
    assert eff.shape == (t1.n_vars,) and eff.std() > 0.2
    assert np.all(t0.uns["simulation"]["capture_efficiency"] == 1)
    share0 = np.asarray(t0.X.sum(0)).ravel() / t0.X.sum()
    share1 = np.asarray(t1.X.sum(0)).ravel() / t1.X.sum()
    ok = share0 > 0.005
    assert pearsonr(np.log(share1[ok] / share0[ok]), np.log(eff[ok])).statistic > 0.8
    assert abs(t1.X.sum() / t0.X.sum() - 1) < 0.1
    held0, held1 = (t.uns["simulation"]["held_out_counts"].sum(0) for t in (t0, t1))
    assert abs(held1.sum() / held0.sum() - 1) < 0.05  # captured as before
    with pytest.raises(ValueError, match="capture_sd"):
        sp.datasets.simulate_with_reference(capture_sd=-1, **kw)


def test_impute_panel_layer_and_validation_beat_mean(with_reference):
    sd, _, model = with_reference
    sd = copy.deepcopy(sd)
    t = sd["table"]
    x_before = t.X.copy()
    assert sp.tl.impute(sd, model, validate=True) is None
    scores = pd.DataFrame(t.uns["spatia"]["impute"]["validation"]).set_index("gene")
    layer = t.layers["spatia_imputed"]
    assert layer.shape == t.shape and np.isfinite(layer).all()
    # expected counts at the cell's library size
    np.testing.assert_allclose(layer.sum(1), np.asarray(t.X.sum(1)).ravel(), rtol=1e-3)
    assert (t.X != x_before).nnz == 0
    # held-out genes: better than predicting each gene's mean for most genes, and positively correlated
    assert (scores["rmse"] < scores["rmse_mean_baseline"]).mean() > 0.6
    assert scores["pearson"].median() > 0.1
    assert t.uns["spatia"]["impute"]["keys"] == ["layers/spatia_imputed"]


def test_impute_from_reference_recovers_unmeasured_genes(with_reference):
    sd, ref, model = with_reference
    sd = copy.deepcopy(sd)
    t = sd["table"]
    sp.tl.impute(sd, model, reference=ref)
    new = sd.tables["spatia_imputed"]
    held = t.uns["simulation"]["held_out_genes"]
    assert list(new.var_names) == held and new.n_obs == t.n_obs
    assert list(new.obs_names) == list(t.obs_names)
    assert new.uns["spatialdata_attrs"]["region"] == t.uns["spatialdata_attrs"]["region"]
    hc = t.uns["simulation"]["held_out_counts"]
    truth = hc / (np.asarray(t.X.sum(1)).ravel() + hc.sum(1))[:, None]
    r = [pearsonr(new.X[:, j], truth[:, j]).statistic for j in range(len(held)) if truth[:, j].std() > 0]
    # a reference cell drawn at random (or the mean profile) gives 0 on average
    assert np.median(r) > 0.15, np.median(r)
    # validation on shared genes held out of the mapping
    scores = sp.tl.validate_imputation(sd, model, reference=ref, n_genes=12)
    assert len(scores) == 12 and scores["pearson"].median() > 0.05
    # an existing table is not overwritten silently
    with pytest.raises(KeyError, match="overwrite=True"):
        sp.tl.impute(sd, model, reference=ref)


def _types_and_targets(seed: int, capture: np.ndarray | None = None):
    """A deep reference and a shallow (10 counts) query of 10 cell types over 30 shared genes, plus 10 genes that
    only the reference measures: ``(ref_counts, query_counts, query_types, type_profiles, type_target_means)``.
    ``capture``: the query's efficiency for each shared gene relative to the reference (a platform effect)."""
    rng = np.random.default_rng(seed)
    n_types, n_genes, n_targets = 10, 30, 10
    profile = rng.gamma(1.0, size=(n_types, n_genes))
    profile /= profile.sum(1, keepdims=True)
    target = rng.gamma(1.0, size=(n_types, n_targets)) * 5

    def cells(n, depth, prof):
        y = rng.integers(n_types, size=n)
        return y, np.stack([rng.multinomial(depth, prof[t]) for t in y]).astype(np.float32)

    captured = profile if capture is None else profile * capture / (profile * capture).sum(1, keepdims=True)
    y_ref, ref = cells(600, 2000, profile)
    y_query, query = cells(600, 10, captured)
    ref = np.hstack([ref, rng.poisson(target[y_ref] * 20).astype(np.float32)])
    return ref, query, y_query, profile, target


def _knn_in_pca(query, ref_shared, ref_target):
    """The usual label-free mapping: kNN (cosine, 50 cells) in a PCA of log-normalised, per-dataset z-scored genes."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    def z(c):
        ln = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
        return (ln - ln.mean(0)) / np.where(ln.std(0) > 0, ln.std(0), 1)

    pca = PCA(20, random_state=0).fit(z(ref_shared))
    dist, idx = NearestNeighbors(n_neighbors=50, metric="cosine").fit(pca.transform(z(ref_shared))).kneighbors(
        pca.transform(z(query)))
    w = np.exp(-dist / np.median(dist))
    return np.einsum("ik,ikg->ig", w / w.sum(1, keepdims=True), ref_target[idx])


def test_reference_mapping_is_depth_aware_and_uses_the_model():
    """Shallow cells: the likelihood of their counts under each reference neighbourhood finds the right genes
    better than kNN in a PCA (the usual mapping), and the model's expected profile, given as ``rho``, helps."""
    from spatia.tl._reference_mapping import _reference_impute

    genes, targets = [f"g{i}" for i in range(30)], [f"t{i}" for i in range(10)]
    ours, knn, with_rho = [], [], []
    for seed in range(3):
        ref, query, y, profile, target = _types_and_targets(seed)
        truth = target[y]

        def score(pred, truth=truth):
            return np.mean([pearsonr(pred[:, j], truth[:, j]).statistic for j in range(truth.shape[1])])

        ref_target = ref[:, 30:] / ref[:, :30].sum(1, keepdims=True) * 1e4
        ours.append(score(_reference_impute(query, None, genes, ref, genes + targets, genes, targets, 50, 30, 0)))
        knn.append(score(_knn_in_pca(query, ref[:, :30], ref_target)))
        # a model that knows each cell's expected profile
        rho = profile[y] * np.random.default_rng(seed).lognormal(0, 0.2, size=query.shape)
        with_rho.append(score(_reference_impute(query, rho, genes, ref, genes + targets, genes, targets, 50, 30, 0)))
    assert np.mean(ours) > np.mean(knn) + 0.02, (ours, knn)
    assert np.mean(with_rho) > np.mean(ours) + 0.02, (with_rho, ours)


def test_reference_mapping_corrects_capture_efficiency(monkeypatch):
    """Genes captured at different efficiencies on the slide than in the reference: the mapping estimates the
    efficiencies and maps better with them than without."""
    from spatia.tl import _reference_mapping

    genes, targets = [f"g{i}" for i in range(30)], [f"t{i}" for i in range(10)]
    capture = np.exp(np.random.default_rng(9).normal(0, 1.0, size=30))
    ref, query, y, _, target = _types_and_targets(1, capture)

    def score(pred):
        return np.mean([pearsonr(pred[:, j], target[y][:, j]).statistic for j in range(len(targets))])

    mapping = _reference_mapping._reference_map(query, None, genes, ref, genes + targets, genes, targets, 50, 30, 0)
    assert pearsonr(np.log(mapping.efficiency), np.log(capture)).statistic > 0.8
    corrected = score(mapping.all())
    monkeypatch.setattr(_reference_mapping._ReferenceMap, "_efficiency", lambda self: np.ones(len(self.genes)))
    plain = score(_reference_mapping._reference_impute(query, None, genes, ref, genes + targets, genes, targets, 50,
                                                       30, 0))
    assert corrected > plain + 0.02, (corrected, plain)


def test_reference_mapping_caps_genes_and_neighbourhoods(monkeypatch):
    """A wide panel scores its most variable genes, and a large reference a sample of its cells and of their
    neighbourhoods: the result stays nearly as good as the uncapped one; rarely detected targets stay sparse."""
    import scipy.sparse as sps

    from spatia.tl import _reference_mapping

    genes, targets = [f"g{i}" for i in range(30)], [f"t{i}" for i in range(10)]
    ref, query, y, _, target = _types_and_targets(5)
    full = _reference_mapping._reference_impute(query, None, genes, ref, genes + targets, genes, targets, 50, 30, 0)
    monkeypatch.setattr(_reference_mapping, "_MAX_GENES", 20)
    monkeypatch.setattr(_reference_mapping, "_MAX_COMPONENTS", 300)
    monkeypatch.setattr(_reference_mapping, "_MAX_REFERENCE_CELLS", 450)
    mapping = _reference_mapping._reference_map(sps.csr_matrix(query), None, genes, sps.csr_matrix(ref),
                                                genes + targets, genes, targets, 50, 30, 0)
    assert len(mapping.genes) == 20 and mapping.profile.shape == (300, 20)
    assert isinstance(mapping.target, np.ndarray)  # pooled over neighbourhoods, these targets fill in: dense
    rare = sps.random(600, 50, density=0.002, random_state=0, format="csr", dtype=np.float32)
    rare_genes = [f"r{i}" for i in range(50)]
    sparse_ref = sps.hstack([sps.csr_matrix(ref[:, :30]), rare * 10], format="csr")
    assert sps.issparse(_reference_mapping._reference_map(query, None, genes, sparse_ref, genes + rare_genes, genes,
                                                          rare_genes, 50, 30, 0).target)
    capped = mapping.all()

    def score(pred):
        return np.mean([pearsonr(pred[:, j], target[y][:, j]).statistic for j in range(len(targets))])

    assert score(capped) > score(full) - 0.15 and score(capped) > 0.6, (score(capped), score(full))


def test_impute_from_reference_into_a_store(with_reference, tmp_path, monkeypatch):
    """store=: the reference table is written block by block and read back lazily, equal to the in-memory one;
    an existing store is kept without overwrite=True; a table too large for memory is refused before any write."""
    import dask.array as da
    import spatialdata as sd_

    from spatia.tl import _reference_mapping

    sd, ref, model = with_reference
    dense = sp.tl.impute(sd, model, reference=ref, inplace=False)["tables/spatia_imputed"]
    sd = copy.deepcopy(sd)
    monkeypatch.setattr(_reference_mapping, "_MAP_CHUNK_BYTES", 2**12)  # many blocks on this small slide
    blocks = []
    one_block = _reference_mapping._ReferenceMap.block
    monkeypatch.setattr(_reference_mapping._ReferenceMap, "block",
                        lambda self, a, b: blocks.append(b - a) or one_block(self, a, b))
    store = tmp_path / "imputed.zarr"
    sp.tl.impute(sd, model, reference=ref, store=store)
    new = sd.tables["spatia_imputed"]
    assert isinstance(new.X, da.Array) and new.X.numblocks[0] > 3  # read lazily, block by block
    assert len(blocks) > 3 and max(blocks) < new.n_obs / 3  # computed block by block, each once
    assert sum(blocks) == new.n_obs
    np.testing.assert_allclose(new.X.compute(), dense.X, rtol=1e-5, atol=1e-6)
    assert new.uns["spatia"]["impute"]["store"] == str(store)
    assert sd["table"].uns["spatia"]["impute"]["store"] == str(store)
    # the SpatialData (lazy table included) writes and reads back
    sd.write(tmp_path / "out.zarr")
    back = sd_.read_zarr(tmp_path / "out.zarr")
    np.testing.assert_allclose(np.asarray(back.tables["spatia_imputed"].X), dense.X, rtol=1e-5, atol=1e-6)
    # an existing store: kept as it was, unless overwrite=True
    before = sorted(p.name for p in store.rglob("*"))
    with pytest.raises((FileExistsError, KeyError), match="overwrite=True"):
        sp.tl.impute(sd, model, reference=ref, store=store)
    assert sorted(p.name for p in store.rglob("*")) == before
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("not a table")
    with pytest.raises(FileExistsError, match="not an AnnData"):
        sp.tl.impute(sd, model, reference=ref, store=other, key_added="again", overwrite=True)
    assert (other / "keep.txt").exists()
    with pytest.raises(ValueError, match="pass reference="):
        sp.tl.impute(sd, model, store=tmp_path / "panel.zarr", key_added="panel")
    assert not (tmp_path / "panel.zarr").exists()
    # too large for memory without a store: refused, nothing written
    monkeypatch.setattr("spatia.tl._impute._dense_limit_bytes", lambda: 1000.0)
    with pytest.raises(MemoryError, match="store="):
        sp.tl.impute(sd, model, reference=ref, key_added="big")
    assert "big" not in sd.tables and "big" not in sd["table"].layers


def test_predict_expression_from_images_alone(with_reference):
    sd, _, model = with_reference
    sd = copy.deepcopy(sd)
    t = sd["table"]
    sp.tl.predict_expression(sd, model)
    pred = t.layers["spatia_predicted"]
    x = t.X.toarray()
    cp = x / x.sum(1, keepdims=True)
    size_genes = np.flatnonzero(t.var["role"] == "size_program")
    r = [pearsonr(pred[:, j], cp[:, j]).statistic for j in size_genes]
    assert np.mean(r) > 0.1, r  # the mean-expression baseline has no correlation
    # the image-only prediction does not read the counts: shuffling them changes nothing
    sd2 = copy.deepcopy(sd)
    t2 = sd2["table"]
    t2.X = t2.X[np.random.default_rng(0).permutation(t2.n_obs)]
    p2 = sp.tl.predict_expression(sd2, model, inplace=False)["layers/spatia_predicted"]
    np.testing.assert_allclose(p2, pred, rtol=1e-4, atol=1e-5)


def test_predict_expression_on_a_slide_without_expression(with_reference):
    import anndata as ad
    from spatialdata.models import TableModel

    sd, _, model = with_reference
    sd = copy.deepcopy(sd)
    t = sd["table"]
    bare = ad.AnnData(obs=t.obs[["region", "cell_id"]].copy(), obsm={"spatial": t.obsm["spatial"]})
    bare = TableModel.parse(bare, region="cell_labels", region_key="region", instance_key="cell_id")
    del sd.tables["table"]
    sd.tables["table"] = bare
    sp.tl.predict_expression(sd, model)
    new = sd.tables["spatia_predicted"]
    assert list(new.var_names) == model.genes and new.n_obs == bare.n_obs
    assert np.isfinite(new.X).all()


def test_imputation_bad_input(with_reference):
    sd, ref, model = with_reference
    sd = copy.deepcopy(sd)
    other = ref.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="shares 0 genes"):
        sp.tl.impute(sd, model, reference=other)
    with pytest.raises(KeyError, match="not in the reference"):
        sp.tl.impute(sd, model, reference=ref, genes=["no_such_gene"])
    with pytest.raises(KeyError, match="not measured"):
        sp.tl.validate_imputation(sd, model, genes=["no_such_gene"])
    logged = ref.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="not integer counts"):
        sp.tl.impute(sd, model, reference=logged)
    # model / slide gene mismatch
    t = sd["table"]
    t.var_names = [f"y{i}" for i in range(t.n_vars)]
    with pytest.raises(ValueError, match="None of the model's genes"):
        sp.tl.impute(sd, model)
    assert "spatia_imputed" not in t.layers and "spatia_imputed" not in sd
