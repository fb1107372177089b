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


def test_impute_backed_writes_the_panel_layer_into_the_store_block_by_block(backed, monkeypatch):
    """backed=True: the layer is computed a block of cells at a time into the slide's store and read back lazily,
    equal to the in-memory layer; the counts and images are not rewritten and nothing temporary is left."""
    import dask.array as da

    from spatia.tl import _impute

    model = sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    dense = sp.tl.impute(backed, model, image_key="morphology", inplace=False)["layers/spatia_imputed"]
    counts_before = _mtimes(backed.path / "tables" / "table" / "X")
    images_before = _mtimes(backed.path / "images")
    blocks = []
    one_layer = _impute._lazy_layer

    def small_blocks(rho, var_names, genes, transform):
        monkeypatch.setattr(_impute, "_LAYER_BLOCK_BYTES", 40 * 4 * 16)  # 16 cells per block
        layer = one_layer(rho, var_names, genes, transform)
        blocks.append(layer.numblocks[0])
        assert isinstance(rho, np.memmap)  # the model's output went to a file, not to memory
        return layer

    monkeypatch.setattr(_impute, "_lazy_layer", small_blocks)
    sp.tl.impute(backed, model, image_key="morphology", backed=True)
    layer = backed["table"].layers["spatia_imputed"]
    assert isinstance(layer, da.Array) and blocks == [int(np.ceil(backed["table"].n_obs / 16))]
    np.testing.assert_allclose(layer.compute(), dense, rtol=1e-6)
    back = sd.read_zarr(backed.path)["table"]
    np.testing.assert_allclose(np.asarray(back.layers["spatia_imputed"]), dense, rtol=1e-6)
    assert back.uns["spatia"]["impute"]["backed"]
    assert _mtimes(backed.path / "tables" / "table" / "X") == counts_before
    assert _mtimes(backed.path / "images") == images_before
    assert not [p for p in backed.path.parent.rglob("*") if ".spatia-" in p.name]
    # write_results after it does not write the layer again (it reads from where it would go)
    layer_files = _mtimes(backed.path / "tables" / "table" / "layers")
    assert "layers/spatia_imputed" in sp.tl.write_results(backed)
    assert _mtimes(backed.path / "tables" / "table" / "layers") == layer_files


def test_impute_backed_refuses_clearly_and_leaves_the_data_alone(backed, monkeypatch, tmp_path):
    from spatia.tl import _impute, _write

    model = sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    in_memory = sp.datasets.simulate(150, mean_depth=25.0, random_state=2)
    with pytest.raises(ValueError, match="sdata.write"):  # no store to write into
        sp.tl.impute(in_memory, model, image_key="morphology", backed=True)
    assert "spatia_imputed" not in in_memory["table"].layers
    # a layer larger than half the machine's memory is refused without backed=True, before any work
    monkeypatch.setattr(_impute, "_dense_limit_bytes", lambda: 1000.0)
    monkeypatch.setattr(_impute, "_prepare", lambda *a, **k: pytest.fail("prepared before refusing"))
    with pytest.raises(MemoryError, match="backed=True"):
        sp.tl.impute(backed, model, image_key="morphology")
    monkeypatch.undo()
    # interrupted while writing into the store: no layer in memory or on disk, no temporary file left
    stored = _mtimes(backed.path / "tables" / "table")

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_write, "_write_key", dies)
    with pytest.raises(KeyboardInterrupt):
        sp.tl.impute(backed, model, image_key="morphology", backed=True)
    assert "spatia_imputed" not in backed["table"].layers
    assert _mtimes(backed.path / "tables" / "table") == stored
    assert not [p for p in backed.path.parent.rglob("*") if ".spatia-" in p.name]


def test_embed_backed_writes_each_level_into_the_store_as_it_comes(backed, monkeypatch):
    """embed(backed=True): the same embeddings as in memory, in the store (with this run's uns entry) and read
    lazily by the table; the model's output goes to a file while it runs; a refused call writes nothing."""
    import dask.array as da

    from spatia.model import _model

    model = sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    dense = sp.tl.embed(backed, model, image_key="morphology", inplace=False)
    with pytest.raises(ValueError, match="inplace=True"):
        sp.tl.embed(backed, model, image_key="morphology", key_added="X_b", backed=True, inplace=False)
    allocated = []
    one = _model._output_array
    monkeypatch.setattr(_model, "_output_array",
                        lambda alloc, shape, name: allocated.append(type(a := one(alloc, shape, name))) or a)
    sp.tl.embed(backed, model, image_key="morphology", key_added="X_b", backed=True)
    assert allocated and set(allocated) == {np.memmap}
    back = sd.read_zarr(backed.path)["table"]
    for level in ("cell", "niche", "tissue"):
        key = f"X_b_{level}"
        assert isinstance(backed["table"].obsm[key], da.Array)
        np.testing.assert_allclose(np.asarray(backed["table"].obsm[key]), dense[f"obsm/X_spatia_{level}"], rtol=1e-6)
        np.testing.assert_allclose(back.obsm[key], dense[f"obsm/X_spatia_{level}"], rtol=1e-6)
    assert back.uns["spatia"]["embed"]["backed"]
    assert not [p for p in backed.path.parent.rglob("*") if ".spatia-" in p.name]
    # the lazily read embedding feeds the next step as an array in memory would
    sp.tl.cluster(backed, use_rep="X_b_niche", level="niche", n_clusters=3)
    assert backed["table"].obs["spatia_niche"].nunique() == 3


