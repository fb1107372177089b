"""Genes from a scRNA-seq reference for :func:`spatia.tl.impute` and :func:`spatia.tl.validate_imputation`.

Each spatial cell takes the posterior mean profile of the reference neighbourhoods most likely to have produced
its counts of the genes both measure (see :class:`_ReferenceMap`); the reference's values are counts per 10,000
counts of the panel genes it measures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp_sparse

from .._fs import written_beside
from .._logging import quiet_dependencies
from ..pp._expression import get_counts


def _reference_profiles(reference, reference_layer):
    """The reference's counts (``reference_layer``, or ``X``) and its gene names; the reference must be an AnnData."""
    from anndata import AnnData

    if not isinstance(reference, AnnData):
        raise TypeError(f"reference must be an AnnData of scRNA-seq counts, got {type(reference).__name__}.")
    counts = get_counts(reference, reference_layer, allow_empty=False, name="reference")
    return counts, reference.var_names.astype(str)


# How the mapping weighs the evidence (chosen on development seeds of ``simulate_with_reference``; see the
# notes of benchmarks/results/imputation.md): the model's expected profile counts as much as one measured library of the cell
# (_MODEL_WEIGHT), the likelihood is tempered by _TEMPERATURE for over-dispersion (real counts vary more than
# Poisson), and each reference component is a reference cell pooled with its _SMOOTHING nearest reference cells.
_MODEL_WEIGHT = 1.0
_TEMPERATURE = 3.0
_SMOOTHING = 15
_MAX_COMPONENTS = 5000  # reference neighbourhoods kept (a seeded sample beyond): the cost is cells × components
_MAX_REFERENCE_CELLS = 50_000  # reference cells read (a seeded sample of an atlas): bounds the set-up's memory
_MAX_GENES = 1000  # shared genes scored (the most variable in the reference beyond)
_EFFICIENCY_CELLS = 20_000  # slide cells that estimate each gene's capture relative to the reference
_NEIGHBOURHOOD_GENES = 2000  # reference genes (the most variable) of the PCA in which neighbourhoods are found


