"""Per-cell image crops, streamed tile by tile from a (dask-backed) image into a crop store.

An extraction from one image has three steps: where each cell's crop lies in the image's pixels
(``_crop_window``), the order in which the image's tiles and their cells are visited (``_crop_tiles``), and
the crop pass that resamples every crop into memory or an on-disk store (:func:`_write_crops`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .._constants import Defaults
from .._utils import keep_torch_threads
from ._crop_store import CropStore, _append, _crop_output, _finished_store
from ._crop_tiles import _resample, _tile_plan, _TilePlan
from ._crop_window import _cell_window, _geometry_for, _neighbour_labels, _Window
from ._elements import CellGeometry, _is_sdata, affine_to, apply_affine, get_image, get_table

logger = logging.getLogger(__name__)


def extract_crops(
    data,
    *,
    image_key: str | Sequence[str] | None = None,
    table_key: str | None = Defaults.TABLE,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    size: int = Defaults.CROP_SIZE,
    crop_um: float | None = None,
    extent_factor: float = 2.0,
    min_um: float = 6.0,
    max_um: float = 60.0,
    channels: Sequence[str | int] | None = None,
    mask_neighbours: bool = False,
    percentiles: tuple[float, float] = (0.5, 99.8),
    outside: Literal["error", "pad"] = "error",
    store: str | Path | None = None,
    batch_cells: int = 4096,
    geometry: CellGeometry | None = None,
    um_per_unit: float | None = None,
    z: int | None = None,
) -> CropStore:
    """Cut a crop centred on every cell of the table, resized to ``size × size`` pixels.

    Cell positions come from the segmentation, polygons or circles the table annotates (or
    ``labels_key`` / ``shapes_key``), mapped through the elements' transformations into the image's
    pixels. The image is read tile by tile along its chunks (never whole; each chunk once when the slide
    is not too wide), so a slide of any size streams through in bounded memory. Each crop is resampled
    around the cell's exact (sub-pixel) centre with a separable triangle filter: bilinear when enlarging,
    anti-aliased (area-like) when shrinking.

    Parameters
    ----------
    data
        The :class:`~spatialdata.SpatialData`.
    image_key
        Image to crop from (the only image when ``None``). Multiscale images use their full resolution.
        A list of images (e.g. CosMx's one image per field of view) crops every cell from the first image
        of the list that contains its centre; intensities are then scaled per image.
    table_key
        Table whose cells are cropped.
    labels_key, shapes_key
        Element giving the cells' positions and extents; default: what the table annotates.
    coordinate_system
        Coordinate system in which cells and image are matched; default: the one they share
        (``"global"`` when present).
    size
        Side of the output crops, in pixels.
    crop_um
        Fixed crop side in µm, whatever the units of the coordinate system (see ``um_per_unit``). ``None``
        sizes each crop from the cell's extent: ``extent_factor × diameter``, clipped to
        ``[min_um, max_um]`` µm (cells without extent use ``max(min_um, 16)`` µm). Crops are square in image
        pixels (side / pixel size, the pixel size being the square root of the pixel area). A fixed window
        shows every cell at the same scale, so nuclear size stays visible; choose it to hold a cell and a
        rim of its neighbours (16 µm for most tissues).
    extent_factor, min_um, max_um
        See ``crop_um``.
    channels
        Channel names or indices to keep (default all).
    mask_neighbours
        Zero the pixels of other cells (needs ``labels_key`` on the image's pixel grid).
    percentiles
        Per-channel intensity range (estimated on ≤ ~1M pixels per channel) mapped to 0–255.
    outside
        What to do with cells whose centre lies outside the image: ``"error"`` or ``"pad"`` (zero crops).
    store
        Directory for an on-disk zarr store, written as it goes: the cells never all sit in memory (with a
        list of images, one image's crops at a time). ``None`` keeps the crops in memory.
    batch_cells
        Most cells resampled in one call (an on-disk store is written through two ~16 MB buffers, each
        written in the background while the other fills).
    geometry
        Cell positions already computed by :func:`~spatia.pp.cell_geometry` for this table (with the image in
        ``shared_with``); saves a second pass over the segmentation.
    um_per_unit
        µm per unit of the coordinate system. Default: the value stored with :func:`~spatia.pp.set_um_per_unit`,
        else read from µm-valued shapes/points (as spatialdata-io writes them), else estimated from the cells'
        spacing (see :func:`~spatia.pp.cell_geometry`). Recorded in the store's ``params``.
    z
        Plane of a 3-D ``(c, z, y, x)`` image to crop from. Default: the middle plane, with a warning naming
        it (pick the in-focus plane, or project the stack before cropping).

    Returns
    -------
    A :class:`CropStore`; nothing is written into ``data``.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.demo()
    >>> crops = sp.pp.extract_crops(sdata, image_key="morphology", size=32)
    """
    if not _is_sdata(data):
        raise TypeError("extract_crops needs a SpatialData object (with an image), not an AnnData.")
    if size < 4:
        raise ValueError(f"size must be at least 4 pixels, got {size}.")
    if outside not in ("error", "pad"):
        raise ValueError(f"outside must be 'error' or 'pad', got {outside!r}.")
    table = get_table(data, table_key)
    kwargs = dict(
        labels_key=labels_key, shapes_key=shapes_key, coordinate_system=coordinate_system, size=size, crop_um=crop_um,
        extent_factor=extent_factor, min_um=min_um, max_um=max_um, channels=channels, mask_neighbours=mask_neighbours,
        percentiles=percentiles, outside=outside, store=store, batch_cells=batch_cells, geometry=geometry,
        table_key=table_key, um_per_unit=um_per_unit, z=z,
    )  # fmt: skip
    with keep_torch_threads():
        if image_key is not None and not isinstance(image_key, str):
            return _extract_from_images(data, table, list(image_key), **kwargs)
        return _extract_one(data, table, image_key=image_key, **kwargs)



def _extract_one(data, table, *, image_key, table_key, labels_key, shapes_key, coordinate_system, size, crop_um,
                 extent_factor, min_um, max_um, channels, mask_neighbours, percentiles, outside, store, batch_cells,
                 geometry, um_per_unit, z) -> CropStore:
    """:func:`extract_crops` from one image, for the cells of ``table`` (the table or a subset of its rows)."""
    image_key, img = get_image(data, image_key)
    geo = _geometry_for(data, table, geometry, [image_key], labels_key=labels_key, shapes_key=shapes_key,
                        coordinate_system=coordinate_system, um_per_unit=um_per_unit)
    win = _cell_window(data, image_key, img, geo, channels=channels, z=z, size=size, crop_um=crop_um,
                       extent_factor=extent_factor, min_um=min_um, max_um=max_um, outside=outside)
    labels, own_ids = None, np.zeros(len(win.pix), dtype=np.int64)
    if mask_neighbours:
        labels, own_ids = _neighbour_labels(data, table, labels_key, geo.coordinate_system, win)
    plan = _tile_plan(win.arr, labels, win.pix, win.inside, percentiles)
    params = {
        "image_key": image_key, "table_key": table_key, "labels_key": labels_key, "shapes_key": shapes_key,
        "coordinate_system": geo.coordinate_system, "size": int(size), "crop_um": crop_um,
        "extent_factor": extent_factor, "min_um": min_um, "max_um": max_um, "channels": win.channels,
        "mask_neighbours": mask_neighbours, "outside": outside, "n_outside": int((~win.inside).sum()),
        "intensity_lo": plan.lo.tolist(), "intensity_hi": plan.hi.tolist(), "pixel_size_um": win.px_size_um,
        "um_per_unit": geo.units.um_per_unit, "units_source": geo.units.source,
        **({"z": int(win.z)} if "z" in img.dims else {}),
    }
    images = _write_crops(win, plan, own_ids, store=store, size=size, batch_cells=batch_cells)
    return _finished_store(images, plan.order, table, win.channels, params, store)


def _write_crops(win: _Window, plan: _TilePlan, own_ids: np.ndarray, *, store, size: int, batch_cells: int):
    """Cut and resample every cell's crop and write it; returns the crops ``(n, C, size, size)`` uint8.

    Cells are taken in ``plan.order``, in runs of one tile (at most ``batch_cells``), each run from the block
    of cached tiles its crops reach. In memory (``store=None``) crops land in table rows; on disk they are
    appended in store order through the writer's buffers, then the blank crops of cells outside the image.
    """
    from .._utils import progress

    pix, step, margin, order, visit = win.pix, win.step, win.margin, plan.order, plan.visit
    tiles, labels_tiles = plan.tiles, plan.labels
    h, w = win.arr.shape[-2:]
    n_cells, n_in = len(pix), len(visit)
    n_out = n_cells - n_in
    out, writer = _crop_output(store, (n_cells, len(win.channels), size, size))
    tq = progress(total=n_cells, desc="crops", unit="cell")
    lo32 = plan.lo.astype(np.float32)
    scale32 = (255.0 / (plan.hi - plan.lo)).astype(np.float32)
    no_labels = np.zeros((0, 0), dtype=np.int32)
    start = 0
    try:
        while start < n_in:
            # the next run of cells of one tile (at most batch_cells, or what the buffer still holds)
            stop = int(np.searchsorted(visit, visit[start], side="right"))
            stop = min(stop, start + batch_cells)
            if writer is not None:
                stop = min(stop, start + writer.room())
            sel = order[start:stop]
            y, x = pix[sel, 1], pix[sel, 0]
            r0, r1 = max(0, int(np.floor(y.min())) - margin), min(h, int(np.ceil(y.max())) + margin + 1)
            c0, c1 = max(0, int(np.floor(x.min())) - margin), min(w, int(np.ceil(x.max())) + margin + 1)
            for t in (tiles, labels_tiles) if labels_tiles is not None else (tiles,):
                t.release(int(visit[start]), plan.stripe, margin)  # tiles no later run reaches
            block = tiles.region(r0, r1, c0, c1)
            lab = labels_tiles.region(r0, r1, c0, c1)[0] if labels_tiles is not None else no_labels
            if writer is None:
                target, rows = out, sel
            else:
                target, rows = writer.buffer, np.arange(writer.filled, writer.filled + len(sel))
            _resample(block, lab, own_ids[sel], y - r0, x - c0, step[sel], lo32, scale32, target, rows)
            if writer is not None:
                writer.advance(len(sel))
            if tq is not None:
                tq.update(len(sel))
            start = stop
        if writer is not None:
            writer.zeros(n_out)  # blank crops of the cells outside the image, at the end of the store
    finally:
        if writer is not None:
            writer.close()
        if tq is not None:
            tq.update(n_out)
            tq.close()
    return out


def _extract_from_images(data, table, image_keys: list[str], *, labels_key, shapes_key, coordinate_system,
                         geometry, outside, store, mask_neighbours, table_key, um_per_unit, **kwargs) -> CropStore:
    """:func:`extract_crops` over several images: each cell from the first image containing its centre."""
    if not image_keys:
        raise ValueError("image_key is an empty list: name at least one image.")
    for k in image_keys:
        get_image(data, k)  # exists, has channels
    if len(set(image_keys)) != len(image_keys):
        raise ValueError(f"image_key lists an image twice: {image_keys}.")
    if mask_neighbours:
        raise ValueError("mask_neighbours=True works with one image (and its segmentation), not a list of images.")
    geo = _geometry_for(data, table, geometry, image_keys, labels_key=labels_key, shapes_key=shapes_key,
                        coordinate_system=coordinate_system, um_per_unit=um_per_unit)
    owner = np.full(table.n_obs, -1)
    for i, k in enumerate(image_keys):
        _, img = get_image(data, k)
        h, w = img.shape[-2:]
        pix = apply_affine(np.linalg.inv(affine_to(data.images[k], geo.coordinate_system)), geo.xy)
        inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
        owner[(owner < 0) & inside] = i
    n_out = int((owner < 0).sum())
    if n_out and outside == "error":
        raise ValueError(
            f"{n_out} of {table.n_obs} cells lie outside all of the images {image_keys} in coordinate system "
            f"{geo.coordinate_system!r}. Check that images and cells are registered to the same coordinate "
            "system, list every image that holds cells, or pass outside='pad' to give them blank crops."
        )
    if n_out:
        logger.warning("%d of %d cells lie outside the image(s): they get blank crops (outside='pad').", n_out,
                       len(geo.xy))
    # one image at a time: its crops go into the output (in memory, table order) or are appended to the store
    # (image by image, then the blank crops of cells outside every image), then are dropped
    out = writer = channels = params = None
    order, lo, hi = [], {}, {}
    try:
        for i, k in enumerate(image_keys):
            rows = np.flatnonzero(owner == i)
            if not len(rows):
                continue
            part = _extract_one(
                data, table[rows], image_key=k, table_key=table_key, labels_key=labels_key, shapes_key=shapes_key,
                coordinate_system=coordinate_system, geometry=geo.subset(rows), outside="error", store=None,
                mask_neighbours=False, um_per_unit=um_per_unit, **kwargs)  # fmt: skip
            if channels is None:
                channels, params = list(part.channels), dict(part.params)
                out, writer = _crop_output(store, (table.n_obs, len(channels), part.size, part.size))
            elif list(part.channels) != channels:
                raise ValueError(f"The images have different channels ({channels} vs {part.channels}): pass channels=.")
            crops = part.get(np.arange(len(rows)))
            if writer is None:
                out[rows] = crops
            else:
                _append(writer, crops)
            order.append(rows)
            lo[k], hi[k] = part.params["intensity_lo"], part.params["intensity_hi"]
            del part, crops
        if channels is None:
            raise ValueError(f"No cell lies inside any of the images {image_keys}.")
        outside_rows = np.flatnonzero(owner < 0)
        if writer is not None:
            writer.zeros(len(outside_rows))
    finally:
        if writer is not None:
            writer.close()
    params.update(image_key=list(image_keys), table_key=table_key, labels_key=labels_key, shapes_key=shapes_key,
                  intensity_lo=lo, intensity_hi=hi, n_outside=n_out)
    return _finished_store(out, np.concatenate([*order, outside_rows]), table, channels, params, store)


def crops_for(data, crops: CropStore | str | Path | None, **kwargs) -> CropStore:
    """Reuse ``crops`` when it holds this table's cells, else extract them with ``kwargs``.

    Extracted crops stay in memory up to :data:`MEMORY_CROPS_BYTES`; more go to a temporary zarr store
    (removed when the returned store is garbage-collected), so a large slide never holds all its crops in
    memory. Pass ``store=`` (or extract with :func:`extract_crops` first) to keep them.
    """
    table = get_table(data, kwargs.get("table_key", Defaults.TABLE))
    if isinstance(crops, str | Path):
        crops = CropStore.open(crops)
    if crops is not None:
        if not crops.matches(table.obs_names):
            raise ValueError(
                "The crop store does not hold this table's cells (obs_names differ): extract crops again "
                "with `sp.pp.extract_crops`."
            )
        return crops
    if (kwargs.get("store") is None and _is_sdata(data)
            and _crops_bytes(data, table.n_obs, kwargs) > MEMORY_CROPS_BYTES):
        import tempfile
        import weakref

        tmp = tempfile.mkdtemp(prefix="spatia_crops_")
        logger.info("Crops of %d cells go to a temporary store %s (pass crops= a store to keep them).",
                    table.n_obs, tmp)
        try:
            out = extract_crops(data, **kwargs, store=tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(out, shutil.rmtree, tmp, ignore_errors=True)
        return out
    return extract_crops(data, **kwargs)


#: Crops extracted on the fly (``crops=None``) above this size go to a temporary on-disk store.
MEMORY_CROPS_BYTES = 256 * 2**20


def _crops_bytes(data, n_cells: int, kwargs: dict) -> int:
    """Size of the crops ``extract_crops(data, **kwargs)`` would hold (uint8)."""
    size = int(kwargs.get("size", Defaults.CROP_SIZE))
    n_ch = kwargs.get("channels")
    if n_ch is None:
        keys = kwargs.get("image_key")
        key = keys[0] if keys is not None and not isinstance(keys, str) else keys
        n_ch = get_image(data, key)[1].sizes.get("c", 1)
    else:
        n_ch = len(n_ch)
    return int(n_cells) * int(n_ch) * size * size


__all__ = ["CropStore", "extract_crops", "crops_for"]
