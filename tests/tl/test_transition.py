"""State transitions end to end: sp.tl.fit_transition, sp.tl.transition (flow training, gating, save/load), sp.pl.transition."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import spatia as sp  # noqa: E402
from spatia.metrics import feature_distances, morphology_features  # noqa: E402
from spatia.module import FlowConfig  # noqa: E402


def _add_tstate(table) -> None:
    """Cells of the simulator's transitioning type: 'control' (control side) or 'transitioned' (disease)."""
    o = table.obs
    tr = table.uns["simulation"]["transition_type"]
    lab = pd.Series(np.nan, index=o.index, dtype=object)
    is_t = (o["cell_type"] == tr).to_numpy()
    lab[is_t & (o["condition"] == "control").to_numpy()] = "control"
    lab[is_t & (o["state"] == "transitioned").to_numpy()] = "transitioned"
    o["tstate"] = lab.to_numpy()


@pytest.fixture(scope="module")
def transitioned(fitted):
    sd, model = fitted
    sd = copy.deepcopy(sd)
    model = copy.deepcopy(model)
    _add_tstate(sd["table"])
    sp.tl.fit_transition(sd, model, groupby="tstate", transitions=[("control", "transitioned")],
                         config=FlowConfig.tiny(), max_epochs=60, random_state=0)
    sp.tl.transition(sd, model, groupby="tstate", source="control", target="transitioned", steps=20)
    return sd, model


def test_transition_moves_morphology_toward_targets(transitioned):
    sd, model = transitioned
    table = sd["table"]
    ttab = sd["spatia_transition_table"]
    src = table.obs["tstate"] == "control"
    assert ttab.n_obs == src.sum() and list(ttab.obs["source_cell"]) == list(table.obs_names[src])
    assert set(ttab.obs["matched_target"]) <= set(table.obs_names[table.obs["tstate"] == "transitioned"])
    assert (ttab.obs["transition"] == "control->transitioned").all() and (ttab.obs["steps"] == 20).all()
    from spatia.pl._transition import _predicted

    pred = _predicted(sd, "spatia_transition", ttab)
    crops = sp.pp.extract_crops(sd, image_key="morphology", size=model.flow.size,
                                crop_um=model.crop_params.get("crop_um"), channels=model.channels)
    rows = lambda m: np.flatnonzero(m.to_numpy())  # noqa: E731
    f_src = morphology_features(crops.get(rows(src)))
    f_tgt = morphology_features(crops.get(rows(table.obs["tstate"] == "transitioned")))
    f_pred = morphology_features(pred)
    d_src = feature_distances(f_tgt, f_src)["wasserstein_std"]
    d_pred = feature_distances(f_tgt, f_pred)["wasserstein_std"]
    # measured (60 epochs): area 1.00 vs 1.16, mean intensity 0.56 vs 2.79, mean of 10 features 0.78 vs 1.73
    assert d_pred["area"] < d_src["area"], (d_pred["area"], d_src["area"])
    assert d_pred["mean_intensity"] < 0.5 * d_src["mean_intensity"], (d_pred["mean_intensity"], d_src["mean_intensity"])
    assert d_pred["mean"] < 0.75 * d_src["mean"], (d_pred["mean"], d_src["mean"])
    info = table.uns["spatia"]["transitions"]["control->transitioned"]
    assert info["delta_m"]["area"] > 0 and info["delta_m"]["mean_intensity"] > 0  # nuclei grow and brighten
    # Δg: response genes up, suppressed markers down (the simulator's ground truth)
    sim = table.uns["simulation"]
    dg = pd.Series(info["delta_g"])
    others = dg.drop(sim["response_genes"] + sim["suppressed_markers"])
    assert dg[sim["response_genes"]].mean() > others.mean() + 0.3
    assert dg[sim["suppressed_markers"]].mean() < others.mean() - 0.1


def test_transition_gate_keeps_unshifted_cells(transitioned):
    sd, model = transitioned
    table = sd["table"]
    ttab = sd["spatia_transition_table"]
    # control -> transitioned cells of one type: every neighbourhood's morphology shifts, every cell moves
    assert ttab.obs["transformed"].all() and (ttab.obs["shift_pvalue"] < 0.01).all()
    params = ttab.uns["spatia"]["transition"]
    assert params["gate"] == 0.01 and params["n_transformed"] == ttab.n_obs
    kw = dict(groupby="tstate", source="control", target="transitioned", steps=2, inplace=False)
    # a gate no p-value passes: the crops come back as they were, and nothing is sampled
    kept = sp.tl.transition(sd, model, gate=1e-300, **kw)
    crops = sp.pp.extract_crops(sd, image_key="morphology", size=model.flow.size,
                                crop_um=model.crop_params.get("crop_um"), channels=model.channels)
    rows = np.flatnonzero((table.obs["tstate"] == "control").to_numpy())
    img, tab = "images/spatia_transition", "tables/spatia_transition_table"
    np.testing.assert_array_equal(kept[img], crops.get(rows).astype(np.float32) / 255.0)
    assert not kept[tab]["transformed"].any()
    moved = sp.tl.transition(sd, model, gate=None, **kw)
    assert moved[tab]["transformed"].all() and np.abs(moved[img] - kept[img]).mean() > 0.01
    np.testing.assert_allclose(moved[tab]["shift_pvalue"], kept[tab]["shift_pvalue"])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="significance level"):
            sp.tl.transition(sd, model, gate=bad, **kw)
    with pytest.raises(ValueError, match="gate_neighbors"):
        sp.tl.transition(sd, model, gate_neighbors=1, **kw)


