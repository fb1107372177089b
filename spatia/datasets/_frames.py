"""Re-express a SpatialData built in µm the way spatialdata-io's readers write it: ``"global"`` in pixels."""

from __future__ import annotations

from typing import Literal

from .._constants import Defaults

FrameUnits = Literal["px", "um"]


def check_units(units: str) -> str:
    if units not in ("px", "um"):
        raise ValueError(f"units must be 'px' (spatialdata-io's pixel frame) or 'um', got {units!r}.")
    return units


def to_pixel_frame(sdata, image_key: str, coordinate_system: str = Defaults.COORDINATE_SYSTEM, *,
                   pixel_points: bool = False, pixel_obsm: bool = False):
    """Make ``coordinate_system`` the pixel grid of ``image_key``, in place, and return ``sdata``.

    The image gets an Identity transformation; every other element keeps its own coordinates (shapes and
    points stay in µm, as spatialdata-io's Xenium and MERSCOPE readers keep them) with its old transformation
    followed by µm → pixels. ``pixel_points`` rewrites the points' coordinates in pixels (Identity), and
    ``pixel_obsm`` the tables' ``obsm['spatial']``, as spatialdata-io's CosMx reader has them; otherwise
    ``obsm['spatial']`` stays in µm.
    """
    import numpy as np
    from spatialdata import transform
    from spatialdata.transformations import Identity, Sequence, get_transformation, set_transformation

    to_px = get_transformation(sdata.images[image_key], to_coordinate_system=coordinate_system).inverse()
    for kind in ("images", "labels", "shapes", "points"):
        for name, el in list(getattr(sdata, kind).items()):
            if kind == "images" and name == image_key:
                set_transformation(el, Identity(), to_coordinate_system=coordinate_system)
                continue
            t = get_transformation(el, to_coordinate_system=coordinate_system)
            set_transformation(el, Sequence([t, to_px]), to_coordinate_system=coordinate_system)
            if kind == "points" and pixel_points:
                moved = transform(el, to_coordinate_system=coordinate_system)
                set_transformation(moved, Identity(), to_coordinate_system=coordinate_system)
                sdata.points[name] = moved
    if pixel_obsm:
        m = np.asarray(to_px.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
        for table in sdata.tables.values():
            if "spatial" in table.obsm:
                xy = np.asarray(table.obsm["spatial"], dtype=float)[:, :2]
                table.obsm["spatial"] = xy @ m[:2, :2].T + m[:2, 2]
    return sdata
