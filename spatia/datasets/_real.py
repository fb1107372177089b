"""Three tiny real datasets shipped with spatia (Xenium, CosMx, MERSCOPE), loaded as SpatialData.

The raw instrument files live in ``_data/`` (provenance and licences: ``_data/ATTRIBUTION.md``). Each loader
reads them without network access and without spatialdata-io, and returns elements shaped like those the
spatialdata-io readers return for full-size outputs, every one parsed with its spatialdata model.

Coordinates: every loader has one coordinate system, ``"global"``. By default (``units="px"``) it is in
pixels, as spatialdata-io's readers write it: the (first) image has an Identity transformation, Xenium's and
MERSCOPE's shapes and points stay in µm with a µm → pixel transformation, and CosMx's frame is the global
pixel grid (its µm per pixel is recorded with :func:`spatia.pp.set_um_per_unit`, which spatialdata-io cannot
do). ``units="um"`` puts ``"global"`` in micrometres instead (x to the right, y down, like the images):
shapes, points and ``table.obsm["spatial"]`` have an Identity; images and labels carry pixel → µm (pixel
``i`` covers ``[i, i + 1)``). spatia gives the same results on both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._frames import FrameUnits, check_units, to_pixel_frame

if TYPE_CHECKING:
    from spatialdata import SpatialData


_DATA = Path(__file__).parent / "_data"
_GLOBAL = "global"

# Xenium toy: an 8x downsample of Xenium's 0.2125 µm/px DAPI (1.7 µm/px) whose pixel index ``col`` sits at
# x_µm = 998 + 1.7 * col (the relation found by overlaying the boundaries on the image). With pixel ``col``
# covering [col, col + 1) in spatialdata's intrinsic coordinates, its centre is col + 0.5, hence the
# half-pixel in the translation. (Measured: the mean DAPI at cell centroids peaks 0.5-1 px from 998 µm.)
_XENIUM_UM_PER_PX = 1.7
_XENIUM_ORIGIN_UM = 998.0 - 0.5 * _XENIUM_UM_PER_PX

# CosMx: 0.18 µm per pixel of the FOV images (NanoString's published pixel size for this instrument).
_COSMX_UM_PER_PX = 0.18
_COSMX_FOVS = (2, 3)


def _identity():
    from spatialdata.transformations import Identity

    return {_GLOBAL: Identity()}


def _scale_translate(scale: float, tx: float, ty: float) -> dict:
    """Pixel → µm: ``x_um = scale * x_px + tx`` (likewise y) as a spatialdata Sequence."""
    from spatialdata.transformations import Scale, Sequence, Translation

    return {
        _GLOBAL: Sequence(
            [Scale([scale, scale], axes=("x", "y")), Translation([tx, ty], axes=("x", "y"))]
        )
    }


def _polygons(df: pd.DataFrame, id_col: str, x_col: str, y_col: str, order: pd.Index):
    """One shapely Polygon per id from a long vertex table, in the order of ``order``."""
    from shapely import Polygon

    groups = {k: g for k, g in df.groupby(id_col, sort=False)[[x_col, y_col]]}
    missing = [i for i in order if i not in groups]
    if missing:
        raise ValueError(f"{len(missing)} cells have no boundary vertices (e.g. {missing[:3]}).")
    return [Polygon(groups[i].to_numpy()) for i in order]


def _rasterize(
    polys, values: np.ndarray, shape: tuple[int, int], origin: float, um_per_px: float
) -> np.ndarray:
    """Burn µm polygons into a label image whose pixel ``i`` covers ``[origin + i*s, origin + (i+1)*s)``."""
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, dtype=np.uint32)
    for poly, value in zip(polys, values, strict=True):
        x, y = np.asarray(poly.exterior.coords).T
        # skimage fills pixels whose index-space centre is inside; index-space = intrinsic - 0.5
        rr, cc = draw_polygon((y - origin) / um_per_px - 0.5, (x - origin) / um_per_px - 0.5, shape=shape)
        out[rr, cc] = value
    return out


def _decode(values: pd.Series) -> pd.Series:
    return values.map(lambda v: v.decode() if isinstance(v, bytes) else str(v))


# --------------------------------------------------------------------------------------------- Xenium
def xenium_toy(*, transcripts: bool = True, units: FrameUnits = "px") -> SpatialData:
    """A tiny real 10x Xenium slide: 526 cells × 27 genes of human lymphoid tissue with a DAPI image.

    Shaped like what ``spatialdata_io.xenium(path, cells_as_circles=True)`` returns for full-size outputs:
    ``"global"`` is the morphology image's pixel grid, and shapes and points stay in µm with a µm → pixel
    transformation into it (spatia reads the µm per pixel from that transformation).

    Parameters
    ----------
    transcripts
        Also load the 5,260 (subsampled) transcripts as points.
    units
        ``"px"``: spatialdata-io's frames (described below); ``"um"``: ``"global"`` in µm instead (shapes,
        points and ``obsm`` with an Identity, the image and labels with pixel → µm).

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images["morphology_focus"]``: DAPI, ``(c, y, x)`` = ``(1, 237, 237)``, uint16, channel ``"DAPI"``;
      1.7 µm/px (an 8× downsample); Identity to ``"global"`` (with ``units="um"``: Scale(1.7) then
      Translation(997.15)).
      Intensities look wrapped into 0–255 and nuclei are 6–10 px across: fine for registration and format
      tests, poor for morphology.
    - ``labels["cell_labels"]``, ``labels["nucleus_labels"]``: the boundary polygons rasterised on the image
      grid (same transformation); the value of a cell and of its nucleus is ``table.obs["cell_labels"]``.
    - ``shapes["cell_circles"]`` (centroid, radius ``sqrt(cell_area / π)``), ``shapes["cell_boundaries"]``,
      ``shapes["nucleus_boundaries"]`` (polygons): µm, indexed by ``cell_id``, with Translation(-997.15) then
      Scale(1 / 1.7) to ``"global"``.
    - ``points["transcripts"]`` (if ``transcripts``): ``x, y, z`` in µm, ``feature_name``, ``cell_id``
      (``"UNASSIGNED"`` when outside cells), ``qv``, ``overlaps_nucleus``.
    - ``tables["table"]``: raw integer counts (CSR) of the 27 "Gene Expression" features (control probes and
      codewords are dropped, their totals stay in ``obs``); ``obs`` = ``cells.parquet`` columns with
      ``cell_id`` (string, also the obs names), ``region`` = ``"cell_circles"``, ``cell_labels``;
      ``obsm["spatial"]`` = centroids ``[x, y]`` in µm. Annotates ``cell_circles`` through
      ``region_key="region"``, ``instance_key="cell_id"``.

    Notes
    -----
    Source: pachterlab/SpatialFeatureExperiment @ 9ec1fd8b : inst/extdata/xenium, licence Artistic-2.0
    (see ``spatia/datasets/_data/ATTRIBUTION.md``). The OME-TIFF carries no usable pixel size and there is no
    ``experiment.xenium``, so the pixel size and origin are fixed here.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.xenium_toy()
    >>> sdata["table"].shape
    (526, 27)
    """
    import scanpy as sc
    import tifffile
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, PointsModel, ShapesModel, TableModel

    path = _DATA / "xenium_toy"

    # 1. table: counts (Gene Expression only) + cell metadata
    adata = sc.read_10x_h5(path / "cell_feature_matrix.h5", gex_only=True)
    cells = pd.read_parquet(path / "cells.parquet")
    cells["cell_id"] = _decode(cells["cell_id"])
    cells = cells.set_index("cell_id", drop=False)
    cells.index.name = None
    missing = cells.index.difference(adata.obs_names)
    if len(missing):
        raise ValueError(f"{len(missing)} cells of cells.parquet are not in cell_feature_matrix.h5.")
    adata = adata[cells.index].copy()
    xy = cells[["x_centroid", "y_centroid"]].to_numpy(dtype=float)
    obs = cells.drop(columns=["x_centroid", "y_centroid"])
    obs["region"] = pd.Categorical(["cell_circles"] * len(obs))
    obs["cell_labels"] = np.arange(1, len(obs) + 1, dtype=np.uint32)
    table = AnnData(
        X=sparse.csr_matrix(adata.X).astype(np.int32),
        obs=obs,
        var=adata.var,
        obsm={"spatial": xy},
    )
    table = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")

    # 2. image
    img = tifffile.imread(path / "morphology_focus.ome.tif")
    image = Image2DModel.parse(
        img[np.newaxis],
        dims=("c", "y", "x"),
        c_coords=["DAPI"],
        transformations=_scale_translate(_XENIUM_UM_PER_PX, _XENIUM_ORIGIN_UM, _XENIUM_ORIGIN_UM),
    )

    # 3. shapes (µm): circles and boundary polygons, indexed by cell_id
    index = pd.Index(obs["cell_id"].to_numpy(), name=None)
    circles = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.sqrt(cells["cell_area"].to_numpy(dtype=float) / np.pi),
        index=index,
        transformations=_identity(),
    )
    shapes = {"cell_circles": circles}
    labels = {}
    for name in ("cell_boundaries", "nucleus_boundaries"):
        df = pd.read_parquet(path / f"{name}.parquet")
        df["cell_id"] = _decode(df["cell_id"])
        polys = _polygons(df, "cell_id", "vertex_x", "vertex_y", index)
        shapes[name] = ShapesModel.parse(
            GeoDataFrame(geometry=polys, index=index), transformations=_identity()
        )
        # 4. labels: polygons burnt on the image grid, value = table.obs["cell_labels"]
        values = obs["cell_labels"].to_numpy()
        lab = _rasterize(polys, values, img.shape, _XENIUM_ORIGIN_UM, _XENIUM_UM_PER_PX)
        labels[name.replace("_boundaries", "_labels")] = Labels2DModel.parse(
            lab,
            dims=("y", "x"),
            transformations=_scale_translate(_XENIUM_UM_PER_PX, _XENIUM_ORIGIN_UM, _XENIUM_ORIGIN_UM),
        )

    # 5. points
    points = {}
    if transcripts:
        tx = pd.read_parquet(path / "transcripts.parquet")
        tx["cell_id"] = _decode(tx["cell_id"])
        tx["feature_name"] = _decode(tx["feature_name"]).astype("category")
        points["transcripts"] = PointsModel.parse(
            tx,
            coordinates={"x": "x_location", "y": "y_location", "z": "z_location"},
            feature_key="feature_name",
            instance_key="cell_id",
            transformations=_identity(),
        )

    sdata = SpatialData(
        images={"morphology_focus": image},
        labels=labels,
        shapes=shapes,
        points=points,
        tables={"table": table},
    )
    return to_pixel_frame(sdata, "morphology_focus") if check_units(units) == "px" else sdata


# --------------------------------------------------------------------------------------------- CosMx
def _cosmx_crop_origin(path: Path) -> tuple[float, float]:
    """``(x0, y_top)`` in FOV-local pixels of a CellLabels crop, from its GeoTIFF tie point."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tie = tif.pages[0].tags["ModelTiepointTag"].value
    return float(tie[3]), float(tie[4])


