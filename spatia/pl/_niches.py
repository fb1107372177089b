"""``sp.pl.niches``: cells coloured by an ``obs`` column over the morphology image, drawn by spatialdata-plot."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import Defaults, Keys
from .._logging import quiet_dependencies
from .._utils import check_obs_column
from ..pp._elements import coordinate_systems, get_table, table_annotation
from ..pp._units import _element_candidates, stored_um_per_unit
from ._utils import categorical_colors, finish, get_ax

logger = logging.getLogger(__name__)


def niches(
    sdata,
    *,
    color: str = Keys.NICHE,
    image_key: str | bool | None = None,
    channel: str | int | None = 0,
    cells_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    coordinate_system: str | None = None,
    zoom: tuple[float, float, float, float] | None = None,
    groups: str | list[str] | None = None,
    palette=None,
    alpha: float = 0.6,
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Cells coloured by niche (or any ``obs`` column), over one channel of the morphology image.

    Drawing is spatialdata-plot's (``render_images`` → ``render_labels`` / ``render_shapes`` → ``show``):
    it reads the image level that suits the figure size from a multiscale image, applies each element's
    transformation (a rotated or scaled image is drawn where it lies in the coordinate system) and colours
    cells by their segmentation (labels) or their shapes (circles, polygons), whichever the table annotates.
    Categorical colours are those of ``uns['<color>_colors']``; they are written on first use, as scanpy does.

    Parameters
    ----------
    sdata
        SpatialData whose table holds ``obs[color]`` (for niches: :func:`spatia.tl.cluster` with
        ``level="niche"``).
    color
        ``obs`` column to colour by (categorical or numeric).
    image_key
        Background image, or a list of images (e.g. one per field of view). ``None``: the input image (Xenium:
        ``morphology_focus``), or all input images when there are several; ``False``: none.
    channel
        Channel shown in grey: a name (case-insensitive) or a position.
    cells_key
        Labels or shapes element to draw the cells as; ``None``: the element(s) the table annotates.
    table_key
        The table.
    coordinate_system
        Coordinate system to draw in; ``None``: the one the image and the cells share (``"global"`` first).
    zoom
        ``(xmin, xmax, ymin, ymax)`` window in coordinate-system units; only what lies in it is read.
    groups
        Categories of ``color`` to show (others are not drawn).
    palette
        Colours for the categories (a list, a dict category → colour, or a matplotlib colormap name); stored in
        ``uns['<color>_colors']``.
    alpha
        Opacity of the cells' fill.
    title
        Figure title (default: ``color``).
    ax, show, save
        Axes to draw into; ``True`` shows the figure and returns ``None``; file to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``).

    Examples
    --------
    >>> sp.tl.cluster(sdata, level="niche")
    >>> fig = sp.pl.niches(sdata, zoom=(100, 400, 100, 400), channel="DAPI")
    """
    import spatialdata_plot  # noqa: F401  (registers the ``.pl`` accessor)

    table = get_table(sdata, table_key)
    table_key = _table_name(sdata, table)
    check_obs_column(table, color, argument="color",
                     hint="For niches, run `sp.tl.cluster(sdata, level='niche')` first.")
    cells = _cell_elements(sdata, table, cells_key)
    ikeys = _image_keys(sdata, image_key)
    cs = _coordinate_system(sdata, [*cells, *ikeys], coordinate_system)
    if not np.issubdtype(np.asarray(table.obs[color]).dtype, np.number):
        categorical_colors(table, color, palette)
    with quiet_dependencies():
        fig, ax, u = _draw(sdata, table, table_key, color, cells, ikeys, cs, channel, zoom, groups, alpha, title,
                           ax)
    if zoom is not None:
        ax.set_xlim(zoom[0], zoom[1])
        ax.set_ylim(zoom[3], zoom[2])
    ax.set_xlabel(f"x ({cs}{'' if u is None else ', µm' if u == 1.0 else f', 1 unit = {u:.4g} µm'})")
    ax.set_ylabel("y")
    return finish(fig, save, show)


def _draw(sdata, table, table_key, color, cells, ikeys, cs, channel, zoom, groups, alpha, title, ax):
    """The spatialdata-plot chain: images, then the cells' labels/shapes coloured by ``obs[color]``."""
    sd = sdata.subset([*cells, *ikeys, table_key], filter_tables=True)
    if zoom is not None:
        sd = _zoomed(sd, zoom, cs)
    sd.tables[table_key] = _light_table(sd.tables[table_key], table, color)
    fig, ax = get_ax(ax, figsize=(6, 6))
    plot = sd
    for ikey in (k for k in ikeys if k in sd.images):
        values = _channel_values(sd.images[ikey])
        ch = values[_channel_position(channel, [str(v) for v in values], ikey)] if values else None
        plot = plot.pl.render_images(ikey, channel=ch, cmap="gray", colorbar=False)  # as scanpy and squidpy: no bar
    for el in cells:
        if el not in sd.labels and el not in sd.shapes:
            continue
        kw = {"color": color, "table_name": table_key, "groups": groups, "fill_alpha": alpha}
        if el in sd.labels:
            plot = plot.pl.render_labels(el, **kw)
        else:
            plot = plot.pl.render_shapes(el, outline_alpha=0.0, **kw)
    u = _known_units(sdata, table, cs)
    scalebar = {"scalebar_dx": u, "scalebar_units": "um"} if u else {}
    plot.pl.show(coordinate_systems=cs, ax=ax, title=title if title is not None else color, **scalebar)
    if len(cells) > 1:  # one legend entry per category, not one per element (e.g. per field of view)
        _dedupe_legend(ax)
    return fig, ax, u


