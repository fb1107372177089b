"""Physical units: the µm-per-unit factor is found in the documented order, recorded, and a slide in pixels
gives the same results as the same slide in µm."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spatia as sp
from spatia.pp._units import TYPICAL_SPACING_UM, resolve_units, spacing_estimate


@pytest.fixture(autouse=True)
def _no_progress_bar():
    old = sp.settings.progress_bar
    sp.settings.progress_bar = False
    yield
    sp.settings.progress_bar = old


def _lattice(n: int = 400, spacing_um: float = 12.0, um_per_unit: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    r, c = np.divmod(np.arange(n), side)
    xy = np.stack([c, r], axis=1) * spacing_um + rng.normal(0, 1.0, (n, 2))
    return (xy + 500.0) / um_per_unit


def _adata(xy: np.ndarray) -> AnnData:
    return AnnData(np.ones((len(xy), 3), dtype=np.float32), obsm={"spatial": xy})


# ------------------------------------------------------------------------------------- resolution order
@pytest.fixture(scope="module")
def sim_px():
    return sp.datasets.simulate(300, units="px", random_state=3)


@pytest.fixture(scope="module")
def sim_um():
    return sp.datasets.simulate(300, units="um", random_state=3)


def test_units_from_the_elements_transformation(sim_px, sim_um):
    """spatialdata-io's convention: µm circles with a µm → px scale tell the pixel size exactly."""
    px = sp.pp.cell_geometry(sim_px, sim_px["table"]).units
    um = sp.pp.cell_geometry(sim_um, sim_um["table"]).units
    assert px.um_per_unit == pytest.approx(0.5) and px.source == "element 'cell_circles'"
    assert um.um_per_unit == pytest.approx(1.0) and um.source == "element 'cell_circles'"


def test_argument_beats_stored_beats_elements(sim_px):
    sd = sim_px  # read only below, except attrs which is restored
    xy = sp.pp.cell_geometry(sd, sd["table"]).xy
    assert resolve_units(sd, xy, coordinate_system="global", um_per_unit=0.3).source == "argument"
    sp.pp.set_um_per_unit(sd, 0.45)
    try:
        u = resolve_units(sd, xy, coordinate_system="global")
        assert (u.um_per_unit, u.source) == (0.45, "stored")
        assert resolve_units(sd, xy, coordinate_system="global", um_per_unit=0.3).um_per_unit == 0.3
        # a value stored for another coordinate system does not apply here
        assert resolve_units(sd, xy, coordinate_system="other").source != "stored"
    finally:
        sd.attrs.pop(sp.Keys.UM_PER_UNIT)
    assert resolve_units(sd, xy, coordinate_system="global").source == "element 'cell_circles'"


def test_stored_value_survives_a_zarr_round_trip(sim_px, tmp_path):
    import copy

    from spatialdata import read_zarr

    sd = copy.deepcopy(sim_px)
    sp.pp.set_um_per_unit(sd, 0.2125)
    sd.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    assert sp.pp.cell_geometry(back, back["table"]).units.to_dict() == {
        "um_per_unit": 0.2125, "source": "stored", "coordinate_system": "global"}


@pytest.mark.parametrize("um_per_unit", [0.12, 0.2125, 1.0, 4.0])
def test_estimate_from_cell_spacing(um_per_unit, caplog):
    """No element, no stored value: the cells' spacing gives the factor (µm snapped to 1), with a warning
    that says the value and how to set it when it is not µm."""
    xy = _lattice(um_per_unit=um_per_unit)
    est = spacing_estimate(xy)
    # the raw estimate: typical spacing / nearest-neighbour distance (a jittered 12-µm lattice: ~10.7 µm)
    assert est == pytest.approx(um_per_unit * TYPICAL_SPACING_UM / 12.0, rel=0.2)
    with caplog.at_level(logging.WARNING, logger="spatia"):
        u = resolve_units(_adata(xy), xy, coordinate_system=None)
    if um_per_unit == 1.0:
        assert (u.um_per_unit, u.source) == (1.0, "cell spacing (µm)")
        assert not caplog.records
    else:
        assert u.source == "estimated from cell spacing"
        assert u.um_per_unit == pytest.approx(um_per_unit, rel=0.25)
        assert "assumes" in caplog.text and "um_per_unit=" in caplog.text and "set_um_per_unit" in caplog.text


