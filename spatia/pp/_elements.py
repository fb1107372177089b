"""Find the elements a function works on, and map cells between coordinate systems.

Everything here reads; nothing writes into the user's object.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from numba import njit

from .._constants import Defaults, Keys
from ._units import Units, resolve_units

logger = logging.getLogger(__name__)


def _is_sdata(data) -> bool:
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def _available(container) -> str:
    keys = list(container.keys())
    return ", ".join(repr(k) for k in keys) if keys else "none"


def get_table(data: AnnData, table_key: str | None = Defaults.TABLE) -> AnnData:
    """Return the table to work on.

    Parameters
    ----------
    data
        An :class:`~anndata.AnnData` (returned as is) or a :class:`~spatialdata.SpatialData`.
    table_key
        Name of the table in ``data.tables``. ``None`` picks the only table.

    Returns
    -------
    The :class:`~anndata.AnnData` table (not a copy).

    Examples
    --------
    >>> table = sp.pp.get_table(sdata)  # the only table, or table_key="table"
    """
    if isinstance(data, AnnData):
        return data
    if not _is_sdata(data):
        raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")
    tables = data.tables
    if table_key is None:
        if len(tables) != 1:
            raise KeyError(f"SpatialData has {len(tables)} tables ({_available(tables)}): pass table_key=.")
        return next(iter(tables.values()))
    if table_key not in tables:
        raise KeyError(f"No table {table_key!r} in the SpatialData; available tables: {_available(tables)}.")
    return tables[table_key]


def get_embedding(table: AnnData, level: str) -> np.ndarray:
    """``obsm['X_spatia_<level>']`` of the table, with clear errors for a bad level or a missing fit.

    Examples
    --------
    >>> emb = sp.pp.get_embedding(sdata["table"], "niche")  # obsm["X_spatia_niche"]
    """
    if level not in Keys.LEVEL_TO_EMB:
        raise ValueError(f"level must be one of {list(Keys.LEVEL_TO_EMB)}, got {level!r}.")
    key = Keys.LEVEL_TO_EMB[level]
    if key not in table.obsm:
        raise KeyError(f"No obsm[{key!r}] in the table: run `sp.tl.fit` or `sp.tl.embed` first.")
    return np.asarray(table.obsm[key])


def table_annotation(table: AnnData) -> tuple[list[str], str | None, str | None]:
    """``(regions, region_key, instance_key)`` of a SpatialData table, or ``([], None, None)``."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    if region is None:
        return [], None, None
    regions = [region] if isinstance(region, str) else list(region)
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def input_images(sdata) -> list[str]:
    """The images that are not spatia's own outputs (generated / transition crop mosaics are never an input)."""
    tables = getattr(sdata, "tables", {})
    own = {k for k in sdata.images if f"{k}_table" in tables and "spatia" in tables[f"{k}_table"].uns}
    return [k for k in sdata.images if k not in own]


def get_image(sdata, image_key: str | None):
    """Return ``(key, DataArray)`` of the full-resolution image, checking it exists and has a channel axis."""
    from xarray import DataArray, DataTree

    images = sdata.images
    if image_key is None:
        if len(images) > 1:
            inputs = input_images(sdata)
            if len(inputs) == 1:
                image_key = inputs[0]
            elif "morphology_focus" in inputs:  # spatialdata-io's Xenium: focus (and older: mip) images
                image_key = "morphology_focus"
                logger.info("Using image 'morphology_focus' of %s (pass image_key= for another).", _available(images))
    if image_key is None:
        if len(images) != 1:
            raise KeyError(
                f"SpatialData has {len(images)} images ({_available(images)}): pass image_key= (one image, or "
                "a list of images, e.g. one per field of view, to crop each cell from the image that holds it)."
            )
        image_key = next(iter(images))
    if image_key not in images:
        raise KeyError(f"No image {image_key!r} in the SpatialData; available images: {_available(images)}.")
    img = images[image_key]
    if isinstance(img, DataTree):
        scales = sorted(img.children, key=lambda s: int(s.replace("scale", "")) if s.startswith("scale") else 0)
        img = next(iter(img[scales[0]].values()))
    if not isinstance(img, DataArray):
        raise TypeError(f"Image {image_key!r} is a {type(img).__name__}, expected an xarray DataArray or DataTree.")
    if "c" not in img.dims:
        raise ValueError(
            f"Image {image_key!r} has dims {img.dims} and no channel axis 'c': parse it with "
            "`spatialdata.models.Image2DModel.parse(array, dims=('c', 'y', 'x'))` (add a length-1 channel axis)."
        )
    if img.sizes["c"] == 0:
        raise ValueError(f"Image {image_key!r} has no channels (its 'c' axis is empty).")
    if tuple(d for d in img.dims if d != "z") != ("c", "y", "x"):
        raise ValueError(f"Image {image_key!r} has dims {img.dims}; spatia works on 2-D images ('c', 'y', 'x').")
    return image_key, img