def _dedupe_legend(ax) -> None:
    legend = ax.get_legend()
    if legend is None:
        return
    seen: dict[str, object] = {}
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=False):
        seen.setdefault(text.get_text(), handle)
    if len(seen) < len(legend.get_texts()):
        ax.legend(list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(1, 0.5),
                  frameon=legend.get_frame_on(), fontsize=legend.get_texts()[0].get_fontsize())


def _light_table(drawn, table, color: str):
    """What spatialdata-plot needs of the table: ``obs[color]`` and the region/instance columns of the cells
    drawn, with the colours of the categories present (it pairs colours with the categories it sees)."""
    from anndata import AnnData

    attrs = dict(drawn.uns["spatialdata_attrs"])
    cols = list(dict.fromkeys([color, attrs["region_key"], attrs["instance_key"]]))
    obs = drawn.obs[cols].copy()
    uns = {"spatialdata_attrs": attrs}
    if isinstance(obs[color].dtype, pd.CategoricalDtype):
        full = [str(c) for c in table.obs[color].cat.categories]
        colors = dict(zip(full, table.uns[f"{color}_colors"], strict=False))
        obs[color] = obs[color].cat.remove_unused_categories()
        uns[f"{color}_colors"] = [colors[str(c)] for c in obs[color].cat.categories]
    return AnnData(obs=obs, uns=uns)


def _table_name(sdata, table) -> str:
    for name, t in sdata.tables.items():
        if t is table:
            return name
    raise ValueError("sp.pl.niches draws a table of the SpatialData; pass the SpatialData that holds it.")


def _cell_elements(sdata, table, cells_key: str | None) -> list[str]:
    """Labels/shapes elements to draw: ``cells_key``, or those the table annotates that the SpatialData holds."""
    drawable = {**{k: "labels" for k in sdata.labels}, **{k: "shapes" for k in sdata.shapes}}
    regions, _, _ = table_annotation(table)
    if cells_key is not None:
        if cells_key not in drawable:
            raise KeyError(f"No labels or shapes element {cells_key!r}; available: {sorted(drawable)}.")
        if cells_key not in regions:
            raise ValueError(f"The table annotates {regions}, not {cells_key!r}: its values cannot colour that "
                             "element. Pass one of those, or leave cells_key=None.")
        return [cells_key]
    found = [r for r in regions if r in drawable]
    if not found:
        raise ValueError(
            f"The table annotates {regions or 'no element'}, and the SpatialData holds none of them as labels or "
            f"shapes (it has: {sorted(drawable)}): sp.pl.niches needs the cells' segmentation or shapes. Register "
            "the table to them with `spatialdata.models.TableModel.parse(table, region=..., region_key=..., "
            "instance_key=...)`."
        )
    return found


def _image_keys(sdata, image_key) -> list[str]:
    """Images drawn under the cells: the one given (or a list, e.g. one per field of view), the input image, or
    every input image when there are several (CosMx fields of view); none for ``False``."""
    from ..pp._elements import get_image, input_images

    if image_key is False or not len(sdata.images):
        return []
    if image_key is None:
        inputs = input_images(sdata)
        if len(inputs) > 1 and "morphology_focus" not in inputs:
            return inputs
    keys = [image_key] if image_key is None or isinstance(image_key, str) else list(image_key)
    return [get_image(sdata, k)[0] for k in keys]


def _coordinate_system(sdata, elements: list[str], coordinate_system: str | None) -> str:
    shared = None
    for name in elements:
        cs = set(coordinate_systems(sdata[name]))
        shared = cs if shared is None else shared & cs
    shared = shared or set()
    if coordinate_system is not None:
        if coordinate_system not in shared:
            raise ValueError(f"The image and cells are not all registered to coordinate system "
                             f"{coordinate_system!r}; shared ones: {sorted(shared)}.")
        return coordinate_system
    if not shared:
        raise ValueError(
            f"The elements {elements} share no coordinate system: register them to a common one with "
            "`spatialdata.transformations.set_transformation`, or pass image_key=False."
        )
    return Defaults.COORDINATE_SYSTEM if Defaults.COORDINATE_SYSTEM in shared else sorted(shared)[0]


def _zoomed(sd, zoom, cs: str):
    x0, x1, y0, y1 = (float(v) for v in zoom)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"zoom must be (xmin, xmax, ymin, ymax) with xmin < xmax and ymin < ymax, got {zoom}.")
    out = sd.query.bounding_box(axes=("x", "y"), min_coordinate=[x0, y0], max_coordinate=[x1, y1],
                                target_coordinate_system=cs, filter_table=True)
    if out is None or (not len(out.labels) and not len(out.shapes)):
        raise ValueError(f"No cells lie in zoom={zoom} (coordinate system {cs!r}).")
    return out


def _known_units(sdata, table, cs: str) -> float | None:
    """µm per unit of ``cs`` when the data say it (stored, recorded by ``fit``, or a µm-valued element)."""
    stored = stored_um_per_unit(sdata, cs)
    if stored is not None:
        return stored
    rec = table.uns.get(Keys.UNS, {}).get("fit", {}).get("units", {})
    if isinstance(rec, dict) and rec.get("coordinate_system") == cs and rec.get("um_per_unit"):
        return float(rec["um_per_unit"])
    values = {round(v, 9) for _, v in _element_candidates(sdata, cs)}
    return values.pop() if len(values) == 1 else None


def _channel_values(img) -> list:
    """The image's channel coordinate values (names or numbers), as spatialdata-plot takes them."""
    from xarray import DataTree

    if isinstance(img, DataTree):
        img = next(iter(img[sorted(img.children)[0]].values()))
    return [c.item() if hasattr(c, "item") else c for c in img.coords["c"].values] if "c" in img.coords else []


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