def test_implausible_or_bad_values_raise():
    xy = _lattice() * 1e-7  # cells 1e-6 units apart: no plausible unit
    with pytest.raises(ValueError, match="not a plausible unit"):
        resolve_units(_adata(xy), xy, coordinate_system=None)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            sp.pp.set_um_per_unit(_adata(xy), bad)
    with pytest.raises(TypeError, match="must be a number"):
        sp.pp.set_um_per_unit(_adata(xy), "0.2")
    with pytest.raises(TypeError, match="AnnData or a SpatialData"):
        sp.pp.set_um_per_unit({"a": 1}, 0.2)


# --------------------------------------------------------------------------- same slide, µm and pixels
@pytest.mark.parametrize(("k", "radius"), [(10, None), (10, 25.0), (3, 12.0), (50, None)])
def test_niche_members_are_the_niche_graph(k, radius, monkeypatch):
    """The model's niche table, built chunk by chunk with a KD-tree, holds exactly the members of the squidpy
    graph `niche_graph` writes (ties at equal positions included), with none of its cells × cells matrices."""
    import spatia.pp._graphs as graphs
    from spatia.data import neighbours_from_graph

    monkeypatch.setattr(graphs, "_MEMBER_CHUNK", 97)  # several chunks
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (1500, 2))
    xy[:40] = np.round(xy[:40] / 50) * 50  # cells sharing a position
    adata = AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(len(xy))]), obsm={"spatial": xy})
    conn, _ = sp.pp.niche_graph(adata, n_neighs=k, radius=radius, inplace=False, um_per_unit=1.0)
    width = k if radius is None else max(k, int(conn.sum(1).max()))
    want = neighbours_from_graph(conn, width)
    got = graphs.niche_members(xy, k, radius)
    assert got.shape == want.shape
    same = [set(a[a >= 0]) == set(b[b >= 0]) for a, b in zip(got, want, strict=True)]
    assert np.mean(same) > 0.99  # ties at the k-th distance may be broken differently
    assert not (got == np.arange(len(xy))[:, None]).any()  # never its own member
    with pytest.raises(ValueError, match="at least 2 cells"):
        graphs.niche_members(xy[:1], k, radius)


@pytest.mark.parametrize("um_per_unit", [0.2125, 0.5])
def test_niche_graph_and_tiles_in_um(um_per_unit):
    """radius and tile_size are µm: a table in pixels gives the same graph and tiles as in µm."""
    xy_um = _lattice(600)
    a, b = _adata(xy_um), _adata(xy_um / um_per_unit)
    sp.pp.set_um_per_unit(b, um_per_unit)
    for kw in ({"radius": 30.0}, {"n_neighs": 8}):
        ca, da = sp.pp.niche_graph(a, inplace=False, **kw)
        cb, db = sp.pp.niche_graph(b, inplace=False, **kw)
        assert (ca != cb).nnz == 0
        np.testing.assert_allclose(da.toarray(), db.toarray(), rtol=1e-6, atol=1e-6)
    # the radius really is 30 µm: 4–8 neighbours on a 12 µm lattice at 30 µm (not ~0 or everything)
    deg = np.asarray(sp.pp.niche_graph(b, radius=30.0, inplace=False)[0].sum(1)).ravel()
    assert 10 <= np.median(deg) <= 25
    np.testing.assert_array_equal(sp.pp.tissue_tiles(a, tile_size=100.0, inplace=False),
                                  sp.pp.tissue_tiles(b, tile_size=100.0, inplace=False))
    # the same table without the stored value: explicit argument, or the spacing estimate
    c = _adata(xy_um / um_per_unit)
    np.testing.assert_array_equal(sp.pp.tissue_tiles(c, tile_size=100.0, inplace=False, um_per_unit=um_per_unit),
                                  sp.pp.tissue_tiles(a, tile_size=100.0, inplace=False))
    sp.pp.niche_graph(b, radius=30.0)
    assert b.uns["spatia_niche_neighbors"]["units"]["um_per_unit"] == um_per_unit