def coordinate_systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True).keys())


def affine_to(element, coordinate_system: str) -> np.ndarray:
    """3×3 matrix mapping the element's intrinsic (x, y) to ``coordinate_system`` (x, y)."""
    from spatialdata.transformations import get_transformation

    cs = coordinate_systems(element)
    if coordinate_system not in cs:
        raise ValueError(
            f"Element is not registered to coordinate system {coordinate_system!r} (it has: {cs}). "
            "Pass coordinate_system= one of those, or register the element with "
            "`spatialdata.transformations.set_transformation`."
        )
    t = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def default_coordinate_system(*elements) -> str:
    """The coordinate system shared by all elements; ``"global"`` if it is among them."""
    shared = None
    for el in elements:
        cs = set(coordinate_systems(el))
        shared = cs if shared is None else shared & cs
    if not shared:
        raise ValueError(
            "The image and the cells' element share no coordinate system: register them to a common one "
            "with `spatialdata.transformations.set_transformation`."
        )
    return Defaults.COORDINATE_SYSTEM if Defaults.COORDINATE_SYSTEM in shared else sorted(shared)[0]


@dataclass
class CellGeometry:
    """Where the table's cells are: centroids and diameters in one coordinate system.

    Attributes
    ----------
    xy
        ``(n_obs, 2)`` centroids ``[x, y]`` in ``coordinate_system`` units, in table row order.
    diameter
        ``(n_obs,)`` equivalent diameter (same units), NaN when unknown (bare centroids).
    region
        ``(n_obs,)`` name of the element each cell belongs to.
    coordinate_system
        The coordinate system of ``xy``.
    source
        ``"labels"``, ``"shapes"``, ``"points"`` or ``"obsm"``.
    units
        µm per ``coordinate_system`` unit and where that came from (:func:`~spatia.pp.resolve_units`).

    Examples
    --------
    >>> geo = sp.pp.cell_geometry(sdata, sdata["table"])
    >>> geo.xy_um[:3], geo.diameter_um[:3], geo.units.um_per_unit
    """

    xy: np.ndarray
    diameter: np.ndarray
    region: np.ndarray
    coordinate_system: str
    source: str
    units: Units

    @property
    def xy_um(self) -> np.ndarray:
        """Centroids in µm (``xy × um_per_unit``; same origin)."""
        return self.xy * self.units.um_per_unit

    @property
    def diameter_um(self) -> np.ndarray:
        """Equivalent diameters in µm."""
        return self.diameter * self.units.um_per_unit

    def subset(self, rows: np.ndarray) -> CellGeometry:
        """The geometry of some of the cells."""
        return CellGeometry(self.xy[rows], self.diameter[rows], self.region[rows], self.coordinate_system,
                            self.source, self.units)


