"""The numerical steps of the pairing: expression space, entropic OT matches with cluster-composition
masses, and the χ² test of neighbourhoods' morphology shifts."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp_sparse


def _lognorm(counts: sp_sparse.csr_matrix) -> sp_sparse.csr_matrix:
    """``log1p`` of counts scaled to the median library size (scanpy's ``normalize_total`` default)."""
    import scanpy as sc
    from anndata import AnnData

    a = AnnData(sp_sparse.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return sp_sparse.csr_matrix(a.X)


def _pca(x: sp_sparse.csr_matrix, n_pcs: int, seed: int) -> np.ndarray:
    import scanpy as sc
    from anndata import AnnData

    n_comps = int(min(n_pcs, x.shape[0] - 1, x.shape[1] - 1))
    if n_comps < 1:
        return np.asarray(x.todense(), dtype=np.float64)
    a = AnnData(x)
    sc.pp.pca(a, n_comps=n_comps, random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float64)


def _composition_labels(zs: np.ndarray, zt: np.ndarray, n_neighbors: int, seed: int):
    """Expression clusters of the source cells and the cluster each target cell falls in.

    The source cells are clustered by Leiden (resolution 1) on their ``n_neighbors``-nearest-neighbour graph
    in ``zs``; each target cell joins the cluster most common among its ``n_neighbors`` nearest source cells
    (ties: the nearest one's).
    """
    from ._cluster import knn_vote, leiden_codes

    ns = len(zs)
    k = int(min(n_neighbors, ns - 1))
    if k < 2:  # too few cells to cluster: one cluster
        return np.zeros(ns, int), np.zeros(len(zt), int)
    lab_s = leiden_codes(zs, n_neighbors=k, resolution=1.0, seed=seed)
    return lab_s, knn_vote(zs, lab_s, zt, n_neighbors=k, seed=seed)


def _cluster_masses(lab_s: np.ndarray, lab_t: np.ndarray) -> np.ndarray:
    """Target masses (sum 1) giving each cluster the share it has among the source cells ``lab_s``, spread
    evenly over its target cells; uniform when no target falls in a source cluster."""
    n = int(max(lab_s.max(), lab_t.max())) + 1
    share = np.bincount(lab_s, minlength=n) / len(lab_s)
    count = np.bincount(lab_t, minlength=n)
    b = share[lab_t] / count[lab_t]
    return b / b.sum() if b.sum() > 0 else np.full(len(lab_t), 1.0 / len(lab_t))


def _sinkhorn_match(xs: np.ndarray, xt: np.ndarray, scale: float, epsilon: float, max_iter: int,
                    reg_m: float | None = None, b: np.ndarray | None = None):
    """Hard match and confidence of each source row under the entropic plan between ``xs`` and ``xt``.

    Cost = squared Euclidean distance divided by ``scale`` (the median of the whole problem's costs), so
    ``epsilon`` is relative to a typical cost whatever the dataset. ``reg_m``: ``None`` = balanced OT
    (uniform marginals); a number = unbalanced OT, the marginals held by a KL penalty of that weight.
    ``b``: the target cells' masses (normalised here; ``None`` = uniform).
    """
    import ot

    if b is not None and (np.asarray(b) <= 0).any():  # massless targets cannot be matched: leave them out
        keep = np.flatnonzero(np.asarray(b) > 0)
        m, c = _sinkhorn_match(xs, xt[keep], scale, epsilon, max_iter, reg_m, np.asarray(b)[keep])
        return keep[m], c
    cost = ot.dist(xs, xt, metric="sqeuclidean") / scale
    a = np.full(len(xs), 1.0 / len(xs))
    b = np.full(len(xt), 1.0 / len(xt)) if b is None else np.asarray(b, dtype=np.float64) / np.sum(b)
    if reg_m is None:
        plan = ot.bregman.sinkhorn_log(a, b, cost, reg=epsilon, numItermax=max_iter, stopThr=1e-9)
    else:
        with warnings.catch_warnings():  # POT warns on slow convergence; the plan is checked below
            warnings.simplefilter("ignore", UserWarning)
            plan = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg=epsilon, reg_m=float(reg_m),
                                                     method="sinkhorn_stabilized", numItermax=max_iter,
                                                     stopThr=1e-9)
    plan = np.asarray(plan, dtype=np.float64)
    if not np.isfinite(plan).all() or plan.sum() <= 0:
        raise ValueError(f"Sinkhorn did not converge to a valid plan (epsilon={epsilon}): increase epsilon.")
    row = plan.sum(1, keepdims=True)
    match = plan.argmax(1)
    conf = plan[np.arange(len(xs)), match] / np.maximum(row[:, 0], 1e-300)
    return match, conf


def _shift_test(coords: np.ndarray, fs: np.ndarray, ft: np.ndarray, k: int):
    """χ² test of the mean morphology shift ``ft − fs`` over each row's ``k`` nearest rows of ``coords``."""
    from scipy import stats
    from sklearn.neighbors import NearestNeighbors

    n, f = fs.shape
    k = int(min(k, n))
    both = np.concatenate([fs, ft])
    with warnings.catch_warnings():  # all-NaN features (no foreground anywhere) → 0
        warnings.simplefilter("ignore", RuntimeWarning)
        mu, sd = np.nanmean(both, 0), np.nanstd(both, 0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    d = np.nan_to_num((ft - mu) / sd) - np.nan_to_num((fs - mu) / sd)
    idx = NearestNeighbors(n_neighbors=k).fit(coords).kneighbors(coords, return_distance=False)
    # neighbourhood means in chunks (no (n, k, f) array: memory stays O(n·k) on large slides)
    step = max(1, 2**22 // (k * f))
    dbar = np.concatenate([d[idx[i:i + step]].mean(1) for i in range(0, n, step)])
    # pooled covariance of the shifts around their neighbourhood means:
    # Σ_i Σ_{j∈N(i)} (d_j − d̄_i)(d_j − d̄_i)ᵀ = Σ_j c_j d_j d_jᵀ − k Σ_i d̄_i d̄_iᵀ,
    # with c_j the number of neighbourhoods holding j
    c = np.bincount(idx.ravel(), minlength=n).astype(np.float64)
    scatter = (d * c[:, None]).T @ d - k * (dbar.T @ dbar)
    cov = scatter / max(n * (k - 1), 1)  # each neighbourhood's mean costs one degree of freedom
    w, v = np.linalg.eigh(cov)
    keep = w > max(w.max(), 0.0) * 1e-6
    if not keep.any():  # no feature varies: nothing can be shifted
        return np.zeros(n), 0, np.ones(n)
    proj = dbar @ (v[:, keep] / np.sqrt(w[keep]))
    stat = k * (proj ** 2).sum(1)
    dof = int(keep.sum())
    return stat, dof, stats.chi2.sf(stat, dof)