LOADERS = {
    "xenium": (lambda u: sp.datasets.xenium_toy(units=u, transcripts=False), {"outside": "pad"}),
    "cosmx": (lambda u: sp.datasets.cosmx_lung_mini(units=u, transcripts=False),
              {"image_key": ["F002_image", "F003_image"]}),
    "merscope": (lambda u: sp.datasets.merscope_toy(units=u), {"outside": "pad"}),
    "simulated": (lambda u: sp.datasets.simulate(200, units=u, random_state=1), {}),
}


@pytest.mark.parametrize("name", list(LOADERS))
@pytest.mark.parametrize("crop_um", [16.0, None])
def test_crops_identical_in_um_and_pixel_frames(name, crop_um):
    load, kw = LOADERS[name]
    a = sp.pp.extract_crops(load("um"), size=16, crop_um=crop_um, **kw)
    b = sp.pp.extract_crops(load("px"), size=16, crop_um=crop_um, **kw)
    x = a.get(np.arange(len(a))).astype(float)
    y = b.get(np.arange(len(b))).astype(float)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.999
    assert np.abs(x - y).mean() < 0.5  # interpolation tolerance, in 0–255 intensity units
    assert a.params["pixel_size_um"] == pytest.approx(b.params["pixel_size_um"], rel=3e-3)
    assert b.params["um_per_unit"] != 1.0  # the pixel frame really was in pixels


def test_crops_are_wrong_without_units():
    """What the units fix: a 16-µm window read as 16 pixels shows another picture (the bug this replaces)."""
    px, um = (LOADERS["simulated"][0](u) for u in ("px", "um"))
    good = sp.pp.extract_crops(um, size=16, crop_um=16.0).get(np.arange(200)).astype(float)
    wrong = sp.pp.extract_crops(px, size=16, crop_um=16.0, um_per_unit=1.0).get(np.arange(200)).astype(float)
    assert np.corrcoef(good.ravel(), wrong.ravel())[0, 1] < 0.9


def test_fit_same_in_um_and_pixel_frames():
    """Same slide, same seed: the same embeddings and niches; the units used are recorded."""
    cfg = sp.SpatiaConfig.tiny()
    out = {}
    for u in ("um", "px"):
        sd = sp.datasets.simulate(160, units=u, random_state=5)
        sp.tl.fit(sd, config=cfg, max_epochs=2, random_state=0, early_stopping=False)
        out[u] = sd["table"]
    um, px = out["um"], out["px"]
    assert um.uns["spatia"]["fit"]["units"]["um_per_unit"] == 1.0
    assert px.uns["spatia"]["fit"]["units"] == {"um_per_unit": 0.5, "source": "element 'cell_circles'",
                                         "coordinate_system": "global"}
    for key in ("X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"):
        a, b = um.obsm[key], px.obsm[key]
        assert np.abs(a - b).max() < 1e-3 * max(1.0, np.abs(a).max()), key


@pytest.fixture(scope="module")
def fitted_both():
    """The same slide in µm and in pixels, each with a model fitted with the same seed."""
    cfg = sp.SpatiaConfig.tiny()
    out = {}
    for u in ("um", "px"):
        sd = sp.datasets.simulate(200, units=u, random_state=11)
        obs = sd["table"].obs
        obs["known_type"] = obs["cell_type"].astype(object).where(np.arange(len(obs)) % 3 != 0)
        model = sp.tl.fit(sd, config=cfg, max_epochs=3, random_state=0, early_stopping=False)
        out[u] = (sd, model)
    return out


