"""The image readout of predict_expression: learned on the training cells, better than the decoder path on
cells the model never saw with counts, saved and loaded with the model, refused when damaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import spatialdata as sd_mod
from scipy.stats import pearsonr

import spatia as sp
from spatia.model._readout import EMBEDDING_WEIGHTS, fit_readout


def _halves(sdata):
    t = sdata["table"]
    top = t.obsm["spatial"][:, 1] < np.median(t.obsm["spatial"][:, 1])

    def part(mask):
        return sd_mod.SpatialData(images=dict(sdata.images), labels=dict(sdata.labels),
                                  tables={"table": t[mask].copy()})

    return part(top), part(~top)


@pytest.fixture(scope="module")
def inductive():
    """A model fitted on the top half of a slide; the bottom half's cells were never seen with counts."""
    sdata = sp.datasets.simulate(900, mean_depth=60.0, random_state=5)
    train, test = _halves(sdata)
    model = sp.tl.fit(train, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=10, random_state=0)
    return model, test


def _program_r(pred, table):
    x = table.X.toarray()
    truth = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    genes = np.flatnonzero(table.var["role"].astype(str).str.endswith("_program").to_numpy())
    return float(np.mean([pearsonr(pred[:, j], truth[:, j]).statistic for j in genes if pred[:, j].std() > 0]))


def test_readout_predicts_unseen_cells_better_than_the_decoder(inductive):
    model, test = inductive
    info = model.readout.info
    assert info["n_cells"] == 450 and info["embedding_weight"] in EMBEDDING_WEIGHTS
    out = sp.tl.predict_expression(test, model, inplace=False)
    assert out["params"]["method"] == "readout"
    readout = out["layers/spatia_predicted"]
    decoder = sp.tl.predict_expression(test, model, method="decoder", inplace=False)["layers/spatia_predicted"]
    r_readout, r_decoder = _program_r(readout, test["table"]), _program_r(decoder, test["table"])
    # the morphology programmes' genes (ground truth of the simulator); a mean profile has r = 0
    assert r_readout > 0.2 and r_readout > r_decoder + 0.05, (r_readout, r_decoder)
    assert (readout >= 0).all() and np.isfinite(readout).all()


def test_embedding_weight_is_chosen_on_the_training_cells():
    """An embedding that carries the signal gets weight; one of pure noise cannot make predictions of new
    cells worse than the measured features alone."""
    rng = np.random.default_rng(0)

    def cells(n):
        nucleus, emb_signal = rng.normal(size=(n, 12)), rng.normal(size=(n, 1))
        y = np.hstack([nucleus[:, :1] + emb_signal + 0.3 * rng.normal(size=(n, 1)), rng.normal(size=(n, 2))])
        return nucleus, np.hstack([emb_signal, rng.normal(size=(n, 15))]), rng.normal(size=(n, 16)), y

    nucleus, useful, noise, y = cells(600)
    new_nucleus, new_useful, new_noise, new_y = cells(2000)
    fitted = fit_readout(nucleus, useful, y)
    assert fitted.info["embedding_weight"] > 0
    r_useful = pearsonr(fitted.predict(new_nucleus, new_useful)[:, 0], new_y[:, 0]).statistic
    with_noise = fit_readout(nucleus, noise, y)
    r_noise = pearsonr(with_noise.predict(new_nucleus, new_noise)[:, 0], new_y[:, 0]).statistic
    alone = fit_readout(nucleus, noise[:, :0], y)
    r_alone = pearsonr(alone.predict(new_nucleus, new_noise[:, :0])[:, 0], new_y[:, 0]).statistic
    assert r_useful > r_alone + 0.1, (r_useful, r_alone)
    assert r_noise > r_alone - 0.01, (r_noise, r_alone)


