"""``sp.datasets.cosmx_lung_mini``: two tiny real NanoString CosMx FOV crops, read from the shipped files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._frames import FrameUnits, check_units, to_pixel_frame
from ._real import _DATA, _GLOBAL, _identity, _scale_translate

if TYPE_CHECKING:
    from spatialdata import SpatialData

# CosMx: 0.18 µm per pixel of the FOV images (NanoString's published pixel size for this instrument).
_COSMX_UM_PER_PX = 0.18
_COSMX_FOVS = (2, 3)


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


def _cosmx_fov(path: Path, fov: int, positions: pd.DataFrame):
    """One FOV crop: its image and labels elements placed on the slide, and its cells (mask centroids in global
    µm); returns ``(image, labels, cells)``."""
    import tifffile
    from PIL import Image
    from spatialdata.models import Image2DModel, Labels2DModel

    tag = f"F{fov:03d}"
    label_path = path / "CellLabels" / f"CellLabels_{tag}.tif"
    rgb = np.asarray(Image.open(path / "CellComposite" / f"CellComposite_{tag}.jpg").convert("RGB"))
    mask = tifffile.imread(label_path).astype(np.uint32)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{tag}: labels {mask.shape} and image {rgb.shape[:2]} are not the same crop.")
    x0, y_top = _cosmx_crop_origin(label_path)
    fov_xy = tuple(positions.loc[fov, ["x_global_px", "y_global_px"]].astype(float))
    transformations = _cosmx_fov_transformation(fov_xy, x0, y_top)

    # raster elements
    image = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0),
        dims=("c", "y", "x"),
        c_coords=["red", "green", "blue"],
        transformations=transformations,
    )
    labels = Labels2DModel.parse(mask, dims=("y", "x"), transformations=transformations)

    # cells of this FOV: mask centroids (intrinsic px centres) → µm
    ids = np.unique(mask)
    ids = ids[ids != 0]
    pix_row, pix_col = np.indices(mask.shape)
    flat = mask.ravel()
    area = np.bincount(flat, minlength=ids.max() + 1)[ids]
    cx = np.bincount(flat, weights=pix_col.ravel() + 0.5)[ids] / area
    cy = np.bincount(flat, weights=pix_row.ravel() + 0.5)[ids] / area
    m = transformations[_GLOBAL].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    xy_um = np.stack([cx, cy], axis=1) @ np.asarray(m)[:2, :2].T + np.asarray(m)[:2, 2]
    cells = pd.DataFrame(
        {
            "fov": fov,
            "cell_ID": ids.astype(np.int64),
            "region": f"{tag}_labels",
            "area": area,
            "x": xy_um[:, 0],
            "y": xy_um[:, 1],
        }
    )
    return image, labels, cells


def _cosmx_table(cells: pd.DataFrame, tx: pd.DataFrame):
    """Counts of transcripts per ``(fov, cell_ID)`` of the cells (a zero row for a cell with a mask but no
    transcript), the negative probes aside, parsed as the table of both FOVs' labels."""
    from spatialdata.models import TableModel

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
    return table


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
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel

    path = _DATA / "cosmx_lung12_mini"
    positions = pd.read_csv(path / "Lung12_fov_positions_file.csv").set_index("fov")
    tx = pd.read_parquet(path / "Lung12_tx_file.parquet")

    # 1. each FOV's image, labels and cells
    images, labels, cells = {}, {}, []
    for fov in _COSMX_FOVS:
        tag = f"F{fov:03d}"
        images[f"{tag}_image"], labels[f"{tag}_labels"], fov_cells = _cosmx_fov(path, fov, positions)
        cells.append(fov_cells)
    cells = pd.concat(cells, ignore_index=True)
    cells.index = [f"c_1_{f}_{c}" for f, c in zip(cells["fov"], cells["cell_ID"], strict=True)]

    # 2. counts: transcripts per (fov, cell_ID); cells with a mask but no transcript get a zero row
    table = _cosmx_table(cells, tx)

    # 3. transcripts in global µm (same relation as the rasters: µm = 0.18 * (x, -y) global px)
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
