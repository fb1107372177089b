"""Time, peak memory and quality of ``sp.tl.cluster(level="niche")`` as the slide grows: its defaults (every cell in
the kNN graph up to ``max_cells``, a sample plus a kNN vote above), every cell in the graph (``max_cells=None``),
and scanpy's neighbours + one Leiden run on the same embedding (the peer users would otherwise run).

    OMP_NUM_THREADS=1 python benchmarks/cluster_scale.py --cells 10000 100000 1000000

Each (size, method) runs in a fresh process, after a warm-up that compiles pynndescent's numba code; the peak RSS
above the RSS at the start of the call is sampled every 20 ms. The embeddings are synthetic (16-d, five spatial
domains as stripes with a mean shift, cells on a jittered lattice), so the ARI against the domains says whether the
sample and vote lose what the whole graph finds; ``benchmarks/domains.py`` measures quality on simulated slides.
Writes ``benchmarks/results/cluster_scale.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

METHODS = {
    "defaults": "sp.tl.cluster(level='niche') defaults",
    "whole": "sp.tl.cluster(level='niche', max_cells=None): every cell in the graph",
    "peer": "peer: scanpy neighbors + leiden (one resolution, no smoothing)",
}


def _slide(n: int, seed: int = 0):
    from anndata import AnnData

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    r, c = np.divmod(np.arange(n), side)
    xy = np.stack([c, r], 1) * 12.0 + rng.normal(0, 2.0, (n, 2))
    dom = (np.floor(xy[:, 0] / (side * 12.0 / 5))).astype(int)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[:, :5] += np.eye(5, dtype=np.float32)[np.clip(dom, 0, 4)] * 1.5
    return AnnData(obs={"domain": dom.astype(str)}, obsm={"X_spatia_cell": emb, "spatial": xy})


def _warm_up() -> None:
    """pynndescent's numba code (index, graph and query) compiled outside the timings."""
    from anndata import AnnData

    from spatia._utils import scanpy_neighbors
    from spatia.tl import _cluster

    x = np.random.default_rng(0).normal(size=(_cluster._EXACT_VOTE_MAX + 1000, 16)).astype(np.float32)
    scanpy_neighbors(AnnData(obsm={"X": x[:5000]}), use_rep="X", random_state=0)
    _cluster.knn_vote(x, np.arange(len(x)) % 3, x[:100], n_neighbors=15)


def _one(n: int, method: str) -> dict:
    """One method on the ``n``-cell slide, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    import scanpy as sc
    from scale import RssSampler
    from sklearn.metrics import adjusted_rand_score

    import spatia as sp
    from spatia._utils import scanpy_neighbors

    sp.settings.verbosity = 1
    _warm_up()
    ad = _slide(n)
    sampler = RssSampler()

    def run():
        if method == "peer":
            scanpy_neighbors(ad, use_rep="X_spatia_cell", random_state=0)  # sc.pp.neighbors (scipy 1.17 fix)
            sc.tl.leiden(ad, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=0)
            return ad.obs["leiden"].to_numpy(), {}
        out = sp.tl.cluster(ad, level="niche", inplace=False, **({"max_cells": None} if method == "whole" else {}))
        return out["obs/spatia_niche"].to_numpy(), out["params"]

    (labels, params), dt, start, peak = sampler.step(run)
    sampler.close()
    codes = np.unique(labels, return_inverse=True)[1].astype(np.int32)
    return {"seconds": dt, "plus_mib": (peak - start) / 2**20, "peak_gib": peak / 2**30,
            "ari": float(adjusted_rand_score(ad.obs["domain"], codes)), "codes": codes,
            "graph_cells": params.get("n_graph_cells", n), "resolution": params.get("resolution", 0.5)}


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    from spatia.tl._cluster import MAX_GRAPH_CELLS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cluster_scale.md")
    a = p.parse_args()
    rows, agree = [], {}
    for n in a.cells:
        res = {}
        for method in METHODS:
            if method == "whole" and n <= MAX_GRAPH_CELLS:
                continue  # identical to the defaults
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                r = ex.submit(_one, n, method).result()
            res[method] = r
            print(f"{n:>9,} {METHODS[method]}: {r['seconds']:.1f} s, +{r['plus_mib']:.0f} MiB, ARI {r['ari']:.3f}, "
                  f"{r['graph_cells']:,} cells in the graph", flush=True)
            rows.append((n, method, r))
        if "whole" in res:
            agree[n] = adjusted_rand_score(res["whole"]["codes"], res["defaults"]["codes"])
    lines = [
        "# Niche clustering as the slide grows: time, memory and quality",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/cluster_scale.py --cells "
        f"{' '.join(map(str, a.cells))}` ({platform.machine()}, {datetime.date.today()}, one torch thread, each "
        "(size, method) in a fresh process after a pynndescent warm-up).",
        "",
        "Synthetic 16-d embeddings: five domains as stripes, a mean shift of 1.5 on one axis per domain, cells on a "
        f"jittered 12 µm lattice. Defaults: at most {MAX_GRAPH_CELLS:,} cells in the kNN graph, the others by a kNN "
        "vote. +MiB: the peak RSS during the call above the RSS at its start.",
        "",
        "| cells | method | cells in the graph | wall s | +MiB | ARI vs domains |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n, method, r in rows:
        lines.append(f"| {n:,} | {METHODS[method]} | {r['graph_cells']:,} | {r['seconds']:.1f} | "
                     f"{r['plus_mib']:.0f} | {r['ari']:.3f} |")
    if agree:
        lines += ["", "Agreement of the defaults with every cell in the graph (ARI between the two partitions): "
                  + ", ".join(f"{n:,} cells {v:.3f}" for n, v in agree.items()) + "."]
    lines += ["", f"Python {platform.python_version()}, {sys.platform}."]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
