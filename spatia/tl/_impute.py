"""Expression tasks: denoise/impute panel genes, impute genes from a scRNA-seq reference, predict from images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp_sparse

from .. import _results
from .._constants import Defaults, Keys
from .._utils import seed_from
from ..pp._elements import table_annotation
from ..pp._expression import cp10k
from ._reference_mapping import (
    _dense_limit_bytes,
    _lazy_log1p,
    _reference_impute,
    _reference_map,
    _reference_profiles,
    _write_table_store,
)
from ._write import backed_table_dir, spill_arrays

logger = logging.getLogger(__name__)

_LAYER_BLOCK_BYTES = 64 << 20  # a block of the backed panel layer, computed and written at once


def _gene_scores(pred: np.ndarray, true: np.ndarray, genes: list[str]) -> pd.DataFrame:
    """Per-gene Pearson, Spearman and RMSE of ``pred`` vs ``true`` (cells × genes, same scale)."""
    from scipy.stats import pearsonr, spearmanr

    rows = []
    for j, g in enumerate(genes):
        p, t = pred[:, j], true[:, j]
        ok = np.isfinite(p) & np.isfinite(t)
        p, t = p[ok], t[ok]
        if p.size < 3 or np.ptp(p) == 0 or np.ptp(t) == 0:
            r = rho = np.nan
        else:
            r, rho = pearsonr(p, t).statistic, spearmanr(p, t).statistic
        rmse = float(np.sqrt(np.mean((p - t) ** 2))) if p.size else np.nan
        rows.append((g, r, rho, rmse, float(t.mean()) if t.size else np.nan, float((t > 0).mean()) if t.size else np.nan))
    df = pd.DataFrame(rows, columns=["gene", "pearson", "spearman", "rmse", "mean_measured", "frac_detected"])
    return df.set_index("gene")


def _infer_rho(model, arrays, batch_size, device) -> np.ndarray:
    return model.infer(arrays, batch_size=batch_size, device=device, outputs=("rho",))["rho"]


_PREPARE_KEYS = ("image_key", "labels_key", "shapes_key", "table_key", "layer", "coordinate_system", "crops",
                 "allow_empty", "um_per_unit")


def _prepare(data, model, kw: dict, use_expression: bool = True):
    from ._fit import _prepare_for_model

    unknown = sorted(set(kw) - set(_PREPARE_KEYS))
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) {unknown}; the input is described by {list(_PREPARE_KEYS)}.")
    return _prepare_for_model(
        data, model, image_key=kw.get("image_key"), labels_key=kw.get("labels_key"),
        shapes_key=kw.get("shapes_key"), table_key=kw.get("table_key", Defaults.TABLE), layer=kw.get("layer"),
        coordinate_system=kw.get("coordinate_system"), crops=kw.get("crops"),
        allow_empty=kw.get("allow_empty", not use_expression), use_expression=use_expression,
        um_per_unit=kw.get("um_per_unit"),
    )


def _layer_for_table(table, genes: list[str], values: np.ndarray) -> np.ndarray:
    """``values`` (cells × model genes) laid out on the table's ``var`` (NaN for genes the model lacks)."""
    if list(table.var_names) == list(genes) and values.dtype == np.float32:
        return values  # the model's panel is the table's var: no copy
    idx = pd.Index(genes).get_indexer(table.var_names)
    out = np.full((table.n_obs, table.n_vars), np.nan, dtype=np.float32)
    has = idx >= 0
    out[:, has] = values[:, idx[has]]
    return out


def _new_table_like(table, x: np.ndarray, genes: list[str], uns: dict):
    """A table of ``x`` (cells × genes) annotating the same region / instances as ``table``; ``uns`` goes to
    its ``uns["spatia"]``."""
    from anndata import AnnData

    regions, region_key, instance_key = table_annotation(table)
    obs = pd.DataFrame(index=table.obs_names.copy())
    x = x if hasattr(x, "dask") else np.asarray(x, dtype=np.float32)  # a dask array stays lazy
    new = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    new.uns[Keys.UNS] = uns
    if region_key is not None:
        from spatialdata.models import TableModel

        new.obs[region_key] = table.obs[region_key].to_numpy()
        new.obs[instance_key] = table.obs[instance_key].to_numpy()
        new.obs[region_key] = new.obs[region_key].astype("category")
        new = TableModel.parse(new, region=regions if len(regions) > 1 else regions[0], region_key=region_key,
                               instance_key=instance_key)
    return new


