"""Image comparison of sp.pl figures against committed baselines (low DPI, with a tolerance, as squidpy does).

The inputs are fixed (a seeded simulated slide, ground-truth columns standing in for results), so the
figures are deterministic: a change in what a plot draws, where, or in what colour fails the comparison.
Regenerate the baselines after an intended change with ``SPATIA_UPDATE_BASELINES=1 pytest tests/pl``
and look at them before committing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.testing.compare import compare_images  # noqa: E402

import spatia as sp  # noqa: E402
from spatia.tl._mosaic import add_crop_mosaic  # noqa: E402

BASELINE = Path(__file__).parent / "baseline"
DPI = 40
TOL = 12  # RMS difference in 0-255 grey levels; font hinting across platforms stays well below


def check_image(fig, name: str, tmp_path: Path) -> None:
    actual = tmp_path / f"{name}.png"
    fig.savefig(actual, dpi=DPI)
    plt.close(fig)
    expected = BASELINE / f"{name}.png"
    if os.environ.get("SPATIA_UPDATE_BASELINES"):
        shutil.copy(actual, expected)
    assert expected.exists(), f"No baseline {expected}: run with SPATIA_UPDATE_BASELINES=1 and check the image."
    err = compare_images(str(expected), str(actual), tol=TOL)
    assert err is None, err


@pytest.fixture(scope="module")
def slide():
    sd = sp.datasets.simulate(300, random_state=0)
    t = sd["table"]
    t.obs["spatia_niche"] = t.obs["domain"].astype("category")
    x = t.X.toarray() if hasattr(t.X, "toarray") else np.asarray(t.X)
    t.layers["spatia_imputed"] = 0.5 * x + 0.5 * x.mean(0)  # a fixed stand-in for imputed expected counts
    return sd


def test_niches_image(slide, tmp_path):
    check_image(sp.pl.niches(slide), "niches", tmp_path)


def test_niches_zoom_image(slide, tmp_path):
    xy = sp.pp.cell_geometry(slide, slide["table"]).xy
    x0, y0 = xy.min(0)
    check_image(sp.pl.niches(slide, zoom=(x0, x0 + 80, y0, y0 + 80)), "niches_zoom", tmp_path)


def test_niches_without_image(slide, tmp_path):
    check_image(sp.pl.niches(slide, color="cell_type", image_key=False), "niches_no_image", tmp_path)


def test_imputation_image(slide, tmp_path):
    genes = list(slide["table"].var_names[:2])
    check_image(sp.pl.imputation(slide, genes), "imputation", tmp_path)


def test_history_image(tmp_path):
    hist = [{"epoch": e, "train_loss": 3.0 / (e + 1) + 1, "val_loss": 3.2 / (e + 1) + 1.1} for e in range(12)]
    check_image(sp.pl.history(SimpleNamespace(history=hist)), "history", tmp_path)


def test_generated_image(slide, tmp_path):
    """Real crops stand in for generated ones: the figure pairs each type's real and 'generated' rows."""
    t = slide["table"]
    store = sp.pp.extract_crops(slide, size=16, crop_um=16.0)
    rows = np.arange(0, t.n_obs, 5)
    obs = t.obs.iloc[rows][["cell_type"]].copy()
    obs["source"] = t.obs_names[rows]
    sd = slide.subset(list(slide.images) + list(slide.labels) + list(slide.shapes) + ["table"])
    add_crop_mosaic(sd, store.get(rows), obs.reset_index(drop=True), key_added="spatia_generated",
                          channels=store.channels, uns={"pixel_size_um": 1.0})
    check_image(sp.pl.generated(sd, n_per_group=3), "generated", tmp_path)
