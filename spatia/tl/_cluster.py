"""``sp.tl.cluster``: Leiden on a SPATIA embedding (cell types at the cell level, niches at the niche level)."""

from __future__ import annotations

import logging

import pandas as pd

from .._constants import Defaults, Keys
from .._utils import log_added, seed_from
from ..pp._elements import get_embedding, get_table

logger = logging.getLogger(__name__)


def cluster(
    data,
    *,
    level: str = "niche",
    resolution: float = 0.5,
    n_neighbors: int = 15,
    table_key: str | None = Defaults.TABLE,
    key_added: str | None = None,
    random_state: int | None = 0,
    inplace: bool = True,
):
    """Leiden clusters of the cell, niche or tissue embedding.

    Parameters
    ----------
    data
        AnnData or SpatialData holding ``obsm['X_spatia_<level>']`` (from :func:`spatia.tl.fit`).
    level
        ``"cell"``, ``"niche"`` or ``"tissue"``.
    resolution
        Leiden resolution (higher → more clusters).
    n_neighbors
        Neighbours of the kNN graph on the embedding (:func:`scanpy.pp.neighbors`).
    table_key
        Table when ``data`` is a SpatialData.
    key_added
        ``obs`` column; default ``"spatia_niche"`` for the niche level, else ``"spatia_cluster"``.
    random_state
        Seed of the graph and of Leiden.
    inplace
        Write into ``obs`` (return ``None``) or return the labels.

    Returns
    -------
    ``None``, writing ``obs[key_added]`` (categorical); or, with ``inplace=False``, a categorical Series.

    Examples
    --------
    >>> sp.tl.cluster(sdata, level="niche", resolution=0.5)
    >>> sdata["table"].obs["spatia_niche"].value_counts()
    """
    import scanpy as sc
    from anndata import AnnData

    table = get_table(data, table_key)
    emb = get_embedding(table, level)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    key_added = key_added or (Keys.NICHE if level == "niche" else Keys.CLUSTER)
    tmp = AnnData(obs=pd.DataFrame(index=table.obs_names), obsm={"X": emb})
    seed = seed_from(random_state)
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=min(n_neighbors, max(2, table.n_obs - 1)), random_state=seed)
    sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    labels = tmp.obs["leiden"].astype("category")
    if not inplace:
        return labels
    table.obs[key_added] = labels.values
    log_added("adata.obs", key_added)
    return None