def _lognorm_variance(x, lib: np.ndarray) -> np.ndarray:
    """Per-gene variance of ``log1p(x / lib * 10,000)`` over cells, without densifying a sparse ``x``."""
    if sp_sparse.issparse(x):
        y = sp_sparse.csr_matrix(sp_sparse.diags((1e4 / lib).astype(np.float32)) @ x)
        np.log1p(y.data, out=y.data)
        mean = np.asarray(y.mean(0), dtype=np.float64).ravel()
        return np.asarray(y.multiply(y).mean(0), dtype=np.float64).ravel() - mean**2
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    step = max(1, 2**22 // max(x.shape[1], 1))  # rows of ~32 MB of float64 at a time
    for s in range(0, x.shape[0], step):
        y = np.log1p(x[s : s + step] / lib[s : s + step, None] * 1e4)
        total += y.sum(0)
        squares += (y * y).sum(0)
    mean = total / max(x.shape[0], 1)
    return squares / max(x.shape[0], 1) - mean**2


def _lognorm_columns(x, lib: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dense float32 ``log1p(x[:, cols] / lib * 10,000)``."""
    c = x[:, cols]
    c = c.toarray() if sp_sparse.issparse(c) else np.array(c, dtype=np.float32)
    c *= (1e4 / lib).astype(np.float32)[:, None]
    return np.log1p(c, out=c)


class _ReferenceMap:
    """Each spatial cell's expression of the reference's genes, as the posterior mean over reference neighbourhoods.

    The reference is cut into neighbourhoods (each reference cell pooled with its ``_SMOOTHING`` nearest reference
    cells in a PCA of the reference's most variable genes, at most ``_MAX_COMPONENTS`` of them); each has a
    profile over the shared genes and a mean of the target genes. A spatial cell's counts of the shared genes are a multinomial draw from
    the profile of the neighbourhood it belongs to, at the cell's own depth, so its log-likelihood under each
    neighbourhood is ``counts @ log(profile)``. That is what makes the mapping depth-aware: a 40-count cell is
    compared with deep reference profiles without first pretending its counts are a profile. The model's expected
    proportions (``rho``) enter as pseudo-counts worth one library of the cell. The ``n_neighbors`` most likely
    neighbourhoods are averaged with their tempered posterior weights. Before that, the profiles are corrected by
    each gene's capture efficiency on the slide relative to the reference (:meth:`_efficiency`).

    :meth:`block` maps any rows of the query, so that the cells × genes result can be written block by block (a
    whole transcriptome for a million cells never sits in memory). A sparse ``ref_target`` (CSR) stays sparse
    while its pooled form is less than half filled.
    """

    def __init__(self, counts, rho: np.ndarray | None, query_cols: np.ndarray, ref_all, shared_cols: np.ndarray,
                 ref_target, n_neighbors: int, n_comps: int, random_state: int) -> None:
        from sklearn.decomposition import PCA
        from sklearn.neighbors import NearestNeighbors

        self.counts = sp_sparse.csr_matrix(counts) if sp_sparse.issparse(counts) else np.asarray(counts)
        self.rho, self.query_cols = rho, np.asarray(query_cols)
        if ref_all.shape[0] > _MAX_REFERENCE_CELLS:  # an atlas: a seeded sample of its cells
            rows = np.sort(np.random.default_rng(random_state).choice(ref_all.shape[0], _MAX_REFERENCE_CELLS,
                                                                     replace=False))
            ref_all, ref_target = ref_all[rows], ref_target[rows]
        ref_all = sp_sparse.csr_matrix(ref_all, dtype=np.float32) if sp_sparse.issparse(ref_all) else \
            np.asarray(ref_all, dtype=np.float32)
        n_ref = ref_all.shape[0]
        lib = np.maximum(np.asarray(ref_all.sum(1), dtype=np.float64).ravel(), 1e-12)
        # neighbourhoods are found on everything the reference measures (its most variable genes), not only on
        # the shared genes: pooled cells then agree on the genes to impute as well
        var_all = _lognorm_variance(ref_all, lib)
        hvg = np.sort(np.argsort(-var_all, kind="stable")[:_NEIGHBOURHOOD_GENES])
        z = _lognorm_columns(ref_all, lib, hvg)
        sd = z.std(0)
        z -= z.mean(0)
        z /= np.where(sd > 0, sd, 1)
        k = max(1, min(n_comps, z.shape[1] - 1, n_ref - 1))
        pc = PCA(k, random_state=random_state).fit_transform(z) if z.shape[1] > 1 else z
        del z
        # the scored genes: all shared genes, or the most variable in the reference on very wide panels
        shared_cols = np.asarray(shared_cols)
        self.genes = np.sort(np.argsort(-var_all[shared_cols], kind="stable")[:_MAX_GENES])
        rc = ref_all[:, shared_cols[self.genes]]
        members = NearestNeighbors(n_neighbors=min(_SMOOTHING, n_ref)).fit(pc).kneighbors(pc, return_distance=False)
        if n_ref > _MAX_COMPONENTS:
            keep = np.sort(np.random.default_rng(random_state).choice(n_ref, _MAX_COMPONENTS, replace=False))
            members = members[keep]
        m, s = members.shape
        pool = sp_sparse.csr_matrix((np.full(m * s, 1.0 / s, dtype=np.float32), members.ravel(),
                                     np.arange(0, m * s + 1, s)), shape=(m, n_ref))
        prof = pool @ rc
        prof = np.asarray(prof.toarray() if sp_sparse.issparse(prof) else prof, dtype=np.float64)
        # half a count per gene over the pooled cells keeps a gene no pooled cell detected possible
        prof += 0.5 / s
        self.profile = prof / prof.sum(1, keepdims=True)
        target = sp_sparse.csr_matrix(ref_target, dtype=np.float32) if sp_sparse.issparse(ref_target) else \
            np.asarray(ref_target, dtype=np.float32)
        # the neighbourhoods' mean targets: pooling fills in a sparse reference, so they stay sparse only where
        # that takes less memory than a dense float32 array (8 bytes per stored value against 4 per cell)
        self.target = pool @ target
        if sp_sparse.issparse(self.target):
            self.target = sp_sparse.csr_matrix(self.target, dtype=np.float32)
            if 2 * self.target.nnz > np.prod(self.target.shape):
                self.target = self.target.toarray()
        self.n_genes = ref_target.shape[1]
        self.n_cells = self.counts.shape[0]
        self.k = min(n_neighbors, m)
        self.log_profile = np.log(self.profile).astype(np.float32)
        self.efficiency = self._efficiency()
        self.profile *= self.efficiency
        self.profile /= self.profile.sum(1, keepdims=True)
        self.log_profile = np.log(self.profile).astype(np.float32)

    @property
    def step(self) -> int:
        """Query cells per block: the block's output (4 bytes a value) and its likelihoods (float32, with their
        negation and int64 ranking: 16 bytes a value) stay within ~64 MB each."""
        return max(1, _MAP_CHUNK_BYTES // max(4 * self.n_genes, 16 * len(self.profile), 1))

    def _counts(self, rows) -> np.ndarray:
        """Dense float32 counts of the scored genes for ``rows`` (a slice or row indices)."""
        c = self.counts[rows][:, self.query_cols[self.genes]]
        return np.asarray(c.toarray() if sp_sparse.issparse(c) else c, dtype=np.float32)

    def _query(self, rows) -> np.ndarray:
        """Pseudo-counts of the scored genes for ``rows``: the counts, plus the model's expectation."""
        q = self._counts(rows)
        if self.rho is not None:
            r = np.asarray(self.rho[rows][:, self.query_cols[self.genes]], dtype=np.float32)
            # worth one library of the cell; a cell without counts of these genes still has the model's guess
            lib = np.maximum(q.sum(1, keepdims=True), 1.0)
            q += _MODEL_WEIGHT * lib * r / np.maximum(r.sum(1, keepdims=True), 1e-12)
        return q

    def _weights(self, rows) -> sp_sparse.csr_matrix:
        """``(rows, neighbourhoods)`` sparse posterior weights over the ``k`` most likely neighbourhoods."""
        q = self._query(rows)
        loglik = q @ self.log_profile.T
        loglik /= _TEMPERATURE
        m, k = loglik.shape[0], self.k
        idx = np.argpartition(-loglik, k - 1, axis=1)[:, :k] if k < loglik.shape[1] else \
            np.broadcast_to(np.arange(loglik.shape[1]), loglik.shape).copy()
        top = np.take_along_axis(loglik, idx, 1)
        w = np.exp(top - top.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return sp_sparse.csr_matrix((w.ravel().astype(np.float32), idx.ravel(), np.arange(0, m * k + 1, k)),
                                    shape=(m, loglik.shape[1]))

    def _efficiency(self) -> np.ndarray:
        """Each scored gene's capture on the slide relative to the reference, from a first mapping of (at most
        ``_EFFICIENCY_CELLS``) cells: their observed counts over those the mapped profiles expect, clipped to
        [1/20, 20].

        Platforms capture genes at different efficiencies (imaging panels and droplet scRNA-seq differ by several
        fold for some genes); uncorrected, a gene the slide captures twice as well pulls every cell towards the
        neighbourhoods that express it most. What it gains where platforms differ and costs where they agree is
        in the notes of ``benchmarks/results/imputation.md``.
        """
        rows = np.arange(0, self.n_cells, max(1, self.n_cells // _EFFICIENCY_CELLS))
        observed = np.zeros(len(self.genes))
        expected = np.zeros(len(self.genes))
        for s in range(0, len(rows), self.step):
            r = rows[s : s + self.step]
            c = self._counts(r).astype(np.float64)
            observed += c.sum(0)
            expected += np.asarray(self._weights(r) @ self.profile).T @ c.sum(1)
        ratio = np.where(expected > 0, observed / np.maximum(expected, 1e-12), 1.0)
        return np.clip(ratio, 1 / 20, 20)

    def block(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, genes)`` float32: the mapped profiles of query rows ``start:stop``."""
        out = self._weights(slice(start, stop)) @ self.target
        return np.asarray(out.toarray() if sp_sparse.issparse(out) else out, dtype=np.float32)

    def all(self) -> np.ndarray:
        """Every query cell, block by block into one dense array."""
        out = np.empty((self.n_cells, self.n_genes), dtype=np.float32)
        for s in range(0, self.n_cells, self.step):
            out[s : s + self.step] = self.block(s, s + self.step)
        return out


_MAP_CHUNK_BYTES = 64 * 2**20


def _reference_map(counts, rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps, seed):
    """The :class:`_ReferenceMap` of each cell (its ``counts`` and the model's ``rho``, both over ``model_genes``)
    to the reference on the ``shared`` genes, for ``targets``.

    The reference's values are counts per 10,000 counts of the panel genes it measures, i.e. on the scale
    of the spatial cells' own normalised panel. A sparse reference stays sparse.
    """
    ridx = pd.Index(ref_genes)
    qi = pd.Index(model_genes).get_indexer(shared)
    panel_in_ref = ridx.get_indexer([g for g in model_genes if g in set(ref_genes)])
    lib = np.asarray(ref_counts[:, panel_in_ref].sum(1)).ravel()
    scale = (1e4 / np.maximum(lib, 1)).astype(np.float32)
    tgt = ref_counts[:, ridx.get_indexer(targets)]
    if sp_sparse.issparse(tgt):
        tgt = sp_sparse.csr_matrix(sp_sparse.diags(scale) @ tgt, dtype=np.float32)
    else:
        tgt = (np.asarray(tgt) * scale[:, None]).astype(np.float32)
    return _ReferenceMap(counts, rho, qi, ref_counts, ridx.get_indexer(shared), tgt, n_neighbors, n_comps, seed)


def _reference_impute(counts, rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps, seed):
    """Dense expression of ``targets`` for each cell from the reference (see :func:`_reference_map`)."""
    return _reference_map(counts, rho, model_genes, ref_counts, ref_genes, shared, targets, n_neighbors, n_comps,
                          seed).all()


def _lazy_log1p(mapping: _ReferenceMap):
    """``log1p`` of every mapped profile as a dask array of the mapping's blocks of cells, each computed when
    read."""
    from ._write import lazy_rows

    def block(a: int, b: int) -> np.ndarray:
        out = mapping.block(a, b)
        return np.log1p(out, out=out)

    return lazy_rows(block, mapping.n_cells, mapping.n_genes, block_bytes=4 * mapping.n_genes * mapping.step)


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
    import anndata

    # zarr chunks: whole blocks of cells (each written once, by one thread) cut into ≤ 2,048 genes
    chunks = (new.X.chunks[0][0], min(new.n_vars, 2048)) if new.n_obs else None
    with (written_beside(path, what="imputed table") as tmp, dask.config.set(scheduler="threads"),
          anndata.settings.override(zarr_write_format=3), quiet_dependencies()):
        new.write_zarr(tmp, chunks=chunks)
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
