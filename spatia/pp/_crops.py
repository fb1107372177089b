"""Per-cell image crops, streamed strip by strip from a (dask-backed) image into a crop store."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._constants import Defaults
from ._elements import _is_sdata, affine_to, apply_affine, as_list, cell_geometry, get_image, get_table

logger = logging.getLogger(__name__)

_STORE_VERSION = 1


@dataclass
class CropStore:
    """Cell crops ``(n_cells, C, S, S)`` uint8, in memory or in a chunked zarr store.

    Crops are stored in extraction order (sorted along the image rows, so cells close in space are close
    on disk); :meth:`get` takes table row positions and maps them through :attr:`order`.

    Attributes
    ----------
    images
        ``(n_cells, C, S, S)`` uint8 array (:class:`numpy.ndarray` or :class:`zarr.Array`), in store order.
    order
        ``(n_cells,)`` table row of each stored crop.
    obs_names
        Table ``obs_names`` in table row order.
    channels
        Channel names.
    params
        Extraction parameters (image key, coordinate system, sizes, normalisation ranges, ...).
    path
        Where the store lives on disk, or ``None`` for an in-memory store.
    """

    images: Any
    order: np.ndarray
    obs_names: np.ndarray
    channels: list[str]
    params: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self._pos = np.empty(len(self.order), dtype=np.int64)
        self._pos[self.order] = np.arange(len(self.order))

    def __len__(self) -> int:
        return len(self.order)

    @property
    def size(self) -> int:
        """Crop side in pixels."""
        return int(self.images.shape[-1])

    @property
    def n_channels(self) -> int:
        return int(self.images.shape[1])

    def get(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Crops of the given table rows, ``(len(rows), C, S, S)`` uint8, in the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = self._pos[rows]
        srt = np.argsort(pos, kind="stable")
        if isinstance(self.images, np.ndarray):
            return self.images[pos]
        out = np.asarray(self.images.get_orthogonal_selection((pos[srt], slice(None), slice(None), slice(None))))
        res = np.empty_like(out)
        res[srt] = out
        return res

    def matches(self, obs_names) -> bool:
        """Whether this store holds exactly the cells of a table with these ``obs_names`` (same order)."""
        return len(obs_names) == len(self.obs_names) and bool(np.all(np.asarray(obs_names) == self.obs_names))

    def save(self, path: str | Path) -> CropStore:
        """Write the store to ``path`` (a zarr directory) and return the on-disk store."""
        import zarr

        path = Path(path)
        arr = zarr.open_array(
            str(path / "crops"), mode="w", shape=self.images.shape, dtype="uint8",
            chunks=(min(1024, max(1, len(self))),) + tuple(self.images.shape[1:]),
        )
        step = 4096
        for i in range(0, len(self), step):
            arr[i : i + step] = np.asarray(self.images[i : i + step])
        _write_meta(path, self.order, self.obs_names, self.channels, self.params)
        return CropStore(arr, self.order, self.obs_names, self.channels, self.params, str(path))

    @classmethod
    def open(cls, path: str | Path) -> CropStore:
        """Open a store written by :func:`extract_crops` or :meth:`save`."""
        import zarr

        path = Path(path)
        meta_file = path / "spatia_crops.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not a spatia crop store (no spatia_crops.json).")
        meta = json.loads(meta_file.read_text())
        arr = zarr.open_array(str(path / "crops"), mode="r")
        order = np.load(path / "order.npy", allow_pickle=False)
        obs_names = np.load(path / "obs_names.npy", allow_pickle=False).astype(object)
        return cls(arr, order, obs_names, meta["channels"], meta["params"], str(path))

    def to_memory(self) -> CropStore:
        """An in-memory copy (for small stores)."""
        return CropStore(np.asarray(self.images[:]), self.order, self.obs_names, self.channels, self.params, None)

    def __repr__(self) -> str:
        where = self.path or "memory"
        return f"CropStore({len(self)} cells × {self.n_channels} channels × {self.size}² px, {where})"


def _write_meta(path: Path, order, obs_names, channels, params) -> None:
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "order.npy", np.asarray(order, dtype=np.int64), allow_pickle=False)
    np.save(path / "obs_names.npy", np.asarray(obs_names).astype(str), allow_pickle=False)
    meta = {"version": _STORE_VERSION, "channels": list(channels), "params": params}
    (path / "spatia_crops.json").write_text(json.dumps(meta, indent=1, default=float))


def _channel_index(img, channels: Sequence[str | int] | None) -> tuple[np.ndarray, list[str]]:
    names = [str(c) for c in img.coords["c"].values] if "c" in img.coords else [str(i) for i in range(img.sizes["c"])]
    if channels is None:
        return np.arange(len(names)), names
    idx = []
    for ch in channels:
        if isinstance(ch, int | np.integer):
            if not 0 <= ch < len(names):
                raise ValueError(f"Channel index {ch} out of range: the image has {len(names)} channels {names}.")
            idx.append(int(ch))
        elif str(ch) in names:
            idx.append(names.index(str(ch)))
        else:
            raise KeyError(f"Unknown channel {ch!r}; the image's channels are {names}.")
    return np.asarray(idx), [names[i] for i in idx]


def _intensity_range(data, ch_idx: np.ndarray, q: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel percentiles from a strided subsample of the image (≤ ~1M pixels per channel)."""
    h, w = data.shape[-2:]
    step = max(1, int(np.ceil(np.sqrt(h * w / 1e6))))
    sub = np.asarray(data[ch_idx, ::step, ::step]).astype(np.float32)
    lo = np.percentile(sub.reshape(len(ch_idx), -1), q[0], axis=1)
    hi = np.percentile(sub.reshape(len(ch_idx), -1), q[1], axis=1)
    hi = np.where(hi > lo, hi, lo + 1.0)
    return lo, hi