def test_marker_steps_are_read_by_the_mixture_and_trends_keep_the_ridge():
    """A cell type's markers are a step in what the image shows (here: a type that a threshold of one nucleus
    feature tells apart); a programme gene is a trend. The readout beats a ridge on the same features (the peer
    of the benchmark) on the step, at least ties it on the trend, and says how much of each part it used."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)

    def cells(n):
        nucleus = rng.normal(size=(n, 12))
        kind = np.digitize(nucleus[:, 0], [-0.5, 0.7])  # three types, told apart by feature 0 only
        marker = np.log1p(rng.poisson(np.array([0.2, 3.0, 0.5])[kind] * 4))
        trend = np.log1p(rng.poisson(np.exp(0.5 * nucleus[:, 1] + 1.0)))
        noise = np.log1p(rng.poisson(2.0, size=(n, 3)))
        return nucleus, np.column_stack([marker, trend, noise])

    nucleus, y = cells(1500)
    new_nucleus, new_y = cells(3000)
    readout = fit_readout(nucleus, np.zeros((len(nucleus), 0)), y, random_state=0)
    pred = readout.predict(new_nucleus, np.zeros((len(new_nucleus), 0)))
    peer = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(nucleus, y).predict(new_nucleus)
    r = [pearsonr(pred[:, j], new_y[:, j]).statistic for j in (0, 1)]
    r_peer = [pearsonr(peer[:, j], new_y[:, j]).statistic for j in (0, 1)]
    assert r[0] > r_peer[0] + 0.1, (r, r_peer)
    assert r[1] > r_peer[1] - 0.02, (r, r_peer)
    assert readout.info["n_states"] == 10 and 0 < readout.info["mixture_weight"] <= 1


def test_leave_one_out_errors_are_exact():
    """The closed-form leave-one-out errors equal refitting the ridge without each cell."""
    from sklearn.linear_model import Ridge

    from spatia.model._readout import ALPHAS, _loo_errors

    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 5))
    z -= z.mean(0)
    y = z @ rng.normal(size=(5, 3)) + rng.normal(size=(40, 3)) + 2.0
    errors, _ = _loo_errors(z, y - y.mean(0))
    for a in (0, 6, 12):
        brute = [((Ridge(alpha=ALPHAS[a]).fit(np.delete(z, i, 0), np.delete(y, i, 0)).predict(z[i:i + 1]) - y[i]) ** 2
                  ).mean() for i in range(len(z))]
        np.testing.assert_allclose(errors[a], brute, rtol=1e-8, atol=1e-10)


def test_readout_saved_and_loaded(inductive, tmp_path):
    model, test = inductive
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "readout.safetensors").exists()
    loaded = sp.SpatiaModel.load(tmp_path / "m")
    assert loaded.readout.info == model.readout.info
    a = sp.tl.predict_expression(test, model, inplace=False)["layers/spatia_predicted"]
    b = sp.tl.predict_expression(test, loaded, inplace=False)["layers/spatia_predicted"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_without_readout_decodes_and_damaged_readout_refused(inductive, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model, test = inductive
    path = tmp_path / "m"
    model.save(path)
    meta = json.loads((path / "spatia_model.json").read_text())
    # a folder saved before the readout existed: it loads, and predict_expression decodes
    old = tmp_path / "old"
    model.save(old)
    (old / "readout.safetensors").unlink()
    meta_old = dict(meta)
    del meta_old["readout"]
    (old / "spatia_model.json").write_text(json.dumps(meta_old))
    legacy = sp.SpatiaModel.load(old)
    assert legacy.readout is None
    out = sp.tl.predict_expression(test, legacy, inplace=False)
    assert out["params"]["method"] == "decoder"
    with pytest.raises(ValueError, match="no image readout"):
        sp.tl.predict_expression(test, legacy, method="readout", inplace=False)
    # the metadata names a readout whose file is gone
    (path / "readout.safetensors").rename(tmp_path / "kept.safetensors")
    with pytest.raises(FileNotFoundError, match="readout.safetensors is missing"):
        sp.SpatiaModel.load(path)
    # non-finite or mis-shaped arrays
    tensors = load_file(str(tmp_path / "kept.safetensors"))
    tensors["coef"][0, 0] = float("nan")
    save_file(tensors, str(path / "readout.safetensors"))
    with pytest.raises(ValueError, match="readout.safetensors: .*NaN"):
        sp.SpatiaModel.load(path)
    tensors = load_file(str(tmp_path / "kept.safetensors"))
    tensors["intercept"] = torch.zeros(3)
    save_file(tensors, str(path / "readout.safetensors"))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        sp.SpatiaModel.load(path)
    # a readout of an earlier layout (a plain ridge) is refused with what to do
    tensors = {k: v for k, v in load_file(str(tmp_path / "kept.safetensors")).items() if k in ("coef", "intercept")}
    save_file(tensors, str(path / "readout.safetensors"))
    with pytest.raises(ValueError, match="earlier development version.*Refit"):
        sp.SpatiaModel.load(path)
    with pytest.raises(ValueError, match="method must be"):
        sp.tl.predict_expression(test, model, method="ridge", inplace=False)


def test_nuclei_measured_on_finer_crops_when_the_image_allows(monkeypatch):
    """The model's 0.5 µm/px crops undersample a Xenium-like image (0.2125 µm/px): the readout measures nuclei on
    its own 12 µm crops at 0.25 µm/px, fitted and predicted alike; a coarse image keeps the model's crops."""
    from spatia.model._readout import nucleus_crop

    assert nucleus_crop({"pixel_size_um": 0.2125, "size": 32, "crop_um": 16.0}) == {"size": 48, "crop_um": 12.0}
    assert nucleus_crop({"pixel_size_um": 0.108, "size": 32, "crop_um": 16.0}) == {"size": 48, "crop_um": 12.0}
    assert nucleus_crop({"pixel_size_um": 0.5, "size": 32, "crop_um": 16.0}) is None
    assert nucleus_crop({"pixel_size_um": 0.2125, "size": 64, "crop_um": 16.0}) is None  # already fine enough
    assert nucleus_crop({"pixel_size_um": 0.2125, "size": 32, "crop_um": None}) is None  # per-cell windows

    sdata = sp.datasets.simulate(300, pixel_size=0.2125, random_state=2)
    model = sp.tl.fit(sdata, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    assert model.readout.info["nucleus_crop"] == {"size": 48, "crop_um": 12.0}
    pred = sp.tl.predict_expression(sdata, model, inplace=False)["layers/spatia_predicted"]
    assert pred.shape == (300, sdata["table"].n_vars) and np.isfinite(pred).all()
    # a slide whose nucleus crops exceed the in-memory limit: they go to a temporary store, same result
    from spatia.pp import _crops

    monkeypatch.setattr(_crops, "MEMORY_CROPS_BYTES", 0)
    with sp.settings.override(cache_crops=False):
        on_disk = sp.tl.predict_expression(sdata, model, inplace=False)["layers/spatia_predicted"]
    np.testing.assert_allclose(on_disk, pred, atol=1e-5)
    monkeypatch.undo()
    # only the model's crops, not the image they came from: the readout cannot measure its nuclei
    crops = sp.pp.extract_crops(sdata, image_key="morphology", size=model.config.image.size,
                                crop_um=model.config.image.crop_um)
    with pytest.raises(ValueError, match="48-px crops over 12 µm.*method='decoder'"):
        sp.tl.predict_expression(sdata, model, crops=crops, inplace=False)
    assert sp.tl.predict_expression(sdata, model, crops=crops, method="decoder", inplace=False)


def test_channel_intensities_tell_types_that_the_nucleus_does_not():
    """A type seen only through a marker stain in the second channel: the channel summaries read it (the nucleus
    channel alone cannot), within the disc radii given in µm whatever the crop's pixel size."""
    from spatia.tl._nucleus import CHANNEL_RADII_UM, CHANNEL_STATS, channel_intensities

    rng = np.random.default_rng(4)
    n, size = 600, 24
    kind = rng.integers(0, 2, n)
    yy, xx = np.mgrid[:size, :size]
    disc = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) <= 3.0 / 0.5  # the 3 µm disc at 0.5 µm/px
    crops = rng.integers(0, 40, size=(n, 2, size, size)).astype(np.uint8)
    crops[:, 0][:, disc] += 120  # the same nucleus for both types
    crops[kind == 1, 1] = np.where(disc, 200, crops[kind == 1, 1]).astype(np.uint8)  # a stain inside the cell
    feats = channel_intensities(crops, um_per_px=0.5)
    assert feats.shape == (n, len(CHANNEL_STATS) * len(CHANNEL_RADII_UM) * 2)
    mean_ch1_small = feats[:, 1]  # layout: disc by disc, statistic by statistic, channel by channel
    assert mean_ch1_small[kind == 1].min() > mean_ch1_small[kind == 0].max()
    # the same crops at twice the pixel size: the 3 µm disc holds 4× fewer pixels, the stain still fills it
    assert channel_intensities(crops, um_per_px=1.0)[kind == 1, 1].min() > 0.7

    marker = np.log1p(rng.poisson(np.where(kind == 1, 6.0, 0.3)))
    y = np.column_stack([marker, np.log1p(rng.poisson(2.0, size=(n, 2)))])
    nucleus_like = feats[:, 0::2]  # channel 0's columns only
    train, test = np.arange(n) < 400, np.arange(n) >= 400
    r_both = pearsonr(fit_readout(feats[train], np.zeros((400, 0)), y[train]).predict(
        feats[test], np.zeros((200, 0)))[:, 0], y[test, 0]).statistic
    r_dapi = pearsonr(fit_readout(nucleus_like[train], np.zeros((400, 0)), y[train]).predict(
        nucleus_like[test], np.zeros((200, 0)))[:, 0], y[test, 0]).statistic
    assert r_both > 0.6 and r_both > r_dapi + 0.3, (r_both, r_dapi)


