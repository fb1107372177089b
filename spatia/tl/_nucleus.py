"""Measured nucleus features of each cell's crop, the morphology read beside the embedding by ``annotate``."""

from __future__ import annotations

import numpy as np

#: Columns of :func:`nucleus_features`: the region measurements of :func:`spatia.metrics.morphology_features`
#: and two grey-level co-occurrence (GLCM) texture statistics of the nucleus.
TEXTURE_FEATURES = ("glcm_contrast", "glcm_homogeneity")

#: Columns of :func:`nucleus_features` without ``channels``.
N_NUCLEUS_FEATURES = 10 + len(TEXTURE_FEATURES)

_LEVELS = 32  # grey levels of the co-occurrence matrices (level 0 = outside the nucleus)
_CHUNK = 2048  # cells read from the crop store at a time


def _texture(img: np.ndarray) -> tuple[float, float]:
    """GLCM contrast and homogeneity of the pixel pairs inside the central Otsu region, the cell's own nucleus
    (distances 1 and 2 px, four directions), on the region's 1st–99.5th percentile range; NaN without one."""
    from skimage.feature import graycomatrix, graycoprops
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    from ..metrics._morphology import central_region

    if not np.isfinite(img).all() or np.ptp(img) <= 1e-8:
        return np.nan, np.nan
    lab = label(img > threshold_otsu(img), connectivity=2)
    inside = lab == central_region(lab)
    if lab.max() == 0 or inside.sum() < 4:
        return np.nan, np.nan
    lo, hi = np.percentile(img[inside], [1, 99.5])
    scaled = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * (_LEVELS - 1.001)
    q = np.where(inside, 1 + scaled.astype(np.uint8), 0).astype(np.uint8)
    glcm = graycomatrix(q, [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=_LEVELS + 1)[1:, 1:]
    glcm = glcm / np.maximum(glcm.sum((0, 1), keepdims=True), 1)  # pairs inside the nucleus only
    return float(graycoprops(glcm, "contrast").mean()), float(graycoprops(glcm, "homogeneity").mean())


def nucleus_features(store, rows: np.ndarray | None = None, channels: bool = False) -> np.ndarray:
    """``(n_cells, 12)`` measurements of each cell's own nucleus (the Otsu region at the centre of the first
    channel of its crop, not a larger neighbour's): area, perimeter, eccentricity, solidity, intensity
    mean / max / min / std, axis lengths (``morphology_features``) and GLCM contrast / homogeneity. Crops are read
    ``_CHUNK`` cells at a time; a crop without foreground gets zeros.

    Measured in crop pixels: comparable between cells of crops cut with the same window and size.

    ``channels=True`` adds :func:`channel_intensities` of every channel (``10 × n_channels`` columns): where
    the cell-type stains of a multiplexed image are (membrane, immunofluorescence markers), which the nucleus
    channel alone does not show.
    """
    from .._settings import settings
    from .._utils import progress
    from ..metrics import morphology_features

    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    n_extra = len(CHANNEL_STATS) * len(CHANNEL_RADII_UM) * len(store.channels) if channels else 0
    um_per_px = _um_per_px(store) if channels else None
    n_base = N_NUCLEUS_FEATURES
    out = np.empty((len(rows), n_base + n_extra), dtype=np.float64)
    with progress(total=len(rows), desc="nucleus features", unit="cell") as bar:
        for start in range(0, len(rows), _CHUNK):
            part = rows[start:start + _CHUNK]
            crops = store.get(part)
            with settings.override(progress_bar=False):  # one bar for the whole slide, not one per chunk
                out[start:start + len(part), :10] = morphology_features(crops, region="central").to_numpy(np.float64)
            gray = crops[:, 0].astype(np.float64)
            out[start:start + len(part), 10:n_base] = [_texture(img) for img in gray]
            if channels:
                out[start:start + len(part), n_base:] = channel_intensities(crops, um_per_px)
            bar.update(len(part))
    return np.nan_to_num(out, nan=0.0)


#: Discs around the crop's centre (radius, µm) whose intensities :func:`channel_intensities` summarises: about
#: the nucleus, and about the cell body.
CHANNEL_RADII_UM = (3.0, 5.0)
#: Summaries of each channel in each disc.
CHANNEL_STATS = ("mean", "std", "q10", "q50", "q90")


def _um_per_px(store) -> float:
    """µm per crop pixel of a store cut with a fixed window (``crop_um``); else 0.5 (the default crop's)."""
    crop_um, size = store.params.get("crop_um"), store.params.get("size", store.size)
    return float(crop_um) / float(size) if crop_um else 0.5


def channel_intensities(crops: np.ndarray, um_per_px: float) -> np.ndarray:
    """``(n, len(CHANNEL_STATS) × len(CHANNEL_RADII_UM) × C)`` intensity summaries (0–1) of each channel of
    ``(n, C, S, S)`` uint8 crops in discs of :data:`CHANNEL_RADII_UM` around their centre, disc by disc."""
    n, c, size = crops.shape[0], crops.shape[1], crops.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    r_px = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    blocks = []
    for radius in CHANNEL_RADII_UM:
        mask = r_px <= max(radius / um_per_px, 1.0)
        v = crops[:, :, mask].astype(np.float32) / 255.0  # (n, C, pixels)
        q = np.quantile(v, (0.1, 0.5, 0.9), axis=-1)
        blocks += [v.mean(-1), v.std(-1), q[0], q[1], q[2]]
    return np.concatenate(blocks, axis=1).reshape(n, -1) if n else np.zeros((0, len(blocks) * c))
