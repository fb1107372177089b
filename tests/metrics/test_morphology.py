import numpy as np
import pytest
from scipy.stats import spearmanr

import spatia as sp


def _disc(r, size=32, intensity=0.8, ecc=1.0):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    img = ((xx / (r * ecc)) ** 2 + (yy / r) ** 2 <= 1).astype(np.float32) * intensity
    return img + 0.02 * np.random.default_rng(int(r * 10)).random((size, size), dtype=np.float32)


def test_features_measure_known_shapes():
    crops = np.stack([_disc(r) for r in (3, 5, 8)])[:, None]
    f = sp.metrics.morphology_features(crops)
    assert list(f.columns) == list(sp.metrics.MORPHOLOGY_FEATURES)
    np.testing.assert_allclose(f["area"], np.pi * np.array([3, 5, 8]) ** 2, rtol=0.2)
    assert (f["eccentricity"] < 0.4).all()
    elong = sp.metrics.morphology_features(_disc(4, ecc=2.0)[None])
    assert elong["eccentricity"].iloc[0] > 0.8
    assert elong["major_axis_length"].iloc[0] > 1.6 * elong["minor_axis_length"].iloc[0]
    # physical units
    f_um = sp.metrics.morphology_features(crops, pixel_size=0.5)
    np.testing.assert_allclose(f_um["area"], f["area"] * 0.25)


def test_blank_crop_gives_zero_area_not_error():
    f = sp.metrics.morphology_features(np.zeros((2, 1, 16, 16)))
    assert (f["area"] == 0).all() and f["solidity"].isna().all()


def test_area_tracks_simulated_size_program(sim):
    store = sp.pp.extract_crops(sim, image_key="morphology", labels_key="cell_labels", size=32, crop_um=16)
    f = sp.metrics.morphology_features(store.get(np.arange(300)), channel=0)
    rho = spearmanr(f["area"], sim["table"].obs["size_program"].to_numpy()[:300]).statistic
    assert rho > 0.6


def test_distances_rank_shifted_sets():
    real = sp.metrics.morphology_features(np.stack([_disc(r) for r in np.linspace(3, 6, 40)])[:, None])
    near = sp.metrics.morphology_features(np.stack([_disc(r) for r in np.linspace(3.2, 6.2, 40)])[:, None])
    far = sp.metrics.morphology_features(np.stack([_disc(r) for r in np.linspace(7, 10, 40)])[:, None])
    d_near, d_far = sp.metrics.feature_distances(real, near), sp.metrics.feature_distances(real, far)
    assert d_near.loc["area", "wasserstein"] < d_far.loc["area", "wasserstein"]
    assert d_near.loc["mean", "ks"] < d_far.loc["mean", "ks"]


def test_kid_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, _ = sp.metrics.kid(a, b)
    shifted, _ = sp.metrics.kid(a, b + 1.0)
    assert abs(same) < 0.05 < shifted
    with pytest.raises(ValueError, match="same d"):
        sp.metrics.kid(a, b[:, :4])


def test_feature_distances_by_group_matches_per_group_calls():
    import numpy as np
    import pandas as pd

    import spatia as sp

    rng = np.random.default_rng(0)
    real = pd.DataFrame({"area": rng.normal(10, 1, 60), "solidity": rng.normal(0.9, 0.05, 60)})
    gen = pd.DataFrame({"area": rng.normal(12, 1, 60), "solidity": rng.normal(0.9, 0.05, 60)})
    groups = np.repeat(["a", "b"], 30)
    gen.loc[groups == "b", "area"] += 5  # group b is further off
    d = sp.metrics.feature_distances_by_group(real, gen, groups)
    assert list(d.columns) == ["a", "b"] and "mean" in d.index
    a = sp.metrics.feature_distances(real[groups == "a"], gen[groups == "a"])
    assert np.isclose(d.loc["area", "a"], a.loc["area", "wasserstein_std"])
    assert d.loc["area", "b"] > d.loc["area", "a"] + 3
    with pytest.raises(ValueError, match="one entry per row"):
        sp.metrics.feature_distances_by_group(real, gen, groups[:10])


def test_central_region_is_the_cells_own_nucleus_not_a_larger_neighbour():
    """In dense tissue a crop holds a neighbour's nucleus too: nucleus features (annotate, the image readout)
    measure the one at the centre, where the cell is; the generation metrics keep the largest region."""
    from spatia.tl._nucleus import nucleus_features

    yy, xx = np.ogrid[:32, :32]
    img = np.zeros((2, 32, 32), np.float32)
    img[0][((yy - 16) ** 2 + (xx - 15) ** 2) < 16] = 1.0  # the cell's nucleus, ~45 px
    img[0][((yy - 4) ** 2 + (xx - 26) ** 2) < 30] = 0.8  # a larger neighbour in the corner, ~90 px
    central = sp.metrics.morphology_features(img[None], region="central")["area"].item()
    largest = sp.metrics.morphology_features(img[None])["area"].item()
    assert 40 <= central <= 50 and largest > 80

    class Store:
        def __len__(self):
            return 1

        def get(self, rows):
            return img[None].repeat(len(rows), 0)

    feats = nucleus_features(Store())
    assert feats[0, 0] == central and feats[0, 4] == 1.0  # area and mean intensity of the central nucleus
    with pytest.raises(ValueError, match="region must be"):
        sp.metrics.morphology_features(img[None], region="middle")
