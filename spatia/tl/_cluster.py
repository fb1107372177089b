"""``sp.tl.cluster``: Leiden on a SPATIA embedding (cell types at the cell level, tissue domains at the niche level)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .._constants import Defaults, Keys
from .._utils import scanpy_neighbors, seed_from
from ..pp._elements import get_table

logger = logging.getLogger(__name__)


#: Level → (embedding, cells averaged over in space, Leiden resolution) when not given. The niche level
#: clusters the *cell* embedding averaged over each cell's 30 nearest cells (the neighbourhood aggregation
#: CellCharter applies to scVI latents), which followed tissue domains better than the niche embedding on the
#: development slides (benchmarks/domains.py); its resolution (``None``) is chosen from the data, among
#: ``NICHE_RESOLUTIONS``.
LEVEL_DEFAULTS = {
    "cell": (Keys.CELL_EMB, 0, 0.5),
    "niche": (Keys.CELL_EMB, 30, None),
    "tissue": (Keys.TISSUE_EMB, 0, 0.5),
}
#: Resolutions searched for the niche level's most stable partition.
NICHE_RESOLUTIONS = (0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3)
#: Cells in the kNN graph and Leiden when ``max_cells`` is not given; the others are assigned by a kNN vote.
MAX_GRAPH_CELLS = 200_000
#: Reference sizes up to which the kNN vote searches exactly (scikit-learn); above it, a pynndescent index.
_EXACT_VOTE_MAX = 20_000
#: Query cells per chunk of the kNN vote (their neighbour indices: chunk × k int64).
_VOTE_CHUNK = 65_536


def cluster(
    data,
    *,
    level: str = "niche",
    resolution: float | None = None,
    n_clusters: int | None = None,
    use_rep: str | None = None,
    smooth_k: int | None = None,
    n_neighbors: int = 15,
    max_cells: int | None = MAX_GRAPH_CELLS,
    table_key: str | None = Defaults.TABLE,
    key_added: str | None = None,
    random_state: int | None = 0,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Leiden clusters of a SPATIA embedding: cell types (``level="cell"``), tissue domains (``"niche"``),
    regions of whole tissue tiles (``"tissue"``).

    Parameters
    ----------
    data
        AnnData or SpatialData holding the embeddings (from :func:`spatia.tl.fit` / :func:`~spatia.tl.embed`).
    level
        ``"cell"``: ``X_spatia_cell``, resolution 0.5. ``"niche"``: ``X_spatia_cell`` averaged over each cell's
        30 nearest cells in space, at a resolution chosen from the data (``resolution``): clusters of
        surroundings, i.e. tissue domains.
        ``"tissue"``: ``X_spatia_tissue``, one graph node per tissue tile, so regions are made of whole tiles.
    resolution
        Leiden resolution (higher → more clusters). Default: 0.5 at the cell and tissue levels; at the niche level
        the most stable partition among resolutions 0.08–0.3 (the one that agrees best, by ARI, with the
        partitions at the neighbouring resolutions), since the right resolution for domains depends on the
        slide. Ignored with ``n_clusters``.
    n_clusters
        Number of clusters wanted: the resolution is searched (bisection) until Leiden gives that many (the
        closest count, with a warning, when none does). Use it when you know how many domains to expect.
    use_rep
        ``obsm`` key to cluster instead of the level's default (e.g. ``"X_spatia_niche"``).
    smooth_k
        Average the embedding of each cell with that of its ``smooth_k`` nearest cells in space
        (``obsm['spatial']``, or the cells' segmentation) before building the graph; ``0``: no smoothing.
        Default per ``level`` (above). Larger values give larger, smoother domains.
    n_neighbors
        Neighbours of the kNN graph on the embedding (:func:`scanpy.pp.neighbors`).
    max_cells
        Most cells (graph nodes) that go into the kNN graph and Leiden. Above it, the graph is built on a seeded
        random sample of ``max_cells`` cells, and every other cell takes the cluster most common among its
        ``n_neighbors`` nearest sampled cells in the (smoothed) embedding, found in chunks. The graph and
        Leiden grow faster than linearly in time and memory (gigabytes at a million cells); with a sample
        they stop growing, and the vote is linear. A sample of 200,000 cells keeps clusters down to a few
        hundred cells in the graph; raise it to keep rarer ones, or pass ``None`` to put every cell in the
        graph (what :func:`scanpy.pp.neighbors` + :func:`scanpy.tl.leiden` do). Slides at or below
        ``max_cells`` are clustered whole either way.
    table_key
        Table when ``data`` is a SpatialData.
    key_added
        ``obs`` column; default ``"spatia_niche"`` for the niche level, else ``"spatia_cluster"``.
    random_state
        Seed of the graph and of Leiden.
    overwrite
        Replace an existing ``obs[key_added]``.
    inplace
        Write into ``obs`` and ``uns['spatia']['cluster']`` (return ``None``), or return
        ``{"obs/<key_added>": labels, "params": ...}`` and leave the data untouched.

    Returns
    -------
    ``None``, writing ``obs[key_added]`` (categorical) and the parameters used (representation, smoothing,
    resolution, number of clusters) in ``uns['spatia']['cluster']``.

    Examples
    --------
    >>> sp.tl.cluster(sdata, level="niche")                 # tissue domains -> obs["spatia_niche"]
    >>> sp.tl.cluster(sdata, level="niche", n_clusters=5, overwrite=True)
    >>> sp.tl.cluster(sdata, level="cell")                  # cell types -> obs["spatia_cluster"]
    """
    from .. import _results

    if level not in LEVEL_DEFAULTS:
        raise ValueError(f"level must be one of {list(LEVEL_DEFAULTS)}, got {level!r}.")
    rep, default_smooth, default_res = LEVEL_DEFAULTS[level]
    resolution = default_res if resolution is None else resolution
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int | float | np.number)
                                   or not resolution > 0):
        raise ValueError(f"resolution must be positive, got {resolution!r}.")
    if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer)
                                   or n_clusters < 1):
        raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}.")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an integer >= 2 (neighbours of the kNN graph), got {n_neighbors!r}.")
    smooth_k = default_smooth if smooth_k is None else smooth_k
    if isinstance(smooth_k, bool) or not isinstance(smooth_k, int | np.integer) or smooth_k < 0:
        raise ValueError(f"smooth_k must be an integer >= 0, got {smooth_k!r}.")
    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, int | np.integer)
                                  or max_cells < 3):
        raise ValueError(f"max_cells must be an integer >= 3 (cells in the kNN graph) or None, got {max_cells!r}.")
    table = get_table(data, table_key)
    use_rep = rep if use_rep is None else use_rep
    if use_rep not in table.obsm:
        raise KeyError(f"No obsm[{use_rep!r}] in the table (have: {sorted(table.obsm)}): run `sp.tl.fit` or "
                       "`sp.tl.embed` first, or pass use_rep=.")
    emb = np.asarray(table.obsm[use_rep])
    key_added = key_added or (Keys.NICHE if level == "niche" else Keys.CLUSTER)
    path = f"obs/{key_added}"
    if inplace:
        _results.check_free(data, table, [path], overwrite=overwrite)
    if smooth_k > 0:
        emb = spatial_smooth(emb, table, smooth_k, data=data)
    if level == "tissue" and use_rep == Keys.TISSUE_EMB:
        # one graph node per tile: the tissue embedding is shared by all the cells of a tile, and a kNN graph
        # over the cells would link each cell only to its own tile-mates (every tile a component, hence at
        # least one cluster per tile whatever the resolution)
        uniq, inverse = np.unique(np.asarray(emb, dtype=np.float32), axis=0, return_inverse=True)
        inverse = inverse.ravel()
    else:
        uniq, inverse = np.asarray(emb), np.arange(table.n_obs)
    seed = seed_from(random_state)
    sample = None
    if max_cells is not None and len(uniq) > max_cells:
        sample = np.sort(np.random.default_rng(seed).choice(len(uniq), size=int(max_cells), replace=False))
        logger.info("Leiden on a sample of %d of %d cells (max_cells); the others join their nearest sampled "
                    "cells' cluster.", len(sample), len(uniq))
    nodes = uniq if sample is None else uniq[sample]
    if len(nodes) < 3:
        codes = np.arange(len(nodes))
    elif n_clusters is not None:
        codes, resolution = leiden_n_clusters(nodes, n_clusters, n_neighbors=n_neighbors, seed=seed)
    elif resolution is None:
        codes, resolution = leiden_most_stable(nodes, NICHE_RESOLUTIONS, n_neighbors=n_neighbors, seed=seed)
    else:
        codes = leiden_codes(nodes, n_neighbors=n_neighbors, resolution=resolution, seed=seed)
    if sample is not None:
        full = np.empty(len(uniq), dtype=codes.dtype)
        full[sample] = codes
        rest = np.setdiff1d(np.arange(len(uniq)), sample, assume_unique=True)
        full[rest] = knn_vote(nodes, codes, uniq, rows=rest, n_neighbors=n_neighbors, seed=seed)
        codes = full
    codes = codes[inverse]
    labels = pd.Categorical(codes.astype(str), categories=[str(c) for c in np.unique(codes)])
    params = {"level": level, "use_rep": use_rep, "smooth_k": int(smooth_k),
              "resolution": float(resolution) if resolution is not None else float("nan"),
              "n_clusters": int(len(labels.categories)), "n_neighbors": int(n_neighbors),
              "max_cells": None if max_cells is None else int(max_cells),
              "n_graph_cells": int(len(nodes)),
              "assignment": "graph" if sample is None else f"kNN vote ({n_neighbors} nearest sampled cells)",
              "random_state": random_state}
    if not inplace:
        return _results.returned("cluster", {path: labels}, params)
    _results.write(data, table, {path: labels}, function="cluster", params=params, overwrite=True)
    return None


