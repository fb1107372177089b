"""Where each cell's crop lies in an image's pixels: the cells' centres mapped into the image, the side of
each crop (fixed in µm or from the cell's extent) and the image plane and channels to crop from."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._elements import CellGeometry, affine_to, apply_affine, cell_geometry

logger = logging.getLogger(__name__)


def _geometry_for(data, table, geometry: CellGeometry | None, image_keys: list[str], *, labels_key, shapes_key,
                  coordinate_system, um_per_unit) -> CellGeometry:
    """``geometry`` when given (it must hold ``table``'s cells), else the cells' geometry from
    :func:`~spatia.pp.cell_geometry` in a coordinate system that the images ``image_keys`` share."""
    if geometry is None:
        return cell_geometry(
            data, table, labels_key=labels_key, shapes_key=shapes_key, coordinate_system=coordinate_system,
            shared_with=tuple(data.images[k] for k in image_keys), um_per_unit=um_per_unit,
        )  # fmt: skip
    if len(geometry.xy) != table.n_obs:
        raise ValueError(f"geometry has {len(geometry.xy)} cells but the table has {table.n_obs}.")
    return geometry


class _Window(NamedTuple):
    """Where one image's crops lie.

    Attributes
    ----------
    arr
        ``(C, H, W)`` pixels to crop from: the chosen z-plane and channels.
    channels
        Channel names, in the order of ``arr``.
    z
        The z-plane of a 3-D image, else ``None``.
    m_img
        ``3 × 3`` affine map from pixel (x, y) to the coordinate system.
    px_size_um
        Pixel size in µm (square root of the pixel area).
    pix
        ``(n, 2)`` crop centres, pixel (x, y), continuous (pixel ``k`` covers ``[k, k + 1)``).
    step
        ``(n,)`` image pixels per crop pixel.
    margin
        How far (pixels) the filter taps of the largest crop reach from its centre.
    inside
        ``(n,)`` whether the cell's centre lies in the image.
    """

    arr: Any
    channels: list[str]
    z: int | None
    m_img: np.ndarray
    px_size_um: float
    pix: np.ndarray
    step: np.ndarray
    margin: int
    inside: np.ndarray


def _cell_window(data, image_key: str, img, geo: CellGeometry, *, channels, z, size: int, crop_um, extent_factor,
                 min_um, max_um, outside) -> _Window:
    """The pixels of image ``image_key`` (``img``) to crop from and where each cell's crop lies in them.

    Centres come from ``geo`` mapped into the image's pixels; crop sides from :func:`_crop_side_px`. Cells
    whose centre lies outside the image raise (``outside="error"``) or are logged (``"pad"``).
    """
    m_img = affine_to(data.images[image_key], geo.coordinate_system)  # pixel (x, y) -> cs
    px_size_um = float(np.sqrt(abs(np.linalg.det(m_img[:2, :2])))) * geo.units.um_per_unit
    pix = apply_affine(np.linalg.inv(m_img), geo.xy)  # (x, y) in pixel units, continuous
    arr, ch_names, z = _image_plane(img, image_key, channels, z)
    h, w = arr.shape[-2:]
    side_px = _crop_side_px(geo, px_size_um, crop_um=crop_um, extent_factor=extent_factor, min_um=min_um,
                            max_um=max_um)
    step = side_px / size
    margin = int(np.ceil(side_px.max() / 2 + max(1.0, step.max()))) + 2

    inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
    n_out = int((~inside).sum())
    if n_out and outside == "error":
        raise ValueError(
            f"{n_out} of {len(pix)} cells lie outside image {image_key!r} ({w}×{h} px) in coordinate system "
            f"{geo.coordinate_system!r}. Check that image and cells are registered to the same coordinate system, "
            "or pass outside='pad' to give them blank crops."
        )
    if n_out:
        logger.warning("%d of %d cells lie outside the image(s): they get blank crops (outside='pad').", n_out,
                       len(geo.xy))
    return _Window(arr, ch_names, z, m_img, px_size_um, pix, step, margin, inside)


def _image_plane(img, image_key: str, channels, z) -> tuple[Any, list[str], int | None]:
    """``(pixels (C, H, W), channel names, z)``: the ``channels`` (default all) of ``img``, and of a 3-D
    ``(c, z, y, x)`` image its plane ``z`` (default the middle one, with a warning)."""
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
    return arr, ch_names, z


def _crop_side_px(geo: CellGeometry, px_size_um: float, *, crop_um, extent_factor, min_um, max_um) -> np.ndarray:
    """``(n,)`` crop side of each cell in image pixels (at least 2): ``crop_um`` for every cell, else
    ``extent_factor ×`` the cell's diameter clipped to ``[min_um, max_um]`` (``max(min_um, 16)`` µm for cells
    without extent)."""
    if crop_um is not None:
        if crop_um <= 0:
            raise ValueError(f"crop_um must be positive, got {crop_um}.")
        side_um = np.full(len(geo.xy), float(crop_um))
    else:
        d = np.where(np.isfinite(geo.diameter), geo.diameter_um * extent_factor, max(min_um, 16.0))
        side_um = np.clip(d, min_um, max_um)
    return np.maximum(side_um / px_size_um, 2.0)


def _neighbour_labels(data, table, labels_key: str | None, cs: str, win: _Window) -> tuple[Any, np.ndarray]:
    """``(labels (1, H, W), label id of each cell)`` for ``mask_neighbours``: the segmentation ``labels_key``
    (its full resolution), which must lie on the pixel grid of the image in ``win``."""
    if labels_key is None:
        raise ValueError("mask_neighbours=True needs labels_key= (the segmentation).")
    m_lab = affine_to(data.labels[labels_key], cs)
    lab = data.labels[labels_key]
    from xarray import DataTree

    if isinstance(lab, DataTree):
        lab = next(iter(lab["scale0"].values()))
    if lab.shape[-2:] != win.arr.shape[-2:] or not np.allclose(m_lab, win.m_img):
        raise ValueError("mask_neighbours=True needs labels on the same pixel grid as the image.")
    from ._elements import table_annotation

    _, _, instance_key = table_annotation(table)
    own_ids = table.obs[instance_key].to_numpy().astype(np.int64)
    return lab.data[None], own_ids


def _channel_index(img, channels: Sequence[str | int] | None) -> tuple[np.ndarray, list[str]]:
    """``(indices, names)`` of ``channels`` (names, case-insensitive when unambiguous, or indices; default
    all) among the channels of ``img``."""
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
