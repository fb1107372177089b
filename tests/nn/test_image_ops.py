"""Differentiable image operations (spatia.nn): Otsu threshold, largest region, morphology proxies against the
measured features, Gaussian blur."""

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.filters import threshold_otsu

import spatia as sp
from spatia.nn import largest_component, morphology_proxies, otsu_fraction

PROXY_FEATURES = ("area", "perimeter", "eccentricity", "mean_intensity", "max_intensity", "min_intensity",
                  "intensity_std", "major_axis_length", "minor_axis_length")


def _blobs(n=120, size=24, seed=0):
    """Noisy elliptic nuclei of random size, shape, brightness and position, some with a dimmer neighbour
    at the crop's edge (the measured region is the largest one, not the whole foreground)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = []
    for i in range(n):
        a, b = rng.uniform(2.5, 7.0), rng.uniform(2.0, 5.0)
        th = rng.uniform(0, np.pi)
        cy, cx = (size - 1) / 2 + rng.normal(0, 1.5, 2)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        inside = (u / a) ** 2 + (v / b) ** 2
        img = rng.uniform(0.4, 0.9) * np.exp(-np.clip(inside - 1, 0, None) * 4) * (1 + 0.3 * (1 - inside).clip(0, 1))
        if i % 3 == 0:  # a smaller neighbour at the edge
            img = img + 0.5 * ((xx - 1) ** 2 + (yy - 2) ** 2 <= 4)
        img = img + rng.uniform(0.02, 0.1) + 0.03 * rng.random((size, size))
        out.append(np.clip(img, 0, 1))
    return np.stack(out)[:, None].astype(np.float32)


def test_proxies_rank_cells_like_the_measured_features():
    crops = _blobs()
    measured = sp.metrics.morphology_features(crops)
    proxy = morphology_proxies(torch.as_tensor(crops)).numpy()
    assert proxy.shape == (len(crops), len(PROXY_FEATURES)) and np.isfinite(proxy).all()
    for j, name in enumerate(PROXY_FEATURES):
        ok = measured[name].notna().to_numpy()
        rho = spearmanr(proxy[ok, j], measured[name][ok]).statistic
        assert rho > (0.85 if name == "min_intensity" else 0.9), (name, rho)


def test_otsu_and_largest_region_match_skimage():
    crops = _blobs(n=20, seed=1)[:, 0]
    flat = torch.as_tensor(crops).flatten(1)
    frac = otsu_fraction(flat).numpy()
    lo, hi = crops.min((1, 2)), crops.max((1, 2))
    expected = np.array([(threshold_otsu(c) - a) / (b - a) for c, a, b in zip(crops, lo, hi, strict=True)])
    np.testing.assert_allclose(frac, expected, atol=1.5 / 256)
    # two blobs: the larger is kept; an empty mask stays empty
    m = torch.zeros(2, 12, 12, dtype=torch.bool)
    m[0, 1:3, 1:3] = True
    m[0, 5:11, 4:10] = True
    comp = largest_component(m)
    assert comp[0].sum() == 36 and comp[0, 5:11, 4:10].all() and not comp[0, 1:3, 1:3].any()
    assert not comp[1].any()


def test_proxies_are_differentiable_and_ignore_a_uniform_brightening():
    crops = torch.as_tensor(_blobs(n=16, seed=2), dtype=torch.float64).requires_grad_(True)
    p = morphology_proxies(crops)
    p[:, 0].sum().backward()  # area
    assert torch.isfinite(crops.grad).all() and crops.grad.abs().sum() > 0
    with torch.no_grad():
        brighter = morphology_proxies(crops + 0.1)
        grown = morphology_proxies(torch.as_tensor(_blobs(n=16, seed=2, size=24)) ** 0.5)
    # the region moves with the crop's range: area and shape unchanged, intensities shifted
    np.testing.assert_allclose(brighter[:, 0], p[:, 0].detach(), rtol=0.02)
    np.testing.assert_allclose(brighter[:, 3], p[:, 3].detach() + 0.1, atol=1e-3)
    # a gamma that lifts the dim rim of each nucleus above the threshold grows the region
    assert (grown[:, 0] > p[:, 0].detach().float()).float().mean() > 0.9
    # a constant crop: finite values (no foreground region: the whole crop)
    flat = morphology_proxies(torch.full((1, 1, 8, 8), 0.3))
    assert torch.isfinite(flat).all()


def test_region_does_not_grow_by_dimming_the_brightest_pixel():
    """The area's gradient sits on the region's rim, not on the crop's maximum (which sets the threshold)."""
    s = 16
    yy, xx = np.mgrid[:s, :s]
    img = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / (2 * 3.0**2)).astype(np.float32)
    x = torch.tensor(img[None, None], requires_grad=True)
    morphology_proxies(x)[:, 0].sum().backward()
    g = x.grad[0, 0].numpy()
    peak = np.unravel_index(img.argmax(), img.shape)
    assert abs(g[peak]) < 1e-6, g[peak]  # before 2026-11-27: -15 (dimming the peak lowered the threshold)
    assert g.max() > 1.0  # brightening pixels at the rim grows the region


def test_gaussian_blur_of_morphology_loss():
    from spatia.nn import gaussian_blur

    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and torch.allclose(y.sum((2, 3)), torch.ones(2, 1), atol=1e-5)
    assert float(y.max()) < 0.2 and gaussian_blur(x, 0.0) is x
