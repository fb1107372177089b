"""Tissue domains from ``sp.tl.cluster(level="niche")`` as users call it, against the baselines they would
write, on simulator designs that were never used to choose the defaults.

    python benchmarks/domains.py --out benchmarks/results/domains.md            # the report designs
    python benchmarks/domains.py --designs dev --out /tmp/domains_dev.md       # the development designs

The defaults of ``sp.tl.cluster(level="niche")`` (X_spatia_cell averaged over 30 nearest cells, Leiden at the
most stable resolution among 0.08–0.3) were chosen on the ``dev`` designs only. For each design the script
simulates a slide in spatialdata-io's pixel frame (``units="px"``), fits spatia with its defaults
(``sp.tl.fit(sdata)``), then scores ARI against the true domains of:

- **spatia, defaults**: ``sp.tl.cluster(sdata)`` (no k given);
- **spatia, true k**: ``sp.tl.cluster(sdata, n_clusters=k)``;
- **peer: neighbourhood mean + KMeans (true k)**: log-normalised expression averaged over each cell's 15 nearest
  cells, PCA(30), KMeans with the true number of domains;
- **peer: CellCharter-like (true k)**: PCA(30) of log-expression concatenated with its means over 1-, 2- and
  3-hop neighbourhoods of the 6-nearest-cell graph, KMeans with the true k;
- **peer: niche embedding, previous default**: Leiden (resolution 0.5) on X_spatia_niche averaged over the
  model's ``niche.k`` nearest cells (what ``cluster`` did before);
- **spatia across slides**: the model fitted on this design's slide embeds a second, larger slide of the same
  design (``sp.tl.embed``, no refit), clustered with the defaults; ARI against that slide's truth (with, beside
  it, the neighbourhood-mean peer fitted on the second slide with its true k).

Prints a markdown table (per design, mean, and paired margins of the spatia rows over the best peer) and writes
it to ``--out``. Time things alone: it runs one fit at a time with one torch thread.
"""

from __future__ import annotations

import platform
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")

# development designs (defaults were chosen on these) and report designs (never looked at while choosing)
DESIGNS = {
    "dev": {
        "dev_a": dict(n_cells=2000, n_domains=4, n_cell_types=6, random_state=101),
        "dev_b": dict(n_cells=2000, n_domains=3, n_cell_types=5, cell_spacing=11.0, mean_depth=80.0, random_state=102),
        "dev_c": dict(n_cells=2000, n_domains=5, n_cell_types=5, cell_spacing=13.0, random_state=103),
        "dev_d": dict(n_cells=2000, n_domains=2, n_cell_types=6, mean_depth=150.0, random_state=104),
    },
    "report": {
        "rep_a": dict(n_cells=2000, n_domains=5, n_cell_types=7, random_state=201),
        "rep_b": dict(n_cells=2000, n_domains=3, n_cell_types=4, mean_depth=300.0, random_state=202),
        "rep_c": dict(n_cells=2000, n_domains=4, n_cell_types=5, cell_spacing=16.0, n_genes=60, random_state=203),
        "rep_d": dict(n_cells=3000, n_domains=4, n_cell_types=6, mean_depth=60.0, random_state=204),
        "rep_e": dict(n_cells=2000, random_state=205),
    },
}


def _lognorm(x):
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * np.median(x.sum(1)))


def _knn(xy, k):
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy, return_distance=False)


def peer_neighbourhood_mean(table, xy, k_domains, seed=0):
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    feats = PCA(30, random_state=seed).fit_transform(_lognorm(table.X)[_knn(xy, 15)].mean(1))
    return KMeans(k_domains, n_init=10, random_state=seed).fit_predict(feats)


def peer_cellcharter(table, xy, k_domains, seed=0, hops=3):
    import scipy.sparse as sps
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = PCA(30, random_state=seed).fit_transform(_lognorm(table.X))
    nb = _knn(xy, 6)[:, 1:]
    n = len(x)
    a = sps.csr_matrix((np.ones(nb.size), (np.repeat(np.arange(n), nb.shape[1]), nb.ravel())), shape=(n, n))
    a = ((a + a.T) > 0).astype(float)
    a = sps.diags(1 / np.asarray(a.sum(1)).ravel()) @ a
    feats, h = [x], x
    for _ in range(hops):
        h = a @ h
        feats.append(h)
    return KMeans(k_domains, n_init=10, random_state=seed).fit_predict(np.hstack(feats))


