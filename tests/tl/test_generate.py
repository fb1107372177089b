"""Generation: the decoder learns expression → morphology (against baselines), counterfactuals, I/O, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import spatia as sp
from spatia.module import DecoderConfig

N_EVAL = 200
STEPS = 10
GUIDANCE = 2.0
# small UNet and batches: at this budget the number of optimiser steps, not of images, is what the decoder
# learns from (~530 steps of batch 8 on the 700-cell slide)
CONFIG = DecoderConfig(block_out_channels=(16, 32, 32)).replace(train={"batch_size": 8, "lr": 2e-3})
EPOCHS = 6
# Margins, from this fixture trained with random_state 0, 1, 2 (ratios own / baseline): all 10 features
# 0.74-0.80 vs shuffled and 0.80-0.84 vs unconditional; area 0.50-0.70 vs shuffled and 0.67-0.69 vs
# unconditional; area correlation with the real cells 0.57-0.60; counterfactual area x1.8-2.2 with every
# cell's area up (see also benchmarks/results/generate_quality.md).
MARGIN_ALL_SHUFFLED = 0.9
MARGIN_ALL_UNCOND = 0.95
MARGIN_AREA = 0.8
MIN_AREA_CORR = 0.4
MIN_CF_GAIN = 1.3
MIN_CF_UP = 0.85


def _copy_model(model, path):
    model.save(path, overwrite=True)
    return sp.SpatiaModel.load(path)


@pytest.fixture(scope="module")
def trained(fitted, tmp_path_factory):
    """(sdata, conditioned model, unconditional model, same model with an untrained decoder, eval cells).

    The unconditional model is the same decoder trained identically with ``cond_dropout=1.0``.
    """
    from spatia.module import DiffusionDecoder

    sd, base = fitted
    cond = _copy_model(base, tmp_path_factory.mktemp("m") / "cond")
    sp.tl.fit_decoder(sd, cond, image_key="morphology", config=CONFIG, max_epochs=EPOCHS, random_state=0)
    uncond = _copy_model(base, tmp_path_factory.mktemp("m") / "uncond")
    sp.tl.fit_decoder(sd, uncond, image_key="morphology", config=CONFIG.replace(train={"cond_dropout": 1.0}), max_epochs=EPOCHS,
                      random_state=0)
    untrained = _copy_model(cond, tmp_path_factory.mktemp("m") / "untrained")
    torch.manual_seed(0)
    untrained.decoder = DiffusionDecoder(cond.decoder.config, cond.decoder.channels, base.config.width,
                                         len(base.genes)).eval()
    cells = np.sort(np.random.default_rng(0).choice(sd["table"].n_obs, N_EVAL, replace=False))
    return sd, cond, uncond, untrained, cells


@pytest.fixture(scope="module")
def real(trained):
    sd, cond, _, _, cells = trained
    store = sp.pp.extract_crops(sd, image_key="morphology", size=cond.decoder.config.size,
                                crop_um=cond.crop_params["crop_um"], channels=cond.channels)
    return sp.metrics.morphology_features(store.get(cells))


def _per_type_distance(real_f, gen_f, types, feature=None):
    """Mean over cell types of the (feature-averaged, or one feature's) Wasserstein distance in real-std units."""
    d = sp.metrics.feature_distances_by_group(real_f, gen_f, types)
    return float(d.loc["mean" if feature is None else feature].mean())


def _features(model, counts, **kw):
    kw.setdefault("guidance_scale", GUIDANCE)
    return sp.metrics.morphology_features(model.sample_images(counts, num_inference_steps=STEPS, **kw))


def test_decoder_follows_its_condition(trained, real):
    """Per-type morphology of crops generated from a cell's own expression is closer to the real cells of that
    type than crops generated from another cell's expression or by the unconditional model."""
    sd, cond, uncond, untrained, cells = trained
    table = sd["table"]
    counts = sp.pp.get_counts(table)[cells]
    types = table.obs["cell_type"].astype(str).to_numpy()[cells]
    perm = np.random.default_rng(1).permutation(len(cells))
    own = _features(cond, counts, random_state=1)
    shuffled = _features(cond, counts[perm], random_state=1)
    unconditional = _features(uncond, counts, random_state=1, unconditional=True)
    before = _features(untrained, counts, random_state=1)
    d = {k: _per_type_distance(real, f, types) for k, f in
         [("own", own), ("shuffled", shuffled), ("uncond", unconditional), ("before", before)]}
    a = {k: _per_type_distance(real, f, types, "area") for k, f in
         [("own", own), ("shuffled", shuffled), ("uncond", unconditional)]}
    # 10 features, Wasserstein in units of the real std, mean over cell types
    assert d["own"] < 0.5 * d["before"], d
    assert d["own"] < MARGIN_ALL_SHUFFLED * d["shuffled"], d
    assert d["own"] < MARGIN_ALL_UNCOND * d["uncond"], d
    assert a["own"] < MARGIN_AREA * a["shuffled"], a
    assert a["own"] < MARGIN_AREA * a["uncond"], a
    assert (own["area"] > 0).mean() > 0.9  # a nucleus is found in the generated crops
    # and cell by cell: generated nuclear area follows the real one
    r = np.corrcoef(np.nan_to_num(own["area"].to_numpy()), real["area"].to_numpy())[0, 1]
    assert r > MIN_AREA_CORR, r


def test_counterfactual_size_programme_raises_nuclear_area(trained):
    sd, cond, _, _, cells = trained
    table = sd["table"]
    size_genes = table.var_names[(table.var["role"] == "size_program").to_numpy()].tolist()
    counts = sp.pp.get_counts(table)
    high = float(np.percentile(counts[:, table.var_names.get_indexer(size_genes)].toarray(), 99))
    sel = table.obs_names[cells[:120]]
    out_up = sp.tl.generate(sd, cond, cells=sel, edits=dict.fromkeys(size_genes, high), num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, random_state=2, inplace=False)
    down = sp.tl.generate(sd, cond, cells=sel, edits=dict.fromkeys(size_genes, 0), num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, random_state=2, inplace=False)["images/spatia_generated"]
    up, obs_up = out_up["images/spatia_generated"], out_up["tables/spatia_generated_table"]
    a_up = sp.metrics.morphology_features(up)["area"].to_numpy()
    a_down = sp.metrics.morphology_features(down)["area"].to_numpy()
    assert (obs_up["mode"] == "counterfactual").all()
    # same cells, same noise: only the size-programme genes differ
    assert np.nanmean(a_up) > MIN_CF_GAIN * np.nanmean(a_down), (np.nanmean(a_up), np.nanmean(a_down))
    assert np.mean(a_up > a_down) > MIN_CF_UP, np.mean(a_up > a_down)


def test_generate_writes_linked_elements(trained):
    sd, cond, _, _, _ = trained
    sel = sd["table"].obs_names[:5]
    sp.tl.generate(sd, cond, cells=sel, n_samples=2, num_inference_steps=3, key_added="gen_test")
    t = sd.tables["gen_test_table"]
    assert "gen_test" in sd.images and "gen_test_labels" in sd.labels
    assert t.n_obs == 10
    assert t.obs["source"].tolist() == list(np.repeat(sel, 2))
    assert t.obs["sample"].tolist() == [0, 1] * 5
    assert set(t.obs["mode"]) == {"reconstruction"}
    assert t.obs["cell_type"].astype(str).tolist() == list(np.repeat(sd["table"].obs["cell_type"].astype(str)[:5], 2))
    assert t.uns["spatia"]["generate"]["num_inference_steps"] == 3
    with pytest.raises(KeyError, match="overwrite=True"):  # a second run does not replace the first silently
        sp.tl.generate(sd, cond, cells=sel[:1], num_inference_steps=1, key_added="gen_test")
    assert sd.tables["gen_test_table"].n_obs == 10
    assert list(sd.images["gen_test"].coords["c"].values) == cond.channels
    fig = sp.pl.generated(sd, key_added="gen_test", n_per_group=2)
    assert len(fig.axes) == 1
    # expression mode from an AnnData with the genes in another order and one extra gene
    ad = sd["table"][:4].copy()
    ad = ad[:, ad.var_names[::-1]].copy()
    out = sp.tl.generate(sd, cond, expression=ad, num_inference_steps=3, inplace=False)
    crops, obs = out["images/spatia_generated"], out["tables/spatia_generated_table"]
    assert crops.shape == (4, len(cond.channels), cond.decoder.config.size, cond.decoder.config.size)
    assert crops.dtype == np.uint8 and set(obs["mode"]) == {"expression"}
    ref = sp.tl.generate(sd, cond, cells=sd["table"].obs_names[:4], num_inference_steps=3,
                         inplace=False)["images/spatia_generated"]
    np.testing.assert_array_equal(crops, ref)  # gene order does not matter


def test_decoder_survives_save_and_load(trained, tmp_path):
    sd, cond, _, _, _ = trained
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
    sd, cond, _, _, _ = trained
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


def test_decoder_config_round_trip():
    """A saved decoder configuration has every field: none is filled in from defaults."""
    cfg = DecoderConfig(size=16)
    assert DecoderConfig.from_dict(cfg.to_dict(), complete=True) == cfg
    d = cfg.to_dict()
    d["train"].pop("ema_decay")
    with pytest.raises(KeyError, match=r"'train' section has no field\(s\) \['ema_decay'\]"):
        DecoderConfig.from_dict(d, complete=True)
    with pytest.raises(ValueError, match=r"Unknown configuration fields: \['lr'\]"):  # a flat (old) save
        DecoderConfig.from_dict({**cfg.to_dict(), "lr": 1e-3})
    with pytest.raises(ValueError, match=r"Unknown configuration fields: \['enabled'\]"):
        DecoderConfig.from_dict({**cfg.to_dict(), "enabled": True})
    with pytest.raises(ValueError, match="ema_decay"):
        DecoderConfig().replace(train={"ema_decay": 1.0})
