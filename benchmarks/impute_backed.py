"""The panel imputation of a large panel, written into the slide's store as it comes: time and peak memory.

``sp.tl.impute(sdata, model, backed=True)`` sends the model's per-cell output to a file while it runs and
writes the cells × panel-genes layer into the zarr store the slide was read from, a block of cells at a time;
the table's layer then reads it lazily. The peer, in the same run, is the in-memory path (``backed=False``, the
default), which holds the whole layer, as scanpy's and scvi-tools' functions return theirs.

    OMP_NUM_THREADS=1 python benchmarks/impute_backed.py --cells 20000 50000 100000 --genes 2000

Each (size, method) runs in a fresh process on a copy of the slide; the RSS is sampled every 20 ms. The
model (default preset) is trained once, on a separate 2,000-cell slide of the same design, for one epoch: the
cost measured is inference and writing, not training. The crops are extracted to a store on disk first (not
timed), so both methods read them the same way. Prints a markdown table (``--out`` writes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

IMAGE = "morphology"
METHODS = {
    "backed": "spatia: impute(backed=True), layer written into the store block by block",
    "memory": "peer: impute() in memory (the default), layer held whole",
}


def _slide(workdir: Path, n: int, genes: int, seed: int) -> Path:
    import spatia as sp

    path = workdir / f"sim_{n}_{genes}.zarr"
    if not path.exists():
        sdata = sp.datasets.simulate(n, n_genes=genes, lazy=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sdata.write(path)
    return path


def _one(method: str, n: int, genes: int, workdir: str, out_json: str) -> None:
    import spatialdata as sd
    from scale import RssSampler

    import spatia as sp

    sp.settings.progress_bar = False
    warnings.simplefilter("ignore", UserWarning)
    work = Path(workdir)
    model = sp.SpatiaModel.load(work / f"model_{genes}")
    copy = work / f"run_{method}_{n}.zarr"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(_slide(work, n, genes, 0), copy)
    sdata = sd.read_zarr(copy)
    crops = work / f"crops_{n}_{genes}.zarr"
    if not crops.exists():
        sp.pp.extract_crops(sdata, image_key=IMAGE, size=model.config.image.size, store=crops)
    sampler = RssSampler()
    _, dt, start, peak = sampler.step(sp.tl.impute, sdata, model, image_key=IMAGE, crops=str(crops),
                                      backed=method == "backed")
    sampler.close()
    layer = sdata["table"].layers["spatia_imputed"]
    check = float(np.nanmean(np.asarray(layer[: min(n, 2000)])))  # the same numbers either way
    shutil.rmtree(copy, ignore_errors=True)
    Path(out_json).write_text(json.dumps({"s": dt, "peak": peak / 2**30, "plus": (peak - start) / 2**20,
                                          "layer_mib": n * genes * 4 / 2**20, "check": check}))


def _isolated(method: str, n: int, genes: int, workdir: Path) -> dict:
    out = workdir / f"res_{method}_{n}.json"
    proc = mp.get_context("spawn").Process(target=_one, args=(method, n, genes, str(workdir), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{method} at {n:,} cells failed (exit code {proc.exitcode})")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    from scale import exponent, machine, others

    import spatia as sp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spatia_impute_backed"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    busy = others()
    sp.settings.progress_bar = False
    warnings.simplefilter("ignore", UserWarning)
    model_dir = args.workdir / f"model_{args.genes}"
    if not model_dir.exists():
        train = sp.datasets.simulate(2000, n_genes=args.genes, random_state=1)
        model = sp.tl.fit(train, image_key=IMAGE, max_epochs=1, random_state=0)
        model.save(model_dir)
    rows = {m: [] for m in METHODS}
    for n in args.cells:
        _slide(args.workdir, n, args.genes, 0)
        for m in METHODS:
            r = _isolated(m, n, args.genes, args.workdir)
            rows[m].append(r)
            print(f"{n:>9,} {m:>7}: {r['s']:.1f} s, peak {r['peak']:.2f} GiB, +{r['plus']:.0f} MiB "
                  f"(layer {r['layer_mib']:.0f} MiB), check {r['check']:.5f}", flush=True)
    head = " | ".join(f"{n:,} cells: s / peak GiB / +MiB" for n in args.cells)
    lines = [
        f"# Panel imputation of a {args.genes:,}-gene panel: in the store as it comes, or in memory",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/impute_backed.py --cells {' '.join(map(str, args.cells))} "
        f"--genes {args.genes}` — {datetime.date.today()}",
        "",
        f"Machine: {machine()}. Busy beside this run at its start: {busy}.",
        "",
        f"Slides: `sp.datasets.simulate(n, n_genes={args.genes}, lazy=True, random_state=0)` written to zarr and "
        "read back lazily; crops extracted to a store first. Model: default preset, one epoch on a separate "
        "2,000-cell slide. Each cell: wall seconds / peak RSS (GiB) / peak minus the RSS at the step's start "
        "(MiB). b: slope of log(+MiB) against log n.",
        "",
        f"| method | {head} | b (+MiB) |",
        "|---|" + "---:|" * (len(args.cells) + 1),
    ]
    for m, label in METHODS.items():
        cells = " | ".join(f"{r['s']:.1f} / {r['peak']:.2f} / {r['plus']:.0f}" for r in rows[m])
        lines.append(f"| {label} | {cells} | {exponent(args.cells, [r['plus'] for r in rows[m]]):.2f} |")
    lines += ["", "Layer size (cells × genes × 4 bytes): "
              + ", ".join(f"{n:,} cells {n * args.genes * 4 / 2**20:,.0f} MiB" for n in args.cells) + ".",
              f"Busy at the end: {others()}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