def _cosmx_fov_transformation(fov_xy: tuple[float, float], x0: float, y_top: float) -> dict:
    """Intrinsic pixel → global µm for one FOV crop.

    Conventions (checked on the data: with them 100 % of assigned transcripts hit their own ``cell_ID``):
    the pixel at (col, row) of the crop is centred at FOV-local ``(x0 + col, y_top - row)`` px, i.e. at
    intrinsic ``(col + 0.5, row + 0.5)``; FOV-local + FOV position = slide ("global") px, whose y points up;
    global µm = ``(0.18 * x_global_px, -0.18 * y_global_px)`` so that y points down like the images.
    """
    s = _COSMX_UM_PER_PX
    tx = s * (x0 - 0.5 + fov_xy[0])
    ty = s * (-(y_top + 0.5) - fov_xy[1])
    return _scale_translate(s, tx, ty)


def cosmx_lung_mini(*, transcripts: bool = True, units: FrameUnits = "px") -> SpatialData:
    """Two tiny real NanoString CosMx FOV crops of human NSCLC (Lung12): 120 cells × 960 genes.

    Parameters
    ----------
    transcripts
        Also load the 25,825 transcripts as points.
    units
        ``"px"``: ``"global"`` is the pixel grid of ``F002_image`` (as spatialdata-io's CosMx reader, one
        global pixel frame): images and labels are translated, transcripts and ``obsm["spatial"]`` are in
        pixels, and ``sdata.attrs`` records 0.18 µm per unit (:func:`spatia.pp.set_um_per_unit`).
        ``"um"``: ``"global"`` in µm, as described below.

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images["F002_image"]``, ``images["F003_image"]``: the RGB immunofluorescence composites
      (``CellComposite``), ``(c, y, x)`` = ``(3, 648, 672)``, uint8, channels ``["red", "green", "blue"]``;
      blue is the nuclear (DAPI) stain, green a membrane/cytoplasm stain. 0.18 µm/px.
    - ``labels["F002_labels"]``, ``labels["F003_labels"]``: the cell masks (``CellLabels``) of the same crops,
      values = ``cell_ID``.
    - ``points["transcripts"]`` (if ``transcripts``): ``x, y`` in µm, ``target``, ``fov``, ``cell_ID``
      (0 = unassigned), ``CellComp``, ``z_index`` (focal plane).
    - ``tables["table"]``: integer counts (CSR) of transcripts per cell (``cell_ID`` 0 excluded) for the 960
      genes; the 20 negative probes (``NegPrb*``) are in ``obsm["negprobes"]`` and their total in
      ``obs["negprobe_counts"]``. ``obs``: ``fov``, ``cell_ID`` (int, = label value), ``region``
      (``"F002_labels"`` / ``"F003_labels"``), ``area`` (px), ``total_counts``; obs names
      ``c_1_{fov}_{cell_ID}``; ``obsm["spatial"]`` = mask centroids ``[x, y]`` in global µm. Annotates both
      labels through ``region_key="region"``, ``instance_key="cell_ID"``.

    Each FOV's image and labels carry the same pixel → µm transformation, placing the FOV at its position on
    the slide (``Lung12_fov_positions_file.csv``): global µm = ``(0.18 · x_global_px, −0.18 · y_global_px)``
    (CosMx's slide y points up; it is negated so that y points down like the images). The two crops sit side
    by side (F002 ends where F003 begins).

    Notes
    -----
    Source: drieslab/GiottoData @ 1dc55ee8 : inst/Mini_datasets/CosMx/Raw, MIT (repository); data from
    NanoString's public NSCLC release (see ``spatia/datasets/_data/ATTRIBUTION.md``). The label masks were
    stored as uint16 (values unchanged) and the transcript table as parquet to keep the package small.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.cosmx_lung_mini()
    >>> sdata["table"].shape
    (120, 960)
    """
    import tifffile
    from PIL import Image
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, PointsModel, TableModel

    path = _DATA / "cosmx_lung12_mini"
    positions = pd.read_csv(path / "Lung12_fov_positions_file.csv").set_index("fov")
    tx = pd.read_parquet(path / "Lung12_tx_file.parquet")

    images, labels, cells = {}, {}, []
    for fov in _COSMX_FOVS:
        tag = f"F{fov:03d}"
        label_path = path / "CellLabels" / f"CellLabels_{tag}.tif"
        rgb = np.asarray(Image.open(path / "CellComposite" / f"CellComposite_{tag}.jpg").convert("RGB"))
        mask = tifffile.imread(label_path).astype(np.uint32)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"{tag}: labels {mask.shape} and image {rgb.shape[:2]} are not the same crop.")
        x0, y_top = _cosmx_crop_origin(label_path)
        fov_xy = tuple(positions.loc[fov, ["x_global_px", "y_global_px"]].astype(float))
        transformations = _cosmx_fov_transformation(fov_xy, x0, y_top)

        # 1. raster elements
        images[f"{tag}_image"] = Image2DModel.parse(
            np.moveaxis(rgb, -1, 0),
            dims=("c", "y", "x"),
            c_coords=["red", "green", "blue"],
            transformations=transformations,
        )
        labels[f"{tag}_labels"] = Labels2DModel.parse(mask, dims=("y", "x"), transformations=transformations)

        # 2. cells of this FOV: mask centroids (intrinsic px centres) → µm
        ids = np.unique(mask)
        ids = ids[ids != 0]
        pix_row, pix_col = np.indices(mask.shape)
        flat = mask.ravel()
        area = np.bincount(flat, minlength=ids.max() + 1)[ids]
        cx = np.bincount(flat, weights=pix_col.ravel() + 0.5)[ids] / area
        cy = np.bincount(flat, weights=pix_row.ravel() + 0.5)[ids] / area
        m = transformations[_GLOBAL].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        xy_um = np.stack([cx, cy], axis=1) @ np.asarray(m)[:2, :2].T + np.asarray(m)[:2, 2]
        cells.append(
            pd.DataFrame(
                {
                    "fov": fov,
                    "cell_ID": ids.astype(np.int64),
                    "region": f"{tag}_labels",
                    "area": area,
                    "x": xy_um[:, 0],
                    "y": xy_um[:, 1],
                }
            )
        )
    cells = pd.concat(cells, ignore_index=True)
    cells.index = [f"c_1_{f}_{c}" for f, c in zip(cells["fov"], cells["cell_ID"], strict=True)]

    # 3. counts: transcripts per (fov, cell_ID); cells with a mask but no transcript get a zero row
    assigned = tx[tx["cell_ID"] != 0]
    unknown = set(zip(assigned["fov"], assigned["cell_ID"], strict=True)) - set(
        zip(cells["fov"], cells["cell_ID"], strict=True)
    )
    if unknown:
        raise ValueError(f"{len(unknown)} (fov, cell_ID) pairs of the transcripts have no label mask.")
    row_of = pd.Series(np.arange(len(cells)), index=pd.MultiIndex.from_frame(cells[["fov", "cell_ID"]]))
    rows = row_of.loc[list(zip(assigned["fov"], assigned["cell_ID"], strict=True))].to_numpy()
    targets = pd.Categorical(assigned["target"], categories=sorted(tx["target"].unique()))
    counts = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.int32), (rows, targets.codes)),
        shape=(len(cells), len(targets.categories)),
    )
    counts.sum_duplicates()
    is_neg = np.asarray(targets.categories.str.startswith("NegPrb"))
    obs = cells[["fov", "cell_ID", "region", "area"]].copy()
    obs["region"] = pd.Categorical(obs["region"], categories=[f"F{f:03d}_labels" for f in _COSMX_FOVS])
    negprobes = pd.DataFrame(
        counts[:, is_neg].toarray(), index=obs.index, columns=list(targets.categories[is_neg])
    )
    X = counts[:, ~is_neg].tocsr()
    obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
    obs["negprobe_counts"] = negprobes.sum(axis=1).to_numpy()
    table = AnnData(
        X=X,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(targets.categories[~is_neg], dtype=str)),
        obsm={"spatial": cells[["x", "y"]].to_numpy(), "negprobes": negprobes},
    )
    table = TableModel.parse(
        table, region=list(obs["region"].cat.categories), region_key="region", instance_key="cell_ID"
    )

    # 4. transcripts in global µm (same relation as the rasters: µm = 0.18 * (x, -y) global px)
    points = {}
    if transcripts:
        pts = tx.assign(
            x=_COSMX_UM_PER_PX * tx["x_global_px"],
            y=-_COSMX_UM_PER_PX * tx["y_global_px"],
            target=tx["target"].astype("category"),
            z_index=tx["z"],
        )
        points["transcripts"] = PointsModel.parse(
            pts[["x", "y", "target", "fov", "cell_ID", "CellComp", "z_index"]],
            coordinates={"x": "x", "y": "y"},
            feature_key="target",
            instance_key="cell_ID",
            transformations=_identity(),
        )
    sdata = SpatialData(images=images, labels=labels, points=points, tables={"table": table})
    if check_units(units) == "um":
        return sdata
    from ..pp import set_um_per_unit

    to_pixel_frame(sdata, "F002_image", pixel_points=True, pixel_obsm=True)
    set_um_per_unit(sdata, _COSMX_UM_PER_PX)
    return sdata



