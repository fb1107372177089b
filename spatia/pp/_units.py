"""Physical units: how many µm one unit of a coordinate system is.

Every length spatia takes (crop window, niche radius, tissue tiles, scale bars) is in µm. Users' slides come
in other units: spatialdata-io's Xenium and MERSCOPE readers make ``"global"`` the morphology image's pixel
grid and keep shapes and points in µm with a ``Scale(1 / pixel size)`` (or an affine) into it; CosMx frames
are in pixels. :func:`resolve_units` finds the factor, in this order:

1. an explicit ``um_per_unit=`` argument, or a value stored on the data with :func:`set_um_per_unit`;
2. the elements: a shapes or points element registered to the coordinate system whose own coordinates are
   µm (as spatialdata-io writes them) gives the factor exactly, as the scale of its transformation;
3. an estimate from the spacing of the cells, with a warning that says what was assumed and how to set it.

Nothing here writes into the user's object except :func:`set_um_per_unit`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .._constants import Keys

logger = logging.getLogger(__name__)

#: Typical distance between a cell's centroid and its nearest neighbour's, in µm (tissue: ~6–15 µm).
TYPICAL_SPACING_UM = 10.0
#: Typical equivalent diameter of a segmented cell or nucleus, in µm (~7–20 µm).
TYPICAL_DIAMETER_UM = 10.0
#: An element's scale explains the cells' spacing when it is within this factor of the estimate. Pixel sizes
#: of the instruments (0.108–0.2125 µm/px) are 4.7–9× away from µm, so the factor can be this wide.
_MATCH_FACTOR = 2.2
#: Fewer cells than this do not tell a spacing.
_MIN_CELLS = 10
#: Estimates outside this range mean the coordinates are not cell positions at any plausible unit.
_PLAUSIBLE = (1e-4, 1e4)


@dataclass(frozen=True)
class Units:
    """The µm-per-unit factor of a coordinate system and where it came from.

    Attributes
    ----------
    um_per_unit
        µm per coordinate-system unit (1 for a frame in µm, the pixel size for a pixel frame).
    source
        ``"argument"``, ``"stored"`` (:func:`set_um_per_unit`), ``"element '<name>'"`` (a µm-valued
        shapes/points element's transformation), ``"cell spacing (µm)"`` (spacing consistent with µm),
        ``"estimated from cell spacing"`` or ``"assumed (too few cells to tell)"`` (1 µm per unit).
    coordinate_system
        The coordinate system the factor applies to (``None``: a table's ``obsm`` coordinates).
    """

    um_per_unit: float
    source: str
    coordinate_system: str | None = None

    def to_dict(self) -> dict:
        out = {"um_per_unit": float(self.um_per_unit), "source": self.source}
        if self.coordinate_system is not None:
            out["coordinate_system"] = self.coordinate_system
        return out


def check_um_per_unit(value) -> float:
    """``value`` as a positive finite float, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"um_per_unit must be a number (µm per coordinate unit), got {type(value).__name__}.")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"um_per_unit must be a positive finite number (µm per coordinate unit), got {value}.")
    return value


def set_um_per_unit(data, um_per_unit: float, *, coordinate_system: str = "global") -> None:
    """Record once how many µm one unit of a coordinate system is; every spatia function then uses it.

    Use it when spatia cannot tell the units from the elements (e.g. CosMx pixel frames) or guesses wrong.
    On a :class:`~spatialdata.SpatialData` the value goes to ``sdata.attrs['spatia_um_per_unit']
    [coordinate_system]`` (saved with the zarr store); on an :class:`~anndata.AnnData` it applies to
    ``obsm['spatial']`` and goes to ``uns['spatia_um_per_unit']``.

    Parameters
    ----------
    data
        SpatialData or AnnData.
    um_per_unit
        µm per unit: 1 for µm, the pixel size in µm for a pixel frame (Xenium morphology: 0.2125).
    coordinate_system
        The coordinate system it applies to (SpatialData only).

    Examples
    --------
    >>> sp.pp.set_um_per_unit(sdata, 0.12028)  # a CosMx slide in global pixels
    """
    from anndata import AnnData

    value = check_um_per_unit(um_per_unit)
    if isinstance(data, AnnData):
        data.uns[Keys.UM_PER_UNIT] = value
        return
    from ._elements import _is_sdata

    if not _is_sdata(data):
        raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")
    stored = dict(data.attrs.get(Keys.UM_PER_UNIT) or {})
    stored[str(coordinate_system)] = value
    data.attrs[Keys.UM_PER_UNIT] = stored


def stored_um_per_unit(data, coordinate_system: str | None) -> float | None:
    """The value recorded by :func:`set_um_per_unit` for ``coordinate_system``, if any."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        value = data.uns.get(Keys.UM_PER_UNIT)
    else:
        value = (getattr(data, "attrs", None) or {}).get(Keys.UM_PER_UNIT, {}) or {}
        value = value.get(coordinate_system) if hasattr(value, "get") else None
    return None if value is None else check_um_per_unit(value)


def spacing_estimate(xy: np.ndarray, diameter: np.ndarray | None = None, max_cells: int = 20_000,
                     seed: int = 0) -> float | None:
    """µm per unit implied by the cells' spacing and sizes: the larger of :func:`estimates`."""
    est = estimates(xy, diameter, max_cells=max_cells, seed=seed)
    return max(est) if est else None