def peer_previous_default(table, xy, niche_k, seed=0):
    from spatia.tl._cluster import leiden_codes

    emb = np.asarray(table.obsm["X_spatia_niche"])[_knn(xy, niche_k)].mean(1)
    return leiden_codes(emb, n_neighbors=15, resolution=0.5, seed=seed)


def run_design(name: str, kw: dict, res: dict, cross_cells: int) -> None:
    from sklearn.metrics import adjusted_rand_score as ari

    import spatia as sp

    kw = dict(kw)
    n = kw.pop("n_cells")
    seed = kw.pop("random_state")
    sd = sp.datasets.simulate(n, units="px", random_state=seed, **kw)
    t0 = time.time()
    model = sp.tl.fit(sd, random_state=0)
    res["wall", "spatia fit"].append(time.time() - t0)
    t = sd["table"]
    y = t.obs["domain"].astype(str).to_numpy()
    k = len(set(y))
    xy = sp.pp.cell_geometry(sd, t).xy_um
    t0 = time.time()
    sp.tl.cluster(sd)
    res["wall", "spatia cluster (defaults)"].append(time.time() - t0)
    res["ARI", "spatia, defaults"].append(ari(y, t.obs["spatia_niche"]))
    res["n domains found", "spatia, defaults"].append(t.obs["spatia_niche"].nunique())
    res["n domains found", "truth"].append(k)
    lab = sp.tl.cluster(sd, n_clusters=k, inplace=False)["obs/spatia_niche"]
    res["ARI", "spatia, true k"].append(ari(y, lab))
    res["ARI", "peer: neighbourhood mean + KMeans (true k)"].append(ari(y, peer_neighbourhood_mean(t, xy, k)))
    res["ARI", "peer: CellCharter-like (true k)"].append(ari(y, peer_cellcharter(t, xy, k)))
    res["ARI", "peer: niche embedding, previous default"].append(ari(y, peer_previous_default(t, xy, model.config.niche.k)))
    # across slides: the same design, another seed, more cells; no refit
    other = sp.datasets.simulate(cross_cells, units="px", random_state=seed + 1000, **kw)
    sp.tl.embed(other, model)
    sp.tl.cluster(other)
    ot = other["table"]
    oy = ot.obs["domain"].astype(str).to_numpy()
    res["ARI, second slide", "spatia, model of the first slide, defaults"].append(ari(oy, ot.obs["spatia_niche"]))
    oxy = sp.pp.cell_geometry(other, ot).xy_um
    res["ARI, second slide", "peer: neighbourhood mean + KMeans (true k)"].append(
        ari(oy, peer_neighbourhood_mean(ot, oxy, len(set(oy)))))
    print(name, {m: round(v[-1], 3) for (_, m), v in res.items() if v}, flush=True)


def report(res: dict, names: list[str], header: str) -> str:
    lines = [header, ""]
    for metric in dict.fromkeys(m for m, _ in res):
        lines += [f"**{metric}**", "", "| method | mean | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        rows = {meth: v for (m, meth), v in res.items() if m == metric}
        for meth, v in rows.items():
            lines.append(f"| {meth} | {np.mean(v):.3f} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
        peers = {m: v for m, v in rows.items() if m.startswith("peer")}
        if metric.startswith("ARI") and peers:
            best = max(peers, key=lambda m: np.mean(peers[m]))
            for meth, v in rows.items():
                if meth.startswith("spatia"):
                    d = np.asarray(v) - np.asarray(peers[best])
                    lines.append(f"\n{meth} − {best}: {d.mean():+.3f} ± {d.std():.3f} (paired by slide), ahead on "
                                 f"{int((d > 0).sum())}/{len(d)} slides.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from _designs import run_designs

    a, names, res, seconds = run_designs(
        __doc__, DESIGNS, lambda name, kw, res, args: run_design(name, kw, res, args.cross_cells),
        extra=lambda p: p.add_argument("--cross-cells", type=int, default=4000,
                                       help="cells of the second slide of each design"))
    header = (f"# Tissue domains: spatia vs baselines ({a.designs} designs)\n\nCommand: `python benchmarks/domains.py "
              f"--designs {a.designs}` ({platform.machine()}, {time.strftime('%Y-%m-%d')}, {a.threads} torch "
              f"thread(s), total {seconds:.0f} s). ARI against the simulated domains; each column is one slide (design "
              f"in the script's DESIGNS). Higher is better.")
    text = report(res, names, header)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
