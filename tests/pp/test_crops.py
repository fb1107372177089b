"""extract_crops cuts the right cell, at the right place and scale, from any cell element and image layout."""

from __future__ import annotations

from types import SimpleNamespace

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from anndata import AnnData
from shapely.geometry import Polygon
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation

import spatia as sp
from spatia import settings
from spatia.datasets import simulate
from spatia.pp import CropStore, extract_crops
from spatia.pp._elements import get_image

# intensities are mapped through percentiles (0, 100): with a 0 and a 255 pixel in every image the map is
# the identity, so crop values can be compared with the painted ones
FULL = (0.0, 100.0)


@pytest.fixture(autouse=True)
def _no_progress_bar():
    old = settings.progress_bar
    settings.progress_bar = False
    yield
    settings.progress_bar = old


# ------------------------------------------------------------------------------------------------ builders
def _transform(kind: str):
    """``(spatialdata transformation, 3×3 matrix)`` mapping intrinsic pixel (x, y) to µm (x, y)."""
    if kind == "scale_translate":
        t = Sequence([Scale([0.5, 0.5], axes=("y", "x")), Translation([100.0, 250.0], axes=("y", "x"))])
    elif kind == "anisotropic":
        t = Sequence([Scale([0.3, 0.7], axes=("y", "x")), Translation([-40.0, 12.0], axes=("y", "x"))])
    elif kind == "affine":
        m = np.array([[0.45, 0.12, 30.0], [-0.08, 0.55, -20.0], [0.0, 0.0, 1.0]])
        t = Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))
    else:
        raise ValueError(kind)
    return t, np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _paint(shape, centres, radii, values, background=0):
    """Image ``(y, x)`` float with discs (pixel centres within ``radius`` of the centre) and their labels."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.full(shape, float(background))
    lab = np.zeros(shape, np.int32)
    for k, ((cy, cx), r, v) in enumerate(zip(centres, radii, values, strict=True)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        img[disc] = v
        lab[disc] = k + 1
    return img, lab


def _grid_centres(n_rows, n_cols, spacing, offset, rng):
    """Sub-pixel cell centres ``(y, x)`` in intrinsic pixel coordinates."""
    r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
    yx = np.stack([offset + r * spacing, offset + c * spacing], axis=1).astype(float)
    return yx + rng.uniform(-0.5, 0.5, yx.shape)


def _build(
    centres,
    radii,
    values,
    *,
    shape,
    transform="scale_translate",
    source="labels",
    channels=("DAPI",),
    background=0,
    scale_factors=None,
    chunks=None,
    calibrate=True,
):
    """A SpatialData with image "img", labels "cells", and the cells as labels/circles/polygons/centroids.

    ``centres`` are ``(y, x)`` intrinsic pixel coordinates; channel ``k`` holds ``values * (k + 1) / n_ch``.
    Pixel ``(0, 0)`` is set to 0 and pixel ``(h-1, w-1)`` to 255 (``calibrate``), so percentiles (0, 100)
    map intensities 1:1.
    """
    t, m = _transform(transform)
    centres = np.asarray(centres, dtype=float)
    n = len(centres)
    plane, lab = _paint(shape, centres, radii, values, background)
    img = np.stack([plane * (k + 1) / len(channels) for k in range(len(channels))]).round().astype(np.uint8)
    if calibrate:
        img[:, 0, 0] = 0
        img[:, -1, -1] = 255
    data = da.from_array(img, chunks=chunks) if chunks is not None else img
    image = Image2DModel.parse(
        data, dims=("c", "y", "x"), c_coords=list(channels), transformations={"global": t},
        scale_factors=scale_factors,
    )  # fmt: skip
    labels = Labels2DModel.parse(lab, dims=("y", "x"), transformations={"global": t})
    xy_um = centres[:, ::-1] @ m[:2, :2].T + m[:2, 2]  # (x, y) µm
    px = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    ids = np.arange(1, n + 1)
    obs = pd.DataFrame({"cell_id": ids, "region": "cells"}, index=[f"cell_{i}" for i in ids])
    shapes = {}
    if source == "labels":
        region = "cells"
    elif source == "circles":
        region = "circles"
        shapes[region] = ShapesModel.parse(
            xy_um, geometry=0, radius=np.asarray(radii, float) * px, index=pd.Index(ids),
            transformations={"global": Identity()},
        )  # fmt: skip
    elif source == "polygons":
        region = "polygons"
        polys = [
            Polygon([(x - r * px, y - r * px), (x + r * px, y - r * px), (x + r * px, y + r * px), (x - r * px, y + r * px)])
            for (x, y), r in zip(xy_um, radii, strict=True)
        ]
        shapes[region] = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=polys, index=pd.Index(ids)), transformations={"global": Identity()}
        )
    elif source == "obsm":
        region = None
    else:
        raise ValueError(source)
    adata = AnnData(np.ones((n, 3), np.float32), obs=obs)
    adata.obsm["spatial"] = xy_um
    if region is None:
        table = TableModel.parse(adata)
    else:
        adata.obs["region"] = pd.Categorical([region] * n)
        table = TableModel.parse(adata, region=region, region_key="region", instance_key="cell_id")
    return SpatialData(images={"img": image}, labels={"cells": labels}, shapes=shapes, tables={"table": table})


def _com(crops: np.ndarray) -> np.ndarray:
    """Centre of mass ``(n, 2)`` as (y, x) in crop pixel units (pixel k covers [k, k+1))."""
    w = crops.astype(float)
    s = crops.shape[-1]
    c = np.arange(s) + 0.5
    tot = w.sum((-2, -1))
    return np.stack([(w.sum(-1) * c).sum(-1) / tot, (w.sum(-2) * c).sum(-1) / tot], axis=-1)


def _snapshot(sdata):
    t = sdata.tables["table"]
    return (
        {k: list(getattr(sdata, k).keys()) for k in ("images", "labels", "shapes", "points", "tables")},
        t.obs.copy(), sorted(t.obsm), sorted(t.uns), sorted(t.layers),
    )  # fmt: skip


def _assert_unchanged(sdata, snap):
    now = _snapshot(sdata)
    assert now[0] == snap[0]
    pd.testing.assert_frame_equal(now[1], snap[1])
    assert now[2:] == snap[2:]


# ------------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("source", ["labels", "circles", "polygons", "obsm"])
@pytest.mark.parametrize("transform", ["scale_translate", "anisotropic", "affine"])
def test_crops_centred_on_their_cell(source, transform):
    """Each crop holds its own cell's disc (unique intensity), centred to a fraction of a pixel."""
    rng = np.random.default_rng(0)
    centres = _grid_centres(3, 4, spacing=40, offset=25, rng=rng)
    n = len(centres)
    values = np.linspace(60, 250, n).round()
    sdata = _build(centres, np.full(n, 4.0), values, shape=(130, 170), transform=transform, source=source)
    _, m = _transform(transform)
    px = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    size = 24
    crops = extract_crops(sdata, image_key="img", size=size, crop_um=size * px, percentiles=FULL)
    assert crops.images.shape == (n, 1, size, size) and crops.images.dtype == np.uint8
    assert list(crops.obs_names) == list(sdata.tables["table"].obs_names)
    got = crops.get(np.arange(n))[:, 0]
    # 1:1 sampling: crop pixels are image pixels, the disc's centre of mass is at the crop centre
    err = _com(got) - size / 2
    assert np.abs(err).max() < 0.3, err  # disc discretisation alone: ≤ 0.17 px
    # no mix-ups: the crop centre has exactly the cell's own intensity
    np.testing.assert_array_equal(got[:, size // 2, size // 2], values)
    # get() follows the rows asked for
    rows = rng.permutation(n)
    np.testing.assert_array_equal(crops.get(rows)[:, 0, size // 2, size // 2], values[rows])


def test_crop_side_fixed_vs_extent():
    """crop_um gives every cell the same window; extent sizing scales the window with the cell."""
    centres = np.array([[40.5, 40.5], [40.5, 120.5]])
    radii = np.array([4.0, 8.0])
    sdata = _build(centres, radii, [200, 200], shape=(90, 170))
    size = 32
    px = 0.5
    fixed = extract_crops(sdata, image_key="img", size=size, crop_um=24 * px, percentiles=FULL).get([0, 1])
    area_fixed = (fixed[:, 0] > 100).sum((-2, -1))
    # 24 px window → 32 px crop: areas ≈ π r² (32/24)², ratio 4
    np.testing.assert_allclose(area_fixed, np.pi * radii**2 * (size / 24) ** 2, rtol=0.15)
    ext = extract_crops(
        sdata, image_key="img", size=size, extent_factor=3.0, min_um=1.0, max_um=100.0, percentiles=FULL
    )
    area_ext = (ext.get([0, 1])[:, 0] > 100).sum((-2, -1))
    # window = 3 × diameter: the disc covers π/36 of the crop, whatever the cell's size
    np.testing.assert_allclose(area_ext, np.pi / 36 * size**2, rtol=0.15)
    assert abs(area_ext[1] / area_ext[0] - 1) < 0.1
    # cells without extent (bare centroids) get max(min_um, 16) µm windows
    bare = _build(centres, radii, [200, 200], shape=(90, 170), source="obsm")
    c = extract_crops(bare, image_key="img", size=size, min_um=1.0, percentiles=FULL)
    side_px = 16.0 / px
    area_bare = (c.get([0, 1])[:, 0] > 100).sum((-2, -1))
    np.testing.assert_allclose(area_bare, np.pi * radii**2 * (size / side_px) ** 2, rtol=0.15)


def test_extent_clipped_to_min_max():
    centres = np.array([[40.5, 40.5], [40.5, 120.5]])
    radii = np.array([4.0, 12.0])  # px of 0.5 µm: diameters 4 / 12 µm
    sdata = _build(centres, radii, [200, 200], shape=(90, 170))
    c = extract_crops(sdata, image_key="img", size=32, min_um=10.0, max_um=20.0, percentiles=FULL)
    # windows 2 × diameter = 8 / 24 µm, clipped to 10 / 20 µm (20 / 40 px)
    area = (c.get([0, 1])[:, 0] > 100).sum((-2, -1))
    expected = np.pi * radii**2 * (32 / np.array([20.0, 40.0])) ** 2
    np.testing.assert_allclose(area, expected, rtol=0.15)


# ------------------------------------------------------------------------------------------------ borders
def test_padding_at_image_edge():
    """A cell 3.5 px from the left edge: the crop's columns beyond the edge are exactly zero."""
    centres = np.array([[40.5, 3.5], [40.5, 60.5]])
    sdata = _build(centres, [2.0, 2.0], [250, 250], shape=(80, 100), background=100)
    c = extract_crops(sdata, image_key="img", size=24, crop_um=12.0, percentiles=FULL).get([0])[0, 0]
    # crop columns k sample x = k - 8 (intrinsic): k ≤ 7 lies wholly outside the image
    assert (c[:, :8] == 0).all()
    assert (c[:, 9:] >= 100).all()
    assert c[12, 12] == 250


def test_outside_cells_error_or_pad(tmp_path):
    centres = np.array([[20.5, 20.5], [20.5, 60.5], [20.5, 40.5]])
    sdata = _build(centres, [3.0, 3.0, 3.0], [200, 250, 220], shape=(50, 90), source="circles", background=90)
    circles = sdata.shapes["circles"]
    moved = circles.copy()
    # cell 1 far away; cell 3 2 px left of the image (its window still overlaps the image)
    x, y = circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy()
    x[0], y[0] = 1e4, 1e4
    x[2] = 250.0 - 2 * 0.5
    moved.geometry = gpd.points_from_xy(x, y)
    sdata.shapes["circles"] = ShapesModel.parse(moved)
    snap = _snapshot(sdata)
    with pytest.raises(ValueError, match="2 of 3 cells lie outside image 'img'"):
        extract_crops(sdata, image_key="img", size=16, crop_um=8.0, percentiles=FULL)
    _assert_unchanged(sdata, snap)
    c = extract_crops(sdata, image_key="img", size=16, crop_um=8.0, percentiles=FULL, outside="pad").get([0, 1, 2])
    assert (c[0] == 0).all() and (c[2] == 0).all()
    assert c[1, 0, 8, 8] == 250 and c[1, 0, 0, 0] == 90
    on_disk = extract_crops(
        sdata, image_key="img", size=16, crop_um=8.0, percentiles=FULL, outside="pad", store=tmp_path / "c.zarr"
    )
    np.testing.assert_array_equal(on_disk.get([0, 1, 2]), c)
    with pytest.raises(ValueError, match="outside must be"):
        extract_crops(sdata, image_key="img", outside="clip")


# ------------------------------------------------------------------------------------------------ channels / masks
def test_channel_selection():
    centres = np.array([[20.5, 20.5], [20.5, 60.5]])
    sdata = _build(centres, [3.0, 3.0], [150, 240], shape=(50, 90), channels=("DAPI", "CD3", "CK"))
    kw = {"image_key": "img", "size": 16, "crop_um": 8.0, "percentiles": FULL}
    full = extract_crops(sdata, **kw)
    assert full.channels == ["DAPI", "CD3", "CK"]
    by_name = extract_crops(sdata, channels=["CK", "DAPI"], **kw)
    by_index = extract_crops(sdata, channels=[2, 0], **kw)
    assert by_name.channels == by_index.channels == ["CK", "DAPI"]
    np.testing.assert_array_equal(by_name.images, full.images[:, [2, 0]])
    np.testing.assert_array_equal(by_index.images, by_name.images)
    # channel k holds values·(k+1)/3 → the centre pixel tells which channel landed where
    np.testing.assert_array_equal(by_name.images[:, :, 8, 8], [[150, 50], [240, 80]])
    with pytest.raises(KeyError, match="Unknown channel 'foo'"):
        extract_crops(sdata, channels=["foo"], **kw)
    with pytest.raises(ValueError, match="out of range"):
        extract_crops(sdata, channels=[3], **kw)


def test_mask_neighbours():
    """Another cell's pixels are zeroed, the cell's own and the background are kept."""
    centres = np.array([[30.5, 30.5], [30.5, 42.5]])
    sdata = _build(centres, [5.0, 5.0], [120, 220], shape=(60, 80), background=30)
    kw = {"image_key": "img", "size": 24, "crop_um": 12.0, "percentiles": FULL}
    plain = extract_crops(sdata, **kw).get([0, 1])
    masked = extract_crops(sdata, labels_key="cells", mask_neighbours=True, **kw).get([0, 1])
    # crop of cell 0 spans x 18.5..42.5: cell 1's interior (x ≥ 38.5) is at crop columns ≥ 20
    assert (plain[0, 0, 10:14, 21:] == 220).all()
    assert (masked[0, 0, 10:14, 21:] == 0).all()
    # own cell untouched, background untouched
    np.testing.assert_array_equal(masked[0, 0, 8:16, 8:16], plain[0, 0, 8:16, 8:16])
    assert masked[0, 0, 1, 1] == plain[0, 0, 1, 1] == 30
    # and symmetrically for cell 1
    assert (plain[1, 0, 10:14, :3] == 120).all()
    assert (masked[1, 0, 10:14, :3] == 0).all()
    with pytest.raises(ValueError, match="needs labels_key"):
        extract_crops(sdata, mask_neighbours=True, **kw)


# ------------------------------------------------------------------------------------------------ store
@pytest.fixture(scope="module")
def many_cells():
    """400 cells (cell k with intensity k-dependent), extracted in several strips and batches."""
    rng = np.random.default_rng(1)
    centres = _grid_centres(20, 20, spacing=12, offset=8, rng=rng)
    values = 20 + (np.arange(len(centres)) * 7) % 230
    return _build(centres, np.full(len(centres), 3.0), values, shape=(250, 250), chunks=(1, 64, 64))


def test_zarr_store_equals_memory(many_cells, tmp_path):
    kw = {"image_key": "img", "size": 12, "crop_um": 5.0, "batch_cells": 37}
    mem = extract_crops(many_cells, **kw)
    disk = extract_crops(many_cells, store=tmp_path / "c.zarr", **kw)
    assert mem.path is None and disk.path == str(tmp_path / "c.zarr")
    n = len(mem)
    np.testing.assert_array_equal(disk.get(np.arange(n)), mem.images)
    # the disk store is in spatial order, not table order; get() undoes that
    assert not np.array_equal(disk.order, np.arange(n))
    rows = np.random.default_rng(0).permutation(n)[:50]
    np.testing.assert_array_equal(disk.get(rows), mem.images[rows])
    np.testing.assert_array_equal(mem.get(rows), mem.images[rows])
    opened = CropStore.open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(opened.get(rows), mem.images[rows])
    assert opened.channels == mem.channels and list(opened.obs_names) == list(mem.obs_names)
    assert opened.params == disk.params
    np.testing.assert_array_equal(opened.to_memory().get(rows), mem.images[rows])
    saved = mem.save(tmp_path / "saved.zarr")
    np.testing.assert_array_equal(CropStore.open(tmp_path / "saved.zarr").get(rows), mem.images[rows])
    assert saved.matches(many_cells.tables["table"].obs_names)
    with pytest.raises(FileNotFoundError):
        CropStore.open(tmp_path)


def test_zarr_store_many_batches(tmp_path):
    """More cells than a zarr chunk / write buffer (1024): every crop still lands at its row."""
    n_side = 36
    rng = np.random.default_rng(2)
    centres = _grid_centres(n_side, n_side, spacing=7, offset=5, rng=rng)
    values = 10 + np.arange(len(centres)) % 240
    sdata = _build(centres, np.full(len(centres), 2.0), values, shape=(260, 260), source="obsm")
    kw = {"image_key": "img", "size": 6, "crop_um": 2.0, "percentiles": FULL, "batch_cells": 500}
    mem = extract_crops(sdata, **kw)
    disk = extract_crops(sdata, store=tmp_path / "big.zarr", **kw)
    np.testing.assert_array_equal(disk.get(np.arange(len(centres))), mem.images)
    np.testing.assert_array_equal(mem.images[:, 0, 3, 3], values)


@pytest.mark.parametrize("cache_tiles", [100, 3])
def test_small_tiles_and_cache_give_the_same_crops(many_cells, monkeypatch, cache_tiles):
    """Crops cut across tile borders, with tiles evicted and re-read (narrow stripes), equal the reference."""
    from spatia.pp import _crop_tiles

    kw = {"image_key": "img", "size": 12, "crop_um": 9.0, "labels_key": "cells", "mask_neighbours": True}
    ref = extract_crops(many_cells, **kw).images
    monkeypatch.setattr(_crop_tiles, "_TILE_ROWS", 40)
    monkeypatch.setattr(_crop_tiles, "_TILE_COLS", 60)
    monkeypatch.setattr(_crop_tiles, "_CACHE_BYTES", cache_tiles * 64 * 64)  # chunks (1, 64, 64) uint8
    reads = []
    tile = _crop_tiles._Tiles.tile

    def counting(self, i, j):
        reads.append((self.arr.shape[0], (i, j) in self._cache))
        return tile(self, i, j)

    monkeypatch.setattr(_crop_tiles._Tiles, "tile", counting)
    np.testing.assert_array_equal(extract_crops(many_cells, **kw).images, ref)
    decoded = sum(not hit for _, hit in reads)
    n_tiles = 16  # 250 px in 64-px chunks: 4 × 4 tiles
    assert decoded == 2 * n_tiles if cache_tiles == 100 else decoded > 2 * n_tiles  # image and labels


def test_multiscale_and_dask_images_match_single_scale(many_cells):
    kw = {"image_key": "img", "size": 12, "crop_um": 5.0, "percentiles": FULL}
    ref = extract_crops(many_cells, **kw).images
    base = many_cells.images["img"]
    arr = np.asarray(base.data)
    t = many_cells.images["img"].attrs["transform"]
    for name, image in {
        "numpy": Image2DModel.parse(arr, dims=("c", "y", "x"), transformations=dict(t)),
        "multiscale": Image2DModel.parse(arr, dims=("c", "y", "x"), transformations=dict(t), scale_factors=[2]),
        "dask_small_chunks": Image2DModel.parse(
            da.from_array(arr, chunks=(1, 17, 33)), dims=("c", "y", "x"), transformations=dict(t)
        ),
    }.items():
        sd = SpatialData(images={"img": image}, labels=dict(many_cells.labels), tables=dict(many_cells.tables))
        np.testing.assert_array_equal(extract_crops(sd, **kw).images, ref, err_msg=name)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def small():
    centres = np.array([[20.5, 20.5], [20.5, 60.5]])
    return _build(centres, [3.0, 3.0], [200, 250], shape=(50, 90))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"image_key": "nope"}, KeyError, "No image 'nope'.*'img'"),
        ({"table_key": "nope"}, KeyError, "No table 'nope'.*'table'"),
        ({"labels_key": "nope"}, KeyError, "No labels element 'nope'.*'cells'"),
        ({"size": 2}, ValueError, "size must be"),
        ({"crop_um": 0.0}, ValueError, "crop_um must be positive"),
    ],
)
def test_bad_keys(small, kwargs, err, match):
    snap = _snapshot(small)
    kwargs = {"image_key": "img", **kwargs}
    with pytest.raises(err, match=match):
        extract_crops(small, **kwargs)
    _assert_unchanged(small, snap)