def impute(
    data,
    model,
    *,
    reference=None,
    reference_layer: str | None = None,
    genes: list[str] | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    n_neighbors: int = 50,
    n_comps: int = 30,
    store: str | Path | None = None,
    backed: bool = False,
    validate: bool = False,
    key_added: str = Keys.IMPUTED,
    batch_size: int | None = None,
    device: str | None = None,
    random_state: int | None = 0,
    overwrite: bool = False,
    inplace: bool = True,
    **prepare_kwargs: Any,
):
    """Denoised expression of the panel genes, and genes outside the panel imputed from a reference.

    (a) **Panel genes**: the model's expected counts given the cell's (partly dropped-out) expression, its
    image and its niche; zeros that are technical dropouts get their expected value.
    (b) **Genes the panel did not measure** (``reference=`` a scRNA-seq AnnData of raw counts): the reference
    is cut into neighbourhoods (each reference cell pooled with its 15 nearest, in a PCA of the reference's
    most variable genes). Each cell takes the posterior-weighted mean of the other genes over the
    ``n_neighbors`` neighbourhoods most likely to have produced its counts of the shared genes (a multinomial
    likelihood at the cell's own depth, tempered for over-dispersion), with the model's denoised profile added
    as pseudo-counts worth one library of the cell. Unlike kNN in a PCA of normalised profiles, this weighs a
    40-count cell's evidence as what it is, which is where shallow panels lose most
    (``benchmarks/results/imputation.md``). Each shared gene's capture efficiency on the slide relative to the
    reference is estimated and corrected for; check the result with :func:`validate_imputation`.

    Parameters
    ----------
    data
        SpatialData (or AnnData with ``crops=``) the model can read (see :func:`spatia.tl.embed`).
    model
        Trained :class:`~spatia.SpatiaModel`.
    reference
        Optional scRNA-seq :class:`~anndata.AnnData` of raw counts sharing genes with the panel.
    reference_layer
        Layer of the reference's raw counts (``None``: ``X``).
    genes
        Reference genes to impute (default: all reference genes not in the panel).
    table_key, layer
        Table and counts layer of ``data``.
    n_neighbors, n_comps
        Reference neighbourhoods averaged per cell (the most likely ones), and PCA components of the
        reference's most variable genes in which its neighbourhoods are found. The defaults suit references of
        hundreds to hundreds of thousands of cells: an atlas beyond 50,000 cells is read through a seeded
        sample of 50,000, and beyond 5,000 neighbourhoods a seeded sample of them is scored.
    store
        A ``.zarr`` path for the table of reference genes: it is computed and written there block by block
        (about 64 MB at a time), and the table added to the SpatialData reads it lazily (its ``X`` is a dask
        array). Use it for whole-transcriptome references, whose cells × genes matrix would not fit in memory
        (20,000 genes for a million cells are 80 GB as float32); without it, a table larger than half the
        machine's memory is refused. An existing store is replaced only with ``overwrite=True``.
    backed
        Write the results into the zarr store the SpatialData was read from as they are computed: the panel
        layer block by block (the table's layer then reads it lazily, a dask array), and this run's
        ``uns`` entry and reference table (as :func:`write_results` does; with ``store=`` that table stays
        there). Use it when the layer does not fit in
        memory (a 5,000-gene panel over a million cells is 20 GB as float32; without it, a layer larger than
        half the machine's memory is refused) or to keep a long session's results on disk. The model's
        per-cell output is held in a temporary file beside the store while it runs (cells × panel genes × 4
        bytes of free disk). Needs ``sd.read_zarr(...)`` data whose table is in the store
        (``sdata.write(path)`` once first). Each key is written beside its place and renamed in, and the
        ``uns`` entry last: an interrupted run leaves no half-written key.
    validate
        Also run :func:`validate_imputation` (held-out genes) and record its per-gene scores.
    key_added
        Layer name for (a) and table name for (b).
    batch_size, device
        Inference settings.
    random_state
        Seed of the PCA (and of the sample of neighbourhoods of a large reference).
    overwrite
        Replace an existing ``key_added`` layer (and table); otherwise an existing one is a ``KeyError``.
    inplace
        Write into the data (return ``None``); with ``False`` write nothing and return the dict below.
    **prepare_kwargs
        ``image_key``, ``labels_key``, ``shapes_key``, ``coordinate_system``, ``crops``, ``allow_empty``,
        ``um_per_unit`` as in :func:`spatia.tl.embed` (any other name raises a ``TypeError``).

    Returns
    -------
    With ``inplace=True`` writes

    - ``table.layers['spatia_imputed']``: expected counts of each panel gene at the cell's library size
      (NaN for table genes that are not in the model's panel);
    - with ``reference``: ``sdata.tables['spatia_imputed']`` (cells × imputed genes, ``log1p`` of counts
      per 10,000 counts of the panel genes, i.e. on the scale of the cells' own normalised panel),
      annotating the same cells as the table;
    - ``table.uns['spatia']['impute']``: parameters, and with ``validate=True`` the per-gene scores of
      :func:`validate_imputation` (``["validation"]``: one list per column, ``gene`` included);

    and returns ``None``. With ``inplace=False``: ``{"layers/spatia_imputed": (cells, table genes) array,
    "tables/spatia_imputed": AnnData (with ``reference``), "params": run parameters}``.

    Examples
    --------
    >>> sp.tl.impute(sdata, model)
    >>> sp.tl.impute(sdata, model, reference=scrna, genes=["EPCAM", "VIM"])
    >>> scores = sp.tl.validate_imputation(sdata, model, reference=scrna)
    """
    from ..pp._elements import _is_sdata, get_table

    kw = dict(prepare_kwargs, table_key=table_key, layer=layer)
    # the reference is checked first: its errors name it (not the slide's table)
    ref = _reference_profiles(reference, reference_layer) if reference is not None else None
    if store is not None and reference is None:
        raise ValueError("store= holds the table of reference genes: pass reference= as well (the panel genes go "
                         "to a layer of the table).")
    paths = [f"layers/{key_added}"] + ([f"tables/{key_added}"] if reference is not None else [])
    cells_table = get_table(data, table_key)
    if inplace:
        if reference is not None and not _is_sdata(data):
            raise TypeError("Reference genes go to a new table, which needs a SpatialData: pass one, or "
                            "inplace=False to get the arrays.")
        _results.check_free(data, cells_table, paths, overwrite=overwrite)
    # the reference and the table's size are checked before the crops are prepared (minutes on a large slide)
    n_cells = cells_table.n_obs
    if reference is not None:
        ref_counts, ref_genes = ref
        shared = [g for g in model.genes if g in set(ref_genes)]
        if len(shared) < 5:
            raise ValueError(
                f"The reference shares {len(shared)} genes with the model's panel (need at least 5): "
                "check the gene naming (symbols vs Ensembl ids)."
            )
        panel = set(model.genes)
        targets = [g for g in ref_genes if g not in panel] if genes is None else list(genes)
        unknown = [g for g in targets if g not in set(ref_genes)]
        if unknown:
            raise KeyError(f"Genes not in the reference: {unknown[:10]}{'...' if len(unknown) > 10 else ''}.")
        if not targets:
            raise ValueError("No genes to impute: every reference gene is in the panel (pass genes=).")
        if store is None:
            _check_fits("The imputed table", n_cells, len(targets), "store='imputed.zarr' to write it to disk block "
                        "by block, or genes= to impute fewer genes.")
    if not backed:
        _check_fits("The imputed panel layer", n_cells, len(model.genes), _BACKED_FIX)
    group_dir = None
    if backed:
        group_dir = backed_table_dir(data, table_key, inplace=inplace,
                                     elements=[] if store is not None else paths[1:])
    validation = None
    if validate:  # before this run's arrays are laid out: its own inference holds its own
        validation = validate_imputation(data, model, reference=reference, reference_layer=reference_layer,
                                         table_key=table_key, layer=layer, n_neighbors=n_neighbors,
                                         n_comps=n_comps, batch_size=batch_size, device=device,
                                         random_state=random_state, **prepare_kwargs)
    prepared = _prepare(data, model, kw)
    table = prepared.table
    seed = seed_from(random_state)
    params = {"n_neighbors": n_neighbors, "n_comps": n_comps, "reference": reference is not None,
              "store": None if store is None else str(store), "backed": backed,
              "n_reference_genes": 0 if reference is None else len(targets),
              "missing_genes": prepared.missing_genes, "random_state": seed}
    if reference is not None:
        params["shared_genes"] = len(shared)
    if validation is not None:
        params["validation"] = {"gene": validation.index.tolist(),
                                **{c: validation[c].astype(float).tolist() for c in validation.columns}}
    lib = np.asarray(prepared.arrays.counts.sum(1)).ravel()
    results: dict[str, Any] = {}
    with spill_arrays(group_dir) as spill:
        rho = model.infer(prepared.arrays, batch_size=batch_size, device=device, outputs=("rho",), alloc=spill)["rho"]
        if reference is not None:
            mapping = _reference_map(prepared.arrays.counts, rho, model.genes, ref_counts, ref_genes, shared,
                                     targets, n_neighbors, n_comps, seed)
            if store is None:
                ref_new = mapping.all()
                np.log1p(ref_new, out=ref_new)
            else:
                ref_new = _lazy_log1p(mapping)  # computed while it is written to the store
            new = _new_table_like(table, ref_new, targets, {"impute": _results.params_entry("impute", params, paths)})
            if store is not None:  # written now, while rho is still the model's proportions
                new = _write_table_store(new, store, overwrite=overwrite)
            results[f"tables/{key_added}"] = new
        if group_dir is None:
            mu = rho
            mu *= lib[:, None]  # in place: one cells × genes array at a time
            del rho
            layer_value = _layer_for_table(table, model.genes, mu)
        else:
            from ._write import write_backed

            layer_value = write_backed(group_dir, "layers", key_added,
                                       _lazy_layer(rho, list(table.var_names), model.genes, _times_lib(lib)))
        results = {f"layers/{key_added}": layer_value, **results}
    if not inplace:
        return _results.returned("impute", results, params)
    _results.write(data, table, results, function="impute", params=params, overwrite=overwrite)
    if group_dir is not None:  # the reference table too, unless it has a store of its own (store=)
        from ._write import _write

        _write(data, table_key, None, ["impute"], with_elements=store is None)
    return None


