"""Writing results into a backed slide: ``sp.tl.write_results`` beside ``sdata.write`` to a new store.

    python benchmarks/write_results.py --slide /tmp/spatia_scale/sim_1000000.zarr \
        --out benchmarks/results/write_results.md

The slide (a zarr store, e.g. one that ``benchmarks/scale.py`` wrote) is copied to a scratch folder and read
lazily. It gets the results that ``fit`` + ``cluster`` + ``annotate`` leave in the table (three ``(n, 32)``
float32 embeddings, two categorical ``obs`` columns, their ``uns["spatia"]`` records), then:

- **spatia**: ``sp.tl.write_results(sdata)``, into the store it was read from;
- **peer**: ``sdata.write(new_store)``, the whole object (images, labels, shapes, counts and results) to a new
  store: what spatialdata allows, since it refuses ``write_element("table", overwrite=True)`` on the store the
  table was read from.

Each prints wall seconds, the peak RSS growth of the process during the write, and the bytes written.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Peak:
    """Peak RSS (MiB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", required=True, help="a SpatialData zarr store")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args()

    import pandas as pd
    import spatialdata as sd

    import spatia as sp
    from spatia._results import save_params

    sp.settings.progress_bar = False
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spatia_write_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "slide.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(args.slide, store)
    sdata = sd.read_zarr(store)
    table = sdata["table"]
    n = table.n_obs
    rng = np.random.default_rng(0)
    for level in ("cell", "niche", "tissue"):
        table.obsm[f"X_spatia_{level}"] = rng.normal(size=(n, 32)).astype(np.float32)
    table.obs["spatia_niche"] = pd.Categorical(rng.integers(0, 12, n).astype(str))
    table.obs["spatia_cell_type"] = pd.Categorical(rng.integers(0, 8, n).astype(str))
    save_params(table, "fit", {}, [f"obsm/X_spatia_{lv}" for lv in ("cell", "niche", "tissue")])
    save_params(table, "cluster", {}, ["obs/spatia_niche"])
    save_params(table, "annotate", {}, ["obs/spatia_cell_type"])
    results_mib = sum(table.obsm[f"X_spatia_{lv}"].nbytes for lv in ("cell", "niche", "tissue")) / 2**20

    rows = []
    before = _size_mib(store)
    with Peak() as peak:
        t0 = time.perf_counter()
        written = sp.tl.write_results(sdata)
        dt = time.perf_counter() - t0
    rows.append(("spatia: `sp.tl.write_results(sdata)` (into the store read from)", dt, peak.peak - peak.start,
                 _size_mib(store) - before, len(written)))
    back = sd.read_zarr(store)["table"]
    assert np.array_equal(back.obsm["X_spatia_cell"], table.obsm["X_spatia_cell"])

    other = work / "rewritten.zarr"
    shutil.rmtree(other, ignore_errors=True)
    with Peak() as peak:
        t0 = time.perf_counter()
        sdata.write(other)
        dt = time.perf_counter() - t0
    rows.append(("peer: `sdata.write(new_store)` (the whole object)", dt, peak.peak - peak.start,
                 _size_mib(other), None))

    lines = [
        "# Writing results into a backed slide",
        "",
        f"`python benchmarks/write_results.py --slide {args.slide}` — {time.strftime('%Y-%m-%d')}",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, spatia "
        f"{sp.__version__}, spatialdata {sd.__version__}. Slide: {n:,} cells, read lazily from zarr; results "
        f"added: 3 embeddings of 32 float32 values per cell ({results_mib:.0f} MiB) and 2 categorical obs columns.",
        "",
        "| method | wall s | peak RSS growth (MiB) | MiB written | keys |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, dt, mem, mib, keys in rows:
        lines.append(f"| {name} | {dt:.1f} | {mem:.0f} | {mib:.0f} | {keys if keys is not None else 'all'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
