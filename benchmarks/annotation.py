"""Cell-type annotation with morphology-only types: ``sp.tl.annotate`` as a user calls it, beside its peers.

    python benchmarks/annotation.py --seeds 10 11 12 13 14 --out benchmarks/results/annotation.md

Each seed simulates a slide with ``sp.datasets.simulate(..., morphology_types=2)``: five cell types with their
own expression plus two morphology-only "twins" (each has exactly the expression of another type and differs
from it only in nuclear size, elongation and chromatin texture; ``uns["simulation"]["morphology_twins"]``).
Half of the cells (stratified, seeded) keep their label; the other half is scored. Methods, all in the same run:

- **spatia, defaults**: ``sp.tl.fit(sdata, image_key="morphology")`` (no labels), then
  ``sp.tl.annotate(sdata, model, labels_key="train_label")`` with its defaults (``unknown`` below 0.5
  confidence, counted as wrong), which reads the cell embedding and the nucleus measurements of each cell's
  crop (``morphology=None``);
- **spatia, embedding alone**: the same, ``annotate(morphology=False)`` (the default before nucleus features);
- **spatia, threshold 0**: the same embedding, ``annotate(unknown_threshold=0)`` (every cell called);
- **spatia, label-aware**: ``sp.tl.fit(..., cell_type_key="train_label")`` then ``annotate`` with its defaults;
- **LR expression PCA**: logistic regression on PCA of expression as scanpy users compute it
  (``normalize_total``, ``log1p``, ``sc.pp.pca``);
- **LR nucleus features**: logistic regression on hand-made nucleus features: skimage ``regionprops`` of the
  Otsu DAPI mask inside each segmented cell (area, eccentricity, solidity, mean and std intensity) and GLCM
  texture (``graycomatrix`` contrast and homogeneity of the nucleus' DAPI, 32 levels, distances 1 and 2);
- **LR PCA + nucleus**: both, concatenated;
- **scANVI** (scvi-tools defaults; labelled cells as labels, the others as the unlabelled category).

Every logistic regression is ``StandardScaler`` + ``LogisticRegression(max_iter=2000)`` trained on the labelled
half. Scores on the unlabelled half: macro-F1 over the true classes ("unknown" is wrong for its cell and is
nobody's class), F1 of the morphology-only types (twins and their parents) and of the other types, coverage
(share not "unknown") and accuracy on the covered cells. Paired margins: per seed, spatia (defaults) minus the
peer, then mean ± sd over seeds. Choose anything on development seeds (0, 1) only; report on 10–14.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")
TWIN_KEY, TRAIN_KEY = "morphology_twins", "train_label"


# ------------------------------------------------------------------------------------------------ features
def nucleus_features(sdata, pixel_size: float) -> np.ndarray:
    """``(n_cells, 7)``: area (µm²), eccentricity, solidity, mean and std DAPI, GLCM contrast and homogeneity."""
    from skimage.feature import graycomatrix, graycoprops
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops

    dapi = sdata.images["morphology"].sel(c="DAPI").data.compute().astype(float)
    labels = sdata.labels["cell_labels"].data.compute()
    nuclei = np.where(dapi > threshold_otsu(dapi[labels > 0]), labels, 0)
    lo, hi = np.percentile(dapi[nuclei > 0], [1, 99.5])
    levels = (1 + np.clip((dapi - lo) / (hi - lo), 0, 1) * 30.999).astype(np.uint8)  # 1..31; 0 = outside
    rows = {}
    for r in regionprops(nuclei, intensity_image=dapi):
        inside = dapi[r.slice][r.image]
        q = np.where(r.image, levels[r.slice], 0)
        glcm = graycomatrix(q, [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32)[1:, 1:]
        glcm = glcm / np.maximum(glcm.sum((0, 1), keepdims=True), 1)  # pairs inside the nucleus only
        rows[r.label] = [r.area * pixel_size**2, r.eccentricity, r.solidity, inside.mean(), inside.std(),
                         graycoprops(glcm, "contrast").mean(), graycoprops(glcm, "homogeneity").mean()]  # fmt: skip
    ids = sdata["table"].obs["cell_id"].to_numpy()
    return np.array([rows.get(i, [0.0] * 7) for i in ids])


def scanpy_pca(counts, n_comps: int, seed: int) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=counts.astype(np.float32))
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=min(n_comps, a.n_vars - 1), random_state=seed)
    return np.asarray(a.obsm["X_pca"])


def logistic(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return model.fit(x[train], y[train]).predict(x)


def scanvi(table, y: np.ndarray, train: np.ndarray, seed: int) -> np.ndarray:
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    a = ad.AnnData(X=table.X.copy(), obs=pd.DataFrame(index=table.obs_names))
    a.obs["label"] = np.where(train, y, "Unknown")
    scvi.model.SCVI.setup_anndata(a, labels_key="label")
    vae = scvi.model.SCVI(a)
    vae.train(enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    lvae.train(enable_progress_bar=False)
    return np.asarray(lvae.predict()).astype(str)


# ------------------------------------------------------------------------------------------------ scoring
def score(y: np.ndarray, pred: np.ndarray, test: np.ndarray, classes: list[str], twins: dict) -> dict:
    from sklearn.metrics import f1_score

    yt, pt = y[test], pred[test]
    per_class = f1_score(yt, pt, labels=classes, average=None, zero_division=0)
    morph = [*twins, *twins.values()]
    covered = pt != "unknown"
    return {
        "macro-F1": float(per_class.mean()),
        "F1 morphology-only": float(np.mean([f for c, f in zip(classes, per_class, strict=True) if c in morph])),
        "F1 twins": float(np.mean([f for c, f in zip(classes, per_class, strict=True) if c in twins])),
        "F1 other types": float(np.mean([f for c, f in zip(classes, per_class, strict=True) if c not in morph])),
        "coverage": float(covered.mean()),
        "accuracy (covered)": float((yt[covered] == pt[covered]).mean()) if covered.any() else np.nan,
        "per_class": dict(zip(classes, per_class.round(3).tolist(), strict=True)),
    }


# ------------------------------------------------------------------------------------------------ one seed
def run_seed(seed: int, args) -> dict[str, dict]:
    import torch

    import spatia as sp

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sdata = sp.datasets.simulate(args.cells, random_state=seed, morphology_types=args.twins,
                                 pixel_size=args.pixel_size)  # fmt: skip
    table = sdata["table"]
    y = table.obs["cell_type"].astype(str).to_numpy()
    twins = dict(table.uns["simulation"][TWIN_KEY])
    classes = sorted(set(y))
    rng = np.random.default_rng(seed)
    train = np.zeros(len(y), bool)
    for c in classes:  # stratified: args.labelled of each class keeps its label
        idx = np.flatnonzero(y == c)
        train[rng.choice(idx, int(round(args.labelled * len(idx))), replace=False)] = True
    test = ~train
    table.obs[TRAIN_KEY] = pd.Categorical(np.where(train, y, None), categories=classes)
    out, wall = {}, {}
    logging.info("seed %d: %d cells, twins %s, simulated in %.0fs", seed, len(y), twins, time.perf_counter() - t0)

    crop = {} if args.crop is None else {"image": {"size": args.crop[0], "crop_um": args.crop[1]}}
    if args.patch is not None:
        crop.setdefault("image", {})["patch"] = args.patch
    config = sp.SpatiaConfig.default().replace(**crop) if crop else None
    fit_kw = {"image_key": "morphology", "max_epochs": args.epochs, "random_state": seed, "config": config}
    t = time.perf_counter()
    model = sp.tl.fit(sdata, **fit_kw)
    sp.tl.annotate(sdata, model, labels_key=TRAIN_KEY)
    wall["spatia (defaults)"] = time.perf_counter() - t
    out["spatia (defaults)"] = table.obs["spatia_cell_type"].astype(str).to_numpy()
    res = sp.tl.annotate(sdata, model, labels_key=TRAIN_KEY, morphology=False, inplace=False)
    out["spatia, embedding alone"] = np.asarray(res["obs/spatia_cell_type"]).astype(str)
    res = sp.tl.annotate(sdata, model, labels_key=TRAIN_KEY, unknown_threshold=0.0, inplace=False)
    out["spatia, unknown_threshold=0"] = np.asarray(res["obs/spatia_cell_type"]).astype(str)
    if args.label_aware:
        t = time.perf_counter()
        aware = sp.tl.fit(sdata, cell_type_key=TRAIN_KEY, key_added="X_aware", **fit_kw)
        sp.tl.annotate(sdata, aware, labels_key=TRAIN_KEY, use_rep="X_aware_cell", key_added="aware_type")
        wall["spatia, label-aware fit"] = time.perf_counter() - t
        out["spatia, label-aware fit"] = table.obs["aware_type"].astype(str).to_numpy()

    t = time.perf_counter()
    pca = scanpy_pca(table.X, args.pcs, seed)
    out["LR expression PCA"] = logistic(pca, y, train)
    wall["LR expression PCA"] = time.perf_counter() - t
    t = time.perf_counter()
    nuc = nucleus_features(sdata, args.pixel_size)
    out["LR nucleus features"] = logistic(nuc, y, train)
    wall["LR nucleus features"] = time.perf_counter() - t
    out["LR PCA + nucleus features"] = logistic(np.hstack([pca, nuc]), y, train)
    if args.scanvi:
        t = time.perf_counter()
        out["scANVI"] = scanvi(table, y, train, seed)
        wall["scANVI"] = time.perf_counter() - t
    scores = {name: score(y, pred, test, classes, twins) for name, pred in out.items()}
    for name, s in scores.items():
        s["wall_s"] = wall.get(name, np.nan)
        logging.info("seed %d %-32s macro-F1 %.3f  morph %.3f  %s", seed, name, s["macro-F1"],
                     s["F1 morphology-only"], s["per_class"])  # fmt: skip
    return {"scores": scores, "twins": twins, "n_test": int(test.sum())}


# ------------------------------------------------------------------------------------------------ report
METRICS = ("macro-F1", "F1 morphology-only", "F1 twins", "F1 other types", "coverage", "accuracy (covered)")


def _pm(values) -> str:
    v = np.asarray(values, float)
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v, ddof=1) if len(v) > 1 else 0.0:.3f}"


def report(runs: dict[int, dict], args, command: str, header: dict) -> str:
    methods = list(next(iter(runs.values()))["scores"])
    lines = [f"# Annotation with morphology-only types ({', '.join(f'seed {s}' for s in runs)})", "",
             f"`{command}`", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["Mean ± sd over seeds (test half of each slide, unknown = wrong).", "",
              "| method | " + " | ".join(METRICS) + " | wall s |", "|---" * (len(METRICS) + 2) + "|"]  # fmt: skip
    for m in methods:
        cells = [_pm([r["scores"][m][k] for r in runs.values()]) for k in METRICS]
        wall = [r["scores"][m]["wall_s"] for r in runs.values()]
        wall = "–" if np.isnan(wall).all() else f"{np.nanmean(wall):.0f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {wall} |")
    ref = "spatia (defaults)"
    lines += ["", f"Paired margins, {ref} minus peer (mean ± sd over seeds; > 0: spatia ahead).", "",
              "| peer | Δ macro-F1 | Δ F1 morphology-only | Δ F1 other types |", "|---|---|---|---|"]  # fmt: skip
    for m in methods:
        if m == ref:
            continue
        d = [_pm([r["scores"][ref][k] - r["scores"][m][k] for r in runs.values()])
             for k in ("macro-F1", "F1 morphology-only", "F1 other types")]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(d) + " |")
    lines += ["", "Per-class F1 per seed (twin → parent; `*` marks the morphology-only types).", ""]
    for seed, r in runs.items():
        pairs = ", ".join(f"{t} → {p}" for t, p in r["twins"].items())
        classes = list(r["scores"][ref]["per_class"])
        morph = {*r["twins"], *r["twins"].values()}
        names = [f"{c}{'*' if c in morph else ''}" for c in classes]
        lines += [f"Seed {seed} ({r['n_test']} test cells; twins {pairs}):", "",
                  "| method | " + " | ".join(names) + " |", "|---" * (len(classes) + 1) + "|"]  # fmt: skip
        for m in methods:
            pc = r["scores"][m]["per_class"]
            lines.append(f"| {m} | " + " | ".join(f"{pc[c]:.2f}" for c in classes) + " |")
        lines.append("")
    return "\n".join(lines)


def busy() -> str:
    """The processes using the CPUs now (``ps``: %CPU and command name, no arguments)."""
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    rows = [line.split(None, 1) for line in ps.splitlines()[1:]]
    return ", ".join(f"{c.strip()} {p}%" for p, c in rows if float(p) >= 5.0) or "nothing above 5 % CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="0, 1: development; 10-14: report")
    p.add_argument("--cells", type=int, default=1500)
    p.add_argument("--twins", type=int, default=2, help="simulate(morphology_types=)")
    p.add_argument("--pixel-size", type=float, default=0.5)
    p.add_argument("--labelled", type=float, default=0.5, help="fraction of cells with a known label")
    p.add_argument("--epochs", type=int, default=None, help="fit max_epochs (None: the library default)")
    p.add_argument("--pcs", type=int, default=30)
    p.add_argument("--crop", type=float, nargs=2, default=None, metavar=("SIZE_PX", "CROP_UM"),
                   help="image.size and image.crop_um for spatia (a lever; default: the library's)")
    p.add_argument("--patch", type=int, default=None, help="ViT patch side in px (config.image.patch)")
    p.add_argument("--no-label-aware", dest="label_aware", action="store_false")
    p.add_argument("--no-scanvi", dest="scanvi", action="store_false")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.crop is not None:
        args.crop = (int(args.crop[0]), float(args.crop[1]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "scvi", "spatia"):
        logging.getLogger(name).setLevel(logging.WARNING)
    command = "python benchmarks/annotation.py " + " ".join(sys.argv[1:])
    load0, busy0 = os.getloadavg(), busy()
    start = time.perf_counter()
    runs = {seed: run_seed(seed, args) for seed in args.seeds}
    import spatia as sp

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()  # fmt: skip
    except OSError:
        commit = "?"
    header = {
        "spatia": f"{sp.__version__} (commit {commit})",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
        f"python {platform.python_version()}",
        "load average (start → end)": f"{load0[0]:.2f} → {os.getloadavg()[0]:.2f}",
        "slides": f"simulate({args.cells}, morphology_types={args.twins}, pixel_size={args.pixel_size}); "
        f"{args.labelled:.0%} of cells labelled (stratified); fit max_epochs={args.epochs or 'default'}"
        + (f"; crops {args.crop[0]} px over {args.crop[1]} µm" if args.crop else "")
        + (f"; ViT patch {args.patch} px" if args.patch else ""),
        "running at start (ps, %CPU)": busy0,
        "total wall": f"{time.perf_counter() - start:.0f} s",
    }
    text = report(runs, args, command, header)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
