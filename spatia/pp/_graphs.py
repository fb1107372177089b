"""Spatial context: the niche graph (through squidpy) and tissue tiles."""

from __future__ import annotations

import itertools
import logging

import numpy as np
from anndata import AnnData

from .._constants import Defaults, Keys
from .._utils import log_added
from ._elements import get_table
from ._units import Units, resolve_units

logger = logging.getLogger(__name__)


def _coords(table: AnnData, spatial_key: str) -> np.ndarray:
    if spatial_key not in table.obsm:
        raise KeyError(
            f"No obsm[{spatial_key!r}] with cell centroids in the table (have: {list(table.obsm) or 'none'}); "
            "pass spatial_key= or add the centroids."
        )
    xy = np.asarray(table.obsm[spatial_key], dtype=float)[:, :2]
    if not np.isfinite(xy).all():
        raise ValueError(f"obsm[{spatial_key!r}] contains NaN or infinite coordinates.")
    return xy


def obsm_um(table: AnnData, spatial_key: str, um_per_unit: float | None) -> tuple[np.ndarray, Units]:
    """``obsm[spatial_key]`` in µm, and the units found for it (see :func:`~spatia.pp.resolve_units`)."""
    xy = _coords(table, spatial_key)
    # obsm is in no coordinate system (spatialdata-io keeps it in µm beside pixel frames): only a value
    # stored on the table itself, or the cells' spacing, tell its units
    units = resolve_units(table, xy, coordinate_system=None, um_per_unit=um_per_unit,
                          what=f"table.obsm[{spatial_key!r}]")
    return xy * units.um_per_unit, units


def niche_graph(
    data,
    *,
    table_key: str | None = Defaults.TABLE,
    n_neighs: int | None = Defaults.NICHE_K,
    radius: float | None = None,
    spatial_key: str = Keys.SPATIAL,
    key_added: str = Keys.NICHE_GRAPH,
    inplace: bool = True,
    um_per_unit: float | None = None,
):
    """Niche graph of every cell: its ``n_neighs`` nearest cells, or the cells within ``radius``.

    A thin wrapper over :func:`squidpy.gr.spatial_neighbors` (``coord_type="generic"``) on
    ``obsm[spatial_key]`` converted to µm, so ``radius`` and the distances written are in µm whatever the
    units of the coordinates.

    Parameters
    ----------
    data
        :class:`~anndata.AnnData` or :class:`~spatialdata.SpatialData`.
    table_key
        Table to use when ``data`` is a SpatialData.
    n_neighs
        Number of nearest neighbours (ignored when ``radius`` is given).
    radius
        Radius of the niche in µm (the paper's niches are ~55 µm windows).
    spatial_key
        ``obsm`` key of cell centroids.
    key_added
        Prefix of the ``obsp`` keys written.
    inplace
        Write into the table and return ``None``; otherwise return ``(connectivities, distances)``.
    um_per_unit
        µm per unit of ``obsm[spatial_key]``. Default: the value stored with :func:`~spatia.pp.set_um_per_unit`
        on the table, else 1 when the cells' spacing is that of µm coordinates, else an estimate from it
        (with a warning).

    Returns
    -------
    ``None``, writing ``obsp['{key_added}_connectivities']``, ``obsp['{key_added}_distances']`` (µm) and
    ``uns['{key_added}_neighbors']`` (with the units used); or, with ``inplace=False``, the two sparse
    matrices.

    Examples
    --------
    >>> sp.pp.niche_graph(sdata, n_neighs=10)
    """
    from .._logging import quiet_dependencies

    with quiet_dependencies():  # squidpy's first import warns about its own docstrings (docrep)
        import squidpy as sq

    table = get_table(data, table_key)
    _check_niche(table.n_obs, n_neighs, radius)
    xy_um, units = obsm_um(table, spatial_key, um_per_unit)
    tmp = AnnData(obs=table.obs[[]].copy(), obsm={spatial_key: xy_um})
    if radius is not None:
        kw, new_api = {"radius": float(radius)}, "spatial_neighbors_radius"
    else:
        kw, new_api = {"n_neighs": int(min(n_neighs, max(1, table.n_obs - 1)))}, "spatial_neighbors_knn"
    sd_logger = logging.getLogger("spatialdata._logging")  # squidpy logs each graph at INFO through it
    level = sd_logger.level
    sd_logger.setLevel(max(level, logging.WARNING))
    try:
        if hasattr(sq.gr, new_api):  # squidpy >= 1.8 splits spatial_neighbors by graph type
            getattr(sq.gr, new_api)(tmp, spatial_key=spatial_key, key_added=key_added, **kw)
        else:
            sq.gr.spatial_neighbors(tmp, spatial_key=spatial_key, coord_type="generic", key_added=key_added, **kw)
    finally:
        sd_logger.setLevel(level)
    conn = tmp.obsp[f"{key_added}_connectivities"].tocsr()
    dist = tmp.obsp[f"{key_added}_distances"].tocsr()
    if not inplace:
        return conn, dist
    table.obsp[f"{key_added}_connectivities"] = conn
    table.obsp[f"{key_added}_distances"] = dist
    table.uns[f"{key_added}_neighbors"] = {**tmp.uns[f"{key_added}_neighbors"], Keys.UNITS: units.to_dict()}
    log_added("adata.obsp", f"{key_added}_connectivities")
    return None


