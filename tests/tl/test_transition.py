"""State transitions: OT pairing, the flow model, sp.tl.fit_transition / sp.tl.transition, sp.pl.transition."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from anndata import AnnData  # noqa: E402

import spatia as sp  # noqa: E402
from spatia.metrics import feature_distances, morphology_features  # noqa: E402
from spatia.module import FlowConfig, TransitionFlow  # noqa: E402
from spatia.nn import integrate  # noqa: E402


def _add_tstate(table) -> None:
    """Cells of the simulator's transitioning type: 'control' (control side) or 'transitioned' (disease)."""
    o = table.obs
    tr = table.uns["simulation"]["transition_type"]
    lab = pd.Series(np.nan, index=o.index, dtype=object)
    is_t = (o["cell_type"] == tr).to_numpy()
    lab[is_t & (o["condition"] == "control").to_numpy()] = "control"
    lab[is_t & (o["state"] == "transitioned").to_numpy()] = "transitioned"
    o["tstate"] = lab.to_numpy()


# ------------------------------------------------------------------------------------------- pairing
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


# ------------------------------------------------------------------------------------------- module
def _batch(b=4, s=16, conf=None):
    g = torch.Generator().manual_seed(0)
    return {
        "x0": torch.rand(b, 2, s, s, generator=g), "x1": torch.rand(b, 2, s, s, generator=g),
        "cell_emb": torch.randn(b, 8, generator=g), "transition": torch.zeros(b, dtype=torch.long),
        "confidence": torch.tensor(conf if conf is not None else [0.5] * b),
    }


def _flow(**kw):
    cfg = FlowConfig.tiny().replace(cond_dropout=0.0, augment=False, **kw)
    torch.manual_seed(0)
    return TransitionFlow(cfg, channels=2, size=16, emb_dim=8, n_genes=5, n_features=10, n_transitions=2)


def test_low_confidence_pairs_get_low_weight():
    flow = _flow(contrastive_weight=0.0, sw_weight=0.0)
    flow.mean_confidence.fill_(0.4)
    conf = [0.8, 0.4, 0.05, 0.01]
    out = flow(_batch(conf=conf), generator=torch.Generator().manual_seed(1))
    w = out.weights.numpy()
    np.testing.assert_allclose(w, np.array(conf) / 0.4, rtol=1e-6)
    assert w[3] < w[2] < w[1] < w[0]
    # the FM loss is the weighted mean: a pair's contribution scales with its confidence
    torch.testing.assert_close(out.losses["fm"], (out.weights * out.fm_error).mean())
    # gradient through the loss: the same pair contributes ~80x less at confidence 0.01 than at 0.8
    b = _batch(conf=conf)
    b["x1"] = b["x1"][[0, 0, 0, 0]].clone().requires_grad_(True)
    b["x0"] = b["x0"][[0, 0, 0, 0]]
    b["cell_emb"] = b["cell_emb"][[0, 0, 0, 0]]
    b["t"] = torch.full((4,), 0.5)  # the same point of the path for all four copies
    flow(b).loss.backward()
    gn = b["x1"].grad.flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(gn / gn[0], np.array(conf) / conf[0], rtol=1e-4)


def test_flow_losses_and_backward():
    flow = _flow()
    out = flow(_batch())
    assert set(out.losses) == {"fm", "contrastive", "sw"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in flow.named_parameters() if not n.startswith("null"))
    assert out.x1_hat.shape == (4, 2, 16, 16)
    x, nfe = flow.sample(_batch()["x0"], _batch()["cell_emb"], _batch()["transition"], steps=3, solver="euler")
    assert x.shape == (4, 2, 16, 16) and nfe == 3 and 0 <= float(x.min()) and float(x.max()) <= 1


def _discs(radius, brightness, n=8, s=16):
    """``(n, 1, s, s)`` crops of one centred disc each (radius in px, jittered), in [0, 1]."""
    g = torch.Generator().manual_seed(int(radius * 10))
    yy, xx = torch.meshgrid(torch.arange(s) - s / 2 + 0.5, torch.arange(s) - s / 2 + 0.5, indexing="ij")
    r = radius + 0.5 * torch.rand(n, generator=g)
    inside = (yy[None] ** 2 + xx[None] ** 2) <= r[:, None, None] ** 2
    return (0.05 + brightness * inside.float())[:, None]