def test_table_annotates_other_element(small):
    small.labels["other"] = Labels2DModel.parse(
        np.asarray(small.labels["cells"].data), dims=("y", "x"), transformations=dict(small.labels["cells"].attrs["transform"])
    )
    snap = _snapshot(small)
    with pytest.raises(ValueError, match="annotates \\['cells'\\], not 'other'"):
        extract_crops(small, image_key="img", labels_key="other")
    _assert_unchanged(small, snap)


def test_not_spatialdata(small):
    with pytest.raises(TypeError, match="SpatialData"):
        extract_crops(small.tables["table"])


def test_image_without_channel_axis():
    img = xr.DataArray(da.zeros((10, 12)), dims=("y", "x"))
    with pytest.raises(ValueError, match="no channel axis 'c'"):
        get_image(SimpleNamespace(images={"x": img}), "x")
    with pytest.raises(KeyError, match="2 images"):
        get_image(SimpleNamespace(images={"x": img, "y": img}), None)


def test_labels_without_rows_ok_rows_without_labels_error(small):
    # an extra segmented object that no table row refers to: fine
    lab = np.asarray(small.labels["cells"].data).copy()
    lab[40:45, 5:10] = 7
    t = dict(small.labels["cells"].attrs["transform"])
    small.labels["cells"] = Labels2DModel.parse(lab, dims=("y", "x"), transformations=t)
    c = extract_crops(small, image_key="img", size=8, crop_um=4.0, percentiles=FULL)
    np.testing.assert_array_equal(c.images[:, 0, 4, 4], [200, 250])
    # a table row whose cell is not in the labels: error
    table = small.tables["table"]
    obs = table.obs.copy()
    obs["cell_id"] = [1, 99]
    small.tables["table"] = TableModel.parse(
        AnnData(table.X, obs=obs), region="cells", region_key="region", instance_key="cell_id"
    )
    snap = _snapshot(small)
    with pytest.raises(ValueError, match="1 of 2 table rows.*no matching instance.*99"):
        extract_crops(small, image_key="img", size=8, crop_um=4.0)
    _assert_unchanged(small, snap)


