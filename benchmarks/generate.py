"""Generation throughput and quality with token merging (ToMe) off and on, at 32, 64 and 128 px, in one run.

For each crop size a decoder is trained on the simulated slide for a fixed wall-clock budget (CPU), then
the same cells are generated (same noise, DDIM) with token merging off and at several ratios. Printed as
a markdown table:

- ``img/s``: generated images per second (``n`` images, ``steps`` DDIM steps, guidance 2 = two UNet
  passes per step);
- ``KID``: kernel inception distance (x 1e3) between generated and real crops of the same cells, on the
  frozen image encoder of the trained SPATIA model (``sp.metrics.image_features``);
- ``W_std``: mean per-feature Wasserstein distance (in units of the real feature's std) of the 10
  morphology features, generated vs real;
- ``Δpix``: mean absolute pixel difference (0-255) to the images generated without merging (same noise):
  how far ToMe moves the samples.

Usage::

    python benchmarks/generate.py --train-minutes 4 --n 64 --steps 10 > benchmarks/results/generate.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="decoder training batch")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="UNet block_out_channels (default: DecoderConfig's; the CLI demo uses 16 32 32 on CPU)")
    args = p.parse_args()
    import spatia as sp
    from spatia.data._prepare import prepare
    from spatia.module import DecoderConfig, DecoderTrainConfig

    torch.set_num_threads(args.threads)  # after the imports (one of them resets it)

    sp.settings.progress_bar = False
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t_all = time.time()
    sdata = sp.datasets.simulate(args.cells, mean_depth=25.0, random_state=3)
    model = sp.tl.fit(sdata, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=20, random_state=0)
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(args.cells, args.n, replace=False))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} thread(s)"
    lines = [
        f"Command: `python benchmarks/generate.py {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, {device}; {args.cells} simulated cells; "
        f"decoder trained {args.train_minutes:g} min per size (`max_time`, batch {args.batch_size}); {args.n} images, "
        f"{args.steps} DDIM steps, guidance 2, sampled in batches of {args.sample_batch}.",
        "",
        "| size | ToMe ratio | epochs | optimiser steps | img/s | speed-up | KID x1e3 | W_std | Δpix vs off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dconf = DecoderConfig(train=DecoderTrainConfig(batch_size=args.batch_size))
    if args.channels:
        dconf = dconf.replace(block_out_channels=tuple(args.channels))
    lines[1] += f" UNet channels {'/'.join(map(str, dconf.block_out_channels))}."
    for size in args.sizes:
        prep = prepare(sdata, table_key="table", image_key="morphology", genes=model.genes,
                       crop_kwargs={"size": size, "crop_um": model.crop_params.get("crop_um"),
                                    "channels": model.channels})
        arrays = prep.arrays
        minutes = args.train_minutes
        model.fit_decoder(arrays, config=dconf, max_epochs=1000,
                          max_time={"minutes": minutes}, random_state=0)
        epochs = len(model.decoder_history)
        opt_steps = model.decoder_info["optimizer_steps"]
        real = arrays.crops.get(cells)
        real_f = sp.metrics.image_features(model, real)
        real_m = sp.metrics.morphology_features(real)
        counts = arrays.counts[cells]
        base = None
        t_off = None
        for ratio in [None, *args.ratios]:
            model.sample_images(counts[:2], num_inference_steps=2, token_merging=ratio)  # warm-up
            t0 = time.perf_counter()
            gen = model.sample_images(counts, num_inference_steps=args.steps, token_merging=ratio, random_state=1,
                                      batch_size=args.sample_batch)
            dt = time.perf_counter() - t0
            if ratio is None:
                base, t_off = gen, dt
            k, _ = sp.metrics.kid(real_f, sp.metrics.image_features(model, gen), subset_size=args.n)
            w = sp.metrics.feature_distances(real_m, sp.metrics.morphology_features(gen)).loc["mean", "wasserstein_std"]
            dpix = float(np.abs(gen.astype(float) - base.astype(float)).mean())
            lines.append(f"| {size} | {'off' if ratio is None else ratio} | {epochs} | {opt_steps} | {args.n / dt:.2f} | "
                         f"{t_off / dt:.2f}x | {k * 1e3:.1f} | {w:.3f} | {dpix:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Total wall time {(time.time() - t_all) / 60:.1f} min."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
