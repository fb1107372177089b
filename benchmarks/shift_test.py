"""Time and peak memory of the morphology-shift test (``PairResult.shift_test``) on large slides.

Compares spatia's implementation (neighbourhood means in chunks, the pooled covariance from neighbourhood
counts: memory O(n·k)) with the direct one that materialises the ``(n, k, 10)`` array of every
neighbourhood's shifts and their residuals, on random data (``n`` source cells, 50 PCs, 10 features,
k = 60). Both give the same statistics (checked here); the kNN search is shared and timed apart.

Usage::

    python benchmarks/shift_test.py --n 10000 50000 100000 --out benchmarks/results/shift_test.md
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.neighbors import NearestNeighbors

from spatia.tl._pairing import _shift_test


def direct(coords, fs, ft, k):
    """The textbook version: every neighbourhood's shifts and residuals held at once."""
    both = np.concatenate([fs, ft])
    mu, sd = both.mean(0), both.std(0)
    d = (ft - mu) / sd - (fs - mu) / sd
    idx = NearestNeighbors(n_neighbors=k).fit(coords).kneighbors(coords, return_distance=False)
    nb = d[idx]
    dbar = nb.mean(1)
    resid = (nb - dbar[:, None, :]).reshape(-1, d.shape[1])
    cov = resid.T @ resid / (len(resid) - len(d))
    w, v = np.linalg.eigh(cov)
    stat = k * ((dbar @ (v / np.sqrt(w))) ** 2).sum(1)
    return stat, len(w), stats.chi2.sf(stat, len(w))


def knn(coords, k):
    return NearestNeighbors(n_neighbors=k).fit(coords).kneighbors(coords)


def measure(fn, *args):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    p.add_argument("--k", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results/shift_test.md")
    a = p.parse_args()
    rows = []
    for n in a.n:
        rng = np.random.default_rng(0)
        coords = rng.normal(size=(n, 50))
        fs, ft = rng.normal(size=(n, 10)), rng.normal(size=(n, 10)) + 0.3 * (coords[:, :1] > 1)
        _, knn_s, _ = measure(knn, coords, a.k)
        (s1, _, _), t1, m1 = measure(_shift_test, coords, fs, ft, a.k)
        (s2, _, _), t2, m2 = measure(direct, coords, fs, ft, a.k)
        rows.append({"cells": n, "kNN alone (s)": knn_s, "spatia (s)": t1, "spatia peak (MiB)": m1,
                     "direct (s)": t2, "direct peak (MiB)": m2, "max |Δ statistic|": float(np.abs(s1 - s2).max())})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    text = ["# Morphology-shift test: time and peak memory", "",
            f"Command: `python {' '.join(sys.argv)}` (CPU; peak = Python-traced allocations, kNN included; "
            f"k = {a.k}, 50 PCs, 10 features).", "", df.round(3).to_markdown(index=False), ""]
    with open(a.out, "w") as fh:
        fh.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
