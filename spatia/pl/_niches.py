"""``sp.pl.niches``: niche clusters over the morphology image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._constants import Defaults, Keys
from .._utils import check_obs_column
from ..pp._elements import affine_to, apply_affine, cell_geometry, get_image, get_table
from ._utils import finish, get_ax


def niches(
    sdata,
    *,
    key: str = Keys.NICHE,
    image_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    channel: str | int | None = 0,
    coordinate_system: str | None = None,
    zoom: tuple[float, float, float, float] | None = None,
    size: float | None = None,
    alpha: float = 0.6,
    max_pixels: int = 2_000_000,
    ax=None,
    save: str | Path | None = None,
):
    """Cells coloured by niche cluster, drawn over one channel of the morphology image.

    Parameters
    ----------
    sdata
        SpatialData with ``obs[key]`` in its table (from :func:`spatia.tl.cluster`).
    key
        ``obs`` column to colour by (default ``"spatia_niche"``).
    image_key
        Background image (the only one when ``None``); ``False`` for no image.
    table_key
        The table.
    channel
        Channel of the image shown in grey.
    coordinate_system
        Coordinate system of the plot (default: shared by image and cells).
    zoom
        ``(xmin, xmax, ymin, ymax)`` window in coordinate-system units (µm).
    size
        Marker size in points²: draws every cell as a dot of that size. By default each cell is drawn as a
        circle of its own diameter (from its segmentation or shape), or as a dot sized from the number of
        cells when diameters are unknown.
    alpha
        Marker opacity.
    max_pixels
        The image is read at a stride so that at most this many pixels are drawn.
    ax
        Axes to draw into.
    save
        File to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.

    Examples
    --------
    >>> sp.tl.cluster(sdata, level="niche")
    >>> fig = sp.pl.niches(sdata, zoom=(100, 400, 100, 400))
    """
    table = get_table(sdata, table_key)
    check_obs_column(table, key, argument="key", hint="For niches, run `sp.tl.cluster(sdata, level='niche')` first.")
    geo = cell_geometry(sdata, table, coordinate_system=coordinate_system)
    xy = geo.xy
    fig, ax = get_ax(ax, figsize=(6, 6))
    if image_key is not False and len(sdata.images):
        ikey, img = get_image(sdata, image_key)
        m = affine_to(sdata.images[ikey], geo.coordinate_system)
        h, w = img.shape[-2:]
        inv = np.linalg.inv(m)
        if zoom is not None:
            corners = apply_affine(inv, np.array([[zoom[0], zoom[2]], [zoom[1], zoom[3]]]))
            c0, r0 = np.floor(corners.min(0)).astype(int)
            c1, r1 = np.ceil(corners.max(0)).astype(int)
            c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, w), min(r1, h)
        else:
            c0, r0, c1, r1 = 0, 0, w, h
        step = max(1, int(np.ceil(np.sqrt((r1 - r0) * (c1 - c0) / max_pixels))))
        names = [str(c) for c in img.coords["c"].values] if "c" in img.coords else []
        ch = _channel_position(channel, names, ikey)
        arr = np.asarray(img.data[ch, r0:r1:step, c0:c1:step]).astype(float)
        lo, hi = np.percentile(arr, [1, 99.5]) if arr.size else (0, 1)
        # pixel edges → coordinate system (axis-aligned transformations; rotations are drawn unrotated)
        (x0, y0), (x1, y1) = apply_affine(m, np.array([[c0, r0], [c0 + arr.shape[1] * step, r0 + arr.shape[0] * step]]))
        ax.imshow(np.clip((arr - lo) / max(hi - lo, 1e-9), 0, 1), cmap="gray", extent=(x0, x1, y1, y0),
                  interpolation="nearest")
    cats = table.obs[key].astype("category")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20" if len(cats.cat.categories) > 10 else "tab10")
    sel = np.ones(len(xy), dtype=bool)
    if zoom is not None:
        sel = (xy[:, 0] >= zoom[0]) & (xy[:, 0] <= zoom[1]) & (xy[:, 1] >= zoom[2]) & (xy[:, 1] <= zoom[3])
    colors = [cmap(i % cmap.N) for i in range(len(cats.cat.categories))]
    diam = np.asarray(geo.diameter, dtype=float)
    circles = size is None and np.isfinite(diam).all() and len(diam) > 0
    s = size if size is not None else max(2.0, 4000.0 / max(1, sel.sum()) ** 0.8)
    for i, c in enumerate(cats.cat.categories):
        mask = sel & (cats == c).to_numpy()
        if circles:  # each cell at its own size, in data units (stays right when zooming)
            from matplotlib.collections import EllipseCollection

            ax.add_collection(EllipseCollection(
                diam[mask], diam[mask], np.zeros(mask.sum()), units="xy", offsets=xy[mask],
                offset_transform=ax.transData, facecolors=[colors[i]], alpha=alpha, linewidths=0, label=str(c)))
        else:
            ax.scatter(xy[mask, 0], xy[mask, 1], s=s, color=colors[i], alpha=alpha, label=str(c), linewidths=0)
    if zoom is None and not len(ax.images):
        pad = np.nanmax(diam) if circles else 0.0
        ax.set_xlim(xy[sel, 0].min() - pad, xy[sel, 0].max() + pad)
        ax.set_ylim(xy[sel, 1].min() - pad, xy[sel, 1].max() + pad)
    if zoom is not None:
        ax.set_xlim(zoom[0], zoom[1])
        ax.set_ylim(zoom[3], zoom[2])
    elif image_key is False or not len(sdata.images):
        ax.invert_yaxis()
    ax.set_aspect("equal")
    u = geo.units.um_per_unit
    ax.set_xlabel(f"x ({geo.coordinate_system}{', µm' if u == 1.0 else f', 1 unit = {u:.4g} µm'})")
    ax.set_ylabel("y")
    ax.set_title(key)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=colors[i], alpha=alpha, label=str(c))
               for i, c in enumerate(cats.cat.categories)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return finish(fig, save)


def _channel_position(channel, names: list[str], image_key: str) -> int:
    """Index of ``channel`` (a name, matched case-insensitively, or a position) in the image's channels."""
    if channel is None:
        return 0
    if isinstance(channel, str):
        lower = [n.lower() for n in names]
        if channel.lower() in lower:
            return lower.index(channel.lower())
        raise KeyError(f"Image {image_key!r} has no channel {channel!r}; its channels are {names}.")
    if isinstance(channel, bool) or not isinstance(channel, int | np.integer) or not 0 <= channel < max(1, len(names)):
        raise ValueError(f"channel must be a channel name or a position 0..{max(1, len(names)) - 1}, got {channel!r}.")
    return int(channel)
