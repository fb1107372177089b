"""spatia's predictive tasks beside the methods users would otherwise pick, in one run on the same data.

    python benchmarks/tasks.py --cells 2400 --seeds 0 1 2 --epochs 30 --out benchmarks/results/tasks.md

For each seed, ``sp.datasets.simulate_with_reference`` gives a shallow panel slide (the left half of a
simulated tissue: 60 % of the genes, about 40 counts per cell) and a deep whole-transcriptome reference
(the right half). Then:

- **annotation** (paper protocol): logistic-regression linear probe on frozen features, 80/20 split (3 splits
  per seed), macro-F1 and macro-precision on cell types; features: ``X_spatia_cell`` vs PCA with as many
  components, computed as scanpy users do (``normalize_total``, ``log1p``, ``sc.pp.pca``); and scANVI (scvi-tools, default settings, 80 % of labels);
- **annotation, label-aware**: spatia given what scANVI is given: ``sp.tl.fit(cell_type_key=...)`` with the
  labels of scANVI's 80 % training split (test cells NaN), then ``sp.tl.annotate`` (probe fitted on those
  labels only), scored on the same 20 % test split as scANVI;
- **clustering**: Leiden over a resolution sweep (best ARI / NMI) on ``X_spatia_cell`` vs PCA for cell types,
  and, for tissue domains, on ``X_spatia_niche`` (raw, and averaged over each cell's ``niche.k`` nearest
  cells as ``sp.tl.cluster(level="niche")`` does by default) vs neighbourhood-averaged expression (PCA of the
  mean log-expression of each cell's 10 or 20 nearest cells);
- **imputation** of the genes the panel did not measure, from the reference: median per-gene Pearson of
  ``sp.tl.impute(reference=...)`` vs gimVI (scvi-tools), Tangram (cells mode) and kNN regression on the raw
  (not denoised) profile, all against the simulated true counts of those genes;
- **image → expression**: a model fitted on the top half of the slide predicts the bottom half's expression
  from images alone (``sp.tl.predict_expression``), vs ridge regression on squidpy image features
  (summary + histogram + texture) of the same crops, trained on the top half; mean per-gene Pearson over the
  10 most variable genes and over all genes.

Wall time is reported per method. Prints a markdown table (mean ± sd over seeds) and writes it to --out.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings
from collections import defaultdict

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")
RESOLUTIONS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5)


def _lognorm(x):
    import scipy.sparse as sps

    x = x.toarray() if sps.issparse(x) else np.asarray(x)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def _pca(x, k, seed=0):
    from sklearn.decomposition import PCA

    return PCA(min(k, x.shape[1] - 1), random_state=seed).fit_transform(x)


def _scanpy_lognorm(counts):
    """scanpy's standard: ``normalize_total`` (to the median library) then ``log1p``."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=counts.copy())
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    x = a.X
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _scanpy_pca(counts, k, seed=0):
    """PCA as a scanpy user runs it: normalize_total, log1p, ``sc.pp.pca``."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=_scanpy_lognorm(counts))
    sc.pp.pca(a, n_comps=min(k, a.n_vars - 1), random_state=seed)
    return a.obsm["X_pca"]


def _probe(x, y, seed):
    """Macro-F1 and macro-precision of a logistic-regression probe, 80/20 split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, precision_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    sc = StandardScaler().fit(x[tr])
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(x[tr]), y[tr])
    p = clf.predict(sc.transform(x[te]))
    return f1_score(y[te], p, average="macro"), precision_score(y[te], p, average="macro", zero_division=0)