def leiden_most_stable(x: np.ndarray, resolutions, *, n_neighbors: int, seed: int) -> tuple[np.ndarray, float]:
    """Leiden codes at the resolution whose partition agrees best (mean ARI) with its neighbours' in
    ``resolutions`` (sorted); partitions into one cluster are never chosen. One kNN graph."""
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    tmp = _knn_graph(x, n_neighbors, seed)
    parts = []
    for res in resolutions:
        sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        parts.append(tmp.obs["leiden"].astype(int).to_numpy())
    score = []
    for i, codes in enumerate(parts):
        nbrs = [parts[j] for j in (i - 1, i + 1) if 0 <= j < len(parts)]
        score.append(np.mean([adjusted_rand_score(codes, o) for o in nbrs]) if codes.max() > 0 else -np.inf)
    best = int(np.argmax(score))
    return parts[best], float(resolutions[best])


def leiden_n_clusters(x: np.ndarray, n_clusters: int, *, n_neighbors: int, seed: int,
                      max_iter: int = 30) -> tuple[np.ndarray, float]:
    """Leiden codes with ``n_clusters`` clusters (resolution found by bisection on a log scale, one graph)."""
    import scanpy as sc

    tmp = _knn_graph(x, n_neighbors, seed)
    lo, hi = 1e-4, 10.0
    best, best_res = None, None
    for _ in range(max_iter):
        res = float(np.sqrt(lo * hi))
        sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        codes = tmp.obs["leiden"].astype(int).to_numpy()
        n = codes.max() + 1
        if best is None or abs(n - n_clusters) < abs(best.max() + 1 - n_clusters):
            best, best_res = codes, res
        if n == n_clusters:
            break
        lo, hi = (res, hi) if n < n_clusters else (lo, res)
    if best.max() + 1 != n_clusters:
        logger.warning("No Leiden resolution gives %d clusters; using %d (resolution %.3g).", n_clusters,
                       best.max() + 1, best_res)
    return best, best_res


