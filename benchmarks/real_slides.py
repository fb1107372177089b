"""spatia on the three real slides shipped with it, on the tasks whose score needs no ground truth.

    python benchmarks/real_slides.py --out benchmarks/results/real_slides.md

Slides: ``sp.datasets.xenium_toy()`` (Xenium, 526 cells × 27 genes, DAPI), ``sp.datasets.merscope_toy()``
(MERSCOPE, 1,058 × 49, DAPI + PolyT mosaic, cells as polygons only) and ``sp.datasets.cosmx_lung_mini()`` (CosMx,
2 FOVs, 120 × 960, RGB composite). Each task splits the slide's own cells, so the truth is the slide's counts:

- **Image → expression, inductive.** ``sp.tl.fit`` (library defaults, as a user calls it) on the cells of the
  slide's top half; ``sp.tl.predict_expression`` on the bottom half from the images alone. Peers, fitted on the
  same top half's log1p expression per 10,000 counts (``StandardScaler`` + ``RidgeCV``): ridge on squidpy's
  summary, histogram and texture features of each crop, and ridge on the nucleus features spatia measures on
  each crop (the readout's inputs without its state mixture, the embedding or the basis). Mean per-gene
  Pearson on the bottom half, over the 10 most variable genes and over all genes.
- **Held-out genes.** The left half of the slide becomes the "reference" (all genes); the right half keeps a
  seeded 60 % of the genes as its panel. ``sp.tl.fit`` on the right half, ``sp.tl.impute(reference=left)`` for
  the other 40 %; peers gimVI, Tangram (cells mode) and kNN in a PCA of the shared genes. Per-gene Pearson
  against the right half's own counts of those genes (per 10,000 panel counts): median and mean.
- **Niches.** ``sp.tl.cluster(level="niche")`` (defaults) after ``fit`` on the whole slide, against
  neighbourhood-mean expression (10 nearest cells) + PCA + KMeans with the same number of clusters. Spatial
  coherence as Cohen's kappa of a cell's label against each of its 10 nearest cells' (0: as by chance, 1: every
  neighbour agrees). Smoothing alone raises it, so it is a sanity check, not a quality score.

The slides are tiny (a few hundred cells): a difference of a few hundredths is noise. No setting was chosen on
them.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

SLIDES = ("xenium_toy", "merscope_toy", "cosmx_lung_mini")
OURS = "spatia, defaults"
TASK_NAMES = {"image_expression": "image → expression", "held_out_genes": "held-out genes", "niches": "niches"}


def _load(name: str):
    import spatia as sp

    kw = {} if name == "merscope_toy" else {"transcripts": False}
    sdata = getattr(sp.datasets, name)(**kw)
    image_key = sorted(sdata.images) if len(sdata.images) > 1 else next(iter(sdata.images))
    return sdata, image_key


def _subset(sdata, cells: np.ndarray, genes: np.ndarray | None = None):
    """The slide with its table cut to ``cells`` (and ``genes``); images, labels and shapes are shared."""
    import spatialdata as sd

    t = sdata["table"][cells]
    t = (t[:, genes] if genes is not None else t).copy()
    return sd.SpatialData(images=dict(sdata.images), labels=dict(sdata.labels), shapes=dict(sdata.shapes),
                          tables={"table": t})


def image_expression(name: str, res: dict) -> None:
    from image_expression import ridge as _ridge
    from imputation import _pearsons
    from tasks import _lognorm, _squidpy_features

    import spatia as sp
    from spatia.tl._nucleus import nucleus_features

    sdata, image_key = _load(name)
    table = sdata["table"]
    y_um = np.asarray(table.obsm["spatial"])[:, 1]
    top = y_um < np.median(y_um)
    train, test = _subset(sdata, top), _subset(sdata, ~top)
    y_tr, y_te = _lognorm(train["table"].X), _lognorm(test["table"].X)
    top10 = np.argsort(-y_te.var(0))[:10]
    task = "image → expression"

    def record(label, pred, seconds):
        res[task, "Pearson top-10 genes", label][name] = float(np.mean(_pearsons(np.asarray(pred)[:, top10], y_te[:, top10])))
        res[task, "Pearson all genes", label][name] = float(np.mean(_pearsons(pred, y_te)))
        res[task, "wall s", label][name] = seconds

    t0 = time.perf_counter()
    model = sp.tl.fit(train, image_key=image_key, outside="pad", random_state=0)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = sp.tl.predict_expression(test, model, image_key=image_key, inplace=False)["layers/spatia_predicted"]
    record(OURS, pred, fit_s + time.perf_counter() - t0)
    res[task, "info", "readout: mixture weight"][name] = model.readout.info["mixture_weight"]
    res[task, "info", "readout: channel features used"][name] = str(model.readout.info["channel_features"])
    res[task, "info", "training cells"][name] = float(top.sum())
    cfg = model.config.image
    crops = {part: sp.pp.extract_crops(sd, image_key=image_key, size=cfg.size, crop_um=cfg.crop_um,
                                        outside="pad")
             for part, sd in (("train", train), ("test", test))}
    t0 = time.perf_counter()
    f = {k: nucleus_features(c) for k, c in crops.items()}
    record("ridge on the crops' nucleus features", _ridge(f["train"], y_tr, f["test"]), time.perf_counter() - t0)
    t0 = time.perf_counter()
    f = {k: _squidpy_features(c.get(np.arange(len(c)))) for k, c in crops.items()}
    record("ridge on squidpy features", _ridge(f["train"], y_tr, f["test"]), time.perf_counter() - t0)


def held_out_genes(name: str, res: dict) -> None:
    import anndata as ad
    import pandas as pd
    from imputation import _pearsons
    from tasks import _gimvi, _knn_pca_map, _lognorm, _tangram

    import spatia as sp

    sdata, image_key = _load(name)
    table = sdata["table"]
    x_pos = table.obsm["spatial"][:, 0]
    right = x_pos > np.median(x_pos)
    rng = np.random.default_rng(0)
    counts = table.X.tocsr() if hasattr(table.X, "tocsr") else np.asarray(table.X)
    expressed = np.flatnonzero(np.asarray((counts[right] > 0).sum(0)).ravel() >= 3)  # genes seen on both halves
    expressed = expressed[np.asarray((counts[~right][:, expressed] > 0).sum(0)).ravel() >= 3]
    panel = np.sort(rng.choice(table.n_vars, size=int(round(0.6 * table.n_vars)), replace=False))
    held_idx = np.setdiff1d(expressed, panel)
    held = list(table.var_names[held_idx])
    slide = _subset(sdata, right, panel)
    ref = ad.AnnData(X=sp.pp.get_counts(table)[np.flatnonzero(~right)].astype(np.float32),
                     obs=pd.DataFrame(index=table.obs_names[~right]), var=pd.DataFrame(index=table.var_names))
    lib = np.asarray(slide["table"].X.sum(1)).ravel()
    truth = np.asarray(counts[right][:, held_idx].todense() if hasattr(counts, "todense") else counts[right][:, held_idx])
    truth = truth / np.maximum(lib, 1)[:, None] * 1e4
    shared = list(slide["table"].var_names)
    ref_x = ref.X.toarray()
    ref_cp = ref_x / np.maximum(ref_x[:, ref.var_names.get_indexer(shared)].sum(1, keepdims=True), 1) * 1e4
    task = "held-out genes"

    def record(label, pred, seconds):
        r = _pearsons(pred, truth)
        res[task, "median Pearson", label][name] = float(np.median(r))
        res[task, "mean Pearson", label][name] = float(np.mean(r))
        res[task, "wall s", label][name] = seconds

    t0 = time.perf_counter()
    model = sp.tl.fit(slide, image_key=image_key, outside="pad", random_state=0)
    out = sp.tl.impute(slide, model, image_key=image_key, reference=ref, genes=held, inplace=False)
    record(OURS, out["tables/spatia_imputed"].X, time.perf_counter() - t0)
    st = slide["table"]
    for label, fn in (("gimVI", lambda: _gimvi(st, ref, held, 0)),
                      ("Tangram", lambda: _tangram(st, ref, held, 0)),
                      ("kNN in PCA of shared genes", lambda: _knn_pca_map(
                          _lognorm(st.X), _lognorm(ref_x[:, ref.var_names.get_indexer(shared)]),
                          ref_cp[:, ref.var_names.get_indexer(held)], min(50, ref.n_obs - 1), 30, 0))):
        t0 = time.perf_counter()
        pred = fn()
        record(label, pred, time.perf_counter() - t0)
    res[task, "info", "held-out genes"][name] = float(len(held))
    res[task, "info", "slide / reference cells"][name] = f"{int(right.sum())} / {int((~right).sum())}"


def _kappa(labels: np.ndarray, xy: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
    agree = (labels[idx[:, 1:]] == labels[:, None]).mean()
    p = np.unique(labels, return_counts=True)[1] / len(labels)
    chance = float((p**2).sum())
    return float((agree - chance) / (1 - chance)) if chance < 1 else 0.0


def niches(name: str, res: dict) -> None:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors
    from tasks import _lognorm

    import spatia as sp

    sdata, image_key = _load(name)
    table = sdata["table"]
    task = "niches"
    t0 = time.perf_counter()
    sp.tl.fit(sdata, image_key=image_key, outside="pad", random_state=0)
    sp.tl.cluster(sdata, level="niche")
    seconds = time.perf_counter() - t0
    labels = table.obs["spatia_niche"].astype(str).to_numpy()
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    res[task, "coherence (kappa, 10 nearest cells)", OURS][name] = _kappa(labels, xy)
    res[task, "n niches", OURS][name] = float(len(np.unique(labels)))
    res[task, "wall s", OURS][name] = seconds
    t0 = time.perf_counter()
    _, idx = NearestNeighbors(n_neighbors=10).fit(xy).kneighbors(xy)
    smooth = _lognorm(table.X)[idx].mean(1)
    pcs = PCA(min(30, smooth.shape[1] - 1), random_state=0).fit_transform(smooth)
    peer = KMeans(len(np.unique(labels)), n_init=10, random_state=0).fit_predict(pcs)
    label = "neighbourhood mean + PCA + KMeans (same k)"
    res[task, "coherence (kappa, 10 nearest cells)", label][name] = _kappa(peer, xy)
    res[task, "n niches", label][name] = float(len(np.unique(peer)))
    res[task, "wall s", label][name] = time.perf_counter() - t0


def report(res: dict, names: list[str], seconds: float, command: str) -> str:
    import datetime
    import platform

    import torch

    import spatia as sp

    lines = [f"# spatia on the real slides shipped with it ({', '.join(names)})", "", f"`{command}`", "",
             f"{platform.machine()}, {datetime.date.today()}, spatia {sp.__version__}, "
             f"{torch.get_num_threads()} torch thread(s), total {seconds:.0f} s. See the script's docstring for "
             "the tasks, peers and splits. Higher is better (wall s: lower).", ""]
    for task in dict.fromkeys(k[0] for k in res):
        lines += [f"## {task}", ""]
        for metric in dict.fromkeys(k[1] for k in res if k[0] == task):
            lines += [f"**{metric}**", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            rows = {k[2]: v for k, v in res.items() if k[0] == task and k[1] == metric}
            for label, per in rows.items():
                cells = [(f"{per[n]:.3f}" if isinstance(per.get(n), float) else str(per.get(n, "–"))) for n in names]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
            if metric not in ("wall s", "n niches") and task != "niches" and OURS in rows and metric != "info":
                mine = rows[OURS]
                for label, per in rows.items():
                    if label == OURS:
                        continue
                    d = np.array([mine[n] - per[n] for n in names])
                    lines.append(f"{OURS} − {label}: {d.mean():+.3f} (per slide " +
                                 ", ".join(f"{v:+.3f}" for v in d) + f"), ahead on {(d > 0).sum()}/{len(d)}.")
                    lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    import torch

    import spatia as sp

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", nargs="*", default=list(SLIDES), choices=list(SLIDES))
    p.add_argument("--tasks", nargs="*", default=["image_expression", "held_out_genes", "niches"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sp.settings.progress_bar = False
    sp.settings.verbosity = 1
    res: dict = defaultdict(dict)
    t0 = time.time()
    for task in a.tasks:
        for name in a.slides:
            globals()[task](name, res)
            print(f"{task} {name}: " + ", ".join(f"{k[1]} / {k[2]}: {v[name]:.3f}" for k, v in res.items()
                                                 if k[0] == TASK_NAMES[task]
                                                 and name in v and isinstance(v[name], float) and k[1] != "wall s"),
                  flush=True)
    text = report(res, a.slides, time.time() - t0, "python " + " ".join(sys.argv))
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
