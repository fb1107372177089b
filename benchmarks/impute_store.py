"""Whole-transcriptome imputation from a reference, written to a zarr store block by block: time and peak memory.

``sp.tl.impute(..., reference=, store=)`` maps each cell to its reference neighbours and writes the cells ×
reference-genes table to a zarr store as it is computed (``_ReferenceMap.block`` per ~64 MB of output); the
table then reads lazily. This script runs that path alone (the model's inference, which ``scale.py`` times as
"impute", is replaced by simulated panel profiles) for growing numbers of cells against a sparse reference of
``--ref-genes`` genes, and, as the peer in the same run, the in-memory path (a dense cells × genes array, what
gimVI's ``get_imputed_values`` and Tangram's projection return) where it fits in ``--dense-limit-gib``.

    OMP_NUM_THREADS=1 python benchmarks/impute_store.py --cells 10000 100000 --ref-genes 20000

Each size runs in a fresh process; the RSS is sampled every 20 ms. Prints a markdown table (``--out`` writes it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def _peak_rss_sampler():
    import psutil

    proc, state = psutil.Process(), {"peak": 0, "stop": False}

    def run():
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return proc, state


def _inputs(n: int, n_panel: int, ref_cells: int, ref_genes: int, seed: int = 0):
    """Panel profiles and counts (about 100 per cell) of ``n`` cells, and a sparse reference (10 % non-zero)
    sharing the panel genes."""
    import scipy.sparse as sps

    rng = np.random.default_rng(seed)
    k = 12  # cell types
    centres = rng.gamma(1.0, 1.0, size=(k, n_panel)).astype(np.float32)
    rho = centres[rng.integers(k, size=n)] * rng.lognormal(0, 0.3, size=(n, n_panel)).astype(np.float32)
    rho /= rho.sum(1, keepdims=True)
    ref_type = rng.integers(k, size=ref_cells)
    panel = (centres[ref_type] * rng.lognormal(0, 0.3, size=(ref_cells, n_panel)) * 50).astype(np.float32)
    other = sps.random(ref_cells, ref_genes, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    other.data = np.ceil(other.data * 5)
    counts = sps.hstack([sps.csr_matrix(np.round(panel)), other], format="csr")
    genes = [f"p{i}" for i in range(n_panel)] + [f"g{i}" for i in range(ref_genes)]
    cells = sps.csr_matrix(rng.poisson(rho * 100).astype(np.float32))
    return rho, cells, counts, genes


def _run(n: int, args, mode: str, queue) -> None:
    import anndata as ad
    import pandas as pd

    from spatia.tl._impute import _new_table_like
    from spatia.tl._reference_mapping import _lazy_log1p, _reference_map, _write_table_store

    rho, cells, counts, genes = _inputs(n, args.panel, args.ref_cells, args.ref_genes)
    panel, targets = genes[: args.panel], genes[args.panel :]
    table = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    proc, state = _peak_rss_sampler()
    start_rss = proc.memory_info().rss
    state["peak"] = start_rss
    t0 = time.perf_counter()
    mapping = _reference_map(cells, rho, panel, counts, genes, panel, targets, 50, 30, 0)
    if mode == "store":
        store = args.workdir / f"imputed_{n}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        new = _write_table_store(_new_table_like(table, _lazy_log1p(mapping), targets, {}), store, overwrite=False)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        shutil.rmtree(store, ignore_errors=True)
        del new
    else:
        x = mapping.all()
        np.log1p(x, out=x)
        size = x.nbytes
    dt = time.perf_counter() - t0
    state["stop"] = True
    queue.put((dt, state["peak"], start_rss, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ref-genes", type=int, default=20_000)
    parser.add_argument("--ref-cells", type=int, default=5_000)
    parser.add_argument("--panel", type=int, default=300, help="panel genes shared with the reference")
    parser.add_argument("--dense-limit-gib", type=float, default=6.0, help="run the in-memory peer up to this size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spatia_scale"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.cells:
        for mode in ("store", "dense"):
            gib = 4 * n * args.ref_genes / 2**30
            if mode == "dense" and gib > args.dense_limit_gib:
                rows.append((n, mode, None, None, None, gib))
                continue
            q = ctx.Queue()
            p = ctx.Process(target=_run, args=(n, args, mode, q))
            p.start()
            dt, peak, start, size = q.get()
            p.join()
            rows.append((n, mode, dt, peak, peak - start, size / 2**30))
            print(f"{n:>9,} {mode:5s} {dt:8.1f} s  peak {peak / 2**30:5.2f} GiB (+{(peak - start) / 2**20:6.0f} MiB)"
                  f"  output {size / 2**30:5.2f} GiB", flush=True)
    lines = [f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/impute_store.py --cells "
             f"{' '.join(map(str, args.cells))} --ref-genes {args.ref_genes}`", "",
             f"Reference: {args.ref_cells:,} cells × {args.ref_genes:,} genes (10 % non-zero) + {args.panel} panel "
             "genes; 50 neighbours, 30 PCs.", "",
             "| cells | path | s | µs / cell | peak RSS GiB | + MiB | output GiB (store: on disk) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for n, mode, dt, peak, plus, size in rows:
        name = "store= (zarr, block by block)" if mode == "store" else "in memory (dense, the peers' way)"
        if dt is None:
            lines.append(f"| {n:,} | {name} | not run: {size:.1f} GiB dense | | | | |")
        else:
            lines.append(f"| {n:,} | {name} | {dt:.1f} | {dt / n * 1e6:.0f} | {peak / 2**30:.2f} | "
                         f"{plus / 2**20:.0f} | {size:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
