"""``sp.datasets.merscope_toy``: a tiny real Vizgen MERSCOPE region, read from the shipped instrument files."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._frames import FrameUnits, check_units, to_pixel_frame
from ._real import _DATA, _GLOBAL, _identity

if TYPE_CHECKING:
    from spatialdata import SpatialData


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
