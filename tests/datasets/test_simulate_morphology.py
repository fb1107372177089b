"""Morphology-only cell types: expression cannot tell a twin from its parent, the image can.

Also pins the default slide: without the option, existing seeds give the same counts and pixels as before
morphology-only types existed.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from spatia.datasets import simulate

PIXEL_SIZE = 0.5


@pytest.fixture(scope="module")
def twins():
    return simulate(1500, random_state=0, morphology_types=2, pixel_size=PIXEL_SIZE)


@pytest.fixture(scope="module")
def without(twins):
    return simulate(1500, random_state=0, pixel_size=PIXEL_SIZE)


def _lognorm(table):
    x = table.X.toarray().astype(float)
    return np.log1p(x / x.sum(1, keepdims=True) * 100)


def _nucleus_features(sdata) -> np.ndarray:
    """Hand-made nucleus features per cell: area (µm²), eccentricity, solidity, mean and std DAPI intensity, and
    the mean high-pass DAPI magnitude (chromatin texture), on the Otsu nuclear mask inside each segmented cell."""
    dapi = sdata.images["morphology"].sel(c="DAPI").data.compute().astype(float)
    labels = sdata.labels["cell_labels"].data.compute()
    nuclei = np.where(dapi > threshold_otsu(dapi[labels > 0]), labels, 0)
    detail = np.abs(dapi - ndimage.gaussian_filter(dapi, 1.5))
    features = {}
    for region in regionprops(nuclei, intensity_image=dapi):
        inside = dapi[region.slice][region.image]
        texture = detail[region.slice][region.image].mean()
        features[region.label] = [region.area * PIXEL_SIZE**2, region.eccentricity, region.solidity,
                                  inside.mean(), inside.std(), texture]  # fmt: skip
    ids = sdata["table"].obs["cell_id"].to_numpy()
    return np.array([features.get(i, [0.0] * 6) for i in ids])


def _accuracy(x, y) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(model, x, y, cv=5).mean())


def test_default_slide_is_unchanged():
    """Checksums of ``simulate(150, random_state=7)`` as written before morphology-only types existed."""
    sdata = simulate(150, random_state=7)
    x = sdata["table"].X
    assert int(x.sum()) == 21419
    assert int((x @ np.arange(1, x.shape[1] + 1)).sum()) == 445819
    assert int(np.asarray(x.sum(1)).ravel() @ np.arange(1, x.shape[0] + 1)) == 1590367
    labels = sdata.labels["cell_labels"].data.compute()
    assert labels.shape == (380, 438) and int(labels.astype(np.int64).sum()) == 6701588
    image = sdata.images["morphology"].data.compute().astype(np.int64).sum(axis=(1, 2))
    np.testing.assert_allclose(image, [101175507, 47070487], atol=20)  # a few ±1 roundings at most
    truth = sdata["table"].uns["simulation"]
    assert truth["parameters"]["morphology_types"] == 0
    assert truth["morphology_twins"] == {} and truth["morphology_only_types"] == []


def test_ground_truth_of_twins(twins):
    table = twins["table"]
    truth = table.uns["simulation"]
    pairs = truth["morphology_twins"]
    assert list(pairs) == ["type_5", "type_6"]
    assert list(table.obs["cell_type"].cat.categories) == [f"type_{i}" for i in range(7)]
    assert truth["cell_types"] == [f"type_{i}" for i in range(7)]
    assert sorted(truth["morphology_only_types"]) == sorted([*pairs, *pairs.values()])
    for twin, parent in pairs.items():
        assert parent not in (truth["inducer_type"], truth["transition_type"])
        assert truth["markers"][twin] == truth["markers"][parent] and truth["markers"][parent]
        assert (table.var["role"] == f"marker:{twin}").sum() == 0  # no gene of its own
        assert (table.obs["cell_type"] == twin).sum() >= 40
        effects = truth["morphology_effects"][twin]
        assert set(effects) == {"nucleus_radius", "axis_ratio_excess", "texture_grain", "texture_amplitude"}
        assert all(v != 1.0 for v in effects.values())
    assert truth["morphology_effects"]["type_5"] != truth["morphology_effects"]["type_6"]
    drivers = truth["morphology_drivers"]
    assert {d["program"] for d in drivers.values()} == {"size_program", "elongation_program", "texture_program"}
    for driver in drivers.values():
        assert driver["genes"] == truth["program_genes"][driver["program"]]


def test_twins_change_only_their_own_cells(twins, without):
    """Same seed with and without twins: same counts, positions and cells; pixels differ only near twins."""
    a, b = twins["table"], without["table"]
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    parent = a.obs["cell_type"].astype(str).replace(a.uns["simulation"]["morphology_twins"])
    np.testing.assert_array_equal(parent.to_numpy(), b.obs["cell_type"].astype(str).to_numpy())
    for column in ("domain", "state", "size_program", "texture_program", "niche_signal"):
        np.testing.assert_array_equal(a.obs[column], b.obs[column])
    is_twin = a.obs["cell_type"].isin(list(a.uns["simulation"]["morphology_twins"])).to_numpy()
    img_a, img_b = (s.images["morphology"].data.compute() for s in (twins, without))
    changed = np.flatnonzero((img_a != img_b).any(0).ravel())
    assert 0 < changed.size < 0.5 * img_a[0].size
    # every changed pixel lies within a (grown) twin cell body of the twin's centre
    rows, cols = np.unravel_index(changed, img_a.shape[1:])
    (y0, x0) = a.uns["simulation"]["origin_yx_um"]
    yx = np.column_stack([y0 + (rows + 0.5) * PIXEL_SIZE, x0 + (cols + 0.5) * PIXEL_SIZE])
    from scipy.spatial import cKDTree

    centres = np.asarray(a.obsm["spatial"])[is_twin][:, ::-1]
    distance, _ = cKDTree(centres).query(yx)
    assert distance.max() < 2 * a.obs.loc[is_twin, "cell_radius_um"].max() + 3.0


def test_twins_hidden_from_expression_seen_in_images(twins):
    """The ground-truth check: a logistic regression on expression is at chance between a twin and its parent,
    one on simple nucleus features separates them."""
    table = twins["table"]
    y = table.obs["cell_type"].astype(str).to_numpy()
    expression, image = _lognorm(table), _nucleus_features(twins)
    for twin, parent in table.uns["simulation"]["morphology_twins"].items():
        pair = np.isin(y, [twin, parent])
        chance = max(np.mean(y[pair] == twin), np.mean(y[pair] == parent))
        assert _accuracy(expression[pair], y[pair]) < chance + 0.08, twin
        assert _accuracy(image[pair], y[pair]) > 0.75, twin  # 0.86 and 0.93 here
    # expression still tells the pairs apart from each other (they are different types)
    twin_a, twin_b = table.uns["simulation"]["morphology_twins"]
    pair = np.isin(y, [twin_a, twin_b])
    assert _accuracy(expression[pair], y[pair]) > 0.9


def test_programmes_drive_their_image_features(twins):
    """``morphology_drivers``: each programme's genes follow the image feature it drives."""
    table = twins["table"]
    features, expression = _nucleus_features(twins), _lognorm(table)
    measured = {"nucleus_area_um2": features[:, 0], "nucleus_eccentricity": features[:, 1],
                "chromatin_texture": features[:, 5] / features[:, 3]}  # fmt: skip
    plain = ~table.obs["cell_type"].isin(table.uns["simulation"]["morphology_only_types"]).to_numpy()
    for feature, driver in table.uns["simulation"]["morphology_drivers"].items():
        assert spearmanr(measured[feature][plain], table.obs[driver["program"]][plain])[0] > 0.2, feature
        genes = [table.var_names.get_loc(g) for g in driver["genes"]]
        assert spearmanr(expression[plain][:, genes].sum(1), table.obs[driver["program"]][plain])[0] > 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"morphology_types": 4}, "morphology_types"),
        ({"morphology_types": -1}, "morphology_types"),
        ({"morphology_types": 1.5}, "morphology_types"),
        ({"morphology_types": 1, "morphology_strength": -0.1}, "morphology_strength"),
    ],
)
def test_bad_morphology_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(50, **kwargs)
