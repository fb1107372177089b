"""sp.tl.write_results: the tl results written into the zarr store the slide was read from, key by key."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import spatialdata as sd

import spatia as sp
from spatia._results import save_params


@pytest.fixture
def backed(tmp_path):
    sdata = sp.datasets.simulate(150, mean_depth=25.0, random_state=2)
    sdata.write(tmp_path / "slide.zarr")
    return sd.read_zarr(tmp_path / "slide.zarr")


def _mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in folder.rglob("*")}


def test_results_land_in_the_store_and_the_slide_is_not_rewritten(backed):
    store = backed.path
    counts_before = _mtimes(store / "tables" / "table" / "X")
    images_before = _mtimes(store / "images")
    sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    sp.tl.cluster(backed, level="niche", n_clusters=3)
    written = sp.tl.write_results(backed)
    assert {"obsm/X_spatia_cell", "obsm/X_spatia_niche", "obs/spatia_niche", "uns/spatia"} <= set(written)

    back = sd.read_zarr(store)["table"]
    np.testing.assert_array_equal(back.obsm["X_spatia_cell"], backed["table"].obsm["X_spatia_cell"])
    assert (back.obs["spatia_niche"].astype(str) == backed["table"].obs["spatia_niche"].astype(str)).all()
    assert back.uns["spatia"]["cluster"]["function"] == "cluster"
    np.testing.assert_array_equal(back.X.toarray(), backed["table"].X.toarray())
    assert _mtimes(store / "tables" / "table" / "X") == counts_before  # the counts were not rewritten
    assert _mtimes(store / "images") == images_before
    assert not [p for p in store.rglob("*") if ".spatia-tmp-" in p.name or ".old-" in p.name]


def test_an_interrupted_write_leaves_the_stored_key_as_it_was(backed, monkeypatch):
    import spatia._fs as fs

    sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    sp.tl.write_results(backed)
    first = sd.read_zarr(backed.path)["table"].obsm["X_spatia_cell"].copy()

    sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=1,
              overwrite=True)
    assert not np.allclose(backed["table"].obsm["X_spatia_cell"], first)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # written beside its place, killed before the rename

    monkeypatch.setattr(fs, "swap_in", dies)
    with pytest.raises(KeyboardInterrupt):
        sp.tl.write_results(backed)
    np.testing.assert_array_equal(sd.read_zarr(backed.path)["table"].obsm["X_spatia_cell"], first)
    assert not [p for p in backed.path.rglob("*") if ".spatia-tmp-" in p.name]


def test_clear_errors_without_a_store(tmp_path):
    sdata = sp.datasets.simulate(60, random_state=0)
    with pytest.raises(ValueError, match="sdata.write"):
        sp.tl.write_results(sdata)
    with pytest.raises(FileNotFoundError, match="no table 'table'"):
        sp.tl.write_results(sdata, path=tmp_path / "empty.zarr")


def test_refuses_a_table_whose_cells_differ_from_the_stored_ones(backed):
    stored = _mtimes(backed.path / "tables" / "table")
    sub = sd.SpatialData(images=dict(backed.images), tables={"table": backed["table"][::2].copy()})
    sub.path = backed.path
    sub["table"].obsm["X_spatia_cell"] = np.zeros((sub["table"].n_obs, 4), dtype=np.float32)
    save_params(sub["table"], "fit", {}, ["obsm/X_spatia_cell"])
    with pytest.raises(ValueError, match="subset or reordered"):
        sp.tl.write_results(sub)
    assert _mtimes(backed.path / "tables" / "table") == stored  # nothing written


def test_new_elements_are_written_once_and_left_alone_after(backed, caplog):
    from spatialdata.models import Image2DModel

    img = Image2DModel.parse(np.zeros((1, 8, 8), dtype=np.uint8), dims=("c", "y", "x"))
    backed.images["spatia_generated"] = img
    save_params(backed["table"], "generate", {}, ["images/spatia_generated"])
    assert "images/spatia_generated" in sp.tl.write_results(backed)
    assert "spatia_generated" in sd.read_zarr(backed.path).images
    other = backed.path.with_name("other.zarr")
    shutil.copytree(backed.path, other)
    stored = _mtimes(other)
    with pytest.raises(ValueError, match="pass no path"):  # elements only into the store sdata was read from
        sp.tl.write_results(backed, path=other)
    assert _mtimes(other) == stored  # checked before anything is written
    assert "images/spatia_generated" not in sp.tl.write_results(backed)
    assert "already in" in caplog.text
