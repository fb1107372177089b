"""Genes from a scRNA-seq reference for :func:`spatia.tl.impute` and :func:`spatia.tl.validate_imputation`.

Each spatial cell takes the similarity-weighted mean profile of its nearest reference cells in a PCA of the
genes both measure; the reference's values are counts per 10,000 counts of the panel genes it measures.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp_sparse

from .._fs import swap_in
from .._logging import quiet_dependencies
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


class _ReferenceMap:
    """kNN regression in a PCA of the shared genes fitted on the reference (each dataset z-scored on its own).

    ``query`` and ``ref_shared`` are log-normalised expression over the same shared genes; each gene is
    standardised within its dataset (removing platform-wide gene scale differences), PCA is fitted on the
    reference, and each query cell takes the similarity-weighted mean of ``ref_target`` over its
    ``n_neighbors`` nearest reference cells (cosine distance). :meth:`block` maps any rows of the query, so
    that the cells × genes result can be written block by block (a whole transcriptome for a million cells
    never sits in memory). ``ref_target`` may be sparse (CSR): it stays sparse.
    """

    def __init__(self, query: np.ndarray, ref_shared: np.ndarray, ref_target, n_neighbors: int, n_comps: int,
                 random_state: int) -> None:
        import sklearn
        from sklearn.decomposition import PCA
        from sklearn.neighbors import NearestNeighbors

        def z(a):
            sd = a.std(0)
            return (a - a.mean(0)) / np.where(sd > 0, sd, 1)

        zr = z(ref_shared)
        k = max(1, min(n_comps, zr.shape[1] - 1, zr.shape[0] - 1))
        pca = PCA(k, random_state=random_state).fit(zr)
        self.pq = pca.transform(z(query)).astype(np.float32)
        self.nn = NearestNeighbors(n_neighbors=min(n_neighbors, len(zr)), metric="cosine").fit(pca.transform(zr))
        self.target = sp_sparse.csr_matrix(ref_target) if sp_sparse.issparse(ref_target) else ref_target
        self.n_genes = ref_target.shape[1]
        # the bandwidth: the median neighbour distance, over (at most ~20,000) query cells spread over the slide
        with sklearn.config_context(working_memory=max(1, _MAP_CHUNK_BYTES // 2**20)):
            probe = self.pq[:: max(1, len(self.pq) // 20_000)]
            self.bandwidth = max(float(np.median(self.nn.kneighbors(probe)[0])), 1e-6)

    @property
    def step(self) -> int:
        """Query cells per block: the block's profiles stay ~64 MB."""
        return max(1, _MAP_CHUNK_BYTES // (max(self.n_genes, 1) * 4))

    def block(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, genes)`` float32: the mapped profiles of query rows ``start:stop``."""
        import sklearn

        # sklearn's brute-force search holds (query chunk × reference cells) distances: at most ~64 MB of them
        with sklearn.config_context(working_memory=max(1, _MAP_CHUNK_BYTES // 2**20)):
            dist, idx = self.nn.kneighbors(self.pq[start:stop])
        w = np.exp(-dist / self.bandwidth)
        w /= w.sum(1, keepdims=True)
        # the weighted mean as (block × reference cells, sparse) @ profiles: never (block × k × genes)
        m, k = idx.shape
        weights = sp_sparse.csr_matrix((w.ravel().astype(np.float32), idx.ravel(), np.arange(0, m * k + 1, k)),
                                       shape=(m, self.target.shape[0]))
        out = weights @ self.target
        return np.asarray(out.toarray() if sp_sparse.issparse(out) else out, dtype=np.float32)

    def all(self) -> np.ndarray:
        """Every query cell, block by block into one dense array."""
        out = np.empty((len(self.pq), self.n_genes), dtype=np.float32)
        for s in range(0, len(self.pq), self.step):
            out[s : s + self.step] = self.block(s, s + self.step)
        return out


def _map_to_reference(query: np.ndarray, ref_shared: np.ndarray, ref_target, n_neighbors: int, n_comps: int,
                      random_state: int) -> np.ndarray:
    """Dense (query cells × target genes) profiles of :class:`_ReferenceMap`."""
    return _ReferenceMap(query, ref_shared, ref_target, n_neighbors, n_comps, random_state).all()


_MAP_CHUNK_BYTES = 64 * 2**20


def _reference_map(rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps, seed):
    """The :class:`_ReferenceMap` of each cell to the reference on the ``shared`` genes, for ``targets``.

    The reference's values are counts per 10,000 counts of the panel genes it measures, i.e. on the scale
    of the spatial cells' own normalised panel. A sparse reference stays sparse.
    """
    ridx = pd.Index(ref_genes)
    qi = pd.Index(model_genes).get_indexer(shared)
    query = np.log1p(rho[:, qi] / np.maximum(rho[:, qi].sum(1, keepdims=True), 1e-12) * 1e4)
    ref_shared = np.log1p(_cp10k(ref_counts[:, ridx.get_indexer(shared)]))
    panel_in_ref = ridx.get_indexer([g for g in model_genes if g in set(ref_genes)])
    lib = np.asarray(ref_counts[:, panel_in_ref].sum(1)).ravel()
    scale = (1e4 / np.maximum(lib, 1)).astype(np.float32)
    tgt = ref_counts[:, ridx.get_indexer(targets)]
    if sp_sparse.issparse(tgt):
        tgt = sp_sparse.csr_matrix(sp_sparse.diags(scale) @ tgt, dtype=np.float32)
    else:
        tgt = (np.asarray(tgt) * scale[:, None]).astype(np.float32)
    return _ReferenceMap(query, ref_shared, tgt, n_neighbors, n_comps, seed)


def _reference_impute(rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps, seed):
    """Dense expression of ``targets`` for each cell from its reference neighbours (see :func:`_reference_map`)."""
    return _reference_map(rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps,
                          seed).all()


def _lazy_log1p(mapping: _ReferenceMap):
    """``log1p`` of every mapped profile as a dask array of blocks of cells, each computed when read."""
    import dask.array as da

    n, step = len(mapping.pq), mapping.step
    starts = da.arange(0, n, chunks=step)

    def block(rows: np.ndarray) -> np.ndarray:
        out = (mapping.block(int(rows[0]), int(rows[-1]) + 1) if len(rows)
               else np.zeros((0, mapping.n_genes), dtype=np.float32))
        return np.log1p(out, out=out)

    return da.map_blocks(block, starts, new_axis=1, chunks=(starts.chunks[0], (mapping.n_genes,)),
                         dtype=np.float32, meta=np.empty((0, 0), dtype=np.float32))


def _write_table_store(new, store, *, overwrite: bool):
    """Write the AnnData ``new`` (its ``X`` a dask array, computed block by block as it is written) to the zarr
    ``store``, and return it with ``X`` read lazily from there.

    The store is written beside its path and moved in by renames: an interrupted write leaves the path as it
    was. An existing path is replaced only with ``overwrite`` and only when it holds an AnnData.
    """
    import dask
    import dask.array as da

    path = Path(store)
    if path.suffix != ".zarr":
        raise ValueError(f"store must be a path ending in .zarr, got {str(path)!r}.")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it, or another store=.")
        if not _is_anndata_store(path):
            raise FileExistsError(f"{path} is not an AnnData zarr store: overwrite=True replaces only those. "
                                  "Choose another store=.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        import anndata

        # zarr chunks: whole blocks of cells (each written once, by one thread) cut into ≤ 2,048 genes
        chunks = (new.X.chunks[0][0], min(new.n_vars, 2048)) if new.n_obs else None
        with (dask.config.set(scheduler="threads"), anndata.settings.override(zarr_write_format=3),
              quiet_dependencies()):
            new.write_zarr(tmp, chunks=chunks)
        swap_in(tmp, path, what="imputed table")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    new.X = da.from_zarr(str(path), component="X")
    return new


def _is_anndata_store(path: Path) -> bool:
    import json

    for meta in ("zarr.json", ".zattrs"):
        try:
            attrs = json.loads((path / meta).read_text())
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", attrs)
        if attrs.get("encoding-type") == "anndata":
            return True
    return False


def _dense_limit_bytes() -> float:
    """Half the machine's physical memory (infinite where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):
        return float("inf")
