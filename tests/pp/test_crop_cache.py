"""Crops cut once per cells, elements and window (sp.settings.cache_crops), and cut again when one changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import spatia as sp
from spatia.pp import _crops


@pytest.fixture
def counted(monkeypatch):
    """How many times the crops were cut from the image."""
    calls = []
    real = _crops.extract_crops

    def counting(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_crops, "extract_crops", counting)
    return calls


def test_later_calls_reuse_the_crops_and_give_the_same_results(small_fitted, counted):
    sd, model = small_fitted
    sd = copy.deepcopy(sd)
    first = sp.tl.embed(sd, model, image_key="morphology", inplace=False)
    sp.tl.impute(sd, model, image_key="morphology", inplace=False)
    again = sp.tl.embed(sd, model, image_key="morphology", inplace=False)
    assert len(counted) == 1  # three calls, one extraction
    with sp.settings.override(cache_crops=False):
        fresh = sp.tl.embed(sd, model, image_key="morphology", inplace=False)
    assert len(counted) == 2
    for k, v in first.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, again[k])
            np.testing.assert_array_equal(v, fresh[k])


def test_changed_elements_cells_or_window_cut_again(small_fitted, counted):
    from spatialdata import SpatialData

    from spatia.data._prepare import prepare

    sd, model = small_fitted
    sd = copy.deepcopy(sd)
    sp.tl.embed(sd, model, image_key="morphology", inplace=False)
    assert len(counted) == 1
    # a replaced image (the same pixels in a new object): cut again
    sd.images["morphology"] = sd.images["morphology"].copy(deep=True)
    sp.tl.embed(sd, model, image_key="morphology", inplace=False)
    assert len(counted) == 2
    # fewer cells, on the same elements: cut again
    fewer = SpatialData(images={"morphology": sd.images["morphology"]}, labels={"cell_labels": sd.labels["cell_labels"]},
                        tables={"table": sd["table"][:60].copy()})
    sp.tl.embed(fewer, model, image_key="morphology", inplace=False)
    assert len(counted) == 3
    # another window: cut again; the last two windows are kept
    for size, n in ((16, 4), (24, 5), (16, 5), (24, 5)):
        prepare(sd, image_key="morphology", crop_kwargs={"size": size})
        assert len(counted) == n, size
    # a call with the cache off cuts, and frees what was kept
    with sp.settings.override(cache_crops=False):
        prepare(sd, image_key="morphology", crop_kwargs={"size": 16})
    assert len(counted) == 6
    prepare(sd, image_key="morphology", crop_kwargs={"size": 16})
    assert len(counted) == 7