def extract_crops(
    data,
    *,
    image_key: str | None = None,
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
) -> CropStore:
    """Cut a crop centred on every cell of the table, resized to ``size × size`` pixels.

    Cell positions come from the segmentation, polygons or circles the table annotates (or
    ``labels_key`` / ``shapes_key``), mapped through the elements' transformations into the image's
    pixels. The image is read strip by strip (never whole), so a slide of any size streams through.

    Parameters
    ----------
    data
        The :class:`~spatialdata.SpatialData`.
    image_key
        Image to crop from (the only image when ``None``). Multiscale images use their full resolution.
    table_key
        Table whose cells are cropped.
    labels_key, shapes_key
        Element giving the cells' positions and extents; default: what the table annotates.
    coordinate_system
        Coordinate system in which cells and image are matched; default: the shared one
        (``"global"`` when present).
    size
        Side of the output crops, in pixels.
    crop_um
        Fixed crop side in coordinate-system units (µm for Xenium/CosMx/MERSCOPE). ``None`` sizes each crop
        from the cell's extent: ``extent_factor × diameter``, clipped to ``[min_um, max_um]`` (cells without
        extent use ``max(min_um, 16)``).
    extent_factor, min_um, max_um
        See ``crop_um``.
    channels
        Channel names or indices to keep (default all).
    mask_neighbours
        Zero the pixels of other cells (needs ``labels_key`` on the image's pixel grid).
    percentiles
        Per-channel intensity range (estimated on a subsample of the image) mapped to 0–255.
    outside
        What to do with cells whose centre lies outside the image: ``"error"`` or ``"pad"`` (zero crops).
    store
        Directory for an on-disk zarr store (written as it goes; the cells never all sit in memory).
        ``None`` keeps the crops in memory.
    batch_cells
        Cells per write.

    Returns
    -------
    A :class:`CropStore`; nothing is written into ``data``.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.demo()
    >>> crops = sp.pp.extract_crops(sdata, image_key="morphology", size=32)
    """
    import torch
    import torch.nn.functional as F

    if not _is_sdata(data):
        raise TypeError("extract_crops needs a SpatialData object (with an image), not an AnnData.")
    if size < 4:
        raise ValueError(f"size must be at least 4 pixels, got {size}.")
    if outside not in ("error", "pad"):
        raise ValueError(f"outside must be 'error' or 'pad', got {outside!r}.")
    table = get_table(data, table_key)
    image_key, img = get_image(data, image_key)
    geo = cell_geometry(data, table, labels_key=labels_key, shapes_key=shapes_key, coordinate_system=coordinate_system)
    cs = geo.coordinate_system
    m_img = affine_to(data.images[image_key], cs)  # pixel (x, y) -> cs
    px_size = float(np.sqrt(abs(np.linalg.det(m_img[:2, :2]))))
    pix = apply_affine(np.linalg.inv(m_img), geo.xy)  # (x, y) in pixel units, continuous
    ch_idx, ch_names = _channel_index(img, channels)
    arr = img.data
    if "z" in img.dims:
        arr = arr[:, arr.shape[1] // 2]
    h, w = arr.shape[-2:]

    # 1. crop side of each cell, in image pixels
    if crop_um is not None:
        if crop_um <= 0:
            raise ValueError(f"crop_um must be positive, got {crop_um}.")
        side_um = np.full(len(pix), float(crop_um))
    else:
        d = np.where(np.isfinite(geo.diameter), geo.diameter * extent_factor, max(min_um, 16.0))
        side_um = np.clip(d, min_um, max_um)
    side_px = np.maximum(side_um / px_size, 2.0)
    win = int(np.ceil(side_px.max())) + 2  # read window (square)
    factor = int(np.floor(win / (2 * size)))  # area pre-reduction when shrinking by more than 2x
    if factor >= 2:
        win = int(np.ceil(win / factor) * factor)
    half = win // 2

    inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
    n_out = int((~inside).sum())
    if n_out and outside == "error":
        raise ValueError(
            f"{n_out} of {len(pix)} cells lie outside image {image_key!r} ({w}×{h} px) in coordinate system "
            f"{cs!r}. Check that image and cells are registered to the same coordinate system, or pass "
            "outside='pad' to give them blank crops."
        )

    mask_arr = None
    own_ids = None
    if mask_neighbours:
        if labels_key is None:
            raise ValueError("mask_neighbours=True needs labels_key= (the segmentation).")
        m_lab = affine_to(data.labels[labels_key], cs)
        lab = data.labels[labels_key]
        from xarray import DataTree

        if isinstance(lab, DataTree):
            lab = next(iter(lab["scale0"].values()))
        if lab.shape[-2:] != (h, w) or not np.allclose(m_lab, m_img):
            raise ValueError("mask_neighbours=True needs labels on the same pixel grid as the image.")
        mask_arr = lab.data
        from ._elements import table_annotation

        _, _, instance_key = table_annotation(table)
        own_ids = table.obs[instance_key].to_numpy().astype(np.int64)

    lo, hi = _intensity_range(arr, ch_idx, percentiles)
    n_cells = len(pix)
    n_ch = len(ch_idx)

    # 2. output: zarr (streamed) or memory
    order = np.lexsort((pix[:, 0], pix[:, 1]))  # by row, then column
    params = {
        "image_key": image_key, "table_key": table_key, "labels_key": labels_key, "shapes_key": shapes_key,
        "coordinate_system": cs, "size": int(size), "crop_um": crop_um, "extent_factor": extent_factor,
        "min_um": min_um, "max_um": max_um, "channels": ch_names, "mask_neighbours": mask_neighbours,
        "intensity_lo": lo.tolist(), "intensity_hi": hi.tolist(), "pixel_size": px_size,
    }
    if store is not None:
        import zarr

        path = Path(store)
        out = zarr.open_array(
            str(path / "crops"), mode="w", shape=(n_cells, n_ch, size, size), dtype="uint8",
            chunks=(min(1024, max(1, n_cells)), n_ch, size, size),
        )
    else:
        out = np.zeros((n_cells, n_ch, size, size), dtype=np.uint8)

    # 3. strips: rows of the image holding a batch of cells (+ half a window of margin)
    strip_rows = max(64, int(64e6 // max(1, w * n_ch * arr.dtype.itemsize)))
    rows_sorted = pix[order, 1]
    start = 0
    from .._settings import settings

    tq = None
    if settings.progress_bar:
        from tqdm.auto import tqdm

        tq = tqdm(total=n_cells, desc="crops", unit="cell", leave=False)
    lo_t = torch.as_tensor(lo, dtype=torch.float32).view(1, -1, 1, 1)
    scale_t = torch.as_tensor(255.0 / (hi - lo), dtype=torch.float32).view(1, -1, 1, 1)
    buf_imgs, buf_n = [], 0
    write_pos = 0
    while start < n_cells:
        r_first = int(np.floor(rows_sorted[start]))
        r_last_allowed = r_first + strip_rows
        stop = int(np.searchsorted(rows_sorted, r_last_allowed, side="left"))
        stop = min(max(stop, start + 1), start + batch_cells, n_cells)
        sel = order[start:stop]
        r0 = max(0, int(np.floor(pix[sel, 1].min())) - half - 1)
        r1 = min(h, int(np.ceil(pix[sel, 1].max())) + half + 2)
        c0 = max(0, int(np.floor(pix[sel, 0].min())) - half - 1)
        c1 = min(w, int(np.ceil(pix[sel, 0].max())) + half + 2)
        if r1 > r0 and c1 > c0:
            block = np.asarray(arr[ch_idx, r0:r1, c0:c1])
        else:
            block = np.zeros((n_ch, 1, 1), dtype=arr.dtype)
            r0, c0 = 0, 0
        # pad so every window fits
        padded = np.zeros((n_ch, block.shape[1] + 2 * win, block.shape[2] + 2 * win), dtype=np.float32)
        padded[:, win : win + block.shape[1], win : win + block.shape[2]] = block
        if mask_arr is not None:
            lblock = np.asarray(mask_arr[r0:r1, c0:c1])
            lpad = np.zeros(padded.shape[1:], dtype=np.int64)
            lpad[win : win + lblock.shape[0], win : win + lblock.shape[1]] = lblock
        # top-left of each window in padded coordinates
        cx = pix[sel, 0] - c0 + win
        cy = pix[sel, 1] - r0 + win
        ty = np.clip(np.floor(cy).astype(np.int64) - half, 0, padded.shape[1] - win)
        tx = np.clip(np.floor(cx).astype(np.int64) - half, 0, padded.shape[2] - win)
        sw = np.lib.stride_tricks.sliding_window_view(padded, (win, win), axis=(1, 2))
        wins = np.ascontiguousarray(sw[:, ty, tx].transpose(1, 0, 2, 3))  # (n, C, win, win)
        if mask_arr is not None:
            lsw = np.lib.stride_tricks.sliding_window_view(lpad, (win, win))
            lw = lsw[ty, tx]
            other = (lw != 0) & (lw != own_ids[sel][:, None, None])
            wins[np.broadcast_to(other[:, None], wins.shape)] = 0.0
        wins[~inside[sel]] = 0.0
        t = torch.from_numpy(wins)
        # 4. resample each window to size×size around the exact (sub-pixel) centre with its own side
        #    (one batched grid_sample; area pre-reduction first when shrinking by more than 2×)
        if factor >= 2:
            t = F.avg_pool2d(t, factor)  # same extent, fewer samples: normalised coordinates unchanged
        off_x = (cx - (tx + win / 2.0)) / (win / 2.0)  # centre offset in normalised window units
        off_y = (cy - (ty + win / 2.0)) / (win / 2.0)
        s = side_px[sel] / win
        theta = torch.zeros(len(sel), 2, 3)
        theta[:, 0, 0] = torch.as_tensor(s, dtype=torch.float32)
        theta[:, 1, 1] = torch.as_tensor(s, dtype=torch.float32)
        theta[:, 0, 2] = torch.as_tensor(off_x, dtype=torch.float32)
        theta[:, 1, 2] = torch.as_tensor(off_y, dtype=torch.float32)
        grid = F.affine_grid(theta, (len(sel), n_ch, size, size), align_corners=False)
        res = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        res = ((res - lo_t) * scale_t).clamp_(0, 255).round_().to(torch.uint8).numpy()
        if store is None:
            out[sel] = res
        else:
            buf_imgs.append(res)
            buf_n += len(sel)
            if buf_n >= 1024 or stop == n_cells:
                chunk = np.concatenate(buf_imgs)
                out[write_pos : write_pos + len(chunk)] = chunk
                write_pos += len(chunk)
                buf_imgs, buf_n = [], 0
        if tq is not None:
            tq.update(len(sel))
        start = stop
    if tq is not None:
        tq.close()

    if store is None:
        return CropStore(out, np.arange(n_cells), table.obs_names.to_numpy().astype(object), ch_names, params)
    _write_meta(Path(store), order, table.obs_names.to_numpy(), ch_names, params)
    return CropStore(out, order, table.obs_names.to_numpy().astype(object), ch_names, params, str(store))


def crops_for(data, crops: CropStore | str | Path | None, **kwargs) -> CropStore:
    """Reuse ``crops`` when it holds this table's cells, else extract them with ``kwargs``."""
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
    return extract_crops(data, **kwargs)


__all__ = ["CropStore", "extract_crops", "crops_for", "as_list"]