def test_joint_morphology_loss_penalises_swapping_types():
    """The morphology loss compares the joint law of (source, endpoint) with that of (source, matched target):
    endpoints that give one type's target morphology to another type's sources are penalised, whereas the
    targets' marginal law (the same set of crops, only reassigned) cannot tell the two apart."""
    flow = _flow(sw_memory=0)
    x0 = torch.cat([_discs(2.0, 0.5), _discs(5.0, 0.5)])  # small- and large-nucleus sources
    x1 = torch.cat([_discs(3.0, 0.9), _discs(6.0, 0.9)])  # their targets: each grows and brightens
    swapped = x1[torch.cat([torch.arange(8, 16), torch.arange(0, 8)])]  # small sources get large targets
    tr = torch.zeros(16, dtype=torch.long)
    use = torch.ones(16, dtype=torch.bool)

    def loss(end, joint):
        g = torch.Generator().manual_seed(0)
        return float(flow._sw_per_transition(end * 2 - 1, x1, tr, use, g, x0r=x0 if joint else None))

    # the true pairs and the swapped pairs' marginal: no signal beyond float noise (every disc of a group has
    # the same eccentricity and intensities, so their tiny spread magnifies rounding errors)
    floor = max(loss(x1, joint=True), loss(swapped, joint=False))
    swap = loss(swapped, joint=True)
    assert swap > 0.3 and swap > 20 * floor, (swap, floor)


def _blob_batch(seed, n=16, grow=1.0):
    """Sources: noisy discs of random radius; targets: the same discs grown by ``grow`` px and brighter."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.0) - 7.5, torch.arange(16.0) - 7.5, indexing="ij")
    r = 2.0 + 3.0 * torch.rand(n, 1, 1, generator=g)
    d = torch.sqrt(yy**2 + xx**2)[None]

    def disc(rad, b):
        return (0.05 + b * torch.sigmoid((rad - d) * 2) + 0.03 * torch.rand(n, 16, 16, generator=g))[:, None]

    return disc(r, 0.5), disc(r + grow, 0.8)


def test_morphology_loss_memory_steadies_the_distance():
    """With ``sw_memory`` the loss compares the batch together with earlier batches' (detached) points: it
    varies less from batch to batch, the batch's own endpoints still get gradients, and the memory holds
    no graph."""
    tr = torch.zeros(16, dtype=torch.long)
    use = torch.ones(16, dtype=torch.bool)
    values = {}
    for memory in (0, 8):
        flow = _flow(sw_memory=memory).train()
        vals, bank = [], []  # the bank is the training plan's: the module keeps no state
        for seed in range(24):
            x0, x1 = _blob_batch(seed)
            end = x0.clone().requires_grad_(True)  # a flow that leaves the cells unchanged: a steady error
            loss, points = flow._sw_per_transition(end * 2 - 1, x1, tr, use, torch.Generator().manual_seed(seed),
                                                   x0r=x0, bank=bank)
            loss.backward()
            assert torch.isfinite(end.grad).all() and end.grad.abs().sum() > 0
            vals.append(float(loss))
            if points is not None:
                bank = [points, *bank][:memory]
        assert len(bank) == memory and all(not t.requires_grad for m in bank for t in m)
        values[memory] = np.array(vals[8:])  # once the memory is full
    assert values[8].std() < 0.6 * values[0].std(), (values[8].std(), values[0].std())
    # outside training the memory is neither used nor filled
    flow = _flow(sw_memory=8).eval()
    x0, x1 = _blob_batch(0)
    _, points = flow._sw_per_transition(x0 * 2 - 1, x1, tr, use, None, x0r=x0, bank=[])
    assert points is None


def test_morphology_loss_on_the_flow_rollout():
    """By default the morphology loss sees the flow's own few-step sample from the source crop."""
    flow = _flow(contrastive_weight=0.0, sw_steps=3)
    b = _batch()
    cond = flow.condition(b["cell_emb"], b["transition"])
    out = flow(b)
    x_euler, _ = integrate(lambda x, t: flow.velocity(x, t, cond), b["x0"] * 2 - 1, steps=3, solver="euler")
    torch.testing.assert_close(out.x1_end, x_euler, atol=1e-5, rtol=1e-5)
    assert "sw" in out.losses
    # the one-step variant compares x_t + (1 - t) v instead, only where t >= sw_min_t
    one = _flow(contrastive_weight=0.0, sw_endpoint="one_step", sw_min_t=0.5)
    b["t"] = torch.tensor([0.1, 0.2, 0.3, 0.9])  # one late pair: too few for a distance
    assert "sw" not in one(b).losses
    # switched off (the warm-up sets the scale to 0): no morphology term, no rollout
    out = flow(_batch(), sw_scale=0.0)
    assert "sw" not in out.losses and out.x1_end is None
    for bad in (dict(sw_endpoint="two_step"), dict(sw_steps=0), dict(sw_warmup=1.0)):
        with pytest.raises(ValueError, match="sw_"):
            FlowConfig(**bad)


