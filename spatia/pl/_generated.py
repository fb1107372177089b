"""``sp.pl.generated``: generated crops beside real cells of the same group."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._constants import Defaults, Keys
from ._utils import finish, get_ax


def _mosaic_crops(sdata, key_added: str) -> tuple[np.ndarray, object]:
    table_key = f"{key_added}_table"
    if key_added not in sdata.images or table_key not in sdata.tables:
        raise KeyError(f"No generated images {key_added!r} (and table {table_key!r}): run `sp.tl.generate` first.")
    t = sdata.tables[table_key]
    img = np.asarray(sdata.images[key_added].values)
    lab = np.asarray(sdata.labels[f"{key_added}_labels"].values)
    ys, _ = np.nonzero(lab == 1)
    s = int(ys.max() - ys.min() + 1) if ys.size else 1
    step = s + 2  # sp.tl.generate writes its mosaic with add_crop_mosaic's default gap of 2 pixels
    crops = np.stack([img[:, r * step:r * step + s, c * step:c * step + s]
                      for r, c in zip(t.obs["grid_row"], t.obs["grid_col"], strict=True)]) if t.n_obs else \
        np.zeros((0, img.shape[0], s, s), dtype=img.dtype)
    return crops, t


def _real_crops(sdata, cells, size: int, crop_um, channels, image_key, table_key):
    """Crops of some of the table's cells (a SpatialData view holding only those rows)."""
    from spatialdata import SpatialData

    from ..pp import cell_geometry, extract_crops

    table = sdata.tables[table_key]
    sub = table[table.obs_names.isin(cells)].copy()
    region = sub.uns.get("spatialdata_attrs", {}).get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if image_key is None:  # the morphology image: not one of the crop mosaics (those have a linking table)
        cands = [k for k in sdata.images if f"{k}_table" not in sdata.tables]
        if not cands:
            raise ValueError("No morphology image to cut real crops from: pass image_key=, or real=False.")
        image_key = cands[0]
    view = SpatialData(
        images={image_key: sdata.images[image_key]},
        labels={k: v for k, v in sdata.labels.items() if k in regions},
        shapes={k: v for k, v in sdata.shapes.items() if k in regions},
        tables={table_key: sub},
    )
    # the units of the whole slide: a few scattered cells would give a wrong spacing estimate
    units = cell_geometry(sdata, table, shared_with=(sdata.images[image_key],)).units
    store = extract_crops(view, image_key=image_key, table_key=table_key, size=size, crop_um=crop_um,
                          channels=channels, um_per_unit=units.um_per_unit)
    return store.get(np.arange(sub.n_obs)), sub.obs


def generated(
    sdata,
    *,
    key_added: str = Keys.GENERATED,
    groupby: str = "cell_type",
    n_per_group: int = 6,
    real: bool = True,
    image_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    channel: int = 0,
    random_state: int = 0,
    cmap: str = "gray",
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Generated crops beside real cells of the same group (e.g. cell type), one row pair per group.

    Parameters
    ----------
    sdata
        SpatialData with the output of :func:`spatia.tl.generate` (``key_added``).
    key_added
        The generated image element.
    groupby
        Column of the generated table (copied from the source cells) to group by; the real cells are
        taken from the table's column of the same name.
    n_per_group
        Crops shown per group and kind.
    real
        Show real crops (cut from the morphology image with the decoder's window) above the generated ones.
    image_key, table_key
        Morphology image and table of the real cells.
    channel
        Channel shown (0 = the nuclear stain in our crops).
    random_state
        Which crops are drawn.
    cmap
        Colour map of the crops.
    title
        Axes title (default: what is compared, and by which column).
    ax
        Axes to draw into (the grid is drawn as one image).
    show, save
        ``True`` shows the figure and returns ``None``; file to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``).

    Examples
    --------
    >>> sp.tl.generate(sdata, model, cells=sdata["table"].obs_names[:60])
    >>> fig = sp.pl.generated(sdata, groupby="cell_type")
    """
    gen, t = _mosaic_crops(sdata, key_added)
    if groupby not in t.obs:
        raise KeyError(f"No column {groupby!r} in {key_added}_table: pass obs_keys=[{groupby!r}] to sp.tl.generate.")
    rng = np.random.default_rng(random_state)
    groups = [str(g) for g in t.obs[groupby].astype("category").cat.categories]
    s = gen.shape[-1]
    rows, names = [], []
    real_by = {}
    if real:
        table = sdata.tables[table_key]
        if groupby not in table.obs:
            raise KeyError(f"No column {groupby!r} in the table {table_key!r} to pick real cells from.")
        uns = t.uns.get(Keys.UNS, {}).get("generate", {})
        um = float(uns.get("pixel_size_um", 1.0)) * s
        picks = []
        for g in groups:
            cand = table.obs_names[(table.obs[groupby].astype(str) == g).to_numpy()]
            picks += list(rng.choice(cand, min(n_per_group, len(cand)), replace=False))
        chans = [str(c) for c in sdata.images[key_added].coords["c"].values]
        crops, obs = _real_crops(sdata, picks, s, um, chans, image_key, table_key)
        lab = obs[groupby].astype(str).to_numpy()
        real_by = {g: crops[lab == g] for g in groups}
    gl = t.obs[groupby].astype(str).to_numpy()
    blank = np.zeros((s, s))
    for g in groups:
        pairs = [("real", real_by.get(g))] if real else []
        sel = np.flatnonzero(gl == g)
        pairs.append(("generated", gen[rng.choice(sel, min(n_per_group, len(sel)), replace=False)]))
        for kind, cr in pairs:
            tiles = [cr[i, channel].astype(float) if cr is not None and i < len(cr) else blank for i in range(n_per_group)]
            rows.append(np.concatenate([np.pad(x, 1, constant_values=255) for x in tiles], axis=1))
            names.append(f"{g} · {kind}")
    grid = np.concatenate(rows, axis=0)
    fig, ax = get_ax(ax, figsize=(1.0 * n_per_group + 1.5, 0.9 * len(rows) + 0.5))
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * (s + 2) for i in range(len(rows))])
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title if title is not None else f"{key_added}: real vs generated by {groupby}", fontsize=9)
    return finish(fig, save, show)
