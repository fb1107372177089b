"""Reading an image tile by tile for the crop pass, and the compiled kernels that cut and resample the crops.

Tiles follow the image's chunks (so each chunk is decoded whole) and are kept in a bounded cache; cells are
visited tile by tile, in vertical stripes narrow enough for the cache to hold the tiles a stripe's crops reach.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._elements import chunk_edges, spatial_chunks

_TILE_ROWS, _TILE_COLS = 1024, 2048  # target tile size (px) when reading the image along its chunks
_CACHE_BYTES = 256 * 2**20  # at most this many bytes of decoded tiles kept for the margins of later tiles
_SMALL_IMAGE_PX = 4_000_000  # below this, intensity percentiles come from a grid over the whole image

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

class _TilePlan(NamedTuple):
    """The order of the crop pass over one image and its intensity map.

    Attributes
    ----------
    tiles
        The image's tiles.
    labels
        The segmentation's tiles on the same grid (for ``mask_neighbours``), or ``None``.
    order
        ``(n_cells,)`` cells in store order: the cells inside the image tile by tile (in :meth:`_Tiles.visit_key`
        order), by row and then column within a tile; the cells outside the image last.
    visit
        Visit key of the tile of each cell inside the image, in store order (non-decreasing).
    stripe
        Tile columns per vertical stripe (:meth:`_Tiles.stripe_width`).
    lo, hi
        ``(C,)`` intensities mapped to 0 and 255 (:func:`_intensity_range`).
    """

    tiles: _Tiles
    labels: _Tiles | None
    order: np.ndarray
    visit: np.ndarray
    stripe: int
    lo: np.ndarray
    hi: np.ndarray


def _tile_plan(arr, labels, pix: np.ndarray, inside: np.ndarray, percentiles: tuple[float, float]) -> _TilePlan:
    """Tiles of ``arr`` ``(C, H, W)`` along its chunks (about ``_TILE_ROWS × _TILE_COLS`` px), the order in
    which the cells (crop centres ``pix`` ``(n, 2)`` as pixel (x, y); ``inside`` the image) are visited, and
    the intensity range at ``percentiles``. ``labels`` ``(1, H, W)`` (or ``None``) is tiled on the same grid.
    """
    h, w = arr.shape[-2:]
    ych, xch = spatial_chunks(arr)
    tiles = _Tiles(arr, chunk_edges(ych, h, _TILE_ROWS), chunk_edges(xch, w, _TILE_COLS))
    label_tiles = _Tiles(labels, tiles.rows, tiles.cols) if labels is not None else None
    ti = np.searchsorted(tiles.rows, np.clip(np.floor(pix[:, 1]), 0, h - 1), "right") - 1
    tj = np.searchsorted(tiles.cols, np.clip(np.floor(pix[:, 0]), 0, w - 1), "right") - 1
    stripe = tiles.stripe_width()
    visit = np.where(inside, tiles.visit_key(ti, tj, stripe), np.iinfo(np.int64).max)
    order = np.lexsort((pix[:, 0], pix[:, 1], visit))
    n_in = len(pix) - int((~inside).sum())
    lo, hi = _intensity_range(tiles, (ti * (len(tiles.cols) - 1) + tj)[inside], percentiles)
    return _TilePlan(tiles, label_tiles, order, visit[order[:n_in]], stripe, lo, hi)


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
