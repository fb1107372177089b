"""Generation: the decoder learns expression → morphology (against baselines), counterfactuals, I/O, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import spatia as sp
from spatia.module import DecoderConfig

N_EVAL = 160
STEPS = 10
# small batches: at this budget the number of optimiser steps, not of images, is what the decoder learns from
CONFIG = DecoderConfig(block_out_channels=(16, 32, 32), batch_size=8, lr=2e-3)
EPOCHS = 6


def _copy_model(model, path):
    model.save(path, overwrite=True)
    return sp.SpatiaModel.load(path)


@pytest.fixture(scope="module")
def trained(fitted, tmp_path_factory):
    """(sdata, trained model, same model with an untrained decoder, eval cells): trained once for the module."""
    from spatia.module import DiffusionDecoder

    sd, base = fitted
    cond = _copy_model(base, tmp_path_factory.mktemp("m") / "cond")
    sp.tl.fit_decoder(sd, cond, image_key="morphology", config=CONFIG, max_epochs=EPOCHS, random_state=0)
    untrained = _copy_model(cond, tmp_path_factory.mktemp("m") / "untrained")
    torch.manual_seed(0)
    untrained.decoder = DiffusionDecoder(cond.decoder.config, cond.decoder.channels, base.config.width).eval()
    cells = np.sort(np.random.default_rng(0).choice(sd["table"].n_obs, N_EVAL, replace=False))
    return sd, cond, untrained, cells


@pytest.fixture(scope="module")
def real(trained):
    sd, cond, _, cells = trained
    store = sp.pp.extract_crops(sd, image_key="morphology", size=cond.decoder.config.size,
                                crop_um=cond.crop_params["crop_um"], channels=cond.channels)
    return sp.metrics.morphology_features(store.get(cells))


def _per_type_distance(real_f, gen_f, types, feature=None):
    out = []
    for t in np.unique(types):
        m = types == t
        d = sp.metrics.feature_distances(real_f[m], gen_f[m])
        out.append(d.loc["mean" if feature is None else feature, "wasserstein_std"])
    return float(np.mean(out))


def _features(model, counts, **kw):
    kw.setdefault("guidance_scale", 2.0)
    return sp.metrics.morphology_features(model.sample_images(counts, num_inference_steps=STEPS, **kw))


def test_decoder_learns_cell_morphology(trained, real):
    sd, cond, untrained, cells = trained
    table = sd["table"]
    counts = sp.pp.get_counts(table)[cells]
    types = table.obs["cell_type"].astype(str).to_numpy()[cells]
    own = _features(cond, counts, random_state=1)
    before = _features(untrained, counts, random_state=1)
    d_own, d_before = _per_type_distance(real, own, types), _per_type_distance(real, before, types)
    # per-type morphology (10 features, Wasserstein in units of the real std) far closer than before training
    assert d_own < 0.5 * d_before, (d_own, d_before)
    assert _per_type_distance(real, own, types, "area") < 0.5 * _per_type_distance(real, before, types, "area")
    assert (own["area"] > 0).mean() > 0.9  # a nucleus is found in the generated crops


def test_counterfactual_size_programme_raises_nuclear_area(trained):
    sd, cond, _, cells = trained
    table = sd["table"]
    size_genes = table.var_names[(table.var["role"] == "size_program").to_numpy()].tolist()
    counts = sp.pp.get_counts(table)
    high = float(np.percentile(counts[:, table.var_names.get_indexer(size_genes)].toarray(), 99))
    sel = table.obs_names[cells[:120]]
    up, obs_up = sp.tl.generate(sd, cond, cells=sel, edits=dict.fromkeys(size_genes, high), num_inference_steps=STEPS,
                                random_state=2, inplace=False)
    down, _ = sp.tl.generate(sd, cond, cells=sel, edits=dict.fromkeys(size_genes, 0), num_inference_steps=STEPS,
                             random_state=2, inplace=False)
    a_up = sp.metrics.morphology_features(up)["area"].to_numpy()
    a_down = sp.metrics.morphology_features(down)["area"].to_numpy()
    assert (obs_up["mode"] == "counterfactual").all()
    # same cells, same noise: only the size-programme genes differ
    assert np.nanmean(a_up) > np.nanmean(a_down), (np.nanmean(a_up), np.nanmean(a_down))
    assert np.mean(a_up > a_down) > 0.6, np.mean(a_up > a_down)


def test_generate_writes_linked_elements(trained):
    sd, cond, _, _ = trained
    sel = sd["table"].obs_names[:5]
    sp.tl.generate(sd, cond, cells=sel, n_samples=2, num_inference_steps=3, key_added="gen_test")
    t = sd.tables["gen_test_table"]
    assert "gen_test" in sd.images and "gen_test_labels" in sd.labels
    assert t.n_obs == 10
    assert t.obs["source"].tolist() == list(np.repeat(sel, 2))
    assert t.obs["sample"].tolist() == [0, 1] * 5
    assert set(t.obs["mode"]) == {"reconstruction"}
    assert t.obs["cell_type"].astype(str).tolist() == list(np.repeat(sd["table"].obs["cell_type"].astype(str)[:5], 2))
    assert t.uns["spatia"]["num_inference_steps"] == 3
    assert list(sd.images["gen_test"].coords["c"].values) == cond.channels
    fig = sp.pl.generated(sd, key_added="gen_test", n_per_group=2)
    assert len(fig.axes) == 1
    # expression mode from an AnnData with the genes in another order and one extra gene
    ad = sd["table"][:4].copy()
    ad = ad[:, ad.var_names[::-1]].copy()
    crops, obs = sp.tl.generate(sd, cond, expression=ad, num_inference_steps=3, inplace=False)
    assert crops.shape == (4, len(cond.channels), cond.decoder.config.size, cond.decoder.config.size)
    assert crops.dtype == np.uint8 and set(obs["mode"]) == {"expression"}
    ref, _ = sp.tl.generate(sd, cond, cells=sd["table"].obs_names[:4], num_inference_steps=3, inplace=False)
    np.testing.assert_array_equal(crops, ref)  # gene order does not matter


def test_decoder_survives_save_and_load(trained, tmp_path):
    sd, cond, _, _ = trained
    counts = sp.pp.get_counts(sd["table"])[:6]
    a = cond.sample_images(counts, num_inference_steps=4, random_state=5)
    cond.save(tmp_path / "m")
    loaded = sp.SpatiaModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.sample_images(counts, num_inference_steps=4, random_state=5), a)
    assert loaded.decoder.config == cond.decoder.config
    assert loaded.decoder_history == cond.decoder_history
    b = cond.sample_images(counts, num_inference_steps=4, random_state=6)
    assert not np.array_equal(a, b)
    # DPM-Solver sampling and token merging run on the trained decoder
    c = cond.sample_images(counts, num_inference_steps=4, scheduler="dpm", token_merging=0.5)
    assert c.shape == a.shape


def test_generate_bad_input(trained, fitted):
    sd, cond, _, _ = trained
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        sp.tl.generate(sd, cond, cells=sd["table"].obs_names[:2], edits={"NOT_A_GENE": 3, cond.genes[0]: 1})
    with pytest.raises(ValueError, match="raw counts"):
        sp.tl.generate(sd, cond, cells=sd["table"].obs_names[:2], edits={cond.genes[0]: -1})
    from anndata import AnnData

    other = AnnData(np.ones((3, 4), dtype=np.float32), var=pd.DataFrame(index=[f"x{i}" for i in range(4)]))
    with pytest.raises(ValueError, match="None of the model's genes"):
        sp.tl.generate(sd, cond, expression=other)
    with pytest.raises(KeyError, match="not in the table"):
        sp.tl.generate(sd, cond, cells=["no_such_cell"])
    with pytest.raises(TypeError, match="SpatialData"):
        sp.tl.generate(sd["table"], cond, cells=[0])
    with pytest.raises(ValueError, match="fit_decoder"):
        sp.tl.generate(sd, fitted[1], cells=[0])
    with pytest.raises(ValueError, match="token_merging"):
        sp.tl.generate(sd, cond, cells=[0], token_merging=1.0)
    assert "spatia_generated" not in sd.images
