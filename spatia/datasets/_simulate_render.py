"""Pixels of the simulated slide: the DAPI and membrane channels and the segmentation, chunk by chunk.

Each pixel is a deterministic function of its *global* position (textures, background and even the pixel
noise are hashed from global coordinates), so a chunk computed lazily equals the same region computed
eagerly, whatever the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ._simulate_fields import _hash_normal, _Waves
from ._simulate_tissue import _MARGIN_UM

CHANNELS = ("DAPI", "membrane")
_PAD_PX = 8  # rendering halo around each chunk (blur + boundary detection), cropped away
_EDGE_UM = 0.2  # softness of nuclear edges (before the optical blur)
# photometry (uint16 counts)
_DAPI_PEAK, _MEMBRANE_PEAK, _BACKGROUND = 2600.0, 1300.0, 110.0
_SHOT_GAIN, _READ_NOISE = 3.0, 15.0


@dataclass(frozen=True)
class _Scene:
    """Everything needed to render any chunk of the slide; cell arrays are indexed by ``cell_id - 1``."""

    shape: tuple[int, int]  # (ny, nx) pixels
    origin: tuple[float, float]  # (y0, x0) µm of the image's top-left corner
    pixel_size: float
    noise: float
    key: int  # seed of the pixel noise hash
    background: _Waves
    tree: cKDTree  # on (cy, cx)
    cy: np.ndarray
    cx: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    cell_a: np.ndarray  # semi-axes of the cell body (µm)
    cell_b: np.ndarray
    nuc_a: np.ndarray  # semi-axes of the nucleus (µm)
    nuc_b: np.ndarray
    dapi: np.ndarray
    tex_amp: np.ndarray
    tex_ky: np.ndarray  # (n, waves) wave vectors (rad/µm) and phases of the chromatin texture
    tex_kx: np.ndarray
    tex_phase: np.ndarray
    membrane: np.ndarray

    def render(self, r0: int, r1: int, c0: int, c1: int, with_image: bool = True):
        """Render pixel rows ``r0:r1`` and columns ``c0:c1``.

        Returns
        -------
        ``labels`` of shape ``(r1 - r0, c1 - c0)`` (int32) and, if ``with_image``, the image ``(2, h, w)``
        (uint16) — else ``None``.
        """
        ps, (oy, ox), pad = self.pixel_size, self.origin, _PAD_PX
        rows, cols = np.arange(r0 - pad, r1 + pad), np.arange(c0 - pad, c1 + pad)
        ys, xs = oy + (rows + 0.5) * ps, ox + (cols + 0.5) * ps  # pixel centres (µm) of the padded chunk
        # 1. cells whose bounding box may touch the padded chunk
        reach = float(self.cell_a.max()) + ps
        centre = [(ys[0] + ys[-1]) / 2, (xs[0] + xs[-1]) / 2]
        half = max(ys[-1] - ys[0], xs[-1] - xs[0]) / 2
        ids = np.sort(np.asarray(self.tree.query_ball_point(centre, half + reach, p=np.inf), dtype=np.int64))
        labels = self._labels(ids, ys, xs)
        if not with_image:
            return labels[pad:-pad, pad:-pad], None
        dapi, nucleus = self._nuclei(ids, labels, ys, xs)
        # 4. channels: optics blur, cell boundaries, background, shot + read noise
        inside = labels > 0
        member = np.where(inside, self.membrane[labels - 1], 0.0)
        edge = np.zeros(labels.shape, bool)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[1:] |= labels[1:] != labels[:-1]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        mem = member * (edge & inside) + 0.18 * member * (1.0 - nucleus) * inside
        bg = _BACKGROUND * (1.0 + 0.3 * self.background.grid(ys, xs))
        channels = [
            ndimage.gaussian_filter(_DAPI_PEAK * dapi + 0.05 * _DAPI_PEAK * inside, 0.8) + bg,
            ndimage.gaussian_filter(_MEMBRANE_PEAK * mem, 1.0) + 0.8 * bg,
        ]
        core = (slice(pad, -pad), slice(pad, -pad))
        image = np.empty((len(channels), r1 - r0, c1 - c0), np.uint16)
        noise = _hash_normal(rows[core[0]], cols[core[1]], self.key) if self.noise > 0 else (0.0, 0.0)
        for k, (signal, z) in enumerate(zip(channels, noise, strict=True)):
            signal = signal[core]
            # shot (Poisson-like, variance ∝ signal) and read noise, summed into one Gaussian
            signal = signal + self.noise * np.sqrt(_SHOT_GAIN * signal + _READ_NOISE**2) * z
            image[k] = np.clip(np.rint(signal), 0, 65535)
        return labels[core], image

    def _frames(self, ids: np.ndarray, ys: np.ndarray, xs: np.ndarray, reach: np.ndarray):
        """Per cell: its id, the chunk slices of its box ``centre ± reach`` and pixel offsets ``(u, v)`` in
        its own frame (µm, u along the major axis)."""
        ps = self.pixel_size
        cy, cx, c, s = (v[ids].astype(np.float64) for v in (self.cy, self.cx, self.cos, self.sin))
        i0 = np.maximum(np.floor((cy - reach - ys[0]) / ps).astype(np.int64), 0)
        i1 = np.minimum(np.ceil((cy + reach - ys[0]) / ps).astype(np.int64) + 1, len(ys))
        j0 = np.maximum(np.floor((cx - reach - xs[0]) / ps).astype(np.int64), 0)
        j1 = np.minimum(np.ceil((cx + reach - xs[0]) / ps).astype(np.int64) + 1, len(xs))
        for k in np.flatnonzero((i0 < i1) & (j0 < j1)).tolist():
            sl = (slice(int(i0[k]), int(i1[k])), slice(int(j0[k]), int(j1[k])))
            dy, dx = ys[sl[0], None] - cy[k], xs[None, sl[1]] - cx[k]
            yield k, sl, dx * c[k] + dy * s[k], dy * c[k] - dx * s[k]

    def _labels(self, ids: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """2. Each pixel goes to the nearest centre (elliptic distance) among the cell bodies covering it."""
        best = np.full((len(ys), len(xs)), np.inf)
        labels = np.zeros((len(ys), len(xs)), np.int32)
        cell_a, cell_b = self.cell_a[ids].tolist(), self.cell_b[ids].tolist()
        for k, sl, u, v in self._frames(ids, ys, xs, self.cell_a[ids] + self.pixel_size):
            a, b = cell_a[k], cell_b[k]
            rho2 = (u / a) ** 2 + (v / b) ** 2
            dist = rho2 * (a * b)  # squared elliptic distance (µm²): monotone in the distance
            sub_best, sub_lab = best[sl], labels[sl]
            win = (rho2 < 1.0) & (dist < sub_best)
            sub_best[win] = dist[win]
            sub_lab[win] = ids[k] + 1
        return labels

    def _nuclei(self, ids: np.ndarray, labels: np.ndarray, ys: np.ndarray, xs: np.ndarray):
        """3. Nuclei: soft ellipses with a brighter rim and chromatin texture, clipped to their own cell.

        The texture is a sum of plane waves in *global* coordinates (deterministic per cell, any chunking).
        Returns the DAPI signal and the nuclear occupancy (0–1) of the padded chunk.
        """
        dapi, nucleus = np.zeros(labels.shape), np.zeros(labels.shape)
        a_all, b_all = self.nuc_a[ids].astype(np.float64), self.nuc_b[ids].astype(np.float64)
        # the soft edge is cut where it has decayed to ~3e-4 (8 edge widths): every pixel's value depends on
        # that pixel alone, never on the box, so chunks agree exactly
        cut = 1.0 + 8 * _EDGE_UM / np.sqrt(a_all * b_all)
        bright, amp = self.dapi[ids].tolist(), self.tex_amp[ids].tolist()
        norm = math.sqrt(2 / self.tex_ky.shape[1])
        for k, sl, u, v in self._frames(ids, ys, xs, a_all * cut + self.pixel_size):
            i, a, b = int(ids[k]), float(a_all[k]), float(b_all[k])
            rn2 = (u / a) ** 2 + (v / b) ** 2
            own = (labels[sl] == i + 1) & (rn2 < cut[k] ** 2)
            # soft edge: logistic in the (approximate) signed distance to the ellipse, width _EDGE_UM
            soft = 0.5 - 0.5 * np.tanh((np.sqrt(rn2) - 1.0) * (0.5 * math.sqrt(a * b) / _EDGE_UM))
            ay = self.tex_ky[i, :, None] * ys[None, sl[0]] + self.tex_phase[i, :, None]  # (waves, h)
            bx = self.tex_kx[i, :, None] * xs[None, sl[1]]  # (waves, w)
            tex = (np.cos(ay).T @ np.cos(bx) - np.sin(ay).T @ np.sin(bx)) * norm
            value = bright[k] * soft * np.maximum(1.0 + amp[k] * tex + 0.3 * np.minimum(rn2, 1.0), 0.05)
            dapi[sl] += np.where(own, value, 0.0)
            nucleus[sl] = np.where(own, soft, nucleus[sl])
        return dapi, nucleus


def _tokenize(parameters: dict, key: int) -> str:
    """A dask key for the rendered arrays: the same slide (parameters and seed) gives the same key."""
    from dask.base import tokenize

    return tokenize(sorted(parameters.items()), key)


def _labels_block(scene: _Scene, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return scene.render(r0, r1, c0, c1, with_image=False)[0]


def _image_block(scene: _Scene, block_info=None) -> np.ndarray:
    _, (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return scene.render(r0, r1, c0, c1, with_image=True)[1]


def _rasters(scene: _Scene, chunk_size: int, lazy: bool, token: str):
    """Labels ``(y, x)`` and image ``(c, y, x)``: dask graphs (lazy) or numpy arrays filled chunk by chunk."""
    ny, nx = scene.shape
    if lazy:
        import dask.array as da

        ychunks = da.core.normalize_chunks(chunk_size, (ny,))[0]
        xchunks = da.core.normalize_chunks(chunk_size, (nx,))[0]
        # `name` given: dask does not hash the scene (a million cells) to build the graph
        labels = da.map_blocks(
            _labels_block, scene=scene, chunks=(ychunks, xchunks), dtype=np.int32,
            meta=np.empty((0, 0), np.int32), name=f"spatia-simulate-labels-{token}",
        )  # fmt: skip
        image = da.map_blocks(
            _image_block, scene=scene, chunks=((len(CHANNELS),), ychunks, xchunks), dtype=np.uint16,
            meta=np.empty((0, 0, 0), np.uint16), name=f"spatia-simulate-image-{token}",
        )  # fmt: skip
        return labels, image
    labels = np.zeros((ny, nx), np.int32)
    image = np.zeros((len(CHANNELS), ny, nx), np.uint16)
    for r0 in range(0, ny, chunk_size):
        for c0 in range(0, nx, chunk_size):
            r1, c1 = min(r0 + chunk_size, ny), min(c0 + chunk_size, nx)
            labels[r0:r1, c0:c1], image[:, r0:r1, c0:c1] = scene.render(r0, r1, c0, c1)
    return labels, image


def _make_scene(tissue, shape: dict, pixel_size: float, noise: float, rng) -> _Scene:
    """The pixel grid covering all cells plus a margin, and the per-cell rendering parameters (float32)."""
    yx, origin = tissue.yx, tissue.origin
    ny, nx = np.ceil((yx.max(0) + _MARGIN_UM - origin) / pixel_size).astype(int)
    cells = {key: np.asarray(value, np.float32) for key, value in shape.items()}
    return _Scene(
        shape=(int(ny), int(nx)), origin=(float(origin[0]), float(origin[1])), pixel_size=float(pixel_size),
        noise=float(noise), key=int(rng.integers(0, 2**62)), background=_Waves.draw(rng, length_scale=150.0),
        tree=cKDTree(yx), cy=yx[:, 0].astype(np.float32), cx=yx[:, 1].astype(np.float32), **cells,
    )  # fmt: skip
