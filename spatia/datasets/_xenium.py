"""``sp.datasets.xenium_toy``: a tiny real 10x Xenium slide, read from the shipped instrument files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._frames import FrameUnits, check_units, to_pixel_frame
from ._real import _DATA, _decode, _identity, _polygons, _rasterize, _scale_translate

if TYPE_CHECKING:
    from spatialdata import SpatialData

# Xenium toy: an 8x downsample of Xenium's 0.2125 µm/px DAPI (1.7 µm/px) whose pixel index ``col`` sits at
# x_µm = 998 + 1.7 * col (the relation found by overlaying the boundaries on the image). With pixel ``col``
# covering [col, col + 1) in spatialdata's intrinsic coordinates, its centre is col + 0.5, hence the
# half-pixel in the translation. (Measured: the mean DAPI at cell centroids peaks 0.5-1 px from 998 µm.)
_XENIUM_UM_PER_PX = 1.7
_XENIUM_ORIGIN_UM = 998.0 - 0.5 * _XENIUM_UM_PER_PX


def _xenium_table(path: Path):
    """The counts of the "Gene Expression" features with ``cells.parquet`` as ``obs``, parsed as the table of
    ``cell_circles``; returns the table, the cell metadata, the ``obs`` it was built from and the µm centroids."""
    import scanpy as sc
    from spatialdata.models import TableModel

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
    return table, cells, obs, xy


def _xenium_boundaries(path: Path, index: pd.Index, values: np.ndarray, shape: tuple[int, int]):
    """The cell and nucleus boundary polygons as µm shapes indexed by ``index``, and burnt on the image grid
    (of ``shape``) as labels whose value for each cell is ``values``; returns ``(shapes, labels)``."""
    from geopandas import GeoDataFrame
    from spatialdata.models import Labels2DModel, ShapesModel

    shapes, labels = {}, {}
    for name in ("cell_boundaries", "nucleus_boundaries"):
        df = pd.read_parquet(path / f"{name}.parquet")
        df["cell_id"] = _decode(df["cell_id"])
        polys = _polygons(df, "cell_id", "vertex_x", "vertex_y", index)
        shapes[name] = ShapesModel.parse(
            GeoDataFrame(geometry=polys, index=index), transformations=_identity()
        )
        lab = _rasterize(polys, values, shape, _XENIUM_ORIGIN_UM, _XENIUM_UM_PER_PX)
        labels[name.replace("_boundaries", "_labels")] = Labels2DModel.parse(
            lab,
            dims=("y", "x"),
            transformations=_scale_translate(_XENIUM_UM_PER_PX, _XENIUM_ORIGIN_UM, _XENIUM_ORIGIN_UM),
        )
    return shapes, labels


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
    import tifffile
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel

    path = _DATA / "xenium_toy"

    # 1. table: counts (Gene Expression only) + cell metadata
    table, cells, obs, xy = _xenium_table(path)

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
    # 4. boundary shapes, and labels: the polygons burnt on the image grid, value = table.obs["cell_labels"]
    boundaries, labels = _xenium_boundaries(path, index, obs["cell_labels"].to_numpy(), img.shape)
    shapes.update(boundaries)

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