def test_channel_block_is_used_only_when_it_earns_its_place():
    """The channel intensities are an optional block: chosen when they carry a type the nucleus does not show,
    dropped (coefficients zero) when they are noise."""
    rng = np.random.default_rng(6)
    n = 800
    nucleus = rng.normal(size=(n, 12))
    kind = rng.integers(0, 2, n)
    stain = np.column_stack([kind + 0.2 * rng.normal(size=n), rng.normal(size=(n, 9))])
    y = np.column_stack([np.log1p(rng.poisson(np.where(kind == 1, 6.0, 0.3))), np.log1p(rng.poisson(
        np.exp(0.4 * nucleus[:, 0] + 1.0))), np.log1p(rng.poisson(2.0, size=(n, 2)))])
    useful = fit_readout(np.hstack([nucleus, stain]), np.zeros((n, 0)), y, optional=10)
    assert useful.info["channel_features"]
    noise = fit_readout(np.hstack([nucleus, rng.normal(size=(n, 10))]), np.zeros((n, 0)), y, optional=10)
    assert not noise.info["channel_features"]
    new = rng.normal(size=(5, 22))
    moved = new.copy()
    moved[:, 12:] += 5.0  # the dropped block cannot move a prediction
    np.testing.assert_allclose(noise.predict(new, np.zeros((5, 0))), noise.predict(moved, np.zeros((5, 0))))
