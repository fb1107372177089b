"""``sp.pl.embedding``: UMAP of a SPATIA embedding."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .._constants import Defaults, Keys
from .._utils import check_obs_column
from ..pp._elements import get_embedding, get_table
from ._utils import finish, get_ax


def embedding(data, *, level: str = "cell", color: str | None = None, table_key: str | None = Defaults.TABLE,
              random_state: int = 0, ax=None, save: str | Path | None = None):
    """UMAP of the cell / niche / tissue embedding, coloured by an ``obs`` column.

    Parameters
    ----------
    data
        AnnData or SpatialData with ``obsm['X_spatia_<level>']``.
    level
        ``"cell"``, ``"niche"`` or ``"tissue"``.
    color
        ``obs`` column (categorical or numeric).
    table_key
        The table.
    random_state
        UMAP seed.
    ax, save
        Axes to draw into; file to save to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`. The UMAP is computed on a copy: nothing is written.

    Examples
    --------
    >>> fig = sp.pl.embedding(sdata, level="niche", color="spatia_niche")
    """
    import scanpy as sc
    from anndata import AnnData

    table = get_table(data, table_key)
    emb = get_embedding(table, level)
    key = Keys.LEVEL_TO_EMB[level]
    if color is not None:
        check_obs_column(table, color, argument="color")
    tmp = AnnData(obs=pd.DataFrame(index=table.obs_names), obsm={"X": emb})
    sc.pp.neighbors(tmp, use_rep="X", random_state=random_state)
    sc.tl.umap(tmp, random_state=random_state)
    u = tmp.obsm["X_umap"]
    fig, ax = get_ax(ax, figsize=(5, 5))
    if color is None:
        ax.scatter(u[:, 0], u[:, 1], s=3, color="grey")
    else:
        col = table.obs[color]
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object:
            cats = col.astype("category")
            import matplotlib.pyplot as plt

            cmap = plt.get_cmap("tab20" if len(cats.cat.categories) > 10 else "tab10")
            for i, c in enumerate(cats.cat.categories):
                m = (cats == c).to_numpy()
                ax.scatter(u[m, 0], u[m, 1], s=3, color=cmap(i % cmap.N), label=str(c))
            ax.legend(markerscale=3, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        else:
            sca = ax.scatter(u[:, 0], u[:, 1], s=3, c=col.to_numpy(dtype=float), cmap="viridis")
            fig.colorbar(sca, ax=ax, label=color)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(f"{key}" + (f" — {color}" if color else ""))
    return finish(fig, save)