def _lazy_layer(src: np.ndarray, var_names: list[str], genes: list[str], transform=None):
    """``src`` (cells × model genes, a memmap) laid out on the table's ``var`` (NaN for genes the model lacks) as
    a dask array of blocks of cells, each computed when it is written; ``transform(values, a, b)`` changes a
    block's rows ``a:b`` in place first (e.g. times the library sizes)."""
    from ._write import lazy_rows

    idx = pd.Index(genes).get_indexer(var_names)
    has = idx >= 0
    same = bool(has.all()) and np.array_equal(idx, np.arange(len(idx))) and len(idx) == src.shape[1]

    def block(a: int, b: int) -> np.ndarray:
        values = np.array(src[a:b], dtype=np.float32) if same else src[a:b][:, idx[has]]
        if transform is not None:
            transform(values, a, b)
        if same:
            return values
        out = np.full((b - a, len(var_names)), np.nan, dtype=np.float32)
        out[:, has] = values
        return out

    return lazy_rows(block, src.shape[0], len(var_names), block_bytes=_LAYER_BLOCK_BYTES, source=src)


_BACKED_FIX = "backed=True to write it into the slide's zarr store block by block."


def _check_fits(what: str, n_cells: int, n_genes: int, fix: str) -> None:
    """A ``MemoryError`` naming ``fix`` when a float32 cells × genes result would take more than half of this
    machine's memory: refused before any work, rather than run out of memory half-way."""
    size = 4.0 * n_cells * n_genes
    if size > _dense_limit_bytes():
        raise MemoryError(f"{what} ({n_cells:,} cells × {n_genes:,} genes) would take {size / 2**30:.1f} GiB in "
                          f"memory, more than half of this machine's: pass {fix}")


