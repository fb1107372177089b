"""Per-cell image crops, streamed tile by tile from a (dask-backed) image into a crop store."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numba import njit, prange

from .._constants import Defaults
from .._utils import keep_torch_threads
from ._elements import (
    CellGeometry,
    _is_sdata,
    affine_to,
    apply_affine,
    cell_geometry,
    chunk_edges,
    get_image,
    get_table,
    spatial_chunks,
)

logger = logging.getLogger(__name__)

_STORE_VERSION = 1
_STORE_CHUNK_BYTES = 512 * 2**10  # zarr chunks of a crop store: small enough to read a few random cells
_TILE_ROWS, _TILE_COLS = 1024, 2048  # target tile size (px) when reading the image along its chunks
_CACHE_BYTES = 256 * 2**20  # at most this many bytes of decoded tiles kept for the margins of later tiles
_BUFFER_BYTES = 16 * 2**20  # each of the two write buffers of an on-disk store
_SMALL_IMAGE_PX = 4_000_000  # below this, intensity percentiles come from a grid over the whole image


@dataclass
class CropStore:
    """Cell crops ``(n_cells, C, S, S)`` uint8, in memory or in a chunked zarr store.

    On disk, crops are stored in extraction order (image tile by tile, by row within a tile, so cells close
    in space are close on disk); :meth:`get` takes table row positions and maps them through :attr:`order`.

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

    Examples
    --------
    >>> crops = sp.pp.extract_crops(sdata, size=32)
    >>> crops.get([0, 1, 2]).shape  # (3, n_channels, 32, 32), uint8
    >>> crops.save("crops.zarr")  # reuse with sp.tl.fit(sdata, crops="crops.zarr")
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

        path = Path(path)
        arr = _store_array(path / "crops", self.images.shape)
        step = _store_layout(self.images.shape)[1]
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


