"""Genes the panel did not measure, from a scRNA-seq reference: ``sp.tl.impute(reference=)`` beside its peers.

    python benchmarks/imputation.py --designs report --out benchmarks/results/imputation.md

Each design is one simulated tissue split in two (``sp.datasets.simulate_with_reference``): the left half is a
panel slide (a random fraction of the genes, thinned to ``mean_depth``), the right half a deeper
whole-transcriptome reference. Designs differ in depth, panel size, gene count, cell types, spacing and
platform effect (``capture_sd``: each panel gene captured on the slide at its own efficiency relative to the
reference) (``DESIGNS``). The genes left out of the panel are imputed for every slide cell; the truth is their simulated
counts in those cells (per 10,000 counts of the panel, the scale of the imputed table). Methods, same run:

- **spatia, defaults**: ``sp.tl.fit(sdata, image_key="morphology")`` then
  ``sp.tl.impute(sdata, model, reference=ref, genes=held_out)``, library defaults;
- **spatia, previous mapping**: the same model's denoised profile mapped by kNN in a PCA of the shared genes
  (what ``impute`` did before 2026-12-07);
- **kNN in PCA of shared genes**: the same kNN mapping on the cells' own normalised counts (no model);
- **gimVI** (scvi-tools, 200 epochs, ``get_imputed_values(normalized=True)``);
- **Tangram** (cells mode, log-normalised inputs, ``project_genes``).

A yardstick row, not a method: each cell given the reference's mean profile of its true cell type (ground truth).

Scores: per-gene Pearson over the slide's cells, median and mean over the held-out genes. Paired margins: per
design, spatia (defaults) minus each peer. Choose anything on the ``dev`` designs only; report on ``report``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

DESIGNS = {
    "dev": {
        "dev_a": dict(n_cells=2000, n_genes=60, mean_depth=40.0, random_state=100),
        "dev_b": dict(n_cells=2000, n_genes=80, panel_fraction=0.4, mean_depth=80.0, random_state=101),
        "dev_c": dict(n_cells=2000, n_genes=60, mean_depth=40.0, capture_sd=0.5, random_state=102),
    },
    "report": {
        "rep_a": dict(n_cells=2000, n_genes=60, mean_depth=40.0, random_state=10),
        "rep_b": dict(n_cells=2000, n_genes=100, panel_fraction=0.4, mean_depth=60.0, random_state=11),
        "rep_c": dict(n_cells=3000, n_genes=80, mean_depth=20.0, reference_depth=300.0, random_state=12),
        "rep_d": dict(n_cells=2000, n_genes=60, mean_depth=120.0, n_cell_types=7, random_state=13),
        "rep_e": dict(n_cells=2500, n_genes=60, panel_fraction=0.75, mean_depth=40.0, cell_spacing=12.0,
                      random_state=14),
        "rep_f": dict(n_cells=2000, n_genes=60, mean_depth=40.0, capture_sd=0.7, random_state=15),
    },
}
OURS = "spatia, defaults"
PEERS = ("gimVI", "Tangram", "kNN in PCA of shared genes")
METRICS = ("median Pearson, held-out genes", "mean Pearson, held-out genes")
ORACLE = "(yardstick) reference mean of the cell's true type"


def _pearsons(pred, truth) -> np.ndarray:
    from scipy.stats import pearsonr

    pred = np.asarray(pred)
    return np.array([pearsonr(pred[:, j], truth[:, j]).statistic for j in range(truth.shape[1])
                     if truth[:, j].std() > 0 and pred[:, j].std() > 0])


def run_design(name: str, kw: dict, res: dict) -> None:
    from tasks import _gimvi, _knn_pca_map, _lognorm, _tangram

    import spatia as sp

    sdata, ref = sp.datasets.simulate_with_reference(**kw)
    table = sdata["table"]
    held = table.uns["simulation"]["held_out_genes"]
    lib = np.asarray(table.X.sum(1)).ravel()
    truth = table.uns["simulation"]["held_out_counts"] / np.maximum(lib, 1)[:, None] * 1e4
    shared = list(table.var_names)
    ridx = ref.var_names.get_indexer
    ref_x = ref.X.toarray()
    ref_cp = ref_x / np.maximum(ref_x[:, ridx(shared)].sum(1, keepdims=True), 1) * 1e4
    ref_ln = _lognorm(ref_x[:, ridx(shared)])

    def record(label, seconds, pred):
        r = _pearsons(pred, truth)
        res["wall s", label].append((name, seconds))
        res[METRICS[0], label].append((name, float(np.median(r))))
        res[METRICS[1], label].append((name, float(np.mean(r))))

    t0 = time.perf_counter()
    model = sp.tl.fit(sdata, image_key="morphology", random_state=kw["random_state"])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sp.tl.impute(sdata, model, reference=ref, genes=held, inplace=False)
    record(OURS, fit_s + time.perf_counter() - t0, out["tables/spatia_imputed"].X)
    rho = out["layers/spatia_imputed"] / lib[:, None]  # the model's expected proportions
    t0 = time.perf_counter()
    pred = _knn_pca_map(np.log1p(rho * 1e4), ref_ln, ref_cp[:, ridx(held)], 50, 30, kw["random_state"])
    record("spatia, previous mapping", time.perf_counter() - t0, pred)
    for label, fn in (("gimVI", lambda: _gimvi(table, ref, held, kw["random_state"])),
                      ("Tangram", lambda: _tangram(table, ref, held, kw["random_state"])),
                      (PEERS[2], lambda: _knn_pca_map(_lognorm(table.X), ref_ln, ref_cp[:, ridx(held)], 50, 30,
                                                      kw["random_state"]))):
        t0 = time.perf_counter()
        pred = fn()
        record(label, time.perf_counter() - t0, pred)
    # not a method: the reference's mean profile of each cell's true type (ground truth), a yardstick of how much
    # of the held-out genes' variation the cell types explain at this depth
    y_ref, y = ref.obs["cell_type"].astype(str).to_numpy(), table.obs["cell_type"].astype(str).to_numpy()
    type_mean = {c: ref_cp[y_ref == c][:, ridx(held)].mean(0) for c in np.unique(y_ref)}
    record(ORACLE, 0.0, np.stack([type_mean.get(c, ref_cp[:, ridx(held)].mean(0)) for c in y]))
    res["info", "held-out genes"].append((name, float(len(held))))
    res["info", "slide cells"].append((name, float(table.n_obs)))
    line = ", ".join(f"{lab}: {dict(res[METRICS[0], lab])[name]:.3f}" for lab in
                     (OURS, "spatia, previous mapping", *PEERS))
    print(f"{name} (median Pearson) {line}", flush=True)


def main() -> None:
    from _designs import run

    run(__doc__, DESIGNS, run_design, title="Genes outside the panel, from a reference", metrics=METRICS,
        ours=OURS, peers=PEERS,
        intro="Per-gene Pearson over the slide's cells against the simulated counts of the held-out genes. Higher "
              "is better; wall s of spatia includes its fit.")


if __name__ == "__main__":
    main()