def estimates(xy: np.ndarray, diameter: np.ndarray | None = None, max_cells: int = 20_000,
              seed: int = 0) -> list[float]:
    """µm per unit implied by the cells' nearest-neighbour spacing and, with ``diameter`` (same units as ``xy``),
    by their sizes; empty when the spacing cannot be measured.

    A subset of a slide's cells (one type, a few picked cells) is sparser than the tissue, which lowers the
    spacing estimate; the cells' own sizes are not affected. Tiny or sparse cells make the two disagree, so a
    value that agrees with either is accepted (:func:`resolve_units`).
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=float)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < _MIN_CELLS:
        return []
    tree = cKDTree(xy)
    probe = xy
    if len(xy) > max_cells:
        probe = xy[np.random.default_rng(seed).choice(len(xy), max_cells, replace=False)]
    d, _ = tree.query(probe, k=2)
    d = d[:, 1]
    d = d[d > 0]
    if d.size < max(2, len(probe) // 4):
        return []
    out = [TYPICAL_SPACING_UM / float(np.median(d))]
    if diameter is not None:
        diameter = np.asarray(diameter, dtype=float)
        diameter = diameter[np.isfinite(diameter) & (diameter > 0)]
        if diameter.size >= _MIN_CELLS:
            out.append(TYPICAL_DIAMETER_UM / float(np.median(diameter)))
    return out


def _element_candidates(sdata, coordinate_system: str) -> list[tuple[str, float]]:
    """``(name, µm per unit)`` for every shapes/points element registered to the frame, assuming it is in µm.

    Only isotropic linear parts are used (a scale, possibly with rotation and translation).
    """
    from spatialdata.transformations import get_transformation

    out = []
    for kind in ("shapes", "points"):
        for name, el in getattr(sdata, kind).items():
            try:
                t = get_transformation(el, get_all=True).get(coordinate_system)
            except (KeyError, ValueError, AttributeError):
                continue
            if t is None:
                continue
            m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)[:2, :2]
            sv = np.linalg.svd(m, compute_uv=False)
            if sv.min() <= 0 or sv.max() / sv.min() > 1.01:
                continue
            out.append((name, 1.0 / float(np.sqrt(sv[0] * sv[1]))))
    return out


def _round_sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def resolve_units(
    data,
    xy: np.ndarray,
    *,
    coordinate_system: str | None,
    um_per_unit: float | None = None,
    what: str = "the cells' coordinates",
    diameter: np.ndarray | None = None,
) -> Units:
    """The µm-per-unit factor of ``coordinate_system`` (see the module docstring for the order).

    Parameters
    ----------
    data
        The SpatialData (elements and stored values are read from it) or AnnData (``uns`` only).
    xy
        Cell centroids in ``coordinate_system`` units, for the spacing check and estimate.
    coordinate_system
        The frame of ``xy``; ``None`` for a table's ``obsm`` coordinates (no elements are consulted).
    um_per_unit
        Explicit value; wins over everything else.
    what
        How the coordinates are named in messages.
    diameter
        The cells' equivalent diameters in ``coordinate_system`` units, when known (steadies the estimate on
        a sparse subset of cells).
    """
    if um_per_unit is not None:
        return Units(check_um_per_unit(um_per_unit), "argument", coordinate_system)
    from ._elements import _is_sdata

    stored = stored_um_per_unit(data, coordinate_system)
    if stored is not None:
        return Units(stored, "stored", coordinate_system)
    ests = estimates(xy, diameter)
    estimate = max(ests) if ests else None
    candidates = _element_candidates(data, coordinate_system) if (_is_sdata(data) and coordinate_system) else []
    hint = (f"pass um_per_unit= or set it once with `sp.pp.set_um_per_unit(data, value"
            f"{'' if coordinate_system in (None, 'global') else f', coordinate_system={coordinate_system!r}'})`")
    if estimate is None:
        values = {round(v, 9) for _, v in candidates}
        if len(values) == 1:
            name, v = candidates[0]
            return Units(v, f"element {name!r}", coordinate_system)
        logger.warning(
            "Too few distinct cell positions to tell the units of %s: spatia assumes 1 µm per unit. If that is "
            "wrong, %s.", what, hint,
        )
        return Units(1.0, "assumed (too few cells to tell)", coordinate_system)
    if not _PLAUSIBLE[0] < estimate < _PLAUSIBLE[1]:
        raise ValueError(
            f"The cell spacing in {what} implies {estimate:.3g} µm per unit, which is not a plausible unit for "
            f"cell positions: check the coordinates, or {hint}."
        )
    def mismatch(v: float) -> float:  # how far v is from the closest estimate (log ratio)
        return min(abs(np.log(v / e)) for e in ests)

    if candidates:
        name, v = min(candidates, key=lambda c: mismatch(c[1]))
        if mismatch(v) < np.log(_MATCH_FACTOR):
            return Units(v, f"element {name!r}", coordinate_system)
    if mismatch(1.0) < np.log(_MATCH_FACTOR):
        logger.info("The spacing of %s is that of µm coordinates: using 1 µm per unit (%s to change it).",
                    what, hint)
        return Units(1.0, "cell spacing (µm)", coordinate_system)
    value = _round_sig(estimate)
    logger.warning(
        "No element says which units %s%s are in; from the cells' spacing spatia assumes %.3g µm per unit. "
        "If that is wrong, %s.",
        what, f" (coordinate system {coordinate_system!r})" if coordinate_system else "", value, hint,
    )
    return Units(value, "estimated from cell spacing", coordinate_system)


__all__ = ["Units", "resolve_units", "set_um_per_unit", "stored_um_per_unit", "check_um_per_unit"]
