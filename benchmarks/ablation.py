"""What each part of the SPATIA model contributes: the same fit with one part switched off at a time.

    python benchmarks/ablation.py --cells 2400 --epochs 30 --seeds 0 1 --out benchmarks/results/ablation.md

On ``sp.datasets.simulate`` slides (shallow counts, ``--depth``), for the full model and with the image
branch, the expression branch, the niche level or the tissue level off, prints:

- cell types from ``X_spatia_cell``: linear-probe macro-F1 (80/20) and best Leiden ARI over a resolution sweep;
- tissue domains from ``X_spatia_niche``: best Leiden ARI;
- morphology: R² of a ridge read-out of the simulated nuclear-size programme from ``X_spatia_cell``
  (5-fold cross-validated);
- held-out panel genes: median Pearson of ``sp.tl.validate_imputation`` (10 most detected genes).

The same-sized PCA of expression (scanpy: normalize_total, log1p, pca) is the reference row.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))
from tasks import _leiden_best, _probe, _scanpy_pca  # noqa: E402

ABLATIONS = {
    "full model": {},
    "no image branch": {"image": {"enabled": False}},
    "no expression branch": {"expression": {"enabled": False}},
    "no niche level": {"niche": {"enabled": False}},
    "no tissue level": {"tissue": {"enabled": False}},
}


def _r2(x, target, seed):
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(RidgeCV(alphas=np.logspace(-2, 3, 11)), x, target, cv=5, scoring="r2").mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=2400)
    ap.add_argument("--depth", type=float, default=40.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import spatia as sp

    sp.settings.progress_bar = False
    for name in ("lightning", "lightning.pytorch", "spatia", "squidpy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        sdata = sp.datasets.simulate(args.cells, mean_depth=args.depth, random_state=seed)
        t = sdata["table"]
        y = t.obs["cell_type"].astype(str).to_numpy()
        dom = t.obs["domain"].astype(str).to_numpy()
        size = t.obs["size_program"].to_numpy()
        base = sp.SpatiaConfig.default()
        pca = _scanpy_pca(t.X, base.embed_dim, seed)
        rows.append({"model": f"PCA({base.embed_dim}) of expression", "seed": seed,
                     "type F1": np.mean([_probe(pca, y, seed * 10 + s)[0] for s in range(3)]),
                     "type ARI": _leiden_best(pca, y, seed)[0], "domain ARI": _leiden_best(pca, dom, seed)[0],
                     "size R²": _r2(pca, size, seed), "held-out gene r": np.nan, "fit s": 0.0})
        for name, change in ABLATIONS.items():
            cfg = base.replace(**change)
            t0 = time.perf_counter()
            out = sp.tl.fit(sdata, image_key="morphology", config=cfg, max_epochs=args.epochs,
                            random_state=seed, inplace=False)
            fit_s = time.perf_counter() - t0
            model, cell, niche = out["model"], out["obsm/X_spatia_cell"], out["obsm/X_spatia_niche"]
            r = np.nan
            if cfg.expression.enabled:
                r = float(sp.tl.validate_imputation(sdata, model, n_genes=10)["pearson"].median())
            rows.append({"model": name, "seed": seed,
                         "type F1": np.mean([_probe(cell, y, seed * 10 + s)[0] for s in range(3)]),
                         "type ARI": _leiden_best(cell, y, seed)[0], "domain ARI": _leiden_best(niche, dom, seed)[0],
                         "size R²": _r2(cell, size, seed), "held-out gene r": r, "fit s": fit_s})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    cols = ["type F1", "type ARI", "domain ARI", "size R²", "held-out gene r", "fit s"]
    agg = df.groupby("model", sort=False)[cols].agg(["mean", "std"])
    lines = ["# Ablations: what each part contributes", "",
             f"Command: `python benchmarks/ablation.py --cells {args.cells} --depth {args.depth} --epochs {args.epochs} "
             f"--seeds {' '.join(map(str, args.seeds))}` ({platform.machine()}, {time.strftime('%Y-%m-%d')}, total "
             f"{time.perf_counter() - start:.0f} s). Mean ± sd over seeds. Cell types and size from `X_spatia_cell`, "
             "domains from `X_spatia_niche` (for the PCA row: the same PCA).", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in agg.index:
        cells = [f"{agg.loc[m, (c, 'mean')]:.3f} ± {agg.loc[m, (c, 'std')]:.3f}" if c != "fit s"
                 else f"{agg.loc[m, (c, 'mean')]:.0f}" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
