"""The demo's generated cells: how close do they come to real nuclei within the demo's budget?

``spatia demo`` trains the diffusion decoder for a few CPU epochs and shows generated crops beside real ones
(``figures/generated.png``). This script repeats that step on the demo slide and measures, for each training
setting and each sampler setting, the distance between generated and real crops of the same cells:
``sp.metrics.feature_distances(...)["wasserstein_std"]`` averaged over the morphology features (``W all``), and
for what tells a smooth oval nucleus from a blob: area, eccentricity and solidity (``W shape``) and the
intensity spread (``W texture``). Lower is better. Each training setting also writes a figure (real row, generated row per
cell type) to ``--figures``.

    python benchmarks/demo_generation.py --train "epochs=3" "epochs=6" --sample "steps=20,guidance=2" \
        "steps=50,guidance=1" --figures /tmp/demo_gen

The encoder is the tiny preset (fitted once, cached with ``--encoder-cache``): the decoder conditions on
expression, so the encoder's quality barely matters here; the demo itself fits the default preset.
Single-threaded; time it alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np


def _kv(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        out[k.strip()] = float(v) if "." in v or "e" in v else int(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", nargs="+", default=["epochs=3"],
                   help="decoder training settings: epochs=, lr=, ema=, batch=, channels=16|32 (comma separated)")
    p.add_argument("--sample", nargs="+", default=["steps=20,guidance=2.0"], help="sampler: steps=, guidance=")
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="decoder training and sampling seed")
    p.add_argument("--slide", type=int, default=None,
                   help="simulate(1500, random_state=SLIDE) instead of the demo slide (a check on a slide not "
                        "used to choose the settings)")
    p.add_argument("--encoder-cache", default="/tmp/spatia_demo_gen_enc")
    p.add_argument("--figures", default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    import spatia as sp
    from spatia.module import DecoderConfig, DecoderTrainConfig

    torch.set_num_threads(a.threads)
    sp.settings.verbosity = 1
    sp.settings.progress_bar = False
    logging.getLogger("lightning").setLevel(logging.ERROR)
    sdata = sp.datasets.demo() if a.slide is None else sp.datasets.simulate(1500, random_state=a.slide)
    table = sdata["table"]
    if a.slide is not None:
        a.encoder_cache = f"{a.encoder_cache}_slide{a.slide}"
    if os.path.exists(os.path.join(a.encoder_cache, "config.json")):
        base = sp.SpatiaModel.load(a.encoder_cache)
    else:
        base = sp.tl.fit(sdata, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=10, random_state=0)
        base.save(a.encoder_cache, overwrite=True)
    genes = list(base.genes)
    counts = sp.pp.get_counts(table).toarray().astype(np.float32)[:, table.var_names.get_indexer(genes)]
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(table.n_obs, min(a.n_eval, table.n_obs), replace=False))
    types = table.obs["cell_type"].astype(str).to_numpy()[cells]
    slide = "demo slide" if a.slide is None else f"simulate(1500, random_state={a.slide})"
    print(f"torch {torch.__version__}, {a.threads} thread(s); {slide}, {table.n_obs} cells; {len(cells)} evaluation "
          f"cells; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| training | sampler | W all | W area | W shape | W texture | train s | sample s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    real = None
    for train in a.train:
        tk = _kv(train)
        default = DecoderTrainConfig()
        dc = DecoderConfig(block_out_channels=(16, 32, 32) if tk.get("channels", 16) == 16 else (32, 64, 64),
                           train=DecoderTrainConfig(batch_size=int(tk.get("batch", 8)),
                                                    lr=float(tk.get("lr", default.lr)),
                                                    ema_decay=float(tk.get("ema", default.ema_decay))))
        m = sp.SpatiaModel.load(a.encoder_cache)
        t0 = time.time()
        sp.tl.fit_decoder(sdata, m, image_key="morphology", config=dc, max_epochs=int(tk.get("epochs", 3)),
                          random_state=a.seed)
        train_s = time.time() - t0
        if real is None:
            store = sp.pp.extract_crops(sdata, image_key="morphology", size=m.decoder.config.size,
                                        crop_um=m.crop_params["crop_um"], channels=m.channels)
            real_crops = store.get(cells)
            real = sp.metrics.morphology_features(real_crops)
        for sample in a.sample:
            sk = _kv(sample)
            t0 = time.time()
            gen = m.sample_images(counts[cells], num_inference_steps=int(sk.get("steps", 20)),
                                  guidance_scale=float(sk.get("guidance", 2.0)), random_state=100 + a.seed)
            sample_s = time.time() - t0
            feats = sp.metrics.morphology_features(gen)
            w = {}
            for t in np.unique(types):
                d = sp.metrics.feature_distances(real[types == t], feats[types == t])["wasserstein_std"]
                for f, v in d.drop("mean").items():
                    w.setdefault(f, []).append(v)
            w = {f: float(np.nanmean(v)) for f, v in w.items()}
            print(f"| {train} | {sample} | {np.mean(list(w.values())):.3f} | {w['area']:.3f} | "
                  f"{np.mean([w['eccentricity'], w['solidity']]):.3f} | {w['intensity_std']:.3f} | "
                  f"{train_s:.0f} | {sample_s:.0f} |", flush=True)
            if a.figures:
                _figure(real_crops, gen, types, os.path.join(a.figures, f"{train}__{sample}.png".replace("=", "")))


def _figure(real, gen, types, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    groups = np.unique(types)
    n = 6
    fig, axs = plt.subplots(2 * len(groups), n, figsize=(n * 0.9, 2 * len(groups) * 0.9))
    for g_i, g in enumerate(groups):
        idx = np.flatnonzero(types == g)[:n]
        for row, src in ((2 * g_i, real), (2 * g_i + 1, gen)):
            for j in range(n):
                ax = axs[row, j]
                ax.axis("off")
                if j < len(idx):
                    ax.imshow(src[idx[j], 0], cmap="gray", vmin=0, vmax=255)
            axs[row, 0].set_title(f"{g} {'real' if src is real else 'gen'}", fontsize=6, loc="left")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