def _store_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(chunk, shard)`` in cells for a crop store: ~512 KB chunks (a random batch of cells reads little),
    ~16 MB shards (few files; one write buffer fills exactly one shard)."""
    per_cell = max(int(np.prod(shape[1:])), 1)
    chunk = int(np.clip(2 ** np.round(np.log2(_STORE_CHUNK_BYTES / per_cell)), 1, 1024))
    chunk = min(chunk, max(1, shape[0]))
    shard = chunk * max(1, int(_BUFFER_BYTES // (chunk * per_cell)))
    return chunk, min(shard, chunk * int(np.ceil(max(1, shape[0]) / chunk)))


def _store_array(path: Path, shape: tuple[int, ...]):
    """A new uint8 zarr array for crops (replacing one at ``path``); sharded, zstd level 1 with zarr 3.

    zstd's fast level compresses the (noisy) crops almost as well as its default at twice the speed.
    """
    import zarr

    if path.exists():
        shutil.rmtree(path)
    chunk, shard = _store_layout(shape)
    chunks = (chunk, *shape[1:])
    if hasattr(zarr, "create_array"):  # zarr >= 3
        from zarr.codecs import ZstdCodec

        return zarr.create_array(
            str(path), shape=shape, chunks=chunks, shards=(shard, *shape[1:]), dtype="uint8",
            compressors=ZstdCodec(level=1),
        )  # fmt: skip
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype="uint8")


class _StoreWriter:
    """Appends crops to a zarr array from two alternating buffers; each full buffer is written (compressed)
    in a background thread while the next one fills."""

    def __init__(self, arr, buffer_cells: int):
        self.arr = arr
        self.bufs = [np.zeros((buffer_cells, *arr.shape[1:]), dtype=np.uint8) for _ in range(2)]
        self.cur = self.filled = self.written = 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    @property
    def buffer(self) -> np.ndarray:
        return self.bufs[self.cur]

    def room(self) -> int:
        return len(self.buffer) - self.filled

    def advance(self, n: int) -> None:
        """``n`` more cells were written into :attr:`buffer` from position ``filled``."""
        self.filled += n
        if self.filled == len(self.buffer):
            self.flush()

    def zeros(self, n: int) -> None:
        """Append ``n`` blank crops."""
        while n > 0:
            k = min(n, self.room())
            self.buffer[self.filled : self.filled + k] = 0
            self.advance(k)
            n -= k

    def flush(self) -> None:
        if self.filled == 0:
            return
        self._wait()
        sl = slice(self.written, self.written + self.filled)
        self.pending = self.pool.submit(self.arr.__setitem__, sl, self.buffer[: self.filled])
        self.written += self.filled
        self.filled = 0
        self.cur = 1 - self.cur

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
        finally:
            self.pool.shutdown(wait=True)


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
        elif [n.lower() for n in names].count(str(ch).lower()) == 1:  # "dapi" for "DAPI"
            idx.append([n.lower() for n in names].index(str(ch).lower()))
        else:
            raise KeyError(f"Unknown channel {ch!r}; the image's channels are {names}.")
    return np.asarray(idx), [names[i] for i in idx]


class _Tiles:
    """Chunk-aligned tiles of a ``(C, H, W)`` image, decoded on demand and kept in a bounded LRU cache.

    A crop near a tile border needs a margin from the neighbouring tiles; the cache keeps recently decoded
    tiles (up to ``max_bytes``) so that, on slides of moderate width, every chunk is decoded once.
    """

    def __init__(self, arr, rows: np.ndarray, cols: np.ndarray, max_bytes: float | None = None):
        self.arr, self.rows, self.cols = arr, rows, cols
        self.max_bytes = _CACHE_BYTES if max_bytes is None else max_bytes
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def tile(self, i: int, j: int) -> np.ndarray:
        key = (i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = np.asarray(self.arr[:, self.rows[i] : self.rows[i + 1], self.cols[j] : self.cols[j + 1]])
        if np.issubdtype(t.dtype, np.floating) and not np.isfinite(t).all():
            r, c = np.argwhere(~np.isfinite(t))[0][1:]
            raise ValueError(
                f"The image has NaN or infinite pixels (e.g. at row {self.rows[i] + r}, column {self.cols[j] + c}): "
                "fill them first, e.g. `sdata.images[key] = Image2DModel.parse(img.fillna(0), ...)`."
            )
        self._cache[key] = t
        self._bytes += t.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return t

    def stripe_width(self) -> int:
        """Tile columns per vertical stripe: two tile rows of a stripe and its neighbours fit in the cache."""
        h, w = int(np.diff(self.rows).max()), int(np.diff(self.cols).max())
        tile_bytes = self.arr.shape[0] * h * w * np.dtype(self.arr.dtype).itemsize
        return int(np.clip(self.max_bytes // (2 * tile_bytes) - 2, 1, len(self.cols) - 1))

    def visit_key(self, ti: np.ndarray, tj: np.ndarray, stripe: int) -> np.ndarray:
        """Order in which tiles are visited: row by row within vertical stripes of ``stripe`` tile columns
        (one stripe when the slide is narrow enough), so each chunk is decoded once or, on wide slides,
        only the stripes' border chunks twice."""
        n_rows, n_cols = len(self.rows) - 1, len(self.cols) - 1
        return ((tj // stripe) * n_rows + ti) * n_cols + tj

    def release(self, key: int, stripe: int, margin: int) -> None:
        """Drop the cached tiles that no read at or after tile ``key`` (margins included) reaches."""
        n_rows, n_cols = len(self.rows) - 1, len(self.cols) - 1
        rest, tj = divmod(key, n_cols)
        s, ti = divmod(rest, n_rows)

        def row(px):
            return int(np.searchsorted(self.rows, max(px, 0), "right")) - 1

        def col(px):
            return int(np.searchsorted(self.cols, max(px, 0), "right")) - 1

        top, next_top = row(self.rows[ti] - margin), row(self.rows[min(ti + 1, n_rows - 1)] - margin)
        left, first = col(self.cols[tj] - margin), col(self.cols[s * stripe] - margin)
        for k in [k for k in self._cache if k[1] < first or k[0] < top or (k[0] < next_top and k[1] < left)]:
            self._bytes -= self._cache.pop(k).nbytes

    def region(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Pixels ``[:, r0:r1, c0:c1]`` (inside the image), assembled from the cached tiles."""
        out = np.empty((self.arr.shape[0], r1 - r0, c1 - c0), dtype=self.arr.dtype)
        i0, i1 = np.searchsorted(self.rows, r0, "right") - 1, np.searchsorted(self.rows, r1, "left")
        j0, j1 = np.searchsorted(self.cols, c0, "right") - 1, np.searchsorted(self.cols, c1, "left")
        for i in range(i0, i1):
            ya, yb = max(r0, self.rows[i]), min(r1, self.rows[i + 1])
            for j in range(j0, j1):
                xa, xb = max(c0, self.cols[j]), min(c1, self.cols[j + 1])
                t = self.tile(i, j)
                out[:, ya - r0 : yb - r0, xa - c0 : xb - c0] = t[
                    :, ya - self.rows[i] : yb - self.rows[i], xa - self.cols[j] : xb - self.cols[j]
                ]
        return out


def _intensity_range(tiles: _Tiles, cell_tiles: np.ndarray, q: tuple[float, float]):
    """Per-channel percentiles ``(lo, hi)`` from ≤ ~1M pixels per channel.

    Small images are subsampled on a regular grid; large ones from a few tiles spread over the cells
    (``cell_tiles``: flat tile index of every cell), which the crop pass then finds in the tile cache.
    """
    arr = tiles.arr
    h, w = arr.shape[-2:]
    if h * w <= _SMALL_IMAGE_PX or len(cell_tiles) == 0:
        step = max(1, int(np.ceil(np.sqrt(h * w / 1e6))))
        sub = np.asarray(arr[:, ::step, ::step]).reshape(arr.shape[0], -1)
    else:
        ij = [divmod(int(u), len(tiles.cols) - 1) for u in np.unique(cell_tiles)]
        tile_px = np.mean([np.diff(tiles.rows)[i] * np.diff(tiles.cols)[j] for i, j in ij])
        k = int(min(len(ij), max(1, np.ceil(_SMALL_IMAGE_PX / tile_px))))
        pick = [ij[p] for p in np.linspace(0, len(ij) - 1, k).round().astype(int)]
        step = max(1, int(np.ceil(np.sqrt(k * tile_px / 1e6))))
        sub = np.concatenate([tiles.tile(i, j)[:, ::step, ::step].reshape(arr.shape[0], -1) for i, j in pick], axis=1)
    sub = sub.astype(np.float32)
    lo = np.percentile(sub, q[0], axis=1)
    hi = np.percentile(sub, q[1], axis=1)
    hi = np.where(hi > lo, hi, lo + 1.0)
    return lo, hi


@njit(nogil=True, cache=True)
def _taps(centre, s, size, n_tap, extent):  # pragma: no cover - compiled
    """Filter taps along one axis: ``(first, index, weight)``.

    Output pixel ``k`` reads pixels ``index[k]`` (clipped into ``[0, extent)``; unsigned, so indexing needs
    no wrap-around check) with ``weight[k]`` (0 for pixels outside, i.e. zero padding; the weights of a
    pixel sum to 1 before that); ``first[k]`` is its first, unclipped pixel.
    """
    radius = max(1.0, s)
    first = np.empty(size, np.int64)
    index = np.empty((size, n_tap), np.uint64)
    weight = np.zeros((size, n_tap), np.float32)
    for k in range(size):
        c = centre + (k + 0.5 - 0.5 * size) * s  # output pixel centre, block coordinates
        j = int(math.floor(c - radius - 0.5)) + 1  # first pixel whose centre lies within the radius
        first[k] = j
        tot = 0.0
        for t in range(n_tap):
            d = abs(j + t + 0.5 - c) / radius
            if d < 1.0:
                weight[k, t] = 1.0 - d
                tot += 1.0 - d
        for t in range(n_tap):
            x = j + t
            weight[k, t] = weight[k, t] / tot if 0 <= x < extent else 0.0
            index[k, t] = min(max(x, 0), extent - 1)
    return first, index, weight


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _resample(block, labels, own, cy, cx, step, lo, scale, out, out_rows):  # pragma: no cover - compiled
    """Cut and resample one crop per cell from ``block``, map it to uint8 and write it to ``out``.

    block ``(C, H, W)``; labels ``(H, W)`` or ``(0, 0)`` (no masking); own ``(n,)`` each cell's label id;
    cy, cx ``(n,)`` crop centres in block coordinates (pixel ``k`` covers ``[k, k + 1)``); step ``(n,)``
    block pixels per output pixel; lo, scale ``(C,)`` float32 intensity map ``(v - lo) * scale``; out
    ``(N, C, S, S)`` uint8 written at rows ``out_rows``. Separable triangle filter of radius
    ``max(1, step)``: bilinear when enlarging, area-like anti-aliasing when shrinking; pixels outside the
    block read as 0 (the block holds the whole image around the cells).
    """
    n_ch, h, w = block.shape
    size = out.shape[-1]
    mask = labels.shape[0] > 0
    zero, top, half = np.float32(0.0), np.float32(255.0), np.float32(0.5)
    one = np.uint64(1)
    for i in prange(cy.shape[0]):
        s = step[i]
        n_tap = int(math.ceil(2.0 * max(1.0, s)))
        x_first, xi, wx = _taps(cx[i], s, size, n_tap, w)
        y_first, _, wy = _taps(cy[i], s, size, n_tap, h)
        ya = y_first[0]
        n_rows = y_first[size - 1] + n_tap - ya
        tmp = np.empty((n_rows, size), np.float32)
        own_id = own[i]
        row = out_rows[i]
        # crops inside the block read each row contiguously from x0 (a 1:1 crop is a sub-pixel shift)
        x0 = x_first[0]
        inside = x0 >= 0 and x_first[size - 1] + n_tap <= w and not mask
        unit = inside and s == 1.0
        x_off = np.empty(size, np.uint64)
        for k in range(size):
            x_off[k] = x_first[k] - x0 if inside else 0
        for ch in range(n_ch):
            # 1. along x, for every block row the crop touches (rows outside the block are zero)
            for r in range(n_rows):
                y = ya + r
                tr = tmp[r]
                if y < 0 or y >= h:
                    tr[:] = zero
                elif unit:
                    src = block[ch, y, x0 : x0 + size + 1]
                    w0, w1 = wx[0, 0], wx[0, 1]
                    for k in range(size):
                        tr[k] = w0 * np.float32(src[k]) + w1 * np.float32(src[k + 1])
                elif inside and n_tap == 2:
                    src = block[ch, y, x0 : x_first[size - 1] + n_tap]
                    for k in range(size):
                        j = x_off[k]
                        tr[k] = wx[k, 0] * np.float32(src[j]) + wx[k, 1] * np.float32(src[j + one])
                elif inside:
                    src = block[ch, y, x0 : x_first[size - 1] + n_tap]
                    for k in range(size):
                        j = x_off[k]
                        a = zero
                        for t in range(n_tap):
                            a += wx[k, t] * np.float32(src[j + np.uint64(t)])
                        tr[k] = a
                elif mask:
                    src = block[ch, y]
                    lab = labels[y]
                    for k in range(size):
                        a = zero
                        for t in range(n_tap):
                            x = xi[k, t]
                            if lab[x] == 0 or lab[x] == own_id:
                                a += wx[k, t] * np.float32(src[x])
                        tr[k] = a
                else:
                    src = block[ch, y]
                    for k in range(size):
                        a = zero
                        for t in range(n_tap):
                            a += wx[k, t] * np.float32(src[xi[k, t]])
                        tr[k] = a
            # 2. along y, then the intensity map to 0..255
            lo_c, scale_c = lo[ch], scale[ch]
            for k in range(size):
                o = y_first[k] - ya
                dst = out[row, ch, k]
                if n_tap == 2:
                    w0, w1 = wy[k, 0], wy[k, 1]
                    t0, t1 = tmp[o], tmp[o + 1]
                    for m in range(size):
                        v = (w0 * t0[m] + w1 * t1[m] - lo_c) * scale_c
                        dst[m] = np.uint8(min(max(v, zero), top) + half)
                else:
                    for m in range(size):
                        a = zero
                        for t in range(n_tap):
                            a += wy[k, t] * tmp[o + t, m]
                        v = (a - lo_c) * scale_c
                        dst[m] = np.uint8(min(max(v, zero), top) + half)


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
    geo = geometry
    if geo is None:
        geo = cell_geometry(
            data, table, labels_key=labels_key, shapes_key=shapes_key, coordinate_system=coordinate_system,
            shared_with=(data.images[image_key],), um_per_unit=um_per_unit,
        )  # fmt: skip
    elif len(geo.xy) != table.n_obs:
        raise ValueError(f"geometry has {len(geo.xy)} cells but the table has {table.n_obs}.")
    cs = geo.coordinate_system
    m_img = affine_to(data.images[image_key], cs)  # pixel (x, y) -> cs
    px_size_um = float(np.sqrt(abs(np.linalg.det(m_img[:2, :2])))) * geo.units.um_per_unit
    pix = apply_affine(np.linalg.inv(m_img), geo.xy)  # (x, y) in pixel units, continuous
    ch_idx, ch_names = _channel_index(img, channels)
    arr = img.data
    if "z" in img.dims:
        n_z = arr.shape[1]
        if z is None:
            z = n_z // 2
            logger.warning("Image %r is 3-D with %d z-planes: cropping from plane z=%d (the middle one); pass z= "
                           "to choose another.", image_key, n_z, z)
        if isinstance(z, bool) or not isinstance(z, int | np.integer) or not 0 <= z < n_z:
            raise ValueError(f"z must be a plane index 0..{n_z - 1} of image {image_key!r}, got {z!r}.")
        arr = arr[:, int(z)]
    elif z is not None:
        raise ValueError(f"z={z!r} was given but image {image_key!r} is 2-D (dims {img.dims}).")
    if not np.array_equal(ch_idx, np.arange(arr.shape[0])):
        arr = arr[ch_idx]
    h, w = arr.shape[-2:]

    # 1. crop side of each cell, in image pixels
    if crop_um is not None:
        if crop_um <= 0:
            raise ValueError(f"crop_um must be positive, got {crop_um}.")
        side_um = np.full(len(pix), float(crop_um))
    else:
        d = np.where(np.isfinite(geo.diameter), geo.diameter_um * extent_factor, max(min_um, 16.0))
        side_um = np.clip(d, min_um, max_um)
    side_px = np.maximum(side_um / px_size_um, 2.0)
    step = side_px / size
    # reach of a crop's filter taps around its centre
    margin = int(np.ceil(side_px.max() / 2 + max(1.0, step.max()))) + 2

    inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
    n_out = int((~inside).sum())
    if n_out and outside == "error":
        raise ValueError(
            f"{n_out} of {len(pix)} cells lie outside image {image_key!r} ({w}×{h} px) in coordinate system "
            f"{cs!r}. Check that image and cells are registered to the same coordinate system, or pass "
            "outside='pad' to give them blank crops."
        )
    if n_out:
        logger.warning("%d of %d cells lie outside the image(s): they get blank crops (outside='pad').", n_out,
                       len(geo.xy))

    labels_tiles = None
    own_ids = np.zeros(len(pix), dtype=np.int64)
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
        from ._elements import table_annotation

        _, _, instance_key = table_annotation(table)
        own_ids = table.obs[instance_key].to_numpy().astype(np.int64)
        labels_tiles = lab.data[None]

    # 2. tiles along the image's chunks; cells in store order: tile by tile, then by row and column
    ych, xch = spatial_chunks(arr)
    tiles = _Tiles(arr, chunk_edges(ych, h, _TILE_ROWS), chunk_edges(xch, w, _TILE_COLS))
    if labels_tiles is not None:
        labels_tiles = _Tiles(labels_tiles, tiles.rows, tiles.cols)
    n_cells = len(pix)
    ti = np.searchsorted(tiles.rows, np.clip(np.floor(pix[:, 1]), 0, h - 1), "right") - 1
    tj = np.searchsorted(tiles.cols, np.clip(np.floor(pix[:, 0]), 0, w - 1), "right") - 1
    stripe = tiles.stripe_width()
    visit = np.where(inside, tiles.visit_key(ti, tj, stripe), np.iinfo(np.int64).max)
    order = np.lexsort((pix[:, 0], pix[:, 1], visit))
    n_in = n_cells - n_out
    visit_sorted = visit[order[:n_in]]

    lo, hi = _intensity_range(tiles, (ti * (len(tiles.cols) - 1) + tj)[inside], percentiles)
    n_ch = len(ch_idx)
    params = {
        "image_key": image_key, "table_key": table_key, "labels_key": labels_key, "shapes_key": shapes_key,
        "coordinate_system": cs, "size": int(size), "crop_um": crop_um, "extent_factor": extent_factor,
        "min_um": min_um, "max_um": max_um, "channels": ch_names, "mask_neighbours": mask_neighbours,
        "outside": outside, "n_outside": n_out,
        "intensity_lo": lo.tolist(), "intensity_hi": hi.tolist(), "pixel_size_um": px_size_um,
        "um_per_unit": geo.units.um_per_unit, "units_source": geo.units.source,
        **({"z": int(z)} if "z" in img.dims else {}),
    }

    # 3. output: zarr (appended in store order from buffers) or memory (written in table order)
    writer = None
    if store is not None:
        path = Path(store)
        shape = (n_cells, n_ch, size, size)
        out = _store_array(path / "crops", shape)
        writer = _StoreWriter(out, min(n_cells, _store_layout(shape)[1]))
    else:
        out = np.zeros((n_cells, n_ch, size, size), dtype=np.uint8)

    from .._utils import progress

    tq = progress(total=n_cells, desc="crops", unit="cell")
    lo32 = lo.astype(np.float32)
    scale32 = (255.0 / (hi - lo)).astype(np.float32)
    no_labels = np.zeros((0, 0), dtype=np.int32)
    start = 0
    try:
        while start < n_in:
            # 4. the next run of cells of one tile (at most batch_cells, or what the buffer still holds)
            stop = int(np.searchsorted(visit_sorted, visit_sorted[start], side="right"))
            stop = min(stop, start + batch_cells)
            if writer is not None:
                stop = min(stop, start + writer.room())
            sel = order[start:stop]
            y, x = pix[sel, 1], pix[sel, 0]
            r0, r1 = max(0, int(np.floor(y.min())) - margin), min(h, int(np.ceil(y.max())) + margin + 1)
            c0, c1 = max(0, int(np.floor(x.min())) - margin), min(w, int(np.ceil(x.max())) + margin + 1)
            for t in (tiles, labels_tiles) if labels_tiles is not None else (tiles,):
                t.release(int(visit_sorted[start]), stripe, margin)  # tiles no later run reaches
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

    obs_names = table.obs_names.to_numpy().astype(object)
    if store is None:
        return CropStore(out, np.arange(n_cells), obs_names, ch_names, params)
    _write_meta(Path(store), order, obs_names, ch_names, params)
    return CropStore(out, order, obs_names, ch_names, params, str(store))


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
    geo = geometry
    if geo is None:
        geo = cell_geometry(data, table, labels_key=labels_key, shapes_key=shapes_key,
                            coordinate_system=coordinate_system, shared_with=tuple(data.images[k] for k in image_keys),
                            um_per_unit=um_per_unit)
    elif len(geo.xy) != table.n_obs:
        raise ValueError(f"geometry has {len(geo.xy)} cells but the table has {table.n_obs}.")
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
                shape = (table.n_obs, len(channels), part.size, part.size)
                if store is None:
                    out = np.zeros(shape, dtype=np.uint8)
                else:
                    out = _store_array(Path(store) / "crops", shape)
                    writer = _StoreWriter(out, min(table.n_obs, _store_layout(shape)[1]))
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
    obs_names = table.obs_names.to_numpy().astype(object)
    if store is None:
        return CropStore(out, np.arange(table.n_obs), obs_names, channels, params)
    order = np.concatenate([*order, outside_rows])
    _write_meta(Path(store), order, obs_names, channels, params)
    return CropStore(out, order, obs_names, channels, params, str(store))


def _append(writer: _StoreWriter, crops: np.ndarray) -> None:
    """Append ``crops`` to the store through the writer's buffers."""
    done = 0
    while done < len(crops):
        k = min(len(crops) - done, writer.room())
        writer.buffer[writer.filled:writer.filled + k] = crops[done:done + k]
        writer.advance(k)
        done += k


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