def test_no_shared_coordinate_system(small):
    small.labels["cells"] = Labels2DModel.parse(
        np.asarray(small.labels["cells"].data), dims=("y", "x"), transformations={"other": Identity()}
    )
    snap = _snapshot(small)
    with pytest.raises(ValueError, match="coordinate system"):
        extract_crops(small, image_key="img")
    _assert_unchanged(small, snap)


def test_coordinate_system_shared_with_image(small):
    """Cells in {"global", "aligned"}, image only in "aligned": crops are cut in "aligned"."""
    lab = small.labels["cells"]
    t = dict(lab.attrs["transform"])
    small.labels["cells"] = Labels2DModel.parse(
        np.asarray(lab.data), dims=("y", "x"), transformations={"global": Identity(), "aligned": t["global"]}
    )
    small.images["img"] = Image2DModel.parse(
        np.asarray(small.images["img"].data), dims=("c", "y", "x"), c_coords=["DAPI"],
        transformations={"aligned": t["global"]},
    )  # fmt: skip
    c = extract_crops(small, image_key="img", size=8, crop_um=4.0, percentiles=FULL)
    assert c.params["coordinate_system"] == "aligned"
    np.testing.assert_array_equal(c.images[:, 0, 4, 4], [200, 250])


# ------------------------------------------------------------------------------------------------ simulator
def test_simulated_crops_show_own_nucleus():
    sdata = simulate(300, random_state=0)
    crops = extract_crops(sdata, image_key="morphology", size=32, channels=["DAPI"])
    assert len(crops) == 300 and crops.channels == ["DAPI"]
    dapi = crops.get(np.arange(300))[:, 0].astype(float)
    centre = dapi[:, 12:20, 12:20].mean((1, 2))
    ring = np.concatenate([dapi[:, :3].reshape(300, -1), dapi[:, -3:].reshape(300, -1),
                           dapi[:, :, :3].reshape(300, -1), dapi[:, :, -3:].reshape(300, -1)], axis=1).mean(1)  # fmt: skip
    assert (centre > ring).mean() > 0.95
    assert centre.mean() > 2 * ring.mean()
    # with the neighbours masked, the bright (top-quartile) DAPI is centred on the crop
    own = extract_crops(
        sdata, image_key="morphology", labels_key="cell_labels", mask_neighbours=True, size=32, channels=["DAPI"]
    )
    own = own.get(np.arange(300))[:, 0].astype(float)
    bright = np.where(own > np.percentile(own, 75, axis=(1, 2), keepdims=True), own, 0.0)
    err = np.abs(_com(bright) - 16)
    assert np.median(err) < 0.5 and np.percentile(err, 90) < 1.5


