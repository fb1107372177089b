"""``sp.tl.cluster``: Leiden on a SPATIA embedding (cell types at the cell level, niches at the niche level)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .._constants import Defaults, Keys
from .._results import written_by
from .._utils import log_added, seed_from
from ..pp._elements import get_embedding, get_table

logger = logging.getLogger(__name__)


def cluster(
    data,
    *,
    level: str = "niche",
    resolution: float = 0.5,
    n_neighbors: int = 15,
    smooth_k: int | None = None,
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
        ``"cell"``, ``"niche"`` or ``"tissue"``. At the tissue level the embedding is one vector per tissue
        tile, so the graph is built over the tiles (``n_neighbors`` nearest tiles) and every cell gets its
        tile's cluster: tissue regions made of whole tiles.
    resolution
        Leiden resolution (higher → more clusters).
    n_neighbors
        Neighbours of the kNN graph on the embedding (:func:`scanpy.pp.neighbors`).
    smooth_k
        Average the embedding of each cell with that of its ``smooth_k`` nearest cells in space
        (``obsm['spatial']``) before building the graph: the neighbourhood aggregation CellCharter applies to
        scVI latents, which turns per-cell profiles into profiles of the surroundings, so that clusters follow
        tissue domains. ``None``: the model's niche size (``niche.k`` of the fitted
        :class:`~spatia.SpatiaConfig`) at the niche level, no smoothing at the cell and tissue levels; ``0``: no
        smoothing.
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
    table = get_table(data, table_key)
    emb = get_embedding(table, level)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an integer >= 2 (neighbours of the kNN graph), got {n_neighbors!r}.")
    key_added = key_added or (Keys.NICHE if level == "niche" else Keys.CLUSTER)
    if smooth_k is None:
        smooth_k = _niche_k(table) if level == "niche" else 0
    if smooth_k < 0:
        raise ValueError(f"smooth_k must be >= 0, got {smooth_k}.")
    if smooth_k > 0:
        emb = spatial_smooth(emb, table, smooth_k, data=data)
    if level == "tissue":
        # one graph node per tile: the tissue embedding is shared by all the cells of a tile, and a kNN graph
        # over the cells would link each cell only to its own tile-mates (every tile a component, hence at
        # least one cluster per tile whatever the resolution)
        uniq, inverse = np.unique(np.asarray(emb, dtype=np.float32), axis=0, return_inverse=True)
        inverse = inverse.ravel()
    else:
        uniq, inverse = np.asarray(emb), np.arange(table.n_obs)
    seed = seed_from(random_state)
    if len(uniq) < 3:
        codes = inverse
    else:
        codes = leiden_codes(uniq, n_neighbors=n_neighbors, resolution=resolution, seed=seed)[inverse]
    labels = pd.Series(pd.Categorical(codes.astype(str), categories=[str(c) for c in np.unique(codes)]),
                       index=table.obs_names, name=key_added)
    if not inplace:
        return labels
    table.obs[key_added] = labels.values
    log_added("adata.obs", key_added)
    return None


def leiden_codes(x: np.ndarray, *, n_neighbors: int, resolution: float, seed: int) -> np.ndarray:
    """Leiden cluster (an integer) of each row of ``x``, on its kNN graph (:func:`scanpy.pp.neighbors`,
    ``n_neighbors`` at most ``len(x) - 1``; igraph Leiden, 2 iterations)."""
    import scanpy as sc
    from anndata import AnnData

    tmp = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]), obsm={"X": x})
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=min(n_neighbors, len(x) - 1), random_state=seed)
    sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return tmp.obs["leiden"].astype(int).to_numpy()


def _niche_k(table) -> int:
    """``niche.k`` of the fit that wrote the table's embeddings (the package default otherwise)."""
    cfg = written_by(table, f"obsm/{Keys.NICHE_EMB}").get("config", {})
    niche = cfg.get("niche", {}) if isinstance(cfg, dict) else {}
    return int(niche.get("k", Defaults.NICHE_K)) if isinstance(niche, dict) else Defaults.NICHE_K


def spatial_smooth(emb: np.ndarray, table, k: int, data=None) -> np.ndarray:
    """Mean of ``emb`` over each cell and its ``k`` nearest cells in space.

    Positions: ``obsm['spatial']``, or, when the table has none and ``data`` is the SpatialData, the cells'
    centroids from their segmentation / shapes (:func:`spatia.pp.cell_geometry`).
    """
    from sklearn.neighbors import NearestNeighbors

    if Keys.SPATIAL in table.obsm:
        xy = np.asarray(table.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    elif data is not None and data is not table:
        from ..pp import cell_geometry

        xy = cell_geometry(data, table).xy
    else:
        raise KeyError(f"No obsm[{Keys.SPATIAL!r}] (cell centroids) in the table: add it, or pass smooth_k=0.")
    k = min(int(k), table.n_obs - 1)
    if k < 1:
        return emb
    nb = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy, return_distance=False)
    return np.asarray(emb, dtype=np.float64)[nb].mean(1).astype(np.float32)
