"""Image → expression on cells the model never saw with counts: ``sp.tl.predict_expression`` beside its peers.

    python benchmarks/image_expression.py --designs report --out benchmarks/results/image_expression.md

Each design is one simulated slide (``sp.datasets.simulate``; designs differ in pixel size, depth, panel,
spacing and morphology-only types; ``DESIGNS``). The model is fitted, as a user calls it
(``sp.tl.fit(sdata, image_key="morphology")``, library defaults), on the cells of the slide's top half with
their counts; the bottom half's expression is then predicted from the images alone. Methods, same run:

- **spatia, defaults**: ``sp.tl.predict_expression(bottom, model)`` (the image readout fitted by ``fit``);
- **spatia, decoder**: ``predict_expression(method="decoder")`` (the model's own expression decoder, image
  tokens only: the only path before the readout);
- **ridge on nucleus features**: hand-made features as an image analyst computes them: skimage
  ``regionprops`` of the Otsu DAPI mask inside each segmented cell at the image's full resolution (area,
  eccentricity, solidity, mean and std intensity) and GLCM contrast / homogeneity
  (``benchmarks/annotation.py``);
- **ridge on squidpy features**: summary, histogram and texture features of each cell's crop
  (``squidpy.im.ImageContainer``; ``benchmarks/tasks.py``).

Every ridge is ``StandardScaler`` + ``RidgeCV(alphas=10^-2..10^4)`` fitted on the top half's log1p expression
per 10,000 counts. Scores on the bottom half: mean per-gene Pearson over the 10 most variable genes, over all
genes, and over the genes of the simulator's morphology programmes (size, elongation, texture; ground truth
in ``var["role"]``). Paired margins: per design, spatia (defaults) minus the best peer. Choose anything on the
``dev`` designs only; report on ``report``.
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
        "dev_a": dict(n_cells=2000, mean_depth=40.0, n_genes=60, random_state=0),
        "dev_b": dict(n_cells=2000, mean_depth=150.0, morphology_types=2, random_state=1),
    },
    "report": {
        "rep_a": dict(n_cells=2000, mean_depth=40.0, n_genes=60, random_state=10),
        "rep_b": dict(n_cells=2000, mean_depth=150.0, morphology_types=2, random_state=11),
        "rep_c": dict(n_cells=2000, pixel_size=0.2125, mean_depth=80.0, random_state=12),
        "rep_d": dict(n_cells=2500, cell_spacing=12.0, mean_depth=25.0, n_genes=80, n_cell_types=7, random_state=13),
        "rep_e": dict(n_cells=2000, mean_depth=300.0, morphology_types=1, cell_spacing=16.0, random_state=14),
    },
}
PEERS = ("ridge on nucleus features", "ridge on squidpy features")
METRICS = ("Pearson top-10 genes", "Pearson all genes", "Pearson programme genes")


def ridge(train_x, train_y, test_x):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(train_x, train_y).predict(test_x)


def scores(pred, truth, genes: dict[str, np.ndarray]) -> dict[str, float]:
    from tasks import _mean_pearson

    return {m: _mean_pearson(np.asarray(pred), truth, idx) for m, idx in genes.items()}


def run_design(name: str, kw: dict, res: dict) -> None:
    from annotation import nucleus_features
    from tasks import _lognorm, _squidpy_features, _subset_table

    import spatia as sp

    sdata = sp.datasets.simulate(**kw)
    table = sdata["table"]
    top = table.obsm["spatial"][:, 1] < np.median(table.obsm["spatial"][:, 1])
    train, test = _subset_table(sdata, top), _subset_table(sdata, ~top)
    y_tr, y_te = _lognorm(train["table"].X), _lognorm(test["table"].X)
    role = table.var["role"].astype(str)
    genes = {METRICS[0]: np.argsort(-y_te.var(0))[:10], METRICS[1]: np.arange(y_te.shape[1]),
             METRICS[2]: np.flatnonzero(role.str.endswith("_program").to_numpy())}

    t0 = time.perf_counter()
    model = sp.tl.fit(train, image_key="morphology", random_state=kw["random_state"], overwrite=True)
    res["wall s", "spatia fit (top half)"].append((name, time.perf_counter() - t0))
    for label, method in (("spatia, defaults", None), ("spatia, decoder", "decoder")):
        t0 = time.perf_counter()
        pred = sp.tl.predict_expression(test, model, method=method, inplace=False)["layers/spatia_predicted"]
        res["wall s", label].append((name, time.perf_counter() - t0))
        for m, v in scores(pred, y_te, genes).items():
            res[m, label].append((name, v))
    res["info", "readout embedding weight"].append((name, model.readout.info["embedding_weight"]))
    res["info", "readout mixture weight"].append((name, model.readout.info["mixture_weight"]))
    res["info", "readout channel features used (1 = yes)"].append((name, float(model.readout.info["channel_features"])))

    t0 = time.perf_counter()
    nuc = nucleus_features(sdata, kw.get("pixel_size", 0.5))
    pred = ridge(nuc[top], y_tr, nuc[~top])
    res["wall s", PEERS[0]].append((name, time.perf_counter() - t0))
    for m, v in scores(pred, y_te, genes).items():
        res[m, PEERS[0]].append((name, v))

    t0 = time.perf_counter()
    cfg = sp.SpatiaConfig.default().image
    f = {}
    for part, sd in (("train", train), ("test", test)):
        crops = sp.pp.extract_crops(sd, image_key="morphology", size=cfg.size, crop_um=cfg.crop_um)
        f[part] = _squidpy_features(crops.get(np.arange(len(crops))))
    pred = ridge(f["train"], y_tr, f["test"])
    res["wall s", PEERS[1]].append((name, time.perf_counter() - t0))
    for m, v in scores(pred, y_te, genes).items():
        res[m, PEERS[1]].append((name, v))
    line = ", ".join(f"{lab}: {dict(res[METRICS[0], lab])[name]:.3f}" for lab in
                     ("spatia, defaults", "spatia, decoder", *PEERS))
    print(f"{name} (top-10 genes) {line}", flush=True)


def main() -> None:
    from _designs import run

    run(__doc__, DESIGNS, run_design, title="Image → expression on unseen cells", metrics=METRICS,
        ours="spatia, defaults", peers=PEERS,
        intro="Mean per-gene Pearson on the bottom half of each slide (the model and every ridge fitted on the top "
              "half). Higher is better.")


if __name__ == "__main__":
    main()