# --------------------------------------------------------------------------- several images (CosMx FOVs)
def test_crops_from_a_list_of_images_take_each_cell_from_its_own_image():
    """CosMx: one image per field of view. A list of images crops each cell from the image holding it,
    exactly as cropping that image alone would."""
    sd = sp.datasets.cosmx_lung_mini(transcripts=False)
    t = sd["table"]
    keys = ["F002_image", "F003_image"]
    store = sp.pp.extract_crops(sd, image_key=keys, size=16, crop_um=20.0)
    assert len(store) == t.n_obs and store.params["image_key"] == keys
    assert set(store.params["intensity_lo"]) == set(keys)
    for k in keys:
        rows = np.flatnonzero((t.obs["region"] == k.replace("_image", "_labels")).to_numpy())
        assert len(rows)
        alone = sp.pp.extract_crops(sd, image_key=k, size=16, crop_um=20.0, outside="pad")
        np.testing.assert_array_equal(store.get(rows), alone.get(rows))
        assert store.get(rows).reshape(len(rows), -1).std(1).min() > 0  # real pixels, not padding


def test_list_of_images_stream_into_the_store_one_image_at_a_time(tmp_path, monkeypatch):
    """With store=, each image's crops are written and dropped before the next image is cut (they were all
    gathered into one array first), and the store holds what the in-memory extraction gives."""
    import weakref

    import spatia.pp._crops as crops_mod

    sd = sp.datasets.cosmx_lung_mini(transcripts=False)
    keys = ["F002_image", "F003_image"]
    kw = dict(image_key=keys, size=16, crop_um=20.0)
    alive, parts = [], []
    real = crops_mod._extract_one

    def spy(*a, **k):
        alive.append(sum(r() is not None for r in parts))  # earlier images' crops still held
        part = real(*a, **k)
        parts.append(weakref.ref(part.images))
        return part

    monkeypatch.setattr(crops_mod, "_extract_one", spy)
    on_disk = sp.pp.extract_crops(sd, store=tmp_path / "crops", **kw)
    assert alive == [0, 0] and all(r() is None for r in parts)
    assert on_disk.path is not None and not isinstance(on_disk.images, np.ndarray)
    monkeypatch.setattr(crops_mod, "_extract_one", real)
    in_memory = sp.pp.extract_crops(sd, **kw)
    rows = np.arange(sd["table"].n_obs)
    np.testing.assert_array_equal(CropStore.open(tmp_path / "crops").get(rows), in_memory.get(rows))
    assert on_disk.params == in_memory.params


