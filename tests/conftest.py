"""Shared fixtures: a small simulated slide and a tiny model fitted on it once per session."""

from __future__ import annotations

import logging
import os

if "PYTEST_XDIST_WORKER" in os.environ:
    # one torch thread per xdist worker: two workers × two threads oversubscribe a 2-core machine, and
    # spinning OpenMP threads then make training several times slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import spatia as sp  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

sp.settings.progress_bar = False
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

N_CELLS = 700


@pytest.fixture(scope="session")
def sim():
    """A slide where expression is shallow (so morphology and context matter)."""
    return sp.datasets.simulate(N_CELLS, mean_depth=25.0, random_state=7)


@pytest.fixture
def sdata(sim):
    """A fresh deep copy for tests that write into the object."""
    return _copy(sim)


def _copy(sdata):
    import copy

    return copy.deepcopy(sdata)


@pytest.fixture(scope="session")
def fitted(sim):
    """(sdata, model) after one tiny fit (shared; tests must not modify it)."""
    sd = _copy(sim)
    model = sp.tl.fit(sd, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=20, random_state=0)
    return sd, model


@pytest.fixture(scope="session")
def small_fitted():
    """A 120-cell slide (without results) and a tiny model trained for one epoch on a copy of it."""
    sd = sp.datasets.simulate(120, random_state=0)
    model = sp.tl.fit(_copy(sd), image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    return sd, model


def knn_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(x)
    return float(cross_val_score(KNeighborsClassifier(15), x, y, cv=5).mean())


def pca_of_expression(table, n_comps: int) -> np.ndarray:
    import scanpy as sc

    a = table.copy()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=n_comps, random_state=0)
    return a.obsm["X_pca"]


@pytest.fixture(autouse=True)
def _fresh_crop_cache():
    """Each test starts without crops kept by an earlier one (sp.settings.cache_crops)."""
    from spatia.pp import _crop_cache

    _crop_cache.clear()
    yield
    _crop_cache.clear()