# --------------------------------------------------------------------------------------------- MERSCOPE
def merscope_toy(*, channels: tuple[str, ...] = ("DAPI", "PolyT"), units: FrameUnits = "px") -> SpatialData:
    """A tiny real Vizgen MERSCOPE region of mouse tissue: 1,058 cells × 49 genes with DAPI/PolyT mosaics.

    Parameters
    ----------
    channels
        Stains of the z-plane 3 mosaic to load, among ``"DAPI"`` and ``"PolyT"`` (the ones shipped).
    units
        ``"px"``: ``"global"`` is the mosaic's pixel grid (as spatialdata-io's MERSCOPE reader): the image has
        an Identity, the µm shapes carry ``micron_to_mosaic_pixel_transform.csv``. ``"um"``: ``"global"`` in
        µm (the image carries the inverse affine, the shapes an Identity).

    Returns
    -------
    :class:`spatialdata.SpatialData` with

    - ``images["mosaic"]``: ``(c, y, x)`` = ``(len(channels), 695, 695)``, uint8, channels = ``channels``
      (z3); 0.432 µm/px. The mosaics are heavily quantised (0–85): tissue is visible, single nuclei
      are not.
    - ``shapes["cell_boundaries"]``: cell polygons in µm (z-plane 3, clipped to the imaged box), indexed by
      the cell id (string).
    - ``tables["table"]``: integer counts (CSR) of the 49 genes from ``cell_by_gene.csv``; the 39 ``Blank-*``
      controls are in ``obsm["blank"]`` and their total in ``obs["blank_counts"]``; ``obs`` = the
      ``cell_metadata.csv`` columns plus ``cell_id`` (string, also the obs names) and ``region`` =
      ``"cell_boundaries"``; ``obsm["spatial"]`` = ``center_x, center_y`` in µm. Annotates
      ``cell_boundaries`` through ``region_key="region"``, ``instance_key="cell_id"``.

    Notes
    -----
    Source: pachterlab/SpatialFeatureExperiment @ 28d3236d : inst/extdata/vizgen_cellbound, licence
    Artistic-2.0 (see ``spatia/datasets/_data/ATTRIBUTION.md``). ``manifest.json``'s ``microns_per_pixel``
    is wrong for this crop; the µm → pixel transform was derived from its ``bbox_microns``. About 4 % of cell
    centres lie outside the imaged box (their polygons are clipped to it). ``spatialdata_io.merscope`` cannot
    read this folder (older boundary layout).

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.merscope_toy()
    >>> sdata["table"].shape
    (1058, 49)
    """
    import geopandas as gpd
    import tifffile
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine

    path = _DATA / "merscope_toy"
    channels = tuple(channels)
    manifest = json.loads((path / "images" / "manifest.json").read_text())
    available = {f["stain"] for f in manifest["mosaic_files"] if (path / "images" / f["file_name"]).exists()}
    bad = [c for c in channels if c not in available]
    if not channels or bad:
        raise ValueError(f"channels must be a non-empty subset of {sorted(available)}, got {list(channels)}.")

    # 1. image: µm → pixel affine from the instrument's csv; the element carries its inverse
    micron_to_px = np.loadtxt(path / "images" / "micron_to_mosaic_pixel_transform.csv")
    px_to_micron = Affine(np.linalg.inv(micron_to_px), input_axes=("x", "y"), output_axes=("x", "y"))
    stack = np.stack([tifffile.imread(path / "images" / f"mosaic_{c}_z3.tif") for c in channels])
    image = Image2DModel.parse(
        stack, dims=("c", "y", "x"), c_coords=list(channels), transformations={_GLOBAL: px_to_micron}
    )

    # 2. table: genes in X, Blank-* controls aside
    counts = pd.read_csv(path / "cell_by_gene.csv.gz", index_col=0, dtype={"cell": str})
    meta = pd.read_csv(path / "cell_metadata.csv.gz", index_col=0, dtype={"EntityID": str})
    counts.index = counts.index.astype(str)
    meta.index = meta.index.astype(str)
    if not counts.index.equals(meta.index):
        meta = meta.reindex(counts.index)
    is_blank = counts.columns.str.startswith("Blank-")
    obs = meta.copy()
    obs.index.name = None
    obs["cell_id"] = obs.index.to_numpy()
    obs["region"] = pd.Categorical(["cell_boundaries"] * len(obs))
    blank = counts.loc[:, is_blank].astype(np.int32)
    blank.index.name = None
    obs["blank_counts"] = blank.sum(axis=1).to_numpy()
    table = AnnData(
        X=sparse.csr_matrix(counts.loc[:, ~is_blank].to_numpy(dtype=np.int32)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(counts.columns[~is_blank], dtype=str)),
        obsm={"spatial": meta[["center_x", "center_y"]].to_numpy(dtype=float), "blank": blank},
    )
    table = TableModel.parse(table, region="cell_boundaries", region_key="region", instance_key="cell_id")

    # 3. shapes: the (older-layout) GeoParquet holds one WKB polygon per cell and z-plane
    bounds = gpd.read_parquet(path / "cell_boundaries.parquet")
    bounds = bounds[bounds["ZIndex"] == bounds["ZIndex"].max()]
    bounds.index = bounds["EntityID"].astype(str).to_numpy()
    missing = obs.index.difference(bounds.index)
    if len(missing):
        raise ValueError(f"{len(missing)} cells of cell_by_gene.csv have no boundary polygon.")
    polys = gpd.GeoDataFrame(geometry=bounds.geometry.loc[obs.index].to_numpy(), index=obs.index.copy())
    shapes = {"cell_boundaries": ShapesModel.parse(polys, transformations=_identity())}

    sdata = SpatialData(images={"mosaic": image}, shapes=shapes, tables={"table": table})
    return to_pixel_frame(sdata, "mosaic") if check_units(units) == "px" else sdata