def test_list_of_images_must_cover_the_cells():
    sd = sp.datasets.cosmx_lung_mini(transcripts=False)
    with pytest.raises(ValueError, match="outside all of the images"):
        sp.pp.extract_crops(sd, image_key=["F002_image"], size=8, crop_um=20.0)
    n_f3 = int((sd["table"].obs["region"] == "F003_labels").sum())
    padded = sp.pp.extract_crops(sd, image_key=["F002_image"], size=8, crop_um=20.0, outside="pad")
    assert padded.params["n_outside"] == n_f3
    with pytest.raises(KeyError, match="No image 'nope'"):
        sp.pp.extract_crops(sd, image_key=["F002_image", "nope"], size=8)
    with pytest.raises(KeyError, match="a list of images"):
        sp.pp.extract_crops(sd, size=8)


def test_fit_on_a_slide_with_cells_outside_the_image(tmp_path):
    """The Xenium toy is cut from a larger slide: some cells' centres fall outside its image. fit explains
    the fix, then with outside='pad' embeds every cell and remembers the choice for embed."""
    sd = sp.datasets.xenium_toy(transcripts=False)
    cfg = sp.SpatiaConfig.tiny()
    with pytest.raises(ValueError, match="outside='pad'"):
        sp.tl.fit(sd, config=cfg, max_epochs=1)
    assert "X_spatia_cell" not in sd["table"].obsm  # nothing half-written
    model = sp.tl.fit(sd, config=cfg, max_epochs=1, outside="pad", enable_progress_bar=False)
    emb = sd["table"].obsm["X_spatia_cell"]
    assert emb.shape[0] == sd["table"].n_obs and np.isfinite(emb).all()
    assert model.crop_params["outside"] == "pad" and model.crop_params["n_outside"] > 0
    model.save(tmp_path / "m")
    again = sp.tl.embed(sd, sp.SpatiaModel.load(tmp_path / "m"), inplace=False)
    np.testing.assert_allclose(again["obsm/X_spatia_cell"], emb, atol=1e-5)