def _times_lib(lib: np.ndarray):
    def transform(values: np.ndarray, a: int, b: int) -> None:
        values *= lib[a:b, None]

    return transform


def _log_per_10k(values: np.ndarray, a: int, b: int) -> None:
    values *= 1e4
    np.log1p(values, out=values)


def validate_imputation(
    data,
    model,
    *,
    genes: list[str] | None = None,
    n_genes: int | None = None,
    n_folds: int = 5,
    reference=None,
    reference_layer: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    n_neighbors: int = 50,
    n_comps: int = 30,
    batch_size: int | None = None,
    device: str | None = None,
    random_state: int | None = 0,
    **prepare_kwargs: Any,
) -> pd.DataFrame:
    """Hide measured genes, predict them, and score each gene: which imputed genes can you trust?

    The held-out genes are split into ``n_folds`` groups; each group is removed from the input (from the
    cells' counts for the model, or from the shared genes for the reference mapping) and predicted from
    everything else. Predictions and measurements are compared on counts per 10,000 (the scale on which
    the model's expectation is unbiased; a log would penalise the expectation of shallow, mostly-zero
    counts).

    Parameters
    ----------
    data, model
        As in :func:`impute`.
    genes
        Measured genes to hold out (default: all model genes present in the table, or ``n_genes`` of the
        most expressed).
    n_genes
        Hold out only the ``n_genes`` most detected genes (faster).
    n_folds
        Groups of genes hidden together (each inference hides ~1/n_folds of the held-out genes).
    reference, reference_layer
        With a scRNA-seq reference, validate the reference imputation (shared genes held out of the
        mapping) instead of the model's panel imputation.
    table_key, layer, n_neighbors, n_comps, batch_size, device, random_state, **prepare_kwargs
        As in :func:`impute`.

    Returns
    -------
    :class:`~pandas.DataFrame` indexed by gene: ``pearson``, ``spearman``, ``rmse`` (of predicted vs
    measured counts per 10,000, over cells), ``mean_measured``, ``frac_detected``, and
    ``rmse_mean_baseline`` (predicting every cell with the gene's mean: a gene whose ``rmse`` is not
    below it is not imputed usefully).

    Examples
    --------
    >>> scores = sp.tl.validate_imputation(sdata, model, n_genes=20)
    >>> scores.sort_values("pearson", ascending=False).head()
    """
    kw = dict(prepare_kwargs, table_key=table_key, layer=layer)
    prepared = _prepare(data, model, kw)
    arrays = prepared.arrays
    counts = arrays.counts.tocsc()
    present = [g for g in model.genes if g not in set(prepared.missing_genes)]
    if reference is not None:
        ref_counts, ref_genes = _reference_profiles(reference, reference_layer)
        if genes is None:  # only genes both measured here and in the reference can be scored
            present = [g for g in present if g in set(ref_genes)]
    if genes is None:
        det = np.asarray((counts > 0).mean(0)).ravel()
        gi = pd.Index(model.genes).get_indexer(present)
        order = np.argsort(-det[gi], kind="stable")
        genes = [present[i] for i in order[: (n_genes or len(present))]]
    unknown = [g for g in genes if g not in set(present)]
    if unknown:
        raise KeyError(f"Genes not measured in the table (or not in the model): {unknown[:10]}.")
    if len(genes) == 0:
        raise ValueError("No genes to validate.")
    rng = np.random.default_rng(seed_from(random_state))
    groups = np.array_split(rng.permutation(len(genes)), max(1, min(n_folds, len(genes))))
    gidx = pd.Index(model.genes).get_indexer(genes)
    truth = cp10k(arrays.counts)[:, gidx]
    pred = np.zeros_like(truth)
    if reference is not None:
        shared_all = [g for g in model.genes if g in set(ref_genes) and g in set(present)]
        rho = _infer_rho(model, arrays, batch_size, device)
        missing_ref = [g for g in genes if g not in set(ref_genes)]
        if missing_ref:
            raise KeyError(f"Genes not in the reference: {missing_ref[:10]}.")
        for grp in groups:
            hidden = {genes[i] for i in grp}
            shared = [g for g in shared_all if g not in hidden]
            if len(shared) < 5:
                raise ValueError("Fewer than 5 shared genes left after hiding: use more folds or fewer genes.")
            # the model's input must not see the hidden genes either
            hid_cols = pd.Index(model.genes).get_indexer(list(hidden))
            rho_h = _infer_rho(model, _hide(arrays, hid_cols), batch_size, device) if len(hid_cols) else rho
            pred[:, grp] = _reference_impute(arrays.counts, rho_h, model.genes, ref_counts, ref_genes, shared,
                                             [genes[i] for i in grp], n_neighbors, n_comps, seed_from(random_state))
    else:
        for grp in groups:
            cols = gidx[grp]
            rho = _infer_rho(model, _hide(arrays, cols), batch_size, device)
            # proportions on the measured library: the hidden genes' share is predicted, the rest is known
            pred[:, grp] = rho[:, cols] * 1e4
    scores = _gene_scores(pred, truth, list(genes))
    scores["rmse_mean_baseline"] = np.sqrt(((truth - truth.mean(0)) ** 2).mean(0))
    return scores