def test_transition_save_load_keeps_flow(transitioned, tmp_path):
    sd, model = transitioned
    model.save(tmp_path / "m")
    loaded = sp.SpatiaModel.load(tmp_path / "m")
    assert loaded.flow is not None and loaded.flow_info["transitions"] == model.flow_info["transitions"]
    assert loaded.flow_info["pairing"]["marginals"] == "composition"
    for (k, a), (_, b) in zip(model.flow.state_dict().items(), loaded.flow.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    kw = dict(groupby="tstate", source="control", target="transitioned", cells=[0, 1, 2], steps=3, inplace=False)
    src_rows = np.flatnonzero((sd["table"].obs["tstate"] == "control").to_numpy())[:3]
    kw["cells"] = src_rows
    a = sp.tl.transition(sd, model, **kw)
    b = sp.tl.transition(sd, loaded, **kw)
    np.testing.assert_allclose(a["images/spatia_transition"], b["images/spatia_transition"], atol=1e-6)
    assert list(a["tables/spatia_transition_table"]["source_cell"]) == list(sd["table"].obs_names[src_rows])
    # a model saved without a flow loads without one
    plain = copy.deepcopy(model)
    plain.flow, plain.flow_info = None, {}
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "flow.json").exists() and sp.SpatiaModel.load(tmp_path / "plain").flow is None
    # transition re-pairs with the parameters the flow was trained with: they must all be there
    broken = copy.deepcopy(loaded)
    del broken.flow_info["pairing"]["marginals"]
    with pytest.raises(ValueError, match=r"pairing parameters \['marginals'\]"):
        sp.tl.transition(sd, broken, **kw)


def test_transition_bad_input(transitioned, fitted):
    sd, model = transitioned
    kw = dict(groupby="tstate", source="control", target="transitioned")
    with pytest.raises(ValueError, match="no state-transition flow"):
        sp.tl.transition(sd, fitted[1], **kw)
    with pytest.raises(KeyError, match="known transitions"):
        sp.tl.transition(sd, model, groupby="tstate", source="transitioned", target="control")
    with pytest.raises(KeyError, match="known transitions"):
        sp.tl.transition(sd, model, groupby="condition", source="control", target="disease")
    with pytest.raises(KeyError, match="already exist"):
        sp.tl.transition(sd, model, **kw, steps=1)
    with pytest.raises(ValueError, match="not in the source group"):
        sp.tl.transition(sd, model, **kw, cells=np.flatnonzero((sd["table"].obs["tstate"] != "control").to_numpy()),
                         steps=1, inplace=False)
    with pytest.raises(ValueError, match="min_cells"):
        sp.tl.fit_transition(sd, copy.deepcopy(fitted[1]), groupby="tstate", source="control", target="transitioned",
                             min_cells=500, max_epochs=1)
    with pytest.raises(KeyError, match="available groups"):
        sp.tl.fit_transition(sd, copy.deepcopy(fitted[1]), groupby="tstate", source="control", target="tumour",
                             max_epochs=1)


def test_several_transitions_in_one_flow(fitted):
    sd, model = fitted
    sd, model = copy.deepcopy(sd), copy.deepcopy(model)
    _add_tstate(sd["table"])
    sp.tl.fit_transition(sd, model, groupby="tstate", transitions=[("control", "transitioned"),
                                                                   ("transitioned", "control")],
                         config=FlowConfig.tiny(), max_epochs=2)
    # the morphology loss is off during the warm-up (first half of the epochs), on afterwards
    hist = model.flow_info["history"]
    assert "train_sw" not in hist[0] and "train_sw" in hist[1] and not hasattr(model.flow, "sw_scale")
    assert [t["name"] for t in model.flow_info["transitions"]] == ["control->transitioned", "transitioned->control"]
    assert model.flow.delta_g.shape == (2, len(model.genes))
    # the two directions have opposite shifts
    torch.testing.assert_close(model.flow.delta_m[0], -model.flow.delta_m[1], atol=0.5, rtol=0.5)
    for s, t in (("control", "transitioned"), ("transitioned", "control")):
        sp.tl.transition(sd, model, groupby="tstate", source=s, target=t, steps=2, key_added=f"tr_{s}")
        assert sd[f"tr_{s}_table"].obs["transition"].iloc[0] == f"{s}->{t}"