_MEMBER_CHUNK = 65_536  # cells queried at a time


def _check_niche(n_cells: int, n_neighs: int | None, radius: float | None) -> None:
    if radius is None and (n_neighs is None or n_neighs < 1):
        raise ValueError("Give n_neighs >= 1 or a radius.")
    if radius is not None and radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}.")
    if n_cells < 2:
        raise ValueError(f"The table has {n_cells} cell(s): a niche graph needs at least 2 cells.")


def niche_members(xy_um: np.ndarray, n_neighs: int, radius: float | None = None) -> np.ndarray:
    """``(n, K)`` row indices of each cell's niche members, ``-1`` padded: the graph of :func:`niche_graph`
    (same members, each row in ascending row order) built straight into a table, a chunk of cells at a time.

    ``K`` is ``n_neighs``, or with ``radius`` (µm) the larger of ``n_neighs`` and the most cells any niche
    holds. A cell is never its own member. Memory: the KD-tree and the table, never a cells × cells matrix
    (a million cells cost their ``(n, K)`` table, not squidpy's two sparse graphs beside it).
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, dtype=np.float64)
    n = len(xy)
    _check_niche(n, n_neighs, radius)
    index = _index_dtype(n)
    tree = cKDTree(xy)
    if radius is None:
        k = int(min(n_neighs, max(1, n - 1)))
        out = np.full((n, int(n_neighs)), -1, dtype=index)
        for start in range(0, n, _MEMBER_CHUNK):
            rows = np.arange(start, min(n, start + _MEMBER_CHUNK))
            _, idx = tree.query(xy[rows], k=min(k + 1, n))
            idx = idx.reshape(len(rows), -1)
            is_self = idx == rows[:, None]
            # drop the cell itself (or, when k + 1 cells share its position, the farthest of them)
            drop = np.where(is_self.any(1), is_self.argmax(1), idx.shape[1] - 1)
            keep = np.ones_like(idx, dtype=bool)
            keep[np.arange(len(rows)), drop] = False
            out[rows, :k] = np.sort(idx[keep].reshape(len(rows), -1), axis=1)[:, :k]
        return out
    # two passes a chunk at a time: the niches' sizes (the table's width), then the members, written straight
    # into the table (no Python list of one array per cell)
    width = int(n_neighs)
    for start in range(0, n, _MEMBER_CHUNK):
        sizes = tree.query_ball_point(xy[start:start + _MEMBER_CHUNK], r=float(radius), return_length=True)
        width = max(width, int(np.max(sizes)) - 1)  # each niche holds its own cell once
    out = np.full((n, width), -1, dtype=index)
    for start in range(0, n, _MEMBER_CHUNK):
        rows = np.arange(start, min(n, start + _MEMBER_CHUNK))
        part = tree.query_ball_point(xy[rows], r=float(radius), return_sorted=True)
        lens = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
        flat = np.fromiter(itertools.chain.from_iterable(part), dtype=np.int64, count=int(lens.sum()))
        owner = np.repeat(rows, lens)
        keep = flat != owner
        flat, owner = flat[keep], owner[keep]
        per_row = np.bincount(owner - start, minlength=len(rows))
        slot = np.arange(len(flat)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        out[owner, slot] = flat
    return out


def tile_index(xy_um: np.ndarray, tile_size: float) -> np.ndarray:
    """The tissue tile of each cell (positions in µm; tiles numbered row-major over the occupied grid)."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}.")
    cell = np.floor((xy_um - xy_um.min(axis=0)) / tile_size).astype(np.int64)
    key = cell[:, 1] * (cell[:, 0].max() + 1) + cell[:, 0]
    return np.unique(key, return_inverse=True)[1].ravel().astype(_index_dtype(len(key)), copy=False)


def _index_dtype(n: int) -> type:
    """Row indices of ``n`` cells as int32 (half the memory of int64 on a million-cell slide) when they fit."""
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def tissue_tiles(
    data,
    *,
    table_key: str | None = Defaults.TABLE,
    tile_size: float = Defaults.TILE_UM,
    spatial_key: str = Keys.SPATIAL,
    key_added: str = Keys.TILE,
    inplace: bool = True,
    um_per_unit: float | None = None,
):
    """Assign every cell to a square tissue tile of side ``tile_size`` µm.

    Tiles are the tokens' grouping at the tissue level (≈ 4× a niche). Tiles are numbered in row-major
    order over the occupied grid; slides with several regions (e.g. CosMx FOVs) get separate tiles as
    long as their coordinates do not overlap. ``um_per_unit`` is the µm per unit of ``obsm[spatial_key]``,
    found as in :func:`niche_graph` when not given.

    Returns
    -------
    ``None``, writing ``obs[key_added]`` (categorical tile id); or, with ``inplace=False``, the integer
    tile id of each cell.

    Examples
    --------
    >>> sp.pp.tissue_tiles(sdata, tile_size=200.0)  # obs["spatia_tile"]: the 200-µm tile of each cell
    """
    import pandas as pd

    table = get_table(data, table_key)
    xy, _ = obsm_um(table, spatial_key, um_per_unit)
    tile = tile_index(xy, tile_size)
    if not inplace:
        return tile
    table.obs[key_added] = pd.Categorical(tile)
    log_added("adata.obs", key_added)
    return None
