"""The whole pipeline on slides of growing size: wall time and peak memory per step, and how they grow.

For each slide size, ``sp.datasets.simulate(n, lazy=True)`` is written once to a zarr SpatialData
(``--workdir``) and read back lazily, as a real slide would be. The pipeline then runs in a fresh process per
size: ``extract_crops`` (to a zarr store), ``fit`` (on a seeded sample of ``--train-cells`` cells, embedding
every cell), ``embed``, ``cluster(level="niche")``, ``annotate`` (10 % of the cells labelled), ``impute``
(panel genes) and ``impute`` from a reference (``--ref-genes`` genes outside the panel), with the peers
scvi-tools' SCVI (trained on the same sample for the same epochs, then the latent of every cell) and
``scanpy.pp.neighbors`` + ``scanpy.tl.leiden`` on the same embedding. A thread samples the process's RSS every
20 ms: each step's peak RSS, and its peak above the RSS at its start, are reported.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --cells 10000 100000
    OMP_NUM_THREADS=1 python benchmarks/scale.py --cells 10000 100000 1000000

Writes ``benchmarks/results/scale.md`` (``--out``) with the growth exponents per step (time ∝ n^a, memory ∝
n^b, least squares on log-log over the sizes run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

IMAGE = "morphology"


# ------------------------------------------------------------------------------------------------ slide
def slide_path(workdir: Path, n: int) -> tuple[Path, float]:
    """The zarr SpatialData of ``simulate(n, lazy=True, random_state=0)`` and the seconds it took to write
    (0 when it was already there)."""
    path = workdir / f"sim_{n}.zarr"
    if path.exists():
        return path, 0.0
    import spatia as sp

    t0 = time.perf_counter()
    sdata = sp.datasets.simulate(n, lazy=True, random_state=0)
    tmp = workdir / f"sim_{n}.tmp.zarr"
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr's note on autosharding, once per chunk
        sdata.write(tmp)  # renders the lazy image / labels chunk by chunk
    tmp.rename(path)
    dt = time.perf_counter() - t0
    print(f"  simulated and wrote {n:,} cells to {path} in {dt:.0f} s", flush=True)
    return path, dt


# ------------------------------------------------------------------------------------------------ memory
class RssSampler:
    """Samples the process's RSS in a thread; :meth:`step` measures one step's time and peak RSS."""

    def __init__(self, every: float = 0.02):
        import psutil

        self.proc, self.every = psutil.Process(), every
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def step(self, fn, *args, **kwargs):
        """``(result, seconds, rss at start, peak rss during)`` of ``fn(*args, **kwargs)``."""
        import gc

        gc.collect()
        start = self.rss()
        self.peak = start
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        peak = max(self.peak, self.rss())
        return out, dt, start, peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------ pipeline
def _warm_up(preset: str) -> None:
    """Compile and import what is on first use (numba crop kernels, pynndescent, torch, scvi-tools) outside the
    timings."""
    from anndata import AnnData

    import spatia as sp
    from spatia._utils import scanpy_neighbors

    sd = sp.datasets.simulate(300, random_state=1)
    config = getattr(sp.SpatiaConfig, preset)()
    model = sp.tl.fit(sd, image_key=IMAGE, config=config, max_epochs=1, random_state=0)
    sp.tl.cluster(sd, level="niche")
    x = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    scanpy_neighbors(AnnData(obsm={"X": x}), use_rep="X", random_state=0)  # pynndescent above 4,096 cells
    _scvi_peer(sd["table"], 300, 1)  # scvi-tools' imports and its first Lightning run
    del model


def _reference(table, n_ref: int, n_extra: int, seed: int = 0):
    """A scRNA-seq-like reference of ``n_ref`` cells: the slide's panel counts of random cells plus ``n_extra``
    genes outside the panel that follow the cells' types (cost, not quality)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp_sparse

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(table.n_obs, size=min(n_ref, table.n_obs), replace=False))
    panel = sp_sparse.csr_matrix(table.X[rows])
    types = table.obs["cell_type"].astype("category").cat.codes.to_numpy()[rows]
    mean = rng.gamma(0.5, 2.0, size=(types.max() + 1, n_extra))
    extra = sp_sparse.csr_matrix(rng.poisson(mean[types]).astype(np.float32))
    x = sp_sparse.hstack([panel.astype(np.float32), extra]).tocsr()
    genes = list(table.var_names) + [f"ref_gene_{i}" for i in range(n_extra)]
    return ad.AnnData(X=x, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


def _scvi_peer(table, train_cells: int, epochs: int):
    """scvi-tools' SCVI as its users call it (defaults: 10 latent dimensions, batches of 128), trained on the same
    number of sampled cells for the same epochs as spatia's ``fit``, then the latent representation of every cell:
    the expression-only peer of ``fit`` + ``embed``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp_sparse
    import scvi

    scvi.settings.seed = 0
    counts = sp_sparse.csr_matrix(table.X, dtype=np.float32)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=table.obs_names.astype(str)),
                       var=pd.DataFrame(index=table.var_names.astype(str)))
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, size=min(train_cells, adata.n_obs), replace=False))
    train = adata[rows].copy()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    scvi.model.SCVI.setup_anndata(adata)
    return model.get_latent_representation(adata)


def pipeline(path: str, n: int, workdir: str, preset: str, train_cells: int, epochs: int, ref_cells: int,
             ref_genes: int, backed: bool, out_json: str) -> None:
    """Every step on one slide, in this (fresh) process; the measurements go to ``out_json``.

    ``backed``: on a copy of the slide (made before the timings), ``embed`` and the panel ``impute`` write their
    results into its store as they come (``backed=True``) and the reference table goes to a store of its own
    (``store=``): the results are then on disk, not in the process.
    """
    import torch

    torch.set_num_threads(1)
    import spatialdata

    import spatia as sp
    from spatia._utils import scanpy_neighbors

    sp.settings.progress_bar = False
    sp.settings.verbosity = 1
    _warm_up(preset)
    sampler = RssSampler()
    rows, info = [], {}

    def run(name, fn, *args, output_bytes=0, **kwargs):
        out, dt, start, peak = sampler.step(fn, *args, **kwargs)
        rows.append({"step": name, "seconds": dt, "rss_start": start, "rss_peak": peak, "output_bytes": output_bytes})
        print(f"  {name}: {dt:.1f} s, peak RSS {peak / 2**30:.2f} GiB (+{(peak - start) / 2**20:.0f} MiB)",
              flush=True)
        return out

    config = getattr(sp.SpatiaConfig, preset)()
    ref_store = None
    if backed:  # the results go into the slide's store: a copy, so that the slide stays as simulated
        copy = Path(workdir) / f"backed_{n}.zarr"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        path, ref_store = str(copy), str(Path(workdir) / f"backed_ref_{n}.zarr")
        shutil.rmtree(ref_store, ignore_errors=True)
    on_disk = 0 if backed else 1  # the outputs that stay in memory
    sdata = run("read (lazy)", spatialdata.read_zarr, path)
    table = sdata["table"]
    store = str(Path(workdir) / f"crops_{n}.zarr")
    shutil.rmtree(store, ignore_errors=True)
    crops = run("extract_crops → zarr", sp.pp.extract_crops, sdata, image_key=IMAGE, size=config.image.size,
                crop_um=config.image.crop_um, store=store)
    emb_bytes = 3 * n * config.embed_dim * 4
    model = run(f"fit (n_cells={train_cells:,}, {epochs} epochs; embed all)", sp.tl.fit, sdata,
                image_key=IMAGE, config=config, crops=crops, n_cells=train_cells, max_epochs=epochs,
                random_state=0, output_bytes=emb_bytes)
    info["epochs_run"] = int(model.train_info["epochs"])
    run("embed (backed=True)" if backed else "embed", sp.tl.embed, sdata, model, image_key=IMAGE, crops=crops,
        overwrite=True, backed=backed, output_bytes=emb_bytes * on_disk)
    run(f"peer: scVI (fit on the same {train_cells:,}-cell sample, {epochs} epochs; latent of every cell)",
        _scvi_peer, table, train_cells, epochs, output_bytes=n * 10 * 4)
    run("cluster(level='niche')", sp.tl.cluster, sdata, level="niche", output_bytes=n * 8)
    from sklearn.metrics import adjusted_rand_score

    info["niche_ari"] = float(adjusted_rand_score(table.obs["domain"], table.obs["spatia_niche"]))
    info["niche_resolution"] = float(table.uns["spatia"]["cluster"]["resolution"])

    def peer():
        import scanpy as sc
        from anndata import AnnData

        tmp = AnnData(obs=table.obs[["domain"]].copy(), obsm={"X": np.asarray(table.obsm["X_spatia_cell"])})
        scanpy_neighbors(tmp, use_rep="X", random_state=0)  # sc.pp.neighbors (scipy 1.17 fix)
        sc.tl.leiden(tmp, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        return float(adjusted_rand_score(tmp.obs["domain"], tmp.obs["leiden"]))

    info["peer_ari"] = run("peer: scanpy.pp.neighbors + scanpy.tl.leiden (X_spatia_cell)", peer, output_bytes=n * 8)
    rng = np.random.default_rng(0)
    known = table.obs["cell_type"].astype(object).where(rng.random(n) < 0.1)
    table.obs["known_type"] = known.astype("category")
    n_types = table.obs["cell_type"].nunique()
    run("annotate (10 % labelled)", sp.tl.annotate, sdata, labels_key="known_type", output_bytes=n * (8 + 4 + 8 * n_types))
    info["annotate_cv_accuracy"] = float(table.uns["spatia"]["annotate"].get("cv_accuracy", np.nan))
    run("impute (panel genes → layer" + (", backed=True)" if backed else ")"), sp.tl.impute, sdata, model,
        image_key=IMAGE, crops=crops, backed=backed, output_bytes=n * table.n_vars * 4 * on_disk)
    reference = _reference(table, ref_cells, ref_genes)
    run(f"impute (reference: {ref_cells:,} cells, {ref_genes} genes outside the panel → table"
        + (", store=)" if backed else ")"), sp.tl.impute, sdata, model, image_key=IMAGE, crops=crops,
        reference=reference, key_added="spatia_ref", overwrite=True, store=ref_store, backed=backed,
        output_bytes=n * (table.n_vars * on_disk + ref_genes * on_disk) * 4)
    sampler.close()
    import resource

    info["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info["n_vars"] = int(table.n_vars)
    info["image_shape"] = list(sdata.images[IMAGE].shape)
    Path(out_json).write_text(json.dumps({"n": n, "rows": rows, "info": info}))
    shutil.rmtree(store, ignore_errors=True)
    if backed:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(ref_store, ignore_errors=True)


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    out_json = str(Path(args[2]) / f"result_{args[1]}.json")
    proc = ctx.Process(target=pipeline, args=(*args, out_json))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"the pipeline on {args[1]:,} cells failed (exit code {proc.exitcode})")
    return json.loads(Path(out_json).read_text())


# ------------------------------------------------------------------------------------------------ report
def machine() -> str:
    import psutil
    import scanpy
    import spatialdata
    import torch
    import zarr

    import spatia

    model = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = psutil.virtual_memory().total / 2**30
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cores} cores ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}, spatialdata {spatialdata.__version__}, scanpy {scanpy.__version__}, "
        f"spatia {spatia.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def others() -> str:
    """The other busy processes (> 5 % of a core over 0.5 s) beside this benchmark and its workers."""
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if cpu > 5 and cmd:
            busy.append((cpu, f"{cmd[:70]} ({cpu:.0f} % CPU)"))
    return "; ".join(b for _, b in sorted(busy, reverse=True)[:6]) or "nothing else busy"


def exponent(n: list[int], y: list[float]) -> float:
    if len(n) < 2 or min(y) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(n), np.log(y), 1)[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000], help="slide sizes (cells)")
    parser.add_argument("--preset", default="default", choices=["tiny", "default", "large"], help="SpatiaConfig")
    parser.add_argument("--train-cells", type=int, default=20_000, help="fit(n_cells=): cells trained on")
    parser.add_argument("--epochs", type=int, default=2, help="fit(max_epochs=)")
    parser.add_argument("--ref-cells", type=int, default=5_000, help="cells of the synthetic reference")
    parser.add_argument("--ref-genes", type=int, default=500, help="reference genes outside the panel (imputed)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spatia_scale"), help="slides and stores")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    parser.add_argument("--backed", action="store_true",
                        help="embed and impute write into (a copy of) the slide's store as they go; reference → store=")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python " + " ".join(
        [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    load_before, others_before = os.getloadavg(), others()
    print(f"load average {load_before}; busy: {others_before}", flush=True)
    results, sim_seconds = [], {}
    for n in args.cells:
        print(f"{n:,} cells", flush=True)
        path, sim_seconds[n] = slide_path(args.workdir, n)
        results.append(run_isolated(str(path), n, str(args.workdir), args.preset, args.train_cells, args.epochs,
                                    args.ref_cells, args.ref_genes, args.backed))
        print(f"  load average now {os.getloadavg()}; busy: {others()}", flush=True)
    load_after, others_after = os.getloadavg(), others()
    text = report(args, command, results, sim_seconds, load_before, load_after, others_before, others_after)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


def report(args, command, results, sim_seconds, load_before, load_after, others_before, others_after) -> str:
    sizes = [r["n"] for r in results]
    steps = [row["step"] for row in results[0]["rows"]]
    gib, mib = 2**30, 2**20
    head = "| step | " + " | ".join(f"{n:,} cells: s / peak GiB / +MiB" for n in sizes) + " | a (time) | b (+MiB) |"
    lines = [head, "|---|" + "---:|" * len(sizes) + "---:|---:|"]
    for i, step in enumerate(steps):
        rs = [r["rows"][i] for r in results]
        cells = [f"{x['seconds']:.1f} / {x['rss_peak'] / gib:.2f} / {(x['rss_peak'] - x['rss_start']) / mib:.0f}"
                 for x in rs]
        a = exponent(sizes, [x["seconds"] for x in rs])
        b = exponent(sizes, [max(x["rss_peak"] - x["rss_start"], mib) for x in rs])
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {a:.2f} | {b:.2f} |")
    out_lines = ["| step | " + " | ".join(f"{n:,} cells: output MiB" for n in sizes) + " |",
                 "|---|" + "---:|" * len(sizes)]
    for i, step in enumerate(steps):
        out_lines.append(f"| {step} | " + " | ".join(f"{r['rows'][i]['output_bytes'] / mib:.0f}" for r in results) + " |")
    info = []
    for r in results:
        x = r["info"]
        info.append(
            f"- {r['n']:,} cells (image {tuple(x['image_shape'])}, {x['n_vars']} genes; slide simulated and written "
            f"in {sim_seconds[r['n']]:.0f} s{' before this run' if not sim_seconds[r['n']] else ''}): process peak "
            f"RSS {x['process_peak_rss'] / gib:.2f} GiB; fit ran {x['epochs_run']} epochs; niche ARI vs domains "
            f"{x['niche_ari']:.3f} (resolution {x['niche_resolution']}), peer Leiden ARI {x['peer_ari']:.3f}; "
            f"annotate out-of-fold accuracy {x['annotate_cv_accuracy']:.3f}.")
    return "\n".join([
        "# The pipeline at 10k–1M cells: time and peak memory per step",
        "",
        f"`{command}` — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        f"Load average (1, 5, 15 min) {tuple(round(v, 2) for v in load_before)} before, "
        f"{tuple(round(v, 2) for v in load_after)} after. Busy beside this run, before: {others_before}; after: "
        f"{others_after}.",
        "",
        f"Slides: `sp.datasets.simulate(n, lazy=True, random_state=0)` written to zarr and read back lazily. "
        f"Preset `SpatiaConfig.{args.preset}()`; `fit(n_cells={args.train_cells}, max_epochs={args.epochs})`; "
        "every step runs in one fresh process per size, after a warm-up on a 300-cell slide (numba, pynndescent "
        "and torch compiled outside the timings). Each cell: wall seconds / peak RSS of the process during the "
        "step (GiB) / that peak minus the RSS at the step's start (MiB, what the step itself allocates, its "
        "outputs included). a, b: least-squares slopes of log time and log(+MiB) against log n."
        + (" `--backed`: on a copy of each slide, `embed` and both imputations write into its store as they go "
           "(`backed=True`) and the reference table into a store of its own (`store=`); their outputs are on "
           "disk, so their output column is 0." if args.backed else ""),
        "",
        *lines,
        "",
        "What each step writes (embeddings, labels, layers, tables: memory that grows with n by design):",
        "",
        *out_lines,
        "",
        *info,
        "",
    ])


if __name__ == "__main__":
    main()