def test_pl_transition(transitioned, tmp_path):
    sd, _ = transitioned
    fig = sp.pl.transition(sd, n=4, save=tmp_path / "t.png")
    assert isinstance(fig, plt.Figure) and (tmp_path / "t.png").stat().st_size > 1000
    img = fig.axes[0].images[0].get_array()
    s = sd["spatia_transition_table"].uns["spatia"]["transition"]["crop_size"]
    assert img.shape == (4 * (s + 2) - 2, 3 * (s + 2) - 2)
    plt.close(fig)
    fig, ax = plt.subplots()
    assert sp.pl.transition(sd, n=2, target="matched", ax=ax) is fig
    plt.close(fig)
    with pytest.raises(KeyError, match="run `sp.tl.transition`"):
        sp.pl.transition(sd, key="nothing")


def test_fit_transition_trains_on_the_cells_that_change(fitted, caplog):
    """On the simulator's mixed-type condition shift, the flow trains on the pairs the gate would transform."""
    sd, model = fitted
    crops = sp.pp.extract_crops(sd, image_key="morphology", size=model.config.image.size,
                                crop_um=model.crop_params.get("crop_um"), channels=model.channels)
    kw = dict(groupby="condition", source="control", target="disease", config=FlowConfig.tiny(), max_epochs=1,
              random_state=0, inplace=False, crops=crops)
    res = sp.tl.pair_states(sd, groupby="condition", source="control", target="disease", random_state=0,
                            inplace=False, crops=crops)["pairing"]
    shifted = res.shift_test()["shift_pvalue"].to_numpy() < 0.01
    assert 2 <= shifted.sum() < 0.6 * len(shifted)  # the transitioning type changes, the others do not
    m = copy.deepcopy(model)
    sp.tl.fit_transition(sd, m, **kw)
    info = m.flow_info["transitions"][0]
    assert info["n_pairs"] == len(shifted) and info["n_train_pairs"] == shifted.sum()
    n_batches = len(range(0, int(shifted.sum()), 32)) - int(shifted.sum() % 32 == 1 and shifted.sum() > 32)
    assert m.flow_info["epochs"] == 1 and m.flow_info["steps"] == n_batches
    assert m.flow_info["train_gate"] == {"gate": 0.01, "gate_neighbors": 60}
    # confidence weights are relative to the pairs trained on
    assert float(m.flow.mean_confidence) == pytest.approx(res.confidence[shifted].mean(), rel=1e-5)
    # the default length counts optimiser steps: at least min_steps, at least 10 epochs
    m = copy.deepcopy(model)
    sp.tl.fit_transition(sd, m, **{**kw, "max_epochs": None, "batch_size": 512,
                                   "config": FlowConfig.tiny().replace(train={"max_epochs": None, "min_steps": 12})})
    assert m.flow_info["epochs"] == 12 and m.flow_info["steps"] == 12
    m = copy.deepcopy(model)
    sp.tl.fit_transition(sd, m, gate=None, **kw)
    assert m.flow_info["transitions"][0]["n_train_pairs"] == len(shifted)
    m = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="spatia"):
        sp.tl.fit_transition(sd, m, gate=1e-300, **kw)  # no cell passes: all pairs, with a warning
    assert m.flow_info["transitions"][0]["n_train_pairs"] == len(shifted)
    assert "trains on all" in caplog.text
    for bad in (0.0, 2.0):
        with pytest.raises(ValueError, match="significance level"):
            sp.tl.fit_transition(sd, copy.deepcopy(model), gate=bad, **kw)
    with pytest.raises(ValueError, match="gate_neighbors"):
        sp.tl.fit_transition(sd, copy.deepcopy(model), gate_neighbors=1, **kw)


def test_fit_transition_and_transition_pair_on_the_layer(fitted):
    """With ``layer=``, the pairing inside fit_transition / transition reads that layer, as pair_states does
    (it read ``X`` before): here ``X`` holds other cells' counts, so reading it would give other pairs."""
    sd, model = fitted
    sd = copy.deepcopy(sd)
    _add_tstate(sd["table"])
    t = sd["table"]
    t.layers["counts"] = t.X.copy()
    t.X = t.X[np.random.default_rng(0).permutation(t.n_obs)]
    crops = sp.pp.extract_crops(sd, image_key="morphology", size=model.config.image.size,
                                crop_um=model.crop_params.get("crop_um"), channels=model.channels)
    kw = dict(groupby="tstate", source="control", target="transitioned", layer="counts", crops=crops, inplace=False)
    ref = sp.tl.pair_states(sd, **kw)
    on_x = sp.tl.pair_states(sd, **{**kw, "layer": None})["pairing"]
    assert not np.array_equal(on_x.match, ref["pairing"].match)  # the test can tell the two apart
    name = "uns/spatia/transitions/control->transitioned"
    out = sp.tl.fit_transition(sd, copy.deepcopy(model), transitions=[("control", "transitioned")],
                               config=FlowConfig.tiny(), max_epochs=1, random_state=0,
                               **{k: v for k, v in kw.items() if k not in ("source", "target")})
    assert out[name]["delta_g"] == pytest.approx(ref[name]["delta_g"])
    assert out["params"]["layer"] == "counts"
    moved = sp.tl.transition(sd, out["model"], steps=1, gate=None, **kw)
    table = moved["tables/spatia_transition_table"]
    np.testing.assert_array_equal(table["matched_target"].to_numpy(), ref["pairing"].matched_obs.astype(str))
