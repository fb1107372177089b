"""State transitions, pairing: OT matches of source and target cells (sp.tl.pair_states), marginals, niches,
and the morphology-shift test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spatia as sp


def test_pairing_recovers_correspondence(sdata):
    table = sdata["table"]
    sp.tl.pair_states(sdata, groupby="condition", source="control", target="disease", crop_size=16)
    obs = table.obs
    src = (obs["condition"] == "control").to_numpy()
    match = obs["spatia_pair_match"]
    conf = obs["spatia_pair_confidence"]
    pval = obs["spatia_pair_shift_pvalue"]
    assert match[~src].isna().all() and conf[~src].isna().all() and pval[~src].isna().all()
    assert pval[src].between(0, 1).all()
    assert match[src].notna().all() and set(match[src]) <= set(obs_names := obs.index[~src]) and len(obs_names)
    # matched cells share the cell type far more often than chance (measured 0.75 vs chance 0.20; 0.65 with
    # uniform masses)
    t_src = obs["cell_type"][src].astype(str).to_numpy()
    t_tgt = obs.loc[match[src].astype(str), "cell_type"].astype(str).to_numpy()
    rate = (t_src == t_tgt).mean()
    p_s = obs["cell_type"][src].value_counts(normalize=True)
    p_t = obs["cell_type"][~src].value_counts(normalize=True).reindex(p_s.index)
    chance = float((p_s * p_t).sum())
    assert rate > chance + 0.3, (rate, chance)
    # control cells of the transitioning type go to transitioned cells more often than chance (0.30 vs 0.11)
    tr = table.uns["simulation"]["transition_type"]
    is_tr = t_src == tr
    to_moved = (obs.loc[match[src].astype(str), "state"].to_numpy()[is_tr] == "transitioned").mean()
    chance_moved = (obs["state"][~src] == "transitioned").mean()
    assert to_moved > 1.6 * chance_moved, (to_moved, chance_moved)
    # the summary of the transition
    info = table.uns["spatia"]["transitions"]["control->disease"]
    assert info["n_pairs"] == src.sum() and info["pairing"] == "global" and info["epsilon"] == 0.05
    assert set(info["delta_g"]) == set(table.var_names) and len(info["delta_m"]) == 10
    assert 1 / (~src).sum() <= info["mean_confidence"] <= 1
    assert info["n_shifted"] == (pval[src] < 0.01).sum() and info["shift_neighbors"] == 60
    # pairing again without crops (an AnnData): no shift test, and the earlier one's p-values go
    with pytest.raises(KeyError, match="overwrite=True"):  # an earlier pairing is not replaced silently
        sp.tl.pair_states(table, groupby="condition", source="control", target="disease")
    sp.tl.pair_states(table, groupby="condition", source="control", target="disease", overwrite=True)
    assert "spatia_pair_shift_pvalue" not in table.obs and "n_shifted" not in table.uns["spatia"]["transitions"][
        "control->disease"]


def test_pairing_confidence_and_epsilon(sim):
    sharp = sp.tl.pair_states(sim, groupby="condition", source="control", target="disease", epsilon=0.05,
                              crops=np.zeros((sim["table"].n_obs, 1, 8, 8), np.uint8), inplace=False)["pairing"]
    blurry = sp.tl.pair_states(sim, groupby="condition", source="control", target="disease", epsilon=5.0,
                               crops=np.zeros((sim["table"].n_obs, 1, 8, 8), np.uint8), inplace=False)["pairing"]
    n_t = len(sharp.target_obs)
    for r in (sharp, blurry):
        assert (r.confidence >= 1 / n_t - 1e-9).all() and (r.confidence <= 1 + 1e-9).all()
    assert sharp.confidence.mean() > 5 * blurry.confidence.mean()
    assert blurry.confidence.mean() < 3 / n_t  # near uniform at large epsilon
    assert "spatia_pair_match" not in sim["table"].obs  # inplace=False writes nothing


def test_pairing_marginals_keep_cell_types(sim):
    """Cell-type proportions differ between the conditions: plain balanced OT must send some mass across
    types; composition marginals (the default) and unbalanced OT (reg_m) need not."""
    table = sim["table"]
    zeros = np.zeros((table.n_obs, 1, 8, 8), np.uint8)
    o = table.obs

    def same_type(res):
        ts = o["cell_type"].astype(str).to_numpy()[res.source_rows]
        return (ts == o.loc[res.matched_obs, "cell_type"].astype(str).to_numpy()).mean()

    kw = dict(groupby="condition", source="control", target="disease", crops=zeros, inplace=False)
    uni = sp.tl.pair_states(sim, marginals="uniform", **kw)["pairing"]
    comp = sp.tl.pair_states(sim, **kw)["pairing"]
    unb = sp.tl.pair_states(sim, reg_m=0.3, marginals="uniform", **kw)["pairing"]
    assert uni.info["reg_m"] is None and unb.info["reg_m"] == 0.3
    assert comp.info["marginals"] == "composition" and comp.info["n_clusters"] >= 3
    assert same_type(unb) > same_type(uni) + 0.02, (same_type(unb), same_type(uni))
    assert same_type(comp) > same_type(uni) + 0.02, (same_type(comp), same_type(uni))
    assert (unb.confidence > 0).all() and (unb.confidence <= 1 + 1e-9).all()
    with pytest.raises(ValueError, match="reg_m"):
        sp.tl.pair_states(sim, reg_m=0.0, **kw)
    with pytest.raises(ValueError, match="marginals"):
        sp.tl.pair_states(sim, marginals="equal", **kw)


def _composition_shift(seed: int):
    """Three cell types with their own marker genes; the target state has 4x more of type 0."""
    rng = np.random.default_rng(seed)
    n_s, n_t = np.array([60, 60, 60]), np.array([160, 40, 40])
    lab = np.concatenate([np.repeat(np.arange(3), n_s), np.repeat(np.arange(3), n_t)])
    logit = np.zeros((len(lab), 30))
    for k in range(3):
        logit[lab == k, 10 * k:10 * k + 10] += 1.5
    mean = 200 * np.exp(logit) / np.exp(logit).sum(1, keepdims=True)
    counts = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)
    obs = pd.DataFrame({"state": np.repeat(["a", "b"], [n_s.sum(), n_t.sum()]), "type": lab.astype(str)},
                       index=[f"c{i}" for i in range(len(lab))])
    return AnnData(counts, obs=obs)


@pytest.mark.parametrize("seed", [0, 1])
def test_composition_marginals_follow_a_change_in_proportions(seed):
    adata = _composition_shift(seed)
    o = adata.obs

    def rates(res):
        ts = o["type"].to_numpy()[res.source_rows]
        tt = o.loc[res.matched_obs, "type"].to_numpy()
        return (ts == tt).mean(), (ts[ts != "0"] == tt[ts != "0"]).mean()

    kw = dict(groupby="state", source="a", target="b", inplace=False, random_state=seed)
    uni = rates(sp.tl.pair_states(adata, marginals="uniform", **kw)["pairing"])
    comp = rates(sp.tl.pair_states(adata, **kw)["pairing"])
    # uniform masses: type 0 holds 2/3 of the target mass against 1/3 of the source mass, so about half the
    # cells of types 1 and 2 must be matched to type 0 (measured 0.5); composition masses keep them
    assert uni[1] < 0.75, uni
    assert comp[1] > 0.95 and comp[0] > 0.95, comp
    assert adata.obs.columns.tolist() == ["state", "type"]  # inplace=False wrote nothing


def _shift_pairing(seed: int, shift: float):
    """Two cell types apart in expression, 200 cells each; the matches of type 0 are shifted in 3 of the
    10 (correlated) morphology features, those of type 1 are fresh draws of the source distribution."""
    from spatia.metrics import MORPHOLOGY_FEATURES

    rng = np.random.default_rng(seed)
    n = 400
    lab = np.repeat([0, 1], n // 2)
    pcs = rng.normal(size=(n, 5)) + 6.0 * lab[:, None]
    fs = rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, 10))
    ft = rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, 10))
    ft[lab == 0, :3] += shift
    cols = list(MORPHOLOGY_FEATURES)
    res = sp.tl.PairResult(
        name="a->b", source_obs=np.array([f"s{i}" for i in range(n)]), target_obs=np.array([f"t{i}" for i in range(n)]),
        source_rows=np.arange(n), target_rows=np.arange(n), match=rng.permutation(n), confidence=np.ones(n),
        stratum=np.full(n, "global"), delta_g=pd.Series(dtype=float), source_pcs=pcs,
        source_features=pd.DataFrame(fs, columns=cols), target_features=pd.DataFrame(ft, columns=cols))
    ft_m = ft.copy()
    ft_m[res.match] = ft  # so that each source's *match* carries its type's shift
    res.target_features = pd.DataFrame(ft_m, columns=cols)
    return res, lab


@pytest.mark.parametrize("seed", [0, 1])
def test_shift_test_finds_the_cells_that_change(seed):
    res, lab = _shift_pairing(seed, shift=0.5)
    st = res.shift_test(60)
    assert list(st.columns) == ["shift_stat", "shift_df", "shift_pvalue"] and (st.index == res.source_obs).all()
    p = st["shift_pvalue"].to_numpy()
    # power: a half-std shift of 3 features is found in (nearly) every cell of the changed type (measured 1.0) ...
    assert (p[lab == 0] < 0.01).mean() > 0.95
    # ... and calibration: the unchanged type is flagged at about the nominal rate (measured 0.0-0.01 at 0.01,
    # 0.015-0.04 at 0.05)
    assert (p[lab == 1] < 0.01).mean() < 0.03 and (p[lab == 1] < 0.05).mean() < 0.1
    # no shift anywhere: nothing is flagged
    null, _ = _shift_pairing(seed, shift=0.0)
    assert (null.shift_test(60)["shift_pvalue"] < 0.01).mean() < 0.03
    # NaN features (no foreground) count as no shift; constant features are dropped from the degrees of freedom
    res.source_features.iloc[:5] = np.nan
    res.source_features["area"] = res.target_features["area"] = 1.0
    st = res.shift_test(60)
    assert st["shift_pvalue"].notna().all() and (st["shift_df"] == 9).all()
    with pytest.raises(ValueError, match="n_neighbors"):
        res.shift_test(1)
    res.source_features = None
    with pytest.raises(ValueError, match="no morphology features"):
        res.shift_test()


def test_pairing_within_niches(sim):
    ad = sim["table"].copy()
    res = sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", niche_key="domain",
                            min_cells=10, inplace=False)["pairing"]
    assert res.info["pairing"] == "niche-stratified" and res.info["niches"]
    src_dom = ad.obs["domain"].astype(str).to_numpy()[res.source_rows]
    tgt_dom = ad.obs.loc[res.matched_obs, "domain"].astype(str).to_numpy()
    strat = res.stratum != "global"
    assert strat.any() and (src_dom[strat] == tgt_dom[strat]).all()
    assert (res.stratum[strat] == src_dom[strat]).all()
    assert res.delta_m.empty  # an AnnData without crops has no morphology shift


def test_pairing_bad_input(sim):
    ad = sim["table"].copy()
    with pytest.raises(KeyError, match="available columns"):
        sp.tl.pair_states(ad, groupby="nope", source="control", target="disease")
    with pytest.raises(KeyError, match=r"available groups: \['control', 'disease'\]"):
        sp.tl.pair_states(ad, groupby="condition", source="control", target="tumour")
    with pytest.raises(ValueError, match="min_cells"):
        sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", min_cells=10_000)
    other = AnnData(ad.X.copy(), obs=ad.obs.copy())
    other.var_names = [f"other_{g}" for g in ad.var_names]
    with pytest.raises(ValueError, match="share no genes"):
        sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", target_data=other)
    with pytest.raises(KeyError, match="niche_key"):
        sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", niche_key="spatia_niche")
    with pytest.raises(ValueError, match="shift_neighbors"):
        sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", shift_neighbors=1)
    assert not any(c.startswith("spatia_pair") for c in ad.obs) and "spatia" not in ad.uns  # nothing written


def test_pairing_across_slides_on_shared_genes(sim):
    ad = sim["table"].copy()
    other = ad[:, ad.var_names[::-1][:30]].copy()  # another slide: a subset of the genes, another order
    res = sp.tl.pair_states(ad, groupby="condition", source="control", target="disease", target_data=other,
                            inplace=False)["pairing"]
    assert res.info["n_shared_genes"] == 30 and set(res.delta_g.index) == set(other.var_names)