def _hide(arrays, cols: np.ndarray):
    """A copy of ``arrays`` whose counts have the columns ``cols`` set to zero (the model never sees them)."""
    import dataclasses

    c = arrays.counts.tocsc(copy=True)
    for j in np.asarray(cols):
        c.data[c.indptr[j]:c.indptr[j + 1]] = 0
    c = sp_sparse.csr_matrix(c)
    c.eliminate_zeros()
    return dataclasses.replace(arrays, counts=c)


def predict_expression(
    data,
    model,
    *,
    method: Literal["readout", "decoder"] | None = None,
    use_niche: bool = True,
    table_key: str | None = Defaults.TABLE,
    key_added: str = Keys.PREDICTED,
    batch_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
    backed: bool = False,
    **prepare_kwargs: Any,
):
    """Expression predicted from the image alone: for slides (or cells) without expression.

    Every cell's expression is hidden; the model reads each cell's crop. Works on an H&E- or DAPI-only
    section whose table has no counts at all (only the cells). Two ways to read the crops:

    - ``"readout"`` (default when the model has one, which :func:`~spatia.tl.fit` trains): a map from the
      measured features of the crop (the nucleus's size, shape, intensity and chromatin texture; each
      channel's intensities around the centre) and the model's image-only cell embedding, fitted on the
      training cells. Per gene, it blends a ridge regression (trends, e.g. a gene that follows nuclear size)
      and a mixture of cell states (the probability of each state given the image times the state's mean
      expression: a marker that is on in one type and off in the others). The embedding's weight and each
      gene's blend were chosen on the training cells; ``model.readout.info`` says which it got. When the
      model's crops undersample the image, the nuclei are measured on finer crops cut from the image
      (``info["nucleus_crop"]``), so pass the SpatialData with its image. Measuring the nuclei costs about
      1 ms per cell on one CPU core (some 15 minutes for a million cells).
    - ``"decoder"``: the model's own expression decoder, from the image tokens and the neighbours' images
      (its image-only training passes, modality dropout). The generative path, and the only one for a model
      saved without a readout; on simulated slides it predicts held-out cells less well
      (``benchmarks/results/image_expression.md``).

    Parameters
    ----------
    data
        SpatialData with the image and the cells (segmentation or shapes) and a table of the cells.
    model
        Trained :class:`~spatia.SpatiaModel` with the image branch.
    method
        ``"readout"`` or ``"decoder"`` (above); ``None``: the readout when the model has one.
    use_niche
        ``"decoder"`` only: let the niche and tissue levels add context from neighbouring cells' images.
        ``False``: each cell's own crop only.
    table_key
        Table of the cells.
    key_added
        Layer (when the table's ``var`` holds the model's genes) or, otherwise, name of a new table
        annotating the same cells.
    batch_size, device
        Inference settings.
    overwrite
        Replace an existing ``key_added`` layer or table; otherwise an existing one is a ``KeyError``.
    inplace
        Write (return ``None``); with ``False`` write nothing and return the dict below.
    backed
        Write the prediction into the zarr store the SpatialData was read from as it is computed (the layer, or
        the new table), with this run's ``uns`` entry; the table then reads it lazily (a dask array), as
        :func:`impute` does with ``backed=True``. For cells × genes that do not fit in memory.
    **prepare_kwargs
        ``image_key``, ``labels_key``, ``shapes_key``, ``coordinate_system``, ``crops``, ``um_per_unit`` as in
        :func:`spatia.tl.embed`.

    Returns
    -------
    ``None``, writing log1p expression per 10,000 counts either to ``table.layers['spatia_predicted']``
    (table genes the model lacks are NaN) or to ``sdata.tables['spatia_predicted']``; the run parameters
    go to ``table.uns['spatia']['predict_expression']``. With ``inplace=False``: ``{"layers/spatia_predicted":
    (cells, table genes) array}`` (or ``{"tables/spatia_predicted": AnnData}``) and ``"params"``.

    Examples
    --------
    >>> sp.tl.predict_expression(dapi_only_sdata, model, image_key="morphology_focus")
    """
    if not model.config.image.enabled:
        raise ValueError("This model has no image branch: it cannot predict expression from images.")
    if method not in (None, "readout", "decoder"):
        raise ValueError(f"method must be 'readout', 'decoder' or None, got {method!r}.")
    if method == "readout" and model.readout is None:
        raise ValueError("This model has no image readout (saved before spatia had one, or not trained by "
                         "sp.tl.fit): pass method='decoder', or refit.")
    method = method or ("readout" if model.readout is not None else "decoder")
    from ..pp._elements import get_table

    kw = dict(prepare_kwargs, table_key=table_key)
    table = get_table(data, table_key)
    covered = pd.Index(model.genes).isin(table.var_names).all()
    path = f"layers/{key_added}" if covered else f"tables/{key_added}"
    if inplace:
        _results.check_free(data, table, [path], overwrite=overwrite)
    if not backed:
        _check_fits("The prediction", table.n_obs, len(model.genes), _BACKED_FIX)
    group_dir = (backed_table_dir(data, table_key, inplace=inplace, elements=[] if covered else [path])
                 if backed else None)
    prepared = _prepare(data, model, kw, use_expression=False)
    table = prepared.table
    arrays = prepared.arrays
    arrays.drop_expression = np.ones(arrays.n, dtype=bool)
    params = {"method": method, "use_niche": use_niche, "backed": backed}
    with spill_arrays(group_dir) as spill:
        if method == "readout":
            from ..model._readout import nucleus_store, readout_features

            nuclei, geometry = None, model.readout.info.get("nucleus_crop")
            if geometry is not None:  # the readout measures nuclei on its own crops, cut as when it was fitted
                if prepared.crop_kwargs is None or prepared.crop_kwargs.get("image_key") is None:
                    raise ValueError(
                        f"This model's image readout measures nuclei on {geometry['size']}-px crops over "
                        f"{geometry['crop_um']:g} µm cut from the image: pass the SpatialData with its image and "
                        "image_key= (not only crops=), or method='decoder'.")
                nuclei = nucleus_store(data, prepared, geometry)
            nucleus, emb = readout_features(model, arrays, batch_size=batch_size, device=device, nuclei=nuclei)
            out = None if spill is None else spill("pred", (arrays.n, len(model.genes)))
            pred = model.readout.predict(nucleus, emb, out=out)
            transform = None
        else:
            if not use_niche:
                arrays.nbr = np.full_like(arrays.nbr, -1)
                arrays.tile = np.arange(arrays.n)
            pred = model.infer(arrays, batch_size=batch_size, device=device, outputs=("rho",), alloc=spill)["rho"]
            transform = _log_per_10k  # float32 proportions → log1p per 10,000
            if spill is None:
                transform(pred, 0, len(pred))  # in place
        if spill is not None:  # block by block into the store, read lazily from there
            from ._write import write_backed

            lazy = _lazy_layer(pred, list(table.var_names) if covered else list(model.genes), model.genes,
                               transform)
            if covered:
                results = {path: write_backed(group_dir, "layers", key_added, lazy)}
            else:
                results = {path: _new_table_like(table, lazy, list(model.genes), {
                    "predict_expression": _results.params_entry("predict_expression", params, [path])})}
        elif covered:
            results = {path: _layer_for_table(table, model.genes, pred)}
        else:
            results = {path: _new_table_like(table, pred, list(model.genes), {
                "predict_expression": _results.params_entry("predict_expression", params, [path])})}
        if not inplace:
            return _results.returned("predict_expression", results, params)
        _results.write(data, table, results, function="predict_expression", params=params, overwrite=overwrite)
        if spill is not None:
            from ._write import _write

            _write(data, table_key, None, ["predict_expression"])  # a new table is written from the spill here
            if not covered:  # then read from the store, not from the spill (removed on leaving this block)
                import dask.array as da

                data.tables[key_added].X = da.from_zarr(str(Path(data.path) / "tables" / key_added), component="X")
    return None
