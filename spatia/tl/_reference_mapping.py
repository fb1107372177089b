"""Genes from a scRNA-seq reference for :func:`spatia.tl.impute` and :func:`spatia.tl.validate_imputation`.

Each spatial cell takes the similarity-weighted mean profile of its nearest reference cells in a PCA of the
genes both measure; the reference's values are counts per 10,000 counts of the panel genes it measures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp_sparse

from ..pp._expression import get_counts


def _cp10k(x, target: float = 1e4) -> np.ndarray:
    """Counts scaled to ``target`` per cell (dense float32)."""
    x = x.toarray() if sp_sparse.issparse(x) else np.asarray(x)
    lib = x.sum(1, keepdims=True)
    return (x / np.maximum(lib, 1e-12) * target).astype(np.float32)


def _reference_profiles(reference, reference_layer):
    """The reference's counts (``reference_layer``, or ``X``) and its gene names; the reference must be an AnnData."""
    from anndata import AnnData

    if not isinstance(reference, AnnData):
        raise TypeError(f"reference must be an AnnData of scRNA-seq counts, got {type(reference).__name__}.")
    counts = get_counts(reference, reference_layer, allow_empty=False, name="reference")
    return counts, reference.var_names.astype(str)


def _map_to_reference(query: np.ndarray, ref_shared: np.ndarray, ref_target: np.ndarray, n_neighbors: int,
                      n_comps: int, random_state: int) -> np.ndarray:
    """kNN regression in a PCA of the shared genes fitted on the reference (each dataset z-scored on its own).

    ``query`` and ``ref_shared`` are log-normalised expression over the same shared genes; each gene is
    standardised within its dataset (removing platform-wide gene scale differences), PCA is fitted on the
    reference, and each query cell takes the similarity-weighted mean of ``ref_target`` over its
    ``n_neighbors`` nearest reference cells (cosine distance).
    """
    import sklearn
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    def z(a):
        sd = a.std(0)
        return (a - a.mean(0)) / np.where(sd > 0, sd, 1)

    zr, zq = z(ref_shared), z(query)
    k = max(1, min(n_comps, zr.shape[1] - 1, zr.shape[0] - 1))
    pca = PCA(k, random_state=random_state).fit(zr)
    pr, pq = pca.transform(zr), pca.transform(zq)
    del zq
    nn_ = NearestNeighbors(n_neighbors=min(n_neighbors, len(pr)), metric="cosine").fit(pr)
    n_nb = nn_.n_neighbors
    out = np.empty((len(pq), ref_target.shape[1]), dtype=np.float32)
    # sklearn's brute-force search holds (query chunk × reference cells) distances: at most ~64 MB of them
    with sklearn.config_context(working_memory=max(1, _MAP_CHUNK_BYTES // 2**20)):
        # the bandwidth: the median neighbour distance, over (at most ~20,000) query cells spread over the slide
        probe = pq[:: max(1, len(pq) // 20_000)]
        bandwidth = max(float(np.median(nn_.kneighbors(probe)[0])), 1e-6)
        # query cells in chunks: the gathered neighbour profiles (chunk × n_neighbors × genes) stay ~64 MB
        step = max(1, _MAP_CHUNK_BYTES // (n_nb * max(ref_target.shape[1], 1) * 8))
        for s in range(0, len(pq), step):
            dist, idx = nn_.kneighbors(pq[s : s + step])
            w = np.exp(-dist / bandwidth)
            w /= w.sum(1, keepdims=True)
            out[s : s + step] = np.einsum("nk,nkg->ng", w, ref_target[idx])
    return out


_MAP_CHUNK_BYTES = 64 * 2**20


def _reference_impute(rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps, seed):
    """Expression of ``targets`` for each cell from its reference neighbours on the ``shared`` genes.

    The reference's values are counts per 10,000 counts of the panel genes it measures, i.e. on the scale
    of the spatial cells' own normalised panel.
    """
    ridx = pd.Index(ref_genes)
    qi = pd.Index(model_genes).get_indexer(shared)
    query = np.log1p(rho[:, qi] / np.maximum(rho[:, qi].sum(1, keepdims=True), 1e-12) * 1e4)
    ref_shared = np.log1p(_cp10k(ref_counts[:, ridx.get_indexer(shared)]))
    panel_in_ref = ridx.get_indexer([g for g in model_genes if g in set(ref_genes)])
    lib = np.asarray(ref_counts[:, panel_in_ref].sum(1)).ravel()
    tgt = ref_counts[:, ridx.get_indexer(targets)]
    tgt = (tgt.toarray() if sp_sparse.issparse(tgt) else np.asarray(tgt)) / np.maximum(lib, 1)[:, None] * 1e4
    return _map_to_reference(query, ref_shared, tgt.astype(np.float32), n_neighbors, n_comps, seed)
