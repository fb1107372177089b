"""Write a set of cell crops (generated or transformed) as SpatialData elements users can browse."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .. import _results

logger = logging.getLogger(__name__)


def add_crop_mosaic(
    sdata,
    crops: np.ndarray,
    obs: pd.DataFrame,
    *,
    key_added: str,
    channels: list[str] | None = None,
    pixel_size: float = 1.0,
    gap: int = 2,
    n_cols: int | None = None,
    uns: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Tile crops into one image element, with a labels element and a table linking each crop to its source.

    Writes (all or nothing):

    - ``sdata.images[key_added]``: ``(C, H, W)`` mosaic (crops in a grid, row-major, ``gap`` pixels apart),
      parsed with :class:`~spatialdata.models.Image2DModel`;
    - ``sdata.labels[f"{key_added}_labels"]``: crop ``i`` painted with label ``i + 1`` over its whole tile;
    - ``sdata.tables[f"{key_added}_table"]``: one row per crop with the columns of ``obs`` plus ``region`` /
      ``instance_id`` annotating the labels element, and ``uns["spatia"]`` = ``uns``.

    The elements live in their own coordinate system, named ``key_added`` (a ``Scale`` by ``pixel_size``,
    so lengths are in the crops' µm), and never overlay the tissue.

    Parameters
    ----------
    sdata
        The :class:`~spatialdata.SpatialData` to add to.
    crops
        ``(N, C, S, S)`` uint8 or float in [0, 1].
    obs
        ``N`` rows describing each crop (source cell, condition, sample index...).
    key_added
        Name of the image element (labels: ``f"{key_added}_labels"``, table: ``f"{key_added}_table"``;
        SpatialData wants element names unique across element types).
    channels
        Channel names (default ``c0, c1, ...``).
    pixel_size
        Size of a crop pixel in µm.
    gap, n_cols
        Spacing between crops and grid width (default: about square).
    uns
        Stored as the table's ``uns["spatia"]``: ``{function: run parameters}``.
    overwrite
        Replace existing elements of the same names; otherwise an existing name is an error.
    """
    from anndata import AnnData
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel
    from spatialdata.transformations import Scale

    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must be (N, C, S, S), got shape {crops.shape}.")
    n, c, s, _ = crops.shape
    if len(obs) != n:
        raise ValueError(f"obs has {len(obs)} rows for {n} crops.")
    labels_key = f"{key_added}_labels"
    _results.check_free(sdata, None, mosaic_paths(key_added), overwrite=overwrite)
    if crops.dtype != np.uint8:
        crops = (np.clip(np.nan_to_num(crops.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)
    channels = list(channels) if channels is not None else [f"c{i}" for i in range(c)]
    if len(channels) != c:
        raise ValueError(f"{len(channels)} channel names for {c} channels.")
    n_cols = int(n_cols or max(1, int(np.ceil(np.sqrt(n)))))
    n_rows = max(1, int(np.ceil(n / n_cols)))
    step = s + gap
    img = np.zeros((c, n_rows * step - gap if n else s, n_cols * step - gap if n else s), dtype=np.uint8)
    lab = np.zeros(img.shape[1:], dtype=np.int32)
    rows, cols = np.divmod(np.arange(n), n_cols)
    for i, (r, q) in enumerate(zip(rows, cols, strict=True)):
        img[:, r * step:r * step + s, q * step:q * step + s] = crops[i]
        lab[r * step:r * step + s, q * step:q * step + s] = i + 1
    tf = {key_added: Scale([pixel_size, pixel_size], axes=("y", "x"))}
    image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=channels, transformations=tf)
    labels = Labels2DModel.parse(lab, dims=("y", "x"), transformations=tf)
    o = obs.copy()
    o.index = [f"{key_added}_{i}" for i in range(n)]
    o["region"] = pd.Categorical([labels_key] * n)
    o["instance_id"] = np.arange(1, n + 1)
    o["grid_row"], o["grid_col"] = rows, cols
    table = AnnData(obs=o, uns={"spatia": dict(uns or {})})
    table = TableModel.parse(table, region=labels_key, region_key="region", instance_key="instance_id")
    # everything built: now write (nothing half-written on error above)
    for path, element in zip(mosaic_paths(key_added), (image, labels, table), strict=True):
        _results.save_data(sdata, None, path, element)


def mosaic_paths(key_added: str) -> list[str]:
    """The elements :func:`add_crop_mosaic` writes: image, labels, table."""
    return [f"images/{key_added}", f"labels/{key_added}_labels", f"tables/{key_added}_table"]