def test_flow_config_old_models_keep_their_training_defaults():
    """Configurations saved before a field existed load with the behaviour they were trained with."""
    d = FlowConfig.tiny().to_dict()
    for k in ("sw_blur", "batch_ot", "batch_ot_emb_weight", "lr_schedule", "proxies", "sw_memory"):
        d.pop(k)
    old = FlowConfig.from_dict(d)
    assert old.sw_blur == 0.0 and old.batch_ot is False and old.lr_schedule == "constant" and old.proxies == "soft"
    assert old.sw_memory == 0
    new = FlowConfig.tiny()
    assert new.sw_blur == 1.0 and new.batch_ot is True and new.lr_schedule == "cosine" and new.proxies == "region"
    assert FlowConfig.from_dict(new.to_dict()) == new
    for bad in (dict(lr_schedule="step"), dict(sw_blur=-1.0), dict(batch_ot_emb_weight=-1.0), dict(proxies="x"),
                dict(sw_memory=-1)):
        with pytest.raises(ValueError):
            FlowConfig(**bad)


def test_default_flow_length_counts_steps():
    from spatia.model._transition import default_flow_epochs

    assert default_flow_epochs(3, 500) == 167  # a small slide's few shifted pairs: many epochs
    assert default_flow_epochs(50, 500) == 10 and default_flow_epochs(313, 500) == 10  # at least 10
    assert default_flow_epochs(0, 500) == 500
    assert FlowConfig().max_epochs is None and FlowConfig().min_steps == 500
    for bad in (dict(max_epochs=0), dict(min_steps=0)):
        with pytest.raises(ValueError, match="max_epochs|min_steps"):
            FlowConfig(**bad)


def test_batch_repair_keeps_the_targets_and_shortens_paths():
    from spatia.module._flow import batch_repair

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(12, 1, 8, 8, generator=g)
    x1 = x0[torch.randperm(12, generator=g)] + 0.01 * torch.rand(12, 1, 8, 8, generator=g)
    emb = torch.zeros(12, 4)
    group = torch.tensor([0] * 6 + [1] * 6)
    perm = batch_repair(x0, x1, emb, group)
    assert sorted(perm.tolist()) == list(range(12))  # a permutation: the same targets
    assert (group[perm] == group).all()  # within each transition only
    d_before = ((x1 - x0) ** 2).flatten(1).sum(1)
    d_after = ((x1[perm] - x0) ** 2).flatten(1).sum(1)
    assert d_after.sum() <= d_before.sum() + 1e-6
    # with a heavy embedding term, a source only takes the target of a source with the same embedding
    emb = torch.tensor([[0.0], [0.0], [10.0], [10.0]])
    x0 = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.05, 0.85, 0.9)])
    x1 = torch.stack([torch.full((1, 4, 4), v) for v in (0.9, 0.8, 0.0, 0.1)])  # pixel cost alone swaps groups
    perm = batch_repair(x0, x1, emb, torch.zeros(4, dtype=torch.long), emb_weight=100.0)
    assert set(perm[:2].tolist()) == {0, 1} and set(perm[2:].tolist()) == {2, 3}
    assert set(batch_repair(x0, x1, emb, torch.zeros(4, dtype=torch.long), emb_weight=0.0)[:2].tolist()) == {2, 3}


def test_gaussian_blur_of_morphology_loss():
    from spatia.nn import gaussian_blur

    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and torch.allclose(y.sum((2, 3)), torch.ones(2, 1), atol=1e-5)
    assert float(y.max()) < 0.2 and gaussian_blur(x, 0.0) is x


def test_ode_solvers():
    x0 = torch.ones(2, 3)
    exact = torch.exp(torch.tensor(-1.0))
    errs = {}
    for solver in ("euler", "midpoint", "rk45"):
        x1, nfe = integrate(lambda x, t: -x, x0, steps=10, solver=solver)
        errs[solver] = float((x1 - exact).abs().max())
    assert errs["midpoint"] < errs["euler"] / 10 and errs["rk45"] < 1e-3 and errs["euler"] < 0.03
    with pytest.raises(ValueError, match="Unknown solver"):
        integrate(lambda x, t: -x, x0, solver="heun")


# ------------------------------------------------------------------------------------------- end to end
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


def test_transition_save_load_keeps_flow(transitioned, tmp_path, monkeypatch):
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
    # a model saved without a flow (older saves) still loads, without one
    # a flow saved before `marginals` existed is re-paired as it was trained: uniform masses
    import spatia.tl._transition as tr_mod

    seen = []
    real = tr_mod.compute_pairing
    monkeypatch.setattr(tr_mod, "compute_pairing", lambda *a, **k: seen.append(k["marginals"]) or real(*a, **k))
    del loaded.flow_info["pairing"]["marginals"]
    sp.tl.transition(sd, loaded, **kw)
    sp.tl.transition(sd, model, **kw)
    assert seen == ["uniform", "composition"]
    plain = copy.deepcopy(model)
    plain.flow, plain.flow_info = None, {}
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "flow.json").exists() and sp.SpatiaModel.load(tmp_path / "plain").flow is None


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
                                   "config": FlowConfig.tiny().replace(max_epochs=None, min_steps=12)})
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