def _knn_graph(x: np.ndarray, n_neighbors: int, seed: int):
    from anndata import AnnData

    tmp = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]), obsm={"X": x})
    scanpy_neighbors(tmp, use_rep="X", n_neighbors=n_neighbors, random_state=seed)
    return tmp


def leiden_codes(x: np.ndarray, *, n_neighbors: int, resolution: float, seed: int) -> np.ndarray:
    """Leiden cluster (an integer) of each row of ``x``, on its kNN graph (:func:`scanpy.pp.neighbors`,
    ``n_neighbors`` at most ``len(x) - 1``; igraph Leiden, 2 iterations)."""
    import scanpy as sc

    tmp = _knn_graph(x, n_neighbors, seed)
    sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return tmp.obs["leiden"].astype(int).to_numpy()


def knn_vote(x_ref: np.ndarray, codes_ref: np.ndarray, x_query: np.ndarray, *, n_neighbors: int,
             seed: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """Cluster of each row of ``x_query`` (or of its ``rows`` only, read a chunk at a time, not copied): the code
    most common among its ``n_neighbors`` nearest rows of ``x_ref`` (ties go to the code of the nearest row).
    Exact search up to ``_EXACT_VOTE_MAX`` reference rows, a pynndescent index above; queries run in chunks of
    ``_VOTE_CHUNK`` rows."""
    k = int(min(n_neighbors, len(x_ref)))
    codes_ref = np.asarray(codes_ref)
    n_codes = int(codes_ref.max()) + 1
    if len(x_ref) <= _EXACT_VOTE_MAX:
        from sklearn.neighbors import NearestNeighbors

        index = NearestNeighbors(n_neighbors=k).fit(x_ref)

        def search(q):
            return index.kneighbors(q, return_distance=False)
    else:
        from pynndescent import NNDescent

        index = NNDescent(np.asarray(x_ref, dtype=np.float32), n_neighbors=max(k, 15), random_state=seed,
                          low_memory=True)
        index.prepare()

        def search(q):
            return index.query(np.asarray(q, dtype=np.float32), k=k)[0]
    n_query = len(x_query) if rows is None else len(rows)
    out = np.empty(n_query, dtype=codes_ref.dtype)
    for s in range(0, n_query, _VOTE_CHUNK):
        chunk = x_query[s : s + _VOTE_CHUNK] if rows is None else x_query[rows[s : s + _VOTE_CHUNK]]
        votes = codes_ref[search(chunk)]  # (m, k), nearest first
        m = len(votes)
        counts = np.bincount((votes + n_codes * np.arange(m)[:, None]).ravel(), minlength=m * n_codes)
        score = counts.reshape(m, n_codes) * 2
        score[np.arange(m), votes[:, 0]] += 1  # ties: the nearest cell's cluster
        out[s : s + m] = score.argmax(1)
    return out


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
    index = NearestNeighbors(n_neighbors=k + 1).fit(xy)
    emb = np.asarray(emb)  # no float64 copy of the whole embedding: each chunk's mean is taken in float64
    out = np.empty(emb.shape, dtype=np.float32)
    # in chunks of cells: the gathered neighbours' embeddings (chunk × (k + 1) × dim) stay ~64 MB
    step = max(1, _SMOOTH_CHUNK_BYTES // ((k + 1) * max(emb.shape[1], 1) * 8))
    for s in range(0, len(xy), step):
        nb = index.kneighbors(xy[s : s + step], return_distance=False)
        out[s : s + step] = emb[nb].mean(1, dtype=np.float64)
    return out


_SMOOTH_CHUNK_BYTES = 64 * 2**20
