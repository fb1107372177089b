"""Three tiny real datasets shipped with spatia (Xenium, CosMx, MERSCOPE), loaded as SpatialData.

The raw instrument files live in ``_data/`` (provenance and licences: ``_data/ATTRIBUTION.md``). Each loader
(:func:`~spatia.datasets.xenium_toy` in ``_xenium.py``, :func:`~spatia.datasets.cosmx_lung_mini` in
``_cosmx.py``, :func:`~spatia.datasets.merscope_toy` in ``_merscope.py``) reads them without network access
and without spatialdata-io, and returns elements shaped like those the spatialdata-io readers return for
full-size outputs, every one parsed with its spatialdata model. This module holds what the loaders share.

Coordinates: every loader has one coordinate system, ``"global"``. By default (``units="px"``) it is in
pixels, as spatialdata-io's readers write it: the (first) image has an Identity transformation, Xenium's and
MERSCOPE's shapes and points stay in µm with a µm → pixel transformation, and CosMx's frame is the global
pixel grid (its µm per pixel is recorded with :func:`spatia.pp.set_um_per_unit`, which spatialdata-io cannot
do). ``units="um"`` puts ``"global"`` in micrometres instead (x to the right, y down, like the images):
shapes, points and ``table.obsm["spatial"]`` have an Identity; images and labels carry pixel → µm (pixel
``i`` covers ``[i, i + 1)``). spatia gives the same results on both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

_DATA = Path(__file__).parent / "_data"
_GLOBAL = "global"


def _identity():
    from spatialdata.transformations import Identity

    return {_GLOBAL: Identity()}


def _scale_translate(scale: float, tx: float, ty: float) -> dict:
    """Pixel → µm: ``x_um = scale * x_px + tx`` (likewise y) as a spatialdata Sequence."""
    from spatialdata.transformations import Scale, Sequence, Translation

    return {
        _GLOBAL: Sequence(
            [Scale([scale, scale], axes=("x", "y")), Translation([tx, ty], axes=("x", "y"))]
        )
    }


def _polygons(df: pd.DataFrame, id_col: str, x_col: str, y_col: str, order: pd.Index):
    """One shapely Polygon per id from a long vertex table, in the order of ``order``."""
    from shapely import Polygon

    groups = {k: g for k, g in df.groupby(id_col, sort=False)[[x_col, y_col]]}
    missing = [i for i in order if i not in groups]
    if missing:
        raise ValueError(f"{len(missing)} cells have no boundary vertices (e.g. {missing[:3]}).")
    return [Polygon(groups[i].to_numpy()) for i in order]


def _rasterize(
    polys, values: np.ndarray, shape: tuple[int, int], origin: float, um_per_px: float
) -> np.ndarray:
    """Burn µm polygons into a label image whose pixel ``i`` covers ``[origin + i*s, origin + (i+1)*s)``."""
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, dtype=np.uint32)
    for poly, value in zip(polys, values, strict=True):
        x, y = np.asarray(poly.exterior.coords).T
        # skimage fills pixels whose index-space centre is inside; index-space = intrinsic - 0.5
        rr, cc = draw_polygon((y - origin) / um_per_px - 0.5, (x - origin) / um_per_px - 0.5, shape=shape)
        out[rr, cc] = value
    return out


def _decode(values: pd.Series) -> pd.Series:
    return values.map(lambda v: v.decode() if isinstance(v, bytes) else str(v))

