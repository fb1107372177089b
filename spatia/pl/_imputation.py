"""``sp.pl.imputation``: measured vs imputed expression maps, side by side, with each gene's score."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._constants import Defaults, Keys
from ..pp._elements import get_table
from ._utils import finish


def imputation(
    sdata,
    color: list[str] | str,
    *,
    layer: str = Keys.IMPUTED,
    counts_layer: str | None = None,
    table_key: str | None = Defaults.TABLE,
    spatial_key: str = Keys.SPATIAL,
    size: float | None = None,
    cmap: str = "viridis",
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Measured (log-normalised) and imputed expression of each gene over the tissue, with their correlation.

    One row per gene: the measured counts per 10,000 (``log1p``), the imputed values of ``layer`` on the
    same scale, and the Pearson correlation between the two over cells in the title. Genes that were held
    out and scored by :func:`spatia.tl.validate_imputation` / ``impute(validate=True)`` also show that
    held-out score.

    Parameters
    ----------
    sdata
        SpatialData or AnnData whose table holds ``layers[layer]`` (from :func:`spatia.tl.impute` or
        :func:`spatia.tl.predict_expression` with ``layer="spatia_predicted"``).
    color
        Gene(s) to show (as scanpy's ``color=``: the values the cells are coloured by).
    layer
        Layer of imputed values (expected counts, or log-normalised values for ``"spatia_predicted"``).
    counts_layer
        Layer of the measured raw counts (``None``: ``X``).
    table_key
        The table.
    spatial_key
        ``obsm`` key of the cell centroids.
    size
        Marker size (default from the number of cells).
    cmap
        Colour map.
    title
        Figure title (above the panels).
    ax
        ``(len(color), 2)`` array of axes to draw into (measured, imputed per gene).
    show, save
        ``True`` shows the figure and returns ``None``; file to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``).

    Examples
    --------
    >>> sp.tl.impute(sdata, model, validate=True)
    >>> fig = sp.pl.imputation(sdata, ["Gene_003", "Gene_017"])
    """
    import matplotlib.pyplot as plt
    import scipy.sparse as sps

    table = get_table(sdata, table_key)
    genes = [color] if isinstance(color, str) else list(color)
    if layer not in table.layers:
        raise KeyError(f"No layers[{layer!r}] in the table: run `sp.tl.impute` first.")
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(f"Genes not in the table: {missing}.")
    if spatial_key not in table.obsm:
        raise KeyError(f"No obsm[{spatial_key!r}] with cell centroids in the table.")
    xy = np.asarray(table.obsm[spatial_key])[:, :2]
    x = table.X if counts_layer is None else table.layers[counts_layer]
    x = x.toarray() if sps.issparse(x) else np.asarray(x)
    lib = np.maximum(x.sum(1, keepdims=True), 1)
    idx = table.var_names.get_indexer(genes)
    measured = np.log1p(x[:, idx] / lib * 1e4)
    imp = np.asarray(table.layers[layer])[:, idx].astype(float)
    if layer != Keys.PREDICTED:  # expected counts → the same log-normalised scale
        imp = np.log1p(imp / lib * 1e4)
    held = table.uns.get(Keys.UNS, {}).get("impute", {}).get("validation", {})
    held_r = dict(zip(held.get("gene", []), held.get("pearson", []), strict=False))
    if ax is None:
        fig, axes = plt.subplots(len(genes), 2, figsize=(8, 3.6 * len(genes)), squeeze=False)
    else:
        axes = np.asarray(ax, dtype=object)
        if axes.size != 2 * len(genes):
            raise ValueError(f"ax must hold {2 * len(genes)} axes (measured and imputed for each of "
                             f"{len(genes)} genes), got {axes.size}.")
        axes = axes.reshape(len(genes), 2)
        fig = axes[0, 0].figure
    s = size if size is not None else max(1.0, 3000.0 / len(xy) ** 0.8)
    for i, g in enumerate(genes):
        ok = np.isfinite(imp[:, i])
        r = np.corrcoef(measured[ok, i], imp[ok, i])[0, 1] if ok.sum() > 2 and imp[ok, i].std() > 0 else np.nan
        vmax = np.percentile(np.concatenate([measured[:, i], imp[ok, i]]), 99) or 1.0
        for j, (vals, what) in enumerate(((measured[:, i], "measured"), (imp[:, i], layer))):
            panel = axes[i, j]
            sc = panel.scatter(xy[:, 0], xy[:, 1], c=vals, s=s, cmap=cmap, vmin=0, vmax=vmax, linewidths=0)
            panel.set_aspect("equal")
            panel.invert_yaxis()
            panel.set_xticks([])
            panel.set_yticks([])
            label = f"{g}: {what}"
            if j == 1:
                label += f"\nPearson vs measured {r:.2f}"
                if g in held_r:
                    label += f", held out {held_r[g]:.2f}"
            panel.set_title(label, fontsize=9)
        fig.colorbar(sc, ax=axes[i, :].tolist(), shrink=0.8, label="log1p(counts per 10k)")
    if title is not None:
        fig.suptitle(title)
    return finish(fig, save, show)
