"""Time and peak memory of ``sp.pl.niches`` on a large lazy slide: spatialdata-plot picks a coarse level of the
multiscale image and labels, against drawing the same chain at full resolution (``scale="scale0"``, what a
plot that ignores the pyramid reads) in the same run.

    python benchmarks/niches_plot.py --cells 100000 [--out benchmarks/results/niches_plot.md]

The slide is ``sp.datasets.simulate(n, lazy=True)`` written to zarr with a 5-level pyramid (factors 2, 4, 8, 16,
as spatialdata-io writes Xenium images), then read back lazily. Each measurement runs in a fresh process, so
its peak RSS is its own; "peak MB" is the peak RSS minus the RSS after opening the slide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCALES = [2, 2, 2, 2]


def _write(n: int, path: Path) -> None:
    import numpy as np
    import pandas as pd
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import get_transformation

    import spatia as sp

    sd = sp.datasets.simulate(n, lazy=True, random_state=0)
    img, lab = sd.images["morphology"], sd.labels["cell_labels"]
    sd.images["morphology"] = Image2DModel.parse(
        img.data, dims=("c", "y", "x"), c_coords=list(img.coords["c"].values), scale_factors=SCALES,
        transformations=get_transformation(img, get_all=True), chunks=(1, 1024, 1024))
    sd.labels["cell_labels"] = Labels2DModel.parse(
        lab.data, dims=("y", "x"), scale_factors=SCALES, transformations=get_transformation(lab, get_all=True),
        chunks=(1024, 1024))
    t = sd.tables["table"]
    t.obs["spatia_niche"] = pd.Categorical(np.asarray(t.obs["domain"]).astype(str))
    sd.write(path, overwrite=True)


def _measure(path: str, scale: str | None) -> dict:
    import resource

    import matplotlib

    matplotlib.use("Agg")
    import psutil
    import spatialdata as sd_

    import spatia as sp

    sp.settings.verbosity = 1
    sdata = sd_.read_zarr(path)
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if scale is None:
        fig = sp.pl.niches(sdata, channel="DAPI")
    else:  # the same chain at a forced level
        import spatialdata_plot  # noqa: F401

        fig = (sdata.pl.render_images("morphology", channel="DAPI", cmap="gray", scale=scale)
               .pl.render_labels("cell_labels", color="spatia_niche", table_name="table", fill_alpha=0.6, scale=scale)
               .pl.show(coordinate_systems="global", return_ax=True).figure)
    fig.savefig(os.devnull, format="png", dpi=100)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"wall_s": wall, "peak_mb": (peak - rss0) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--zarr", type=Path, default=Path("/tmp/spatia_niches_plot.zarr"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--measure", nargs=2, metavar=("PATH", "SCALE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(_measure(a.measure[0], None if a.measure[1] == "auto" else a.measure[1])))
        return
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    _write(a.cells, a.zarr)
    write_s = time.perf_counter() - t0
    rows = []
    for label, scale in [("sp.pl.niches (level chosen by spatialdata-plot)", "auto"),
                         ("same chain at full resolution (scale0)", "scale0")]:
        out = subprocess.run([sys.executable, __file__, "--measure", str(a.zarr), scale], capture_output=True,
                             text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, res))
        print(f"{label}: {res['wall_s']:.1f} s, peak {res['peak_mb']:.0f} MB", flush=True)
    import spatia as sp

    lines = [
        "# `sp.pl.niches` on a large lazy slide",
        "",
        f"`python benchmarks/niches_plot.py --cells {a.cells}` — {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}; Python {platform.python_version()}, "
        f"spatia {sp.__version__}. Load average (1 min) {load0:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(other jobs shared the machine; compare the two rows, which ran back to back).",
        "",
        f"Slide: `simulate({a.cells}, lazy=True)` written to zarr with a {len(SCALES) + 1}-level pyramid "
        f"(written in {write_s:.0f} s), read back lazily; each row runs in a fresh process; peak MB = peak RSS minus "
        "the RSS after opening the slide.",
        "",
        "| cells | drawing | wall s | peak MB |",
        "|---:|---|---:|---:|",
        *[f"| {a.cells:,} | {label} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} |" for label, r in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