def chunk_edges(chunks: Sequence[int] | None, n: int, target: int) -> np.ndarray:
    """Tile boundaries along an axis of length ``n``: chunk boundaries grouped into tiles of ≥ ``target`` px.

    Chunks longer than ``2 * target`` are split (reading part of a chunk decodes all of it, but an in-memory
    or huge chunk should not become one huge tile).
    """
    chunks = (n,) if chunks is None else tuple(int(c) for c in chunks)
    fine = [0]
    for size in chunks:
        pieces = max(1, int(round(size / target))) if size > 2 * target else 1
        fine.extend(fine[-1] + np.linspace(0, size, pieces + 1)[1:].round().astype(int))
    edges = [0]
    for b in fine[1:]:
        if b - edges[-1] >= target or b == n:
            edges.append(int(b))
    return np.asarray(edges, dtype=np.int64)


def spatial_chunks(arr) -> tuple[Sequence[int] | None, Sequence[int] | None]:
    """Chunk sizes of the last two (y, x) axes of a dask array; ``(None, None)`` for in-memory arrays."""
    chunks = getattr(arr, "chunks", None)
    if chunks is None or not isinstance(chunks, tuple) or not chunks or not isinstance(chunks[0], tuple):
        return None, None
    return chunks[-2], chunks[-1]


@njit(nogil=True, cache=True)
def _accumulate_labels(block, r0, c0, counts, sx, sy):  # pragma: no cover - compiled
    h, w = block.shape
    for y in range(h):
        for x in range(w):
            v = block[y, x]
            if v > 0:
                counts[v] += 1
                sx[v] += c0 + x
                sy[v] += r0 + y