def test_the_lazy_panel_layer_follows_the_tables_genes(monkeypatch):
    """Blocks of the backed layer: expected counts on the table's var, in its order, NaN for genes the model
    lacks; the same values whatever the block size."""
    from spatia.tl import _impute

    rng = np.random.default_rng(0)
    rho = rng.random((50, 4), dtype=np.float32)
    lib = np.arange(50, dtype=np.float32)
    expected = np.stack([rho[:, 2] * lib, np.full(50, np.nan, dtype=np.float32), rho[:, 0] * lib], 1)
    for block_bytes in (64 << 20, 3 * 4 * 7):  # one block, then 7 cells per block
        monkeypatch.setattr(_impute, "_LAYER_BLOCK_BYTES", block_bytes)
        layer = _impute._lazy_layer(rho, ["g2", "x", "g0"], ["g0", "g1", "g2", "g3"], _impute._times_lib(lib))
        assert layer.numblocks[0] == (1 if block_bytes > 1000 else 8)
        np.testing.assert_allclose(layer.compute(), expected, rtol=1e-6)
        same = _impute._lazy_layer(rho, ["g0", "g1", "g2", "g3"], ["g0", "g1", "g2", "g3"],
                                   _impute._times_lib(lib)).compute()
        np.testing.assert_allclose(same, rho * lib[:, None], rtol=1e-6)
        logged = _impute._lazy_layer(rho, ["g3", "g0"], ["g0", "g1", "g2", "g3"], _impute._log_per_10k).compute()
        np.testing.assert_allclose(logged, np.log1p(rho[:, [3, 0]] * 1e4), rtol=1e-6)
        assert not np.shares_memory(layer.compute(), rho)  # the source is never changed in place
    np.testing.assert_array_equal(rho, np.random.default_rng(0).random((50, 4), dtype=np.float32))


def test_lazy_blocks_do_not_pickle_what_they_read():
    """dask names an unnamed array by hashing its function, pickling whatever the function holds: for the
    backed layer that was the model's whole output (153 MB and 0.6 s at 20,000 cells × 2,000 genes)."""
    from spatia.tl._write import lazy_rows

    pickled = []

    class Source:
        def __reduce__(self):
            pickled.append(1)
            return (Source, ())

    src = Source()
    layer = lazy_rows(lambda a, b: np.full((b - a, 2), float(src is not None), dtype=np.float32), 10, 2)
    assert not pickled
    np.testing.assert_array_equal(layer.compute(), np.ones((10, 2)))
    import dask.array as da

    da.map_blocks(lambda x: x + (src is None), da.zeros(4, chunks=2), dtype=float)  # the unnamed way pickles
    assert pickled


@pytest.mark.parametrize("method", ["readout", "decoder"])
def test_predict_expression_backed_equals_in_memory_for_a_layer_and_a_new_table(backed, tmp_path, method):
    import dask.array as da

    model = sp.tl.fit(backed, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1, random_state=0)
    dense = sp.tl.predict_expression(backed, model, image_key="morphology", method=method,
                                     inplace=False)["layers/spatia_predicted"]
    sp.tl.predict_expression(backed, model, image_key="morphology", method=method, backed=True)
    layer = backed["table"].layers["spatia_predicted"]
    assert isinstance(layer, da.Array)
    np.testing.assert_allclose(layer.compute(), dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sd.read_zarr(backed.path)["table"].layers["spatia_predicted"]), dense,
                               rtol=1e-5, atol=1e-6)
    # a slide whose table lacks the model's genes gets a new table, written into its store and read from there
    other = sp.datasets.simulate(150, mean_depth=25.0, random_state=2)
    other.tables["table"] = other["table"][:, :5].copy()
    other.write(tmp_path / "other.zarr")
    other = sd.read_zarr(tmp_path / "other.zarr")
    sp.tl.predict_expression(other, model, image_key="morphology", method=method, backed=True)
    new = other.tables["spatia_predicted"]
    assert isinstance(new.X, da.Array) and str(tmp_path / "other.zarr") in str(new.X.dask.values())
    np.testing.assert_allclose(new.X.compute(), dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sd.read_zarr(tmp_path / "other.zarr").tables["spatia_predicted"].X),
                               dense, rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.rglob("*") if ".spatia-" in p.name]
    # that table is in the store now: spatialdata cannot overwrite it there, so a second run refuses before work
    before = _mtimes(tmp_path / "other.zarr")
    with pytest.raises(FileExistsError, match="already in"):
        sp.tl.predict_expression(other, model, image_key="morphology", method=method, backed=True,
                                 overwrite=True)
    assert _mtimes(tmp_path / "other.zarr") == before