def test_extract_crops_keeps_torch_thread_count():
    """numba's parallel resampling shares OpenMP with torch: a caller's thread limit must survive it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sp.pp.extract_crops(simulate(60, random_state=0), size=8)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- degenerate images
def _with_image(sdata, data, dims, **kw):
    from spatialdata.transformations import get_transformation

    t = get_transformation(sdata.images["img"], "global")
    sdata.images["img"] = Image2DModel.parse(data, dims=dims, transformations={"global": t}, **kw) \
        if "z" not in dims else _image3d(data, t)
    return sdata


def _image3d(data, t):
    from spatialdata.models import Image3DModel

    return Image3DModel.parse(data, dims=("c", "z", "y", "x"), c_coords=["DAPI"], transformations={"global": t})


def test_3d_image_uses_the_plane_asked_for(small, caplog):
    """A (c, z, y, x) image: the middle plane with a warning naming it, or the plane z= chooses."""
    base = np.asarray(small.images["img"].data)  # (1, h, w)
    stack = np.stack([255 - base, base, base // 2], axis=1)  # plane 1 is the original, plane 0 inverted
    _with_image(small, stack, ("c", "z", "y", "x"))
    with caplog.at_level("WARNING", logger="spatia"):
        mid = extract_crops(small, image_key="img", size=16, crop_um=8.0, percentiles=FULL)
    assert "z=1" in caplog.text and "pass z=" in caplog.text
    assert mid.params["z"] == 1
    c0 = extract_crops(small, image_key="img", size=16, crop_um=8.0, percentiles=FULL, z=0).get([0, 1])
    c1 = mid.get([0, 1])
    assert c1[:, 0, 8, 8].tolist() == [200, 250] and c0[:, 0, 8, 8].tolist() == [55, 5]
    snap = _snapshot(small)
    for bad in (3, -1, 1.5):
        with pytest.raises(ValueError, match="z must be a plane index 0..2"):
            extract_crops(small, image_key="img", size=16, z=bad)
    _assert_unchanged(small, snap)


def test_z_on_a_2d_image_is_an_error(small):
    with pytest.raises(ValueError, match="is 2-D"):
        extract_crops(small, image_key="img", size=16, z=0)


def test_nan_pixels_are_an_error(small):
    img = np.asarray(small.images["img"].data).astype(np.float32)
    img[0, 20, 22] = np.nan
    _with_image(small, img, ("c", "y", "x"), c_coords=["DAPI"])
    snap = _snapshot(small)
    with pytest.raises(ValueError, match=r"NaN or infinite pixels \(e.g. at row 20, column 22\)"):
        extract_crops(small, image_key="img", size=16)
    _assert_unchanged(small, snap)


def test_image_without_channels_is_an_error():
    img = xr.DataArray(da.zeros((0, 10, 12)), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="has no channels"):
        get_image(SimpleNamespace(images={"x": img}), "x")


def test_xenium_focus_image_is_the_default_among_several():
    """spatialdata-io's Xenium reader writes morphology_focus beside morphology_mip: the focus image is used."""
    from spatialdata.transformations import get_transformation

    sd = sp.datasets.xenium_toy(transcripts=False)
    img = sd.images["morphology_focus"]
    sd.images["morphology_mip"] = Image2DModel.parse(np.asarray(img.data) // 2, dims=("c", "y", "x"),
                                                     c_coords=["DAPI"],
                                                     transformations={"global": get_transformation(img, "global")})
    assert get_image(sd, None)[0] == "morphology_focus"
    del sd.images["morphology_focus"]
    sd.images["other"] = sd.images["morphology_mip"]
    with pytest.raises(KeyError, match="pass image_key="):
        get_image(sd, None)
