"""Time and peak memory of ``sp.tl.cluster(level="niche")`` with its defaults against scanpy's neighbours + one
Leiden run on the same embedding (the peer users would otherwise run), as the number of cells grows.

    python benchmarks/cluster_scale.py --cells 10000 100000

The embeddings are synthetic (16-d, five spatial domains with a mean shift, cells on a jittered lattice): this
measures cost, not quality (``benchmarks/domains.py`` measures quality). The niche default smooths over 30 cells
and runs Leiden at 8 resolutions on one kNN graph, so expect several times the peer's time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _slide(n: int, seed: int = 0):
    from anndata import AnnData

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    r, c = np.divmod(np.arange(n), side)
    xy = np.stack([c, r], 1) * 12.0 + rng.normal(0, 2.0, (n, 2))
    dom = (np.floor(xy[:, 0] / (side * 12.0 / 5))).astype(int)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[:, :5] += np.eye(5, dtype=np.float32)[np.clip(dom, 0, 4)] * 1.5
    return AnnData(obs={"domain": dom.astype(str)}, obsm={"X_spatia_cell": emb, "X_spatia_niche": emb, "spatial": xy})


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    import spatia as sp
    from spatia._utils import scanpy_neighbors

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    a = p.parse_args()
    sp.settings.verbosity = 1
    print("| cells | method | wall s | ARI vs domains | peak RSS GB (process so far) |")
    print("|---:|---|---:|---:|---:|")
    for n in a.cells:
        ad = _slide(n)
        t0 = time.time()
        lab = sp.tl.cluster(ad, level="niche", inplace=False)["obs/spatia_niche"]
        t_sp = time.time() - t0
        print(f"| {n} | sp.tl.cluster(level='niche') defaults | {t_sp:.1f} | "
              f"{adjusted_rand_score(ad.obs['domain'], lab):.3f} | {_peak_gb():.2f} |", flush=True)
        tmp = ad.copy()
        t0 = time.time()
        scanpy_neighbors(tmp, use_rep="X_spatia_cell", random_state=0)  # sc.pp.neighbors (scipy 1.17 fix)
        sc.tl.leiden(tmp, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        t_sc = time.time() - t0
        print(f"| {n} | peer: scanpy neighbors + leiden (one resolution, no smoothing) | {t_sc:.1f} | "
              f"{adjusted_rand_score(tmp.obs['domain'], tmp.obs['leiden']):.3f} | {_peak_gb():.2f} |", flush=True)


if __name__ == "__main__":
    main()
