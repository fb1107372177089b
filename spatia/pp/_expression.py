"""Raw counts: fetch, validate and summarise the expression the model reads."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp_sparse
from anndata import AnnData

logger = logging.getLogger(__name__)


def get_counts(
    table: AnnData, layer: str | None = None, *, allow_empty: bool = False, name: str = "table",
    keep_integers: bool = False,
) -> sp_sparse.csr_matrix:
    """Validated raw counts of ``table`` as a float32 CSR matrix (or, with ``keep_integers``, an integer one).

    The table's own matrix is returned, not a copy, when it already is a float32 CSR without explicit zeros
    (what scanpy's ``read_10x_h5`` and spatialdata-io's readers give): treat the result as read-only. Checks
    run in chunks, so a million-cell table is validated without whole-matrix temporaries.

    Parameters
    ----------
    table
        The cells × genes table.
    layer
        Layer holding raw counts; ``None`` reads ``X``.
    allow_empty
        Accept cells with zero total counts (they are kept; their expression tokens are empty).
    name
        What the table is, in error messages (e.g. ``"reference"``).
    keep_integers
        Return an integer CSR without explicit zeros as it is (int32 counts are not copied to float32: on a
        large slide the copy would double the counts' memory). Callers then convert what they read.

    Returns
    -------
    ``(n_obs, n_vars)`` CSR matrix of counts.

    Raises
    ------
    KeyError
        Unknown layer.
    ValueError
        Duplicated gene names, NaN / infinite / negative / non-integer values, no genes, or (unless
        ``allow_empty``) cells with zero counts.

    Examples
    --------
    >>> counts = sp.pp.get_counts(sdata["table"])  # CSR of raw counts; raises on log-normalised data
    >>> counts = sp.pp.get_counts(adata, layer="counts")
    """
    if table.n_vars == 0:
        raise ValueError(f"The {name} has no genes (n_vars == 0).")
    if not table.var_names.is_unique:
        dup = table.var_names[table.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicated gene names in the {name}'s var_names (e.g. {dup}): call "
                         f"`{name}.var_names_make_unique()`.")
    if layer is None:
        x = table.X
        where = "X"
    else:
        if layer not in table.layers:
            raise KeyError(f"No layer {layer!r} in the {name}; available layers: {list(table.layers) or 'none'}.")
        x = table.layers[layer]
        where = f"layers[{layer!r}]"
    if x is None:
        raise ValueError(f"The {name} has no X: pass layer= with the raw counts.")
    if hasattr(x, "compute"):  # dask
        x = x.compute()
    x = x.tocsr() if sp_sparse.issparse(x) else sp_sparse.csr_matrix(np.asarray(x))  # no copy of a CSR
    data = x.data
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{name}.{where} has dtype {data.dtype}: spatia models raw counts (numbers).")
    floating = data.dtype.kind == "f"
    if floating and not _all_chunks(data, np.isfinite):
        raise ValueError(f"{name}.{where} contains NaN or infinite values: fix or drop those cells/genes first.")
    if data.dtype.kind != "u" and _any_chunks(data, lambda d: d < 0):
        raise ValueError(
            f"{name}.{where} has negative values: it is not raw counts (scaled or log data?). "
            "Pass layer= naming the raw integer counts."
        )
    if floating and not _all_chunks(data, lambda d: np.isclose(d, np.round(d))):
        hint = " (e.g. layer='counts')" if "counts" in table.layers else ""
        raise ValueError(
            f"{name}.{where} is not integer counts (normalised or log-transformed?): spatia models raw counts. "
            f"Pass layer= naming the raw counts{hint}."
        )
    totals = np.asarray(x.sum(axis=1)).ravel()
    empty = int((totals == 0).sum())
    if empty and empty == table.n_obs:
        raise ValueError(f"Every cell of the {name} has zero counts: there is no expression to model. Check that "
                         "layer= names the raw counts.")
    if empty and not allow_empty:
        raise ValueError(
            f"{empty} of {table.n_obs} cells have zero counts in the {name}. Remove them first "
            "(`sc.pp.filter_cells(table, min_counts=1)`, or subset the SpatialData with its table) "
            "or pass allow_empty=True to keep them."
        )
    usable = data.dtype == np.float32 or (keep_integers and data.dtype.kind in "iu")
    if usable and x.has_canonical_format and not _any_chunks(data, lambda d: d == 0):
        return x  # already what the model reads: shared with the table, not copied
    out = x.astype(np.float32, copy=True)
    out.eliminate_zeros()
    return out


_CHUNK = 1 << 22  # values checked at a time (bounded temporaries on a million-cell slide)


def cp10k(x, target: float = 1e4) -> np.ndarray:
    """Counts scaled to ``target`` per cell (dense float32)."""
    x = x.toarray() if sp_sparse.issparse(x) else np.asarray(x)
    lib = x.sum(1, keepdims=True)
    return (x / np.maximum(lib, 1e-12) * target).astype(np.float32)


def _all_chunks(a: np.ndarray, test) -> bool:
    return all(bool(test(a[i:i + _CHUNK]).all()) for i in range(0, len(a), _CHUNK))


def _any_chunks(a: np.ndarray, test) -> bool:
    return any(bool(test(a[i:i + _CHUNK]).any()) for i in range(0, len(a), _CHUNK))


def align_genes(var_names, model_genes) -> tuple[np.ndarray, list[str]]:
    """Index of each of ``model_genes`` in ``var_names`` (-1 when missing) and the list of missing genes."""
    import pandas as pd

    idx = pd.Index(var_names).get_indexer(list(model_genes))
    missing = [g for g, i in zip(model_genes, idx, strict=True) if i < 0]
    return idx, missing
