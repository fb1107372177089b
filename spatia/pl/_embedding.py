"""``sp.pl.embedding``: UMAP of a SPATIA embedding, drawn by :func:`scanpy.pl.embedding`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import Defaults, Keys
from .._logging import quiet_dependencies
from .._results import written_by
from .._utils import check_obs_column, scanpy_neighbors
from ..pp._elements import get_embedding, get_table
from ._utils import finish, get_ax

logger = logging.getLogger(__name__)


def umap_key(level: str) -> str:
    """``obsm`` key of the stored UMAP of a level's embedding: ``"X_umap_spatia_<level>"``."""
    return f"X_umap_spatia_{level}"


def _umap(table, level: str, random_state: int) -> str:
    """The UMAP of ``obsm['X_spatia_<level>']``: reused when stored for the same run and seed, else computed and
    stored (``obsm['X_umap_spatia_<level>']``, with its source in ``uns['spatia']['umap'][level]``)."""
    import scanpy as sc
    from anndata import AnnData

    key, emb_key = umap_key(level), Keys.LEVEL_TO_EMB[level]
    source = {"embedding": emb_key, "run": int(written_by(table, f"obsm/{emb_key}").get("run", -1)),
              "random_state": int(random_state), "n_obs": int(table.n_obs)}
    stored = table.uns.get(Keys.UNS, {}).get("umap", {}).get(level)
    if key in table.obsm and isinstance(stored, dict) and {k: stored.get(k) for k in source} == source:
        return key
    tmp = AnnData(obs=pd.DataFrame(index=table.obs_names), obsm={"X": np.asarray(get_embedding(table, level))})
    scanpy_neighbors(tmp, use_rep="X", random_state=random_state)
    sc.tl.umap(tmp, random_state=random_state)
    table.obsm[key] = tmp.obsm["X_umap"]
    table.uns.setdefault(Keys.UNS, {}).setdefault("umap", {})[level] = source
    logger.info("Adding `adata.obsm[%r]` (UMAP of %s, reused by later plots)", key, emb_key)
    return key


def embedding(data, *, level: str = "cell", color: str | None = None, table_key: str | None = Defaults.TABLE,
              palette=None, title: str | None = None, size: float | None = None, random_state: int = 0, ax=None,
              show: bool | None = None, save: str | Path | None = None):
    """UMAP of the cell / niche / tissue embedding, coloured by an ``obs`` column.

    The UMAP is computed on the first call and stored in ``obsm['X_umap_spatia_<level>']`` (its source run and
    seed in ``uns['spatia']['umap']``), so later plots reuse it; it is recomputed when the embedding was
    rewritten since. Drawing is :func:`scanpy.pl.embedding`'s: categorical colours come from (and are stored
    in) ``uns['<color>_colors']``, as in scanpy.

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
    palette, title, size
        As in :func:`scanpy.pl.embedding`.
    random_state
        UMAP seed.
    ax, show, save
        Axes to draw into; ``True`` shows the figure and returns ``None``; file to save to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``). Writes ``obsm['X_umap_spatia_<level>']`` and
    ``uns['spatia']['umap'][level]`` the first time.

    Examples
    --------
    >>> fig = sp.pl.embedding(sdata, level="niche", color="spatia_niche")
    """
    import scanpy as sc

    table = get_table(data, table_key)
    get_embedding(table, level)
    if color is not None:
        check_obs_column(table, color, argument="color")
    basis = _umap(table, level, random_state)
    fig, ax = get_ax(ax, figsize=(5, 5))
    with quiet_dependencies():
        sc.pl.embedding(table, basis=basis, color=color, palette=palette, size=size, ax=ax, show=False,
                        title=title if title is not None else f"{Keys.LEVEL_TO_EMB[level]}" + (f" — {color}" if color else ""))
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    return finish(fig, save, show)
