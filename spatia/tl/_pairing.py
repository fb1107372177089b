"""``sp.tl.pair_states``: entropic optimal-transport pairing of source-state and target-state cells.

No cell is observed before and after a change of state, so each source cell is paired with the target cell
that an entropic OT plan (Sinkhorn, POT) on expression sends it to. The pairing drives the flow model
(:func:`spatia.tl.fit_transition`) and can be inspected on its own.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp_sparse

from .. import _results
from .._constants import Defaults, Keys
from .._results import sanitize
from .._utils import progress, seed_from
from ..pp._elements import get_table
from ._pairing_ot import _cluster_masses, _composition_labels, _lognorm, _pca, _shift_test, _sinkhorn_match

logger = logging.getLogger(__name__)


@dataclass
class PairResult:
    """The pairing of one ``source -> target`` transition (see :func:`~spatia.tl.pair_states`).

    Attributes
    ----------
    name
        ``"source->target"``.
    source_obs, target_obs
        ``obs_names`` of the source cells (rows of the plan) and of the target cells.
    source_rows, target_rows
        Their row positions in the source and target tables.
    match
        ``(n_source,)`` index into ``target_obs`` of each source cell's hard match (argmax of its plan row).
    confidence
        ``(n_source,)`` plan entry of the match divided by the row mass: 1 = certain, ``1 / n_target`` =
        uniform over the targets it could be sent to.
    stratum
        ``(n_source,)`` niche the cell was paired within, or ``"global"``.
    delta_g
        Mean log-normalised expression shift (matched target − source) per shared gene.
    delta_m
        Mean morphology-feature shift per feature (empty without crops).
    delta_m_std
        ``delta_m`` divided by the pooled standard deviation of each feature (unitless; the flow's input).
    source_features, target_features
        The 10 morphology features of each source and target cell (``None`` without crops).
    source_pcs
        ``(n_source, n_pcs)`` principal components of the source cells (the cost's space).
    info
        Parameters and summary numbers (written to ``uns``).

    Examples
    --------
    >>> res = sp.tl.pair_states(sdata, groupby="condition", source="control", target="disease", inplace=False)
    >>> res.confidence[:5], res.delta_m
    """

    name: str
    source_obs: np.ndarray
    target_obs: np.ndarray
    source_rows: np.ndarray
    target_rows: np.ndarray
    match: np.ndarray
    confidence: np.ndarray
    stratum: np.ndarray
    delta_g: pd.Series
    delta_m: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    delta_m_std: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    info: dict = field(default_factory=dict)
    source_features: pd.DataFrame | None = field(default=None, repr=False)
    target_features: pd.DataFrame | None = field(default=None, repr=False)
    source_pcs: np.ndarray | None = field(default=None, repr=False)

    @property
    def matched_obs(self) -> np.ndarray:
        """``obs_names`` of each source cell's matched target cell."""
        return self.target_obs[self.match]

    def shift_test(self, n_neighbors: int = Defaults.SHIFT_NEIGHBORS) -> pd.DataFrame:
        """Is the morphology of each source cell's neighbourhood shifted by the pairing?

        For every source cell, the ``n_neighbors`` source cells nearest to it in the pairing's expression
        space (itself included) and their matched targets: the mean of their morphology shifts (matched
        target − source, the 10 features of :func:`spatia.metrics.morphology_features` divided by their
        pooled standard deviation) is tested against zero with a χ² test, its covariance estimated from
        the shifts' spread around their neighbourhood means (pooled over all cells, so correlated
        features count once). A small p-value: cells like this one change shape or stain under the
        transition; a large one: their matches look like them, as for cell types the transition leaves
        alone (:func:`spatia.tl.transition` returns those crops unchanged).

        Parameters
        ----------
        n_neighbors
            Cells per neighbourhood (capped at the number of source cells); more cells detect smaller
            shifts but blur the boundaries between cell types.

        Returns
        -------
        DataFrame indexed by ``source_obs`` with ``shift_stat`` (the χ² statistic), ``shift_df`` (its degrees
        of freedom) and ``shift_pvalue``.

        Examples
        --------
        >>> res = sp.tl.pair_states(sdata, groupby="condition", source="control", target="disease",
        ...                         inplace=False)
        >>> (res.shift_test()["shift_pvalue"] < 0.01).mean()  # fraction of control cells that change
        """
        if self.source_features is None or self.target_features is None or self.source_pcs is None:
            raise ValueError("This pairing has no morphology features: pair with crops (a SpatialData with an "
                             "image, or crops=).")
        if n_neighbors < 2:
            raise ValueError(f"n_neighbors must be at least 2, got {n_neighbors}.")
        fs = self.source_features.to_numpy(np.float64)
        ft = self.target_features.to_numpy(np.float64)
        stat, df, p = _shift_test(self.source_pcs, fs, ft[self.match], n_neighbors)
        return pd.DataFrame({"shift_stat": stat, "shift_df": df, "shift_pvalue": p},
                            index=pd.Index(self.source_obs, name=None))

    def to_uns(self) -> dict:
        """The entry written to ``uns['spatia']['transitions'][name]`` (plain types only)."""
        out = dict(self.info)
        out["delta_g"] = {str(k): float(v) for k, v in self.delta_g.items()}
        out["delta_m"] = {str(k): float(v) for k, v in self.delta_m.items()}
        out["delta_m_std"] = {str(k): float(v) for k, v in self.delta_m_std.items()}
        return out


def _group_rows(table, groupby: str, group: str, *, role: str, min_cells: int) -> np.ndarray:
    if groupby not in table.obs:
        raise KeyError(f"No obs column {groupby!r} in the table; available columns: {list(table.obs.columns)}.")
    col = table.obs[groupby]
    values = col.astype(str).where(col.notna(), None)
    available = sorted({str(v) for v in col.dropna().unique()})
    if str(group) not in available:
        raise KeyError(f"The {role} group {group!r} is not in obs[{groupby!r}]; available groups: {available}.")
    rows = np.flatnonzero((values == str(group)).to_numpy())
    if len(rows) < min_cells:
        raise ValueError(
            f"The {role} group {group!r} of obs[{groupby!r}] has {len(rows)} cells; pairing needs at least "
            f"min_cells={min_cells}: merge groups or lower min_cells."
        )
    return rows


def _features(crops, rows: np.ndarray, channel: int) -> pd.DataFrame | None:
    from ..metrics import morphology_features

    if crops is None:
        return None
    imgs = crops.get(rows) if hasattr(crops, "get") else np.asarray(crops)[rows]
    return morphology_features(np.asarray(imgs, dtype=np.float32) / 255.0, channel=channel)


def _match(zs, zt, lab_s, lab_t, niches, *, scale, epsilon, max_iter, reg_m, min_cells):
    """Each source cell's match, confidence and stratum: within the niches both sides share with at least
    ``min_cells`` cells each (``niches``: the source and target cells' niche labels), the rest globally."""
    ns = len(zs)
    match = np.full(ns, -1, dtype=np.int64)
    conf = np.zeros(ns)
    stratum = np.full(ns, "global", dtype=object)
    strata_used: list[str] = []
    if niches is not None:
        ns_lab, nt_lab = niches
        for lab in progress(sorted(set(ns_lab) & set(nt_lab)), desc="pairing niches", unit="niche"):
            si, ti = np.flatnonzero(ns_lab == lab), np.flatnonzero(nt_lab == lab)
            if len(si) < min_cells or len(ti) < min_cells:
                continue
            m, c = _sinkhorn_match(zs[si], zt[ti], scale, epsilon, max_iter, reg_m,
                                   b=_cluster_masses(lab_s[si], lab_t[ti]))
            match[si], conf[si], stratum[si] = ti[m], c, lab
            strata_used.append(lab)
    rest = np.flatnonzero(match < 0)
    if len(rest):
        m, c = _sinkhorn_match(zs[rest], zt, scale, epsilon, max_iter, reg_m, b=_cluster_masses(lab_s[rest], lab_t))
        match[rest], conf[rest] = m, c
    return match, conf, stratum, strata_used


def _morphology_shift(fs: pd.DataFrame | None, ft: pd.DataFrame | None, match: np.ndarray):
    """Mean morphology-feature shift of the pairs, raw and divided by each feature's pooled standard deviation
    (empty without features)."""
    if fs is None or ft is None:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    d = ft.to_numpy()[match] - fs.to_numpy()
    with warnings.catch_warnings():  # a feature NaN in every pair (no foreground anywhere) stays NaN → 0
        warnings.simplefilter("ignore", RuntimeWarning)
        delta_m = pd.Series(np.nanmean(np.where(np.isfinite(d), d, np.nan), 0), index=fs.columns)
    pooled = pd.concat([fs, ft]).std()
    return delta_m.fillna(0.0), (delta_m / pooled.where(pooled > 0)).fillna(0.0)


def compute_pairing(
    source_table,
    target_table,
    source_rows: np.ndarray,
    target_rows: np.ndarray,
    *,
    name: str,
    layer: str | None = None,
    n_pcs: int = 50,
    epsilon: float = 0.05,
    max_iter: int = 1000,
    niche_key: str | None = None,
    min_cells: int = 10,
    reg_m: float | None = None,
    marginals: str = "composition",
    source_crops=None,
    target_crops=None,
    channel: int = 0,
    random_state: int | None = 0,
) -> PairResult:
    """Pair ``source_rows`` of ``source_table`` with ``target_rows`` of ``target_table`` (no writing)."""
    from ..pp._expression import get_counts

    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}.")
    if reg_m is not None and reg_m <= 0:
        raise ValueError(f"reg_m must be positive or None (balanced), got {reg_m}.")
    if marginals not in ("composition", "uniform"):
        raise ValueError(f"marginals must be 'composition' or 'uniform', got {marginals!r}.")
    genes_s = source_table.var_names.astype(str)
    genes_t = target_table.var_names.astype(str)
    shared = genes_s.intersection(genes_t, sort=False) if source_table is not target_table else genes_s
    if len(shared) == 0:
        raise ValueError(
            "The source and target tables share no genes (var_names): pair cells measured on the same panel "
            "or rename the genes to a common naming (symbols vs Ensembl ids)."
        )
    cs = get_counts(source_table, layer, allow_empty=True)[source_rows][:, genes_s.get_indexer(shared)]
    ct = get_counts(target_table, layer, allow_empty=True)[target_rows][:, genes_t.get_indexer(shared)]
    x = _lognorm(sp_sparse.vstack([cs, ct], format="csr"))
    seed = seed_from(random_state)
    z = _pca(x, n_pcs, seed)
    ns = len(source_rows)
    zs, zt = z[:ns], z[ns:]
    # one cost scale for every stratum: the median squared distance over the whole problem (on a sample)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, ns, 4000)
    j = rng.integers(0, len(zt), 4000)
    scale = float(np.median(((zs[i] - zt[j]) ** 2).sum(1)))
    scale = scale if scale > 0 else 1.0
    if marginals == "composition":
        lab_s, lab_t = _composition_labels(zs, zt, Defaults.PAIR_NEIGHBORS, seed)
    else:
        lab_s, lab_t = np.zeros(ns, int), np.zeros(len(zt), int)
    niches = None
    if niche_key is not None:
        for t, role in ((source_table, "source"), (target_table, "target")):
            if niche_key not in t.obs:
                raise KeyError(f"No obs column {niche_key!r} (niche_key) in the {role} table; run "
                               "`sp.tl.cluster(..., level='niche')` first or pass niche_key=None.")
        niches = (source_table.obs[niche_key].astype(str).to_numpy()[source_rows],
                  target_table.obs[niche_key].astype(str).to_numpy()[target_rows])
    match, conf, stratum, strata_used = _match(zs, zt, lab_s, lab_t, niches, scale=scale, epsilon=epsilon,
                                               max_iter=max_iter, reg_m=reg_m, min_cells=min_cells)
    xd = x.toarray()
    delta_g = pd.Series((xd[ns:][match] - xd[:ns]).mean(0), index=shared.to_numpy())
    fs = _features(source_crops, source_rows, channel)
    ft = _features(target_crops, target_rows, channel)
    delta_m, delta_m_std = _morphology_shift(fs, ft, match)
    info = {
        "source": name.split("->")[0], "target": name.split("->")[1], "epsilon": float(epsilon),
        "n_pcs": int(z.shape[1]), "cost": "squared euclidean / median", "cost_scale": scale,
        "max_iter": int(max_iter), "reg_m": None if reg_m is None else float(reg_m), "marginals": marginals,
        "n_clusters": int(len(np.unique(lab_s))), "n_source": int(ns),
        "n_target": int(len(target_rows)), "n_pairs": int(ns),
        "n_unique_targets": int(len(np.unique(match))), "mean_confidence": float(conf.mean()),
        "uniform_confidence": float(1.0 / len(target_rows)),
        "pairing": "niche-stratified" if strata_used else "global",
        "niches": strata_used, "n_global": int((stratum == "global").sum()), "n_shared_genes": int(len(shared)),
    }
    return PairResult(
        name=name, source_obs=source_table.obs_names.to_numpy()[source_rows],
        target_obs=target_table.obs_names.to_numpy()[target_rows], source_rows=source_rows,
        target_rows=target_rows, match=match, confidence=conf, stratum=stratum.astype(str), delta_g=delta_g,
        delta_m=delta_m, delta_m_std=delta_m_std, info=info, source_features=fs, target_features=ft,
        source_pcs=zs,
    )


def _crops_of(data, table_key, crops, image_key, crop_size, crop_um, um_per_unit=None):
    from ..pp._crops import crops_for
    from ..pp._elements import _is_sdata

    if crops is not None or not (_is_sdata(data) and len(data.images)):
        if crops is None:
            return None
        if isinstance(crops, np.ndarray):
            return crops
        return crops_for(data, crops, table_key=table_key)
    return crops_for(data, None, table_key=table_key, image_key=image_key, size=crop_size, crop_um=crop_um,
                     um_per_unit=um_per_unit)


def pair_states(
    data,
    *,
    groupby: str,
    source: str,
    target: str,
    target_data=None,
    table_key: str | None = Defaults.TABLE,
    target_table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    n_pcs: int = 50,
    epsilon: float = 0.05,
    max_iter: int = 1000,
    niche_key: str | None = None,
    min_cells: int = 10,
    reg_m: float | None = None,
    marginals: str = "composition",
    crops=None,
    image_key: str | None = None,
    crop_size: int = Defaults.CROP_SIZE,
    crop_um: float | None = Defaults.CROP_UM,
    um_per_unit: float | None = None,
    channel: int = 0,
    shift_neighbors: int = Defaults.SHIFT_NEIGHBORS,
    random_state: int | None = 0,
    key_added: str = Keys.PAIR,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Pair source-state with target-state cells by entropic optimal transport on expression.

    The cells of both groups are log-normalised together (:func:`scanpy.pp.normalize_total`,
    :func:`scanpy.pp.log1p`) and projected on their ``n_pcs`` principal components (:func:`scanpy.pp.pca`).
    The cost between a source and a target cell is their squared Euclidean distance divided by the median
    of all such costs, so ``epsilon`` means the same on any dataset (0.05: sharp, 1: nearly uniform).
    POT's log-domain Sinkhorn (``ot.bregman.sinkhorn_log``, stable at small ``epsilon``) gives the plan
    (the cells' masses: ``marginals``); each source cell's **hard match** is the argmax of its row and its
    **confidence** is that entry divided by the row mass (1 = certain, ``1 / n_target`` = uniform). With
    ``niche_key``, cells are paired within each niche cluster where both groups have at least ``min_cells``
    cells, and the rest globally (against all target cells).

    Per transition, ``Δg`` is the mean expression shift (log-normalised, matched target − source) per gene
    and ``Δm`` the mean shift of the 10 morphology features of :func:`spatia.metrics.morphology_features`
    (when crops are available).

    Parameters
    ----------
    data
        AnnData or SpatialData with the source cells (and the target cells unless ``target_data``).
    groupby
        ``obs`` column holding the states (e.g. ``"condition"``).
    source, target
        Group names in ``obs[groupby]``.
    target_data
        Another AnnData / SpatialData holding the target cells (another slide); genes are matched by name.
    table_key, target_table_key
        Tables when the inputs are SpatialData.
    layer
        Layer with raw counts (``None``: ``X``).
    n_pcs
        Principal components of the cost.
    epsilon
        Entropic regularisation, relative to the median cost.
    max_iter
        Sinkhorn iterations at most.
    niche_key
        ``obs`` column of niche clusters (e.g. ``"spatia_niche"`` from :func:`spatia.tl.cluster`) to pair
        within; ``None`` pairs globally.
    min_cells
        Fewest cells a group (and a group within a niche) must have.
    reg_m
        ``None`` (default): balanced OT, every source and target cell carries the same mass. A positive
        number: unbalanced OT (``ot.unbalanced.sinkhorn_unbalanced``), the marginals only held by a KL
        penalty of weight ``reg_m`` (relative to the median cost, like ``epsilon``), so cell types whose
        proportions differ between the groups need not send mass to other types (0.3: mild, 0.1: strong).
    marginals
        The masses the plan gives the cells. ``"composition"`` (default): every source cell weighs the same,
        and the target cells are weighted so that each expression cluster of the source cells keeps its share
        of the mass on the target side (Leiden clusters of the source cells; each target cell joins the
        cluster most common among its 15 nearest source cells). When a cell type is more common in one state
        than in the other, the plan then need not send its excess to other types, while cells of a type that
        changed expression still reach their own type. ``"uniform"``: every cell weighs the same (plain
        balanced OT), for groups of the same composition. Within niches the shares are those of the niche's
        source cells. With ``reg_m`` these are the masses the KL penalty holds the plan to.
    crops
        :class:`~spatia.pp.CropStore` of the table's cells for ``Δm``; by default extracted from the
        SpatialData's image (``image_key``, ``crop_size`` px over ``crop_um`` µm); an AnnData without
        crops gets no ``Δm``.
    image_key, crop_size, crop_um
        Crop extraction when ``crops`` is ``None``.
    um_per_unit
        µm per unit of ``data``'s coordinate system, as in :func:`spatia.tl.fit` (``target_data``'s units are
        found on their own).
    channel
        Crop channel measured for ``Δm`` (0: the nuclear stain).
    shift_neighbors
        Cells per neighbourhood of the morphology-shift test (:meth:`PairResult.shift_test`).
    random_state
        Seed of the PCA.
    key_added
        Prefix of the ``obs`` columns.
    overwrite
        Replace the columns of an earlier pairing with the same ``key_added``; otherwise they are a
        ``KeyError``.
    inplace
        Write into the (source) table and return ``None``; with ``False`` write nothing and return the dict
        below.

    Returns
    -------
    ``None``, writing into the source table:

    - ``obs[f"{key_added}_match"]``: ``obs_name`` of each source cell's matched target cell (NaN elsewhere);
    - ``obs[f"{key_added}_confidence"]``: its confidence (NaN elsewhere);
    - ``obs[f"{key_added}_shift_pvalue"]``: p-value of the morphology shift of the cell's neighbourhood to
      its matches (:meth:`PairResult.shift_test`; small = cells like this one change under the transition;
      only with crops);
    - ``uns['spatia']['transitions'][f"{source}->{target}"]``: ``delta_g`` (gene → shift), ``delta_m``
      and ``delta_m_std`` (feature → shift), ``epsilon``, ``n_pairs``, ``pairing`` (``"global"`` or
      ``"niche-stratified"``), ``mean_confidence``, ``uniform_confidence`` and the other parameters;
    - ``uns['spatia']['pair_states']``: the run parameters.

    With ``inplace=False``: ``{"obs/spatia_pair_match": ..., "obs/spatia_pair_confidence": ...,
    "obs/spatia_pair_shift_pvalue": ... (arrays over the table's cells), "uns/spatia/transitions/<name>": ...,
    "params": ..., "pairing": PairResult}``; the :class:`PairResult` holds the plan's matches, features and
    the shift test.

    Examples
    --------
    >>> sp.tl.pair_states(sdata, groupby="condition", source="control", target="disease")
    >>> obs = sdata["table"].obs
    >>> obs.loc[obs["condition"] == "control", ["spatia_pair_match", "spatia_pair_confidence"]]
    """
    if min_cells < 2:
        raise ValueError(f"min_cells must be at least 2, got {min_cells}.")
    if shift_neighbors < 2:
        raise ValueError(f"shift_neighbors must be at least 2, got {shift_neighbors}.")
    st = get_table(data, table_key)
    tt = st if target_data is None else get_table(target_data, target_table_key)
    srows = _group_rows(st, groupby, source, role="source", min_cells=min_cells)
    trows = _group_rows(tt, groupby, target, role="target", min_cells=min_cells)
    if target_data is None and source == target:
        raise ValueError(f"source and target are the same group {source!r}.")
    columns = [f"obs/{key_added}_{c}" for c in ("match", "confidence", "shift_pvalue")]
    if inplace:
        _results.check_free(data, st, columns, overwrite=overwrite)
    sc_ = _crops_of(data, table_key, crops, image_key, crop_size, crop_um, um_per_unit)
    tc_ = sc_ if target_data is None else _crops_of(target_data, target_table_key, None, image_key, crop_size, crop_um)
    res = compute_pairing(
        st, tt, srows, trows, name=f"{source}->{target}", layer=layer, n_pcs=n_pcs, epsilon=epsilon,
        max_iter=max_iter, niche_key=niche_key, min_cells=min_cells, reg_m=reg_m, marginals=marginals,
        source_crops=sc_, target_crops=tc_, channel=channel, random_state=random_state,
    )
    res.info["groupby"] = groupby
    shift = res.shift_test(shift_neighbors) if res.source_features is not None else None
    if shift is not None:
        res.info["shift_neighbors"] = int(shift_neighbors)
        res.info["n_shifted"] = int((shift["shift_pvalue"] < Defaults.SHIFT_ALPHA).sum())
    logger.info("Paired %d %r cells with %d %r cells (%s, mean confidence %.3f, uniform %.3f%s).",
                len(srows), source, len(trows), target, res.info["pairing"], res.info["mean_confidence"],
                res.info["uniform_confidence"],
                "" if shift is None else f"; {res.info['n_shifted']} source cells with a significant morphology shift")
    match = pd.Series(np.nan, index=st.obs_names, dtype=object)
    match.iloc[srows] = res.matched_obs
    conf = np.full(st.n_obs, np.nan)
    conf[srows] = res.confidence
    results = {columns[0]: match.to_numpy(), columns[1]: conf}
    if shift is not None:
        pv = np.full(st.n_obs, np.nan)
        pv[srows] = shift["shift_pvalue"].to_numpy()
        results[columns[2]] = pv
    results[f"uns/{Keys.UNS}/{Keys.TRANSITIONS}/{res.name}"] = sanitize(res.to_uns())
    params = {"groupby": groupby, "source": source, "target": target, "table_key": table_key,
              "target_table_key": None if target_data is None else target_table_key, "layer": layer,
              "n_pcs": n_pcs, "epsilon": epsilon, "max_iter": max_iter, "niche_key": niche_key,
              "min_cells": min_cells, "reg_m": reg_m, "marginals": marginals, "channel": channel,
              "shift_neighbors": shift_neighbors, "random_state": seed_from(random_state)}
    if not inplace:
        return _results.returned("pair_states", results, params, pairing=res)
    if shift is None and f"{key_added}_shift_pvalue" in st.obs:  # an earlier test would not match these pairs
        del st.obs[f"{key_added}_shift_pvalue"]
    _results.write(data, st, results, function="pair_states", params=params, overwrite=overwrite)
    return None


__all__ = ["pair_states", "PairResult", "compute_pairing"]