def test_downstream_tools_same_decisions_in_um_and_pixel_frames(fitted_both):
    """annotate, impute, predict_expression and pair_states decide the same on the two frames."""
    res = {}
    for u, (sd, model) in fitted_both.items():
        sp.tl.embed(sd, model, overwrite=True)  # embed re-reads the slide (its own units)
        sp.tl.annotate(sd, model, labels_key="known_type", random_state=0)
        sp.tl.impute(sd, model)
        sp.tl.predict_expression(sd, model)
        pairs = sp.tl.pair_states(sd, groupby="condition", source="control", target="disease", inplace=False,
                                  crop_size=16)["pairing"]
        t = sd["table"]
        res[u] = (t.obs["spatia_cell_type"].astype(str).to_numpy(), t.layers["spatia_imputed"],
                  t.layers["spatia_predicted"], pairs)
    (lab_a, imp_a, pred_a, pa), (lab_b, imp_b, pred_b, pb) = res["um"], res["px"]
    np.testing.assert_array_equal(lab_a, lab_b)
    np.testing.assert_allclose(imp_a, imp_b, rtol=1e-3, atol=1e-3 * np.abs(imp_a).max())
    np.testing.assert_allclose(pred_a, pred_b, rtol=1e-3, atol=1e-3 * np.abs(pred_a).max())
    np.testing.assert_array_equal(pa.match, pb.match)
    np.testing.assert_allclose(pa.delta_m, pb.delta_m, rtol=1e-3, atol=1e-6)


def test_unknown_input_keyword_is_an_error(fitted_both):
    sd, model = fitted_both["px"]
    with pytest.raises(TypeError, match="um_per_units"):
        sp.tl.impute(sd, model, um_per_units=0.5, inplace=False)


def test_estimate_steady_on_a_sparse_subset_of_cells():
    """A few scattered cells of a slide (no µm element): their sizes keep the estimate from drifting."""
    import copy

    sd = sp.datasets.simulate(400, units="px", random_state=2)
    del sd.shapes["cell_circles"]  # the table annotates the labels; no element says "µm"
    full = sp.pp.cell_geometry(sd, sd["table"]).units
    sub = copy.deepcopy(sd)
    sub.tables["table"] = sd["table"][::12].copy()  # 34 scattered cells
    part = sp.pp.cell_geometry(sub, sub["table"]).units
    assert full.source == part.source == "estimated from cell spacing"
    assert full.um_per_unit == pytest.approx(0.5, rel=0.3)
    assert part.um_per_unit == pytest.approx(full.um_per_unit, rel=0.3)
    # without the sizes, the spacing alone drifts by more than that
    xy = sp.pp.cell_geometry(sub, sub["table"]).xy
    assert spacing_estimate(xy) < 0.6 * full.um_per_unit


def test_decoder_and_generation_same_in_um_and_pixel_frames(fitted_both):
    """fit_decoder cuts the same crops in both frames, so the same seed generates the same cells, and the
    generated pixel size is recorded in µm."""
    from spatia.module import DecoderConfig

    dc = DecoderConfig(size=16, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
                       attention_heads=2, cross_attention_dim=16, train={"batch_size": 16})
    out = {}
    for u, (sd, model) in fitted_both.items():
        sp.tl.fit_decoder(sd, model, config=dc, max_epochs=1, random_state=0)
        res = sp.tl.generate(sd, model, cells=sd["table"].obs_names[:6], num_inference_steps=4, random_state=0,
                             inplace=False)
        out[u] = res
    a, b = out["um"], out["px"]
    img = next(k for k in a if k.startswith("images/"))
    np.testing.assert_allclose(np.asarray(a[img]), np.asarray(b[img]), atol=1e-3 * float(np.abs(np.asarray(a[img])).max()))
    assert a["params"]["pixel_size_um"] == pytest.approx(b["params"]["pixel_size_um"]) == pytest.approx(16.0 / 16)
