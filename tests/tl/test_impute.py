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
