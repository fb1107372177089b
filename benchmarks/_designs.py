"""Shared driver of the held-out-design benchmarks (``image_expression.py``, ``imputation.py``).

Each script defines ``DESIGNS`` (``dev``: choose anything on these; ``report``: report on these) and a
``run_design(name, kwargs, res)`` that appends ``(design, value)`` to ``res[metric, method]``. :func:`run` parses
the command line, runs the designs one torch thread at a time, and writes one markdown table per metric with
the paired margins of spatia's row over each peer.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def tables(res: dict, names: list[str], metrics: tuple[str, ...], ours: str, peers: tuple[str, ...]) -> list[str]:
    """One table per metric (then ``wall s`` and ``info``): mean and per design; margins of ``ours`` per peer."""
    lines = []
    for m in (*metrics, "wall s", "info"):
        rows = [(k[1], dict(v)) for k, v in res.items() if k[0] == m]
        if not rows:
            continue
        lines += [f"**{m}**", "", "| method | mean | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for label, per in rows:
            vals = [per[n] for n in names if n in per]
            lines.append(f"| {label} | {np.mean(vals):.3f} | " + " | ".join(f"{per[n]:.3f}" for n in names) + " |")
        lines.append("")
        if m in metrics:
            mine = dict(res[m, ours])
            for peer in peers:
                d = np.array([mine[n] - dict(res[m, peer])[n] for n in names])
                lines.append(f"{ours} − {peer}: {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} "
                             f"(paired by slide), ahead on {(d > 0).sum()}/{len(d)} slides.")
                lines.append("")
    return lines


def run_designs(doc: str, designs: dict, run_design, *, extra=None):
    """Parse ``--designs dev|report``, ``--only``, ``--threads``, ``--out`` (and what ``extra(parser)`` adds), run
    ``run_design(name, kwargs, res, args)`` on each chosen design; return ``(args, names, res, seconds)``."""
    import torch

    import spatia as sp

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--designs", choices=list(designs), default="report")
    p.add_argument("--only", nargs="*", help="run only these design names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    if extra is not None:
        extra(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sp.settings.progress_bar = False
    sp.settings.verbosity = 1
    chosen = {k: v for k, v in designs[a.designs].items() if not a.only or k in a.only}
    res = defaultdict(list)
    t0 = time.time()
    for name, kw in chosen.items():
        run_design(name, kw, res, a)
    return a, list(chosen), res, time.time() - t0


def run(doc: str, designs: dict, run_design, *, title: str, intro: str, metrics: tuple[str, ...], ours: str,
        peers: tuple[str, ...]) -> None:
    """The command line of a held-out-design benchmark (:func:`run_designs`) and its report: one table per metric
    with the paired margins of ``ours`` over each peer."""
    import spatia as sp

    a, names, res, seconds = run_designs(doc, designs, lambda name, kw, res, _: run_design(name, kw, res))
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    header = (f"{platform.machine()}, {datetime.date.today()}, spatia {sp.__version__}, {a.threads} torch "
              f"thread(s), total {seconds:.0f} s. Designs: " +
              "; ".join(f"{k}: {designs[a.designs][k]}" for k in names) + ".")
    lines = [f"# {title} ({', '.join(names)})", "", f"`{command.strip()}`", "", header, "", intro, ""]
    text = "\n".join(lines + tables(res, names, metrics, ours, peers))
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
