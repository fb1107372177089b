"""Training / inference throughput, peak memory and size of the SPATIA encoder, beside scVI in the same run.

    python benchmarks/train.py --cells 2000 --presets default large --steps 20 [--device cuda]

For each preset: parameters, training cells/s (forward + backward + AdamW step on batches of centre cells
with their niche members), inference cells/s, and peak memory (CPU: peak RSS growth of a fresh process;
CUDA: ``torch.cuda.max_memory_allocated``). The peer is scvi-tools' SCVI trained on the same counts
(expression only, so it is a floor on cost, not an equal model). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spatia(preset: str, n_cells: int, steps: int, device: str, q) -> None:
    import numpy as np
    import torch

    import spatia as sp
    from spatia.data._prepare import prepare
    from spatia.module import SpatiaModule

    sp.settings.progress_bar = False
    cfg = getattr(sp.SpatiaConfig, preset)()
    sdata = sp.datasets.simulate(n_cells, random_state=0)
    p = prepare(sdata, image_key="morphology", crop_kwargs={"size": cfg.image.size, "crop_um": cfg.image.crop_um}, niche_k=cfg.niche.k,
                tile_um=cfg.tissue.tile_um)
    torch.manual_seed(0)
    module = SpatiaModule(cfg, len(p.genes), len(p.channels)).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batches = p.arrays.plan(cfg.train.batch_size, np.random.default_rng(0))
    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bf16 = device == "cuda"

    def step(b, train):
        b = {k: v.to(device) for k, v in p.arrays.collate(b).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = module(b, train=train)
        if train:
            loss = module.total_loss(out.losses)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return len(b["core"])

    step(batches[0], True)  # warm-up
    n, t0 = 0, time.perf_counter()
    for i in range(steps):
        n += step(batches[i % len(batches)], True)
    if device == "cuda":
        torch.cuda.synchronize()
    train_cps = n / (time.perf_counter() - t0)
    module.eval()
    n, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for b in batches:
            n += step(b, False)
    if device == "cuda":
        torch.cuda.synchronize()
    infer_cps = n / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - base
    q.put((f"spatia {preset}", sum(x.numel() for x in module.parameters()), train_cps, infer_cps, peak))


def _scvi(n_cells: int, device: str, q) -> None:
    import scvi

    import spatia as sp

    sdata = sp.datasets.simulate(n_cells, random_state=0)
    adata = sdata["table"].copy()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    base = _rss_mb()
    t0 = time.perf_counter()
    model.train(max_epochs=5, accelerator="gpu" if device == "cuda" else "cpu", enable_progress_bar=False)
    train_cps = 5 * n_cells / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    model.get_latent_representation()
    infer_cps = n_cells / (time.perf_counter() - t0)
    q.put(("scVI (peer)", sum(x.numel() for x in model.module.parameters()), train_cps, infer_cps, _rss_mb() - base))


def _run(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q))
    proc.start()
    import queue

    while True:  # a crashed child must not leave the parent waiting forever
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__} failed (exit code {proc.exitcode}); see its traceback above.") from None
    proc.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--presets", nargs="+", default=["default", "large"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = [_run(_spatia, p, args.cells, args.steps, args.device) for p in args.presets]
    rows.append(_run(_scvi, args.cells, args.device))
    print(f"\n{args.cells} simulated cells, device={args.device}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}\n")
    print("| model | parameters | train cells/s | inference cells/s | peak memory MB |")
    print("|---|---:|---:|---:|---:|")
    for name, n_par, tr, inf, mem in rows:
        print(f"| {name} | {n_par / 1e6:.2f} M | {tr:,.0f} | {inf:,.0f} | {mem:,.0f} |")


if __name__ == "__main__":
    main()
