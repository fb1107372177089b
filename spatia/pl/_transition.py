"""``sp.pl.transition``: source crop → predicted target-state crop → real target crop, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._constants import Defaults, Keys
from ..pp._elements import get_table

_COLUMNS = ("source", "predicted", "real target")


def _predicted(sdata, key: str, table) -> np.ndarray:
    """Predicted crops ``(N, C, S, S)`` uint8 cut back out of the mosaic image."""
    params = table.uns[Keys.UNS]["transition"]
    s = int(params["crop_size"])
    gap = int(params.get("gap", 2))
    img = np.asarray(sdata.images[key].data)
    out = np.empty((table.n_obs, img.shape[0], s, s), dtype=img.dtype)
    for i, (r, c) in enumerate(zip(table.obs["grid_row"], table.obs["grid_col"], strict=True)):
        out[i] = img[:, r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s]
    return out


def transition(
    sdata,
    *,
    key: str = Keys.TRANSITION,
    target: str = "nearest",
    n: int = 6,
    channel: int = 0,
    crops=None,
    table_key: str | None = Defaults.TABLE,
    random_state: int = 0,
    cmap: str = "magma",
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Rows of source crop → predicted target-state crop → a real target-state crop.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` after :func:`spatia.tl.transition`.
    key
        ``key_added`` of :func:`spatia.tl.transition`.
    target
        Real target shown: ``"nearest"`` (the real target cell nearest to the prediction in morphology
        features) or ``"matched"`` (the source cell's optimal-transport match).
    n
        Number of rows (predictions drawn at random, among the crops the flow transformed when there are
        any: the others are their source crop, see ``gate`` in :func:`spatia.tl.transition`).
    channel
        Crop channel shown (0: nuclear stain).
    crops
        :class:`~spatia.pp.CropStore` of the table's cells; by default cut again from the image with the
        parameters the transition used.
    table_key
        Table of the source and target cells.
    random_state
        Seed of the rows drawn.
    cmap
        Colour map of the crops.
    title
        Axes title (default: the transition, e.g. ``"control → disease"``).
    ax, show, save
        Axes to draw into; ``True`` shows the figure and returns ``None``; file to save to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``); nothing is written.

    Examples
    --------
    >>> sp.tl.transition(sdata, model, groupby="condition", source="control", target="disease")
    >>> fig = sp.pl.transition(sdata, n=8)
    """
    from ..pp._crops import crops_for, extract_crops
    from ._utils import finish, get_ax

    tkey = f"{key}_table"
    if key not in sdata.images or tkey not in sdata.tables:
        raise KeyError(f"No transition {key!r} in the SpatialData (image {key!r} and table {tkey!r}): "
                       "run `sp.tl.transition` first.")
    if target not in ("nearest", "matched"):
        raise ValueError(f"target must be 'nearest' or 'matched', got {target!r}.")
    ttab = sdata.tables[tkey]
    table = get_table(sdata, table_key)
    pred = _predicted(sdata, key, ttab)
    if crops is None:
        cp = dict(ttab.uns[Keys.UNS]["transition"].get("crop_params", {}))
        kw = {k: cp[k] for k in ("size", "crop_um", "extent_factor", "min_um", "max_um") if k in cp}
        chans = list(ttab.uns[Keys.UNS]["transition"].get("channels", []))
        crops = extract_crops(sdata, table_key=table_key, image_key=cp.get("image_key"),
                              channels=chans or None, **kw)
    else:
        crops = crops_for(sdata, crops, table_key=table_key)
    rng = np.random.default_rng(random_state)
    pool = np.arange(ttab.n_obs)
    if "transformed" in ttab.obs and ttab.obs["transformed"].astype(bool).any():
        pool = np.flatnonzero(ttab.obs["transformed"].astype(bool).to_numpy())
    pick = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
    names = table.obs_names
    src = crops.get(names.get_indexer(ttab.obs["source_cell"].astype(str).to_numpy()[pick]))
    col = "nearest_target" if target == "nearest" else "matched_target"
    tgt = crops.get(names.get_indexer(ttab.obs[col].astype(str).to_numpy()[pick]))
    s, gap = pred.shape[-1], 2
    h, w = len(pick) * (s + gap) - gap, 3 * (s + gap) - gap
    canvas = np.full((h, w), np.nan)
    for i, k in enumerate(pick):
        for j, img in enumerate((src[i], pred[k], tgt[i])):
            canvas[i * (s + gap):i * (s + gap) + s, j * (s + gap):j * (s + gap) + s] = img[channel] / 255.0
    fig, ax = get_ax(ax, figsize=(3.2, 1.1 * len(pick) + 0.4))
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (s + gap) + s / 2 for j in range(3)])
    ax.set_xticklabels([*_COLUMNS[:2], f"{target} real target"], fontsize=8)
    ax.set_yticks([i * (s + gap) + s / 2 for i in range(len(pick))])
    ax.set_yticklabels(ttab.obs["source_cell"].astype(str).to_numpy()[pick], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title if title is not None else str(ttab.obs["transition"].iloc[0]), fontsize=9)
    return finish(fig, save, show)