def _leiden_best(x, truth, seed):
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]), obsm={"X": np.asarray(x, np.float32)})
    sc.pp.neighbors(a, use_rep="X", n_neighbors=15, random_state=seed)
    ari = nmi = 0.0
    for r in RESOLUTIONS:
        sc.tl.leiden(a, resolution=r, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        ari = max(ari, adjusted_rand_score(truth, a.obs["leiden"]))
        nmi = max(nmi, normalized_mutual_info_score(truth, a.obs["leiden"]))
    return ari, nmi


def _knn_pca_map(query, ref, target, k, n_comps, seed):
    """kNN regression in a PCA of the shared genes fitted on the reference, each dataset z-scored on its own
    (cosine distance, weights exp(-d / median d)): the usual label-free mapping, and spatia's before 2026-12-07."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    def z(a):
        sd = a.std(0)
        return (a - a.mean(0)) / np.where(sd > 0, sd, 1)

    pca = PCA(min(n_comps, ref.shape[1] - 1), random_state=seed).fit(z(ref))
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine").fit(pca.transform(z(ref))).kneighbors(
        pca.transform(z(query)))
    w = np.exp(-dist / max(float(np.median(dist)), 1e-6))
    return np.einsum("ik,ikg->ig", w / w.sum(1, keepdims=True), np.asarray(target)[idx])


def _median_pearson(pred, truth):
    from scipy.stats import pearsonr

    r = [pearsonr(pred[:, j], truth[:, j]).statistic for j in range(truth.shape[1])
         if truth[:, j].std() > 0 and np.std(pred[:, j]) > 0]
    return float(np.median(r)) if r else np.nan


def _mean_pearson(pred, truth, genes_idx):
    from scipy.stats import pearsonr

    r = [pearsonr(pred[:, j], truth[:, j]).statistic for j in genes_idx if np.std(pred[:, j]) > 0]
    return float(np.mean(r)) if r else 0.0


def _subset_table(sdata, mask):
    """The same SpatialData (shared image / labels) whose table keeps only ``mask`` cells."""
    import spatialdata as sd

    t = sdata["table"][mask].copy()
    out = sd.SpatialData(images=dict(sdata.images), labels=dict(sdata.labels), tables={"table": t})
    return out


def _squidpy_features(crops):
    """squidpy's summary, histogram and texture features of each crop (an ImageContainer per crop)."""
    import squidpy as sq

    rows = []
    for c in crops:
        img = sq.im.ImageContainer(np.moveaxis(c, 0, -1)[:, :, None, :], layer="image", dims=("y", "x", "z", "channels"))
        f = {}
        f.update(img.features_summary("image"))
        f.update(img.features_histogram("image"))
        f.update(img.features_texture("image"))
        rows.append(f)
    return pd.DataFrame(rows).fillna(0).to_numpy(np.float64)


def run_seed(seed: int, n_cells: int, epochs: int, res: dict) -> None:
    import scanpy as sc

    import spatia as sp
    from spatia.tl._cluster import spatial_smooth

    sdata, ref = sp.datasets.simulate_with_reference(n_cells, n_genes=60, mean_depth=40.0, random_state=seed)
    table = sdata["table"]
    y = table.obs["cell_type"].astype(str).to_numpy()
    dom = table.obs["domain"].astype(str).to_numpy()
    cfg = sp.SpatiaConfig.default()
    ln = _lognorm(table.X)
    sln = _scanpy_lognorm(table.X)

    # ---- spatia fit (all spatial cells) ----
    t0 = time.perf_counter()
    model = sp.tl.fit(sdata, image_key="morphology", config=cfg, max_epochs=epochs, random_state=seed)
    res["wall", "spatia fit"].append(time.perf_counter() - t0)
    cell, niche = table.obsm["X_spatia_cell"], table.obsm["X_spatia_niche"]
    d = cell.shape[1]
    pca = _scanpy_pca(table.X, d, seed)

    # ---- annotation ----
    for split in range(3):
        s = seed * 10 + split
        for name, x in (("spatia (X_spatia_cell)", cell), ("spatia (cell + niche)", np.hstack([cell, niche])),
                        (f"PCA({d}) of expression", pca)):
            f1, prec = _probe(x, y, s)
            res["annot F1", name].append(f1)
            res["annot precision", name].append(prec)
    t0 = time.perf_counter()
    f1, prec = _spatia_label_aware(sdata, y, seed, cfg, epochs)
    res["annot F1", "spatia label-aware (fit with train labels + annotate)"].append(f1)
    res["annot precision", "spatia label-aware (fit with train labels + annotate)"].append(prec)
    res["wall", "spatia label-aware fit + annotate"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    f1, prec = _scanvi(table, y, seed)
    res["annot F1", "scANVI"].append(f1)
    res["annot precision", "scANVI"].append(prec)
    res["wall", "scANVI"].append(time.perf_counter() - t0)

    # ---- clustering ----
    for name, x in (("spatia (X_spatia_cell)", cell), (f"PCA({d}) of expression", pca)):
        ari, nmi = _leiden_best(x, y, seed)
        res["cluster types ARI", name].append(ari)
        res["cluster types NMI", name].append(nmi)
    from sklearn.neighbors import NearestNeighbors

    xy = np.asarray(table.obsm["spatial"])
    nb = NearestNeighbors(n_neighbors=21).fit(xy).kneighbors(xy, return_distance=False)
    neigh = _pca(sln[nb[:, :11]].mean(1), d, seed)
    neigh20 = _pca(sln[nb].mean(1), d, seed)
    k = cfg.niche.k
    niche_sm = spatial_smooth(niche, table, k)  # what sp.tl.cluster(level="niche") clusters by default
    for name, x in (("spatia (X_spatia_niche, raw)", niche),
                    (f"spatia (X_spatia_niche smoothed over {k} nearest cells = sp.tl.cluster default)", niche_sm),
                    ("neighbourhood-mean expression PCA (10 nearest cells)", neigh),
                    ("neighbourhood-mean expression PCA (20 nearest cells, ~ reach of the smoothed niche)", neigh20),
                    (f"PCA({d}) of expression", pca)):
        ari, nmi = _leiden_best(x, dom, seed)
        res["cluster domains ARI", name].append(ari)
        res["cluster domains NMI", name].append(nmi)

    # ---- imputation of unmeasured genes from the reference ----
    held = table.uns["simulation"]["held_out_genes"]
    hc = table.uns["simulation"]["held_out_counts"]
    truth = hc / np.maximum(np.asarray(table.X.sum(1)).ravel(), 1)[:, None] * 1e4  # per 10k panel counts
    t0 = time.perf_counter()
    out = sp.tl.impute(sdata, model, reference=ref, genes=held, inplace=False)["tables/spatia_imputed"].X
    res["impute Pearson", "spatia"].append(_median_pearson(out, truth))
    res["wall", "spatia impute"].append(time.perf_counter() - t0)
    shared = list(table.var_names)
    ridx = ref.var_names.get_indexer
    ref_ln = _lognorm(ref.X[:, ridx(shared)])
    ref_x = ref.X.toarray()
    ref_cp = ref_x / np.maximum(ref_x[:, ridx(shared)].sum(1, keepdims=True), 1) * 1e4
    knn = _knn_pca_map(ln, ref_ln, ref_cp[:, ridx(held)], 50, 30, seed)
    res["impute Pearson", "kNN on raw profiles"].append(_median_pearson(knn, truth))
    t0 = time.perf_counter()
    res["impute Pearson", "gimVI"].append(_median_pearson(_gimvi(table, ref, held, seed), truth))
    res["wall", "gimVI"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res["impute Pearson", "Tangram"].append(_median_pearson(_tangram(table, ref, held, seed), truth))
    res["wall", "Tangram"].append(time.perf_counter() - t0)

    # ---- image -> expression: fit on the top half, predict the bottom half ----
    top = xy[:, 1] < np.median(xy[:, 1])
    train_sd, test_sd = _subset_table(sdata, top), _subset_table(sdata, ~top)
    t0 = time.perf_counter()
    m_top = sp.tl.fit(train_sd, image_key="morphology", config=cfg, max_epochs=epochs, random_state=seed,
                      overwrite=True)  # the subset's table carries the full slide's embeddings
    pred = sp.tl.predict_expression(test_sd, m_top, inplace=False)["layers/spatia_predicted"]
    res["wall", "spatia fit (top half) + predict"].append(time.perf_counter() - t0)
    ln_test = _lognorm(test_sd["table"].X)
    order = np.argsort(-ln_test.var(0))
    top10, allg = order[:10], np.arange(ln_test.shape[1])
    res["img->expr Pearson top10", "spatia (image only)"].append(_mean_pearson(pred, ln_test, top10))
    res["img->expr Pearson all", "spatia (image only)"].append(_mean_pearson(pred, ln_test, allg))
    t0 = time.perf_counter()
    crops_tr = sp.pp.extract_crops(train_sd, image_key="morphology", size=cfg.image.size, crop_um=cfg.image.crop_um)
    crops_te = sp.pp.extract_crops(test_sd, image_key="morphology", size=cfg.image.size, crop_um=cfg.image.crop_um)
    f_tr = _squidpy_features(crops_tr.get(np.arange(len(crops_tr))))
    f_te = _squidpy_features(crops_te.get(np.arange(len(crops_te))))
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(f_tr, _lognorm(train_sd["table"].X))
    pr = ridge.predict(f_te)
    res["wall", "squidpy features + ridge"].append(time.perf_counter() - t0)
    res["img->expr Pearson top10", "ridge on squidpy features"].append(_mean_pearson(pr, ln_test, top10))
    res["img->expr Pearson all", "ridge on squidpy features"].append(_mean_pearson(pr, ln_test, allg))
    sc.settings.verbosity = 0


def _split(y, seed):
    """The 80/20 split that scANVI and the label-aware spatia fit share (stratified, seeded)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed * 10, stratify=y)


def _spatia_label_aware(sdata, y, seed, cfg, epochs):
    """spatia given what scANVI is given: the labels of the training split (test cells NaN).

    ``sp.tl.fit(cell_type_key=...)`` trains the supervised head on the known labels, then
    ``sp.tl.annotate`` (linear probe on the label-aware ``X_spatia_cell``, fitted on the training labels only)
    calls every cell; scored on the test split, whose labels the fit never saw.
    """
    from sklearn.metrics import f1_score, precision_score

    import spatia as sp

    tr, te = _split(y, seed)
    lab = pd.Series(np.nan, index=sdata["table"].obs_names, dtype=object)
    lab.iloc[tr] = y[tr]
    sd2 = _subset_table(sdata, np.ones(len(y), bool))
    sd2["table"].obs["train_label"] = pd.Categorical(lab)
    sp.tl.fit(sd2, image_key="morphology", config=cfg, cell_type_key="train_label", max_epochs=epochs,
              random_state=seed, overwrite=True)  # replaces the label-free embeddings copied with the table
    out = sp.tl.annotate(sd2, labels_key="train_label", unknown_threshold=0.0, keep_known=False, inplace=False,
                         random_state=seed)
    p = np.asarray(out["obs/spatia_cell_type"]).astype(str)
    return f1_score(y[te], p[te], average="macro"), precision_score(y[te], p[te], average="macro", zero_division=0)


def _scanvi(table, y, seed):
    import anndata as ad
    import scvi
    from sklearn.metrics import f1_score, precision_score

    scvi.settings.seed = seed
    a = ad.AnnData(X=table.X.copy(), obs=pd.DataFrame({"label": y}, index=table.obs_names))
    tr, te = _split(y, seed)
    lab = np.array(y, dtype=object)
    lab[te] = "Unknown"
    a.obs["scanvi_label"] = lab
    scvi.model.SCVI.setup_anndata(a, labels_key="scanvi_label")
    vae = scvi.model.SCVI(a)
    vae.train(enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    lvae.train(enable_progress_bar=False)
    p = np.asarray(lvae.predict())
    return f1_score(y[te], p[te], average="macro"), precision_score(y[te], p[te], average="macro", zero_division=0)


def _gimvi(table, ref, held, seed):
    import anndata as ad
    import scvi
    from scvi.external import GIMVI

    scvi.settings.seed = seed
    seq = ad.AnnData(X=ref.X.copy(), obs=pd.DataFrame(index=ref.obs_names), var=pd.DataFrame(index=ref.var_names))
    spa = ad.AnnData(X=table.X.copy(), obs=pd.DataFrame(index=table.obs_names), var=pd.DataFrame(index=table.var_names))
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spa)
    m = GIMVI(seq, spa)
    m.train(max_epochs=200, enable_progress_bar=False)
    _, imputed = m.get_imputed_values(normalized=True)
    return np.asarray(imputed)[:, ref.var_names.get_indexer(held)]


def _tangram(table, ref, held, seed):
    import anndata as ad
    import tangram as tg

    logging.getLogger().setLevel(logging.WARNING)
    sc_ad = ad.AnnData(X=np.asarray(_lognorm(ref.X)), obs=pd.DataFrame(index=ref.obs_names),
                       var=pd.DataFrame(index=[g.lower() for g in ref.var_names]))
    sp_ad = ad.AnnData(X=np.asarray(_lognorm(table.X)), obs=pd.DataFrame(index=table.obs_names),
                       var=pd.DataFrame(index=[g.lower() for g in table.var_names]))
    tg.pp_adatas(sc_ad, sp_ad, genes=None)
    amap = tg.map_cells_to_space(sc_ad, sp_ad, mode="cells", device="cpu", random_state=seed, verbose=False)
    ge = tg.project_genes(amap, sc_ad)
    return np.asarray(ge[:, [g.lower() for g in held]].X)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=2400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import spatia as sp

    sp.settings.progress_bar = False
    for name in ("lightning", "lightning.pytorch", "scvi", "tangram", "squidpy", "spatia"):
        logging.getLogger(name).setLevel(logging.ERROR)
    res: dict = defaultdict(list)
    start = time.perf_counter()
    for s in args.seeds:
        t0 = time.perf_counter()
        run_seed(s, args.cells, args.epochs, res)
        print(f"seed {s}: {time.perf_counter() - t0:.0f} s", flush=True)
    n_seeds = len(args.seeds)
    rows = []
    for (metric, method), vals in res.items():
        v = np.asarray(vals, float)
        per_seed = v.reshape(n_seeds, -1).mean(1) if len(v) % n_seeds == 0 else np.full(n_seeds, np.nan)
        rows.append((metric, method, np.nanmean(v), np.nanstd(v), len(v), per_seed))
    df = pd.DataFrame(rows, columns=["metric", "method", "mean", "sd", "n", "per_seed"])
    lines = [
        "# Tasks benchmark: spatia vs baselines (simulated panel slide + scRNA-seq reference)", "",
        f"Command: `python benchmarks/tasks.py --cells {args.cells} --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs}` ({platform.machine()}, {time.strftime('%Y-%m-%d')}, total "
        f"{time.perf_counter() - start:.0f} s). Mean ± sd over seeds (annotation: 3 splits per seed), the mean of "
        "each seed, and the paired margin of spatia's best row over the best baseline (per seed); higher is "
        "better except wall time (s).", "",
    ]
    for metric, grp in df.groupby("metric", sort=False):
        lines += [f"**{metric}**", "", "| method | mean ± sd | per seed | n |", "|---|---:|---:|---:|"]
        best = grp["mean"].max() if metric != "wall" else None
        for r in grp.itertuples():
            mark = " **(best)**" if best is not None and np.isclose(r.mean, best) else ""
            seeds = " / ".join(f"{x:.3f}" for x in r.per_seed)
            lines.append(f"| {r.method}{mark} | {r.mean:.3f} ± {r.sd:.3f} | {seeds} | {r.n} |")
        ours = grp[grp["method"].str.startswith("spatia")]
        theirs = grp[~grp["method"].str.startswith("spatia")]
        if best is not None and len(ours) and len(theirs):
            a = ours.loc[ours["mean"].idxmax()]
            b = theirs.loc[theirs["mean"].idxmax()]
            d = np.asarray(a.per_seed) - np.asarray(b.per_seed)
            verdict = "ahead" if d.mean() > 0 else "**behind**"
            lines += ["", f"{a.method} − {b.method}: {d.mean():+.3f} ± {d.std():.3f} (paired by seed), "
                          f"{verdict}; ahead in {(d > 0).sum()}/{len(d)} seeds."]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