def _labels_stats(labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streaming centroid / area of every label id: ``(ids, xy_centroid_px, area_px)``.

    Reads the labels tile by tile along their chunks (never the whole array at once, each chunk once) and
    accumulates pixel counts and coordinate sums in one compiled pass.
    """
    from xarray import DataTree

    if isinstance(labels, DataTree):
        labels = next(iter(labels["scale0"].values()))
    arr = labels.data  # dask or numpy, (y, x)
    h, w = arr.shape[-2:]
    ych, xch = spatial_chunks(arr)
    rows, cols = chunk_edges(ych, h, 1024), chunk_edges(xch, w, 2048)
    counts = np.zeros(1, dtype=np.int64)
    sx = np.zeros(1)
    sy = np.zeros(1)
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            block = np.asarray(arr[r0:r1, c0:c1])
            if block.size == 0:
                continue
            if not np.issubdtype(block.dtype, np.integer):
                raise ValueError(f"Labels must hold integer ids, got dtype {block.dtype}.")
            if block.min() < 0:
                raise ValueError("Labels contain negative values; label ids must be non-negative integers.")
            n = int(block.max()) + 1
            if n > counts.size:
                counts, sx, sy = (np.pad(a, (0, n - a.size)) for a in (counts, sx, sy))
            _accumulate_labels(block, int(r0), int(c0), counts, sx, sy)
    ids = np.nonzero(counts)[0]
    ids = ids[ids != 0]
    area = counts[ids].astype(float)
    # pixel centres: index i covers [i, i+1) in spatialdata's intrinsic coordinates → centre at i + 0.5
    xy = np.stack([sx[ids] / area + 0.5, sy[ids] / area + 0.5], axis=1)
    return ids, xy, area


def _match_instances(element_ids: pd.Index, table_ids: pd.Series, region: str) -> np.ndarray:
    """Positions in ``element_ids`` of each table instance id; a clear error when some are missing."""
    idx = pd.Index(element_ids)
    if not idx.is_unique:
        raise ValueError(f"Element {region!r} has duplicated instance ids.")
    # compare as strings when the dtypes differ (e.g. int label ids vs '12' in obs)
    try:
        pos = idx.get_indexer(table_ids.to_numpy())
    except (TypeError, ValueError):
        pos = np.full(len(table_ids), -1)
    if (pos < 0).any():
        pos2 = pd.Index(idx.astype(str)).get_indexer(table_ids.astype(str).to_numpy())
        if (pos2 >= 0).sum() > (pos >= 0).sum():
            pos = pos2
    missing = int((pos < 0).sum())
    if missing:
        example = table_ids.to_numpy()[pos < 0][:3].tolist()
        raise ValueError(
            f"{missing} of {len(table_ids)} table rows annotating {region!r} have no matching instance in it "
            f"(e.g. ids {example}). The table's instance_key column must hold the element's ids "
            "(label values or shapes index)."
        )
    return pos


def _cell_regions(sdata, regions: list[str], labels_key: str | None, shapes_key: str | None) -> list[str]:
    """The labels / shapes elements that hold the table's cells: ``labels_key`` or ``shapes_key`` when given
    (it must be one the table annotates, if it annotates any), else the annotated ``regions`` that are labels
    or shapes (empty when the table annotates only points, or nothing)."""
    if labels_key is not None and shapes_key is not None:
        raise ValueError("Pass either labels_key or shapes_key, not both.")
    explicit = labels_key or shapes_key
    if explicit is None:
        missing = [r for r in regions if r not in sdata.labels and r not in sdata.shapes and r not in sdata.points]
        if missing:
            raise KeyError(f"The table annotates {missing}, which are not elements of the SpatialData.")
        return [r for r in regions if r in sdata.labels or r in sdata.shapes]
    container = sdata.labels if labels_key is not None else sdata.shapes
    kind = "labels" if labels_key is not None else "shapes"
    if explicit not in container:
        raise KeyError(f"No {kind} element {explicit!r} in the SpatialData; available {kind}: {_available(container)}.")
    if regions and explicit not in regions:
        raise ValueError(
            f"The table annotates {regions}, not {explicit!r}: its rows cannot be matched to {kind} "
            f"{explicit!r}. Pass {'labels_key' if kind == 'labels' else 'shapes_key'}= one of the annotated "
            "elements, or link the table to it (`spatialdata.SpatialData.set_table_annotates_spatialelement`)."
        )
    return [explicit]


def cell_geometry(
    sdata,
    table: AnnData,
    *,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    spatial_key: str = Keys.SPATIAL,
    shared_with: Sequence = (),
    um_per_unit: float | None = None,
) -> CellGeometry:
    """Centroids and sizes of the table's cells, from the element the table annotates.

    The cells come from ``labels_key`` (segmentation), ``shapes_key`` (circles / polygons), or, when
    neither is given, from the element(s) the table annotates (``region``); a table annotating points or
    nothing falls back to ``table.obsm[spatial_key]``, taken to be in ``coordinate_system``.
    Coordinates always go through the elements' transformations. The default coordinate system is one
    shared by the cells' elements and the elements in ``shared_with`` (e.g. the image to crop from).

    The µm per unit of that coordinate system (``geo.units``) is ``um_per_unit`` when given, else the value
    stored with :func:`~spatia.pp.set_um_per_unit`, else the scale of a µm-valued shapes/points element's
    transformation (as spatialdata-io writes them), else an estimate from the cells' spacing (with a warning
    when it is not µm).

    Examples
    --------
    >>> geo = sp.pp.cell_geometry(sdata, sdata["table"], coordinate_system="global")
    >>> geo.xy.shape  # (n_cells, 2), coordinate-system units; geo.xy_um in µm
    """
    regions, region_key, instance_key = table_annotation(table)
    n = table.n_obs
    use_regions = _cell_regions(sdata, regions, labels_key, shapes_key)
    if not use_regions:
        if spatial_key not in table.obsm:
            raise ValueError(
                "The table annotates no labels or shapes element and has no "
                f"obsm[{spatial_key!r}]: pass labels_key= or shapes_key=, or add cell centroids to obsm."
            )
        cs = coordinate_system or Defaults.COORDINATE_SYSTEM
        xy = np.asarray(table.obsm[spatial_key], dtype=float)[:, :2]
        units = resolve_units(sdata, xy, coordinate_system=cs, um_per_unit=um_per_unit,
                              what=f"table.obsm[{spatial_key!r}]")
        return CellGeometry(xy, np.full(n, np.nan), np.full(n, "", dtype=object), cs, "obsm", units)

    xy = np.full((n, 2), np.nan)
    diam = np.full(n, np.nan)
    region_of = np.full(n, "", dtype=object)
    kinds = set()
    elements = [sdata.labels[r] if r in sdata.labels else sdata.shapes[r] for r in use_regions]
    cs = coordinate_system or default_coordinate_system(*elements, *shared_with)
    for r, el in zip(use_regions, elements, strict=True):
        if region_key is not None and len(regions) > 1:
            rows = np.nonzero((table.obs[region_key] == r).to_numpy())[0]
        else:
            rows = np.arange(n)
        if rows.size == 0:
            continue
        if instance_key is None or instance_key not in table.obs:
            raise ValueError(f"The table has no instance_key column to match its rows to {r!r}.")
        tids = table.obs[instance_key].iloc[rows]
        m = affine_to(el, cs)
        scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        if r in sdata.labels:
            kinds.add("labels")
            ids, cxy, area = _labels_stats(el)
            pos = _match_instances(pd.Index(ids), tids, r)
            xy[rows] = apply_affine(m, cxy[pos])
            diam[rows] = 2.0 * np.sqrt(area[pos] / np.pi) * scale
        else:
            kinds.add("shapes")
            gdf = el
            pos = _match_instances(gdf.index, tids, r)
            geom = gdf.geometry.iloc[pos]
            if "radius" in gdf.columns:
                cxy = np.stack([geom.x.to_numpy(), geom.y.to_numpy()], axis=1)
                d = 2.0 * gdf["radius"].to_numpy(dtype=float)[pos]
            else:
                c = geom.centroid
                cxy = np.stack([c.x.to_numpy(), c.y.to_numpy()], axis=1)
                d = 2.0 * np.sqrt(geom.area.to_numpy() / np.pi)
            xy[rows] = apply_affine(m, cxy)
            diam[rows] = d * scale
        region_of[rows] = r
    unplaced = np.isnan(xy).any(axis=1)
    if unplaced.any():
        raise ValueError(
            f"{int(unplaced.sum())} table rows belong to no annotated labels/shapes element "
            f"(regions {use_regions}); check the table's region column."
        )
    units = resolve_units(sdata, xy, coordinate_system=cs, um_per_unit=um_per_unit, diameter=diam)
    geo = CellGeometry(xy, diam, region_of, cs, "labels" if kinds == {"labels"} else "shapes", units)
    _check_obsm_consistency(table, geo, spatial_key)
    return geo


def _check_obsm_consistency(table: AnnData, geo: CellGeometry, spatial_key: str) -> None:
    """Warn when ``obsm['spatial']`` is neither the cells' positions in the frame nor in µm.

    spatialdata-io keeps ``obsm['spatial']`` in µm while its ``"global"`` is in pixels: that is not a problem.
    """
    if spatial_key not in table.obsm or table.n_obs == 0:
        return
    obsm = np.asarray(table.obsm[spatial_key], dtype=float)[:, :2]
    if not np.isfinite(obsm).all():
        return
    tol = np.nanmedian(geo.diameter) if np.isfinite(geo.diameter).any() else 10.0
    d = np.linalg.norm(obsm - geo.xy, axis=1)
    # in µm up to a shift (spatialdata-io's MERSCOPE affine has an offset), in frame units like tol
    centred = obsm - np.median(obsm, axis=0) - (geo.xy_um - np.median(geo.xy_um, axis=0))
    d_um = np.linalg.norm(centred, axis=1) / geo.units.um_per_unit
    if min(np.median(d), np.median(d_um)) > max(tol, 1e-6):
        logger.warning(
            "table.obsm[%r] is far from the cells' element positions in coordinate system %r "
            "(median distance %.3g, cell diameter ~%.3g): obsm may be in another coordinate system "
            "(e.g. pixels vs µm). spatia uses the element positions.",
            spatial_key,
            geo.coordinate_system,
            float(np.median(d)),
            float(tol),
        )
