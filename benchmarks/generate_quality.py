"""Does the diffusion decoder use its condition? Conditioned vs shuffled vs unconditional, and a counterfactual.

A tiny SPATIA encoder is fitted once on a simulated slide (ground truth: cell types with distinct nuclear
morphology, and a ``size_program`` whose genes drive the nuclear size). Then, for each seed, two decoders
are trained with the same configuration: the **conditioned** one and an **unconditional** one
(``cond_dropout=1.0``). On a fixed set of evaluation cells we generate:

- ``cond``: each cell from its own expression;
- ``shuffled``: each cell from another evaluation cell's expression (a random permutation; same noise);
- ``uncond``: from the unconditional model.

and compare them, cell type by cell type, with the real crops of the same cells: the per-type mean of
``sp.metrics.feature_distances(...)["wasserstein_std"]`` (Wasserstein distance in units of the real
feature's standard deviation), averaged over the 10 morphology features (``W all``) and for the nuclear
area alone (``W area``). Lower is better; a decoder that uses its condition has ``cond`` < ``shuffled`` and
``cond`` < ``uncond``.

Counterfactual: the same cells and noise, generated with the size-programme genes set to 0 and to their
99th percentile: the relative change of the mean nuclear area (``Δarea``) and the fraction of cells whose
area grew (``up``).

Prints a markdown table (one row per seed and a mean row) and the wall time. Single-threaded.

Usage::

    python benchmarks/generate_quality.py --seeds 0 1 2 > benchmarks/results/generate_quality.md
    python benchmarks/generate_quality.py --set ema_decay=0 --set warmup_steps=0   # an ablation
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import os
import shlex
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _per_type(real_f, gen_f, types, feature=None) -> float:
    import spatia as sp

    d = sp.metrics.feature_distances_by_group(real_f, gen_f, types)
    return float(d.loc["mean" if feature is None else feature].mean())


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=1200, help="simulated cells")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="decoder training / sampling seeds")
    p.add_argument("--epochs", type=int, default=None, help="decoder epochs (default: the config's)")
    p.add_argument("--n-eval", type=int, default=300, help="evaluation cells")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: sample_images')")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="DecoderConfig or DecoderTrainConfig field override (repeatable), e.g. --set batch_size=8")
    p.add_argument("--encoder-epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--encoder-cache", default=None, help="directory: save the fitted encoder there / reuse it")
    args = p.parse_args()

    import spatia as sp
    from spatia.module import DecoderConfig, DecoderTrainConfig

    torch.set_num_threads(args.threads)  # after the imports
    sp.settings.progress_bar = False
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    t_all = time.time()

    sdata = sp.datasets.simulate(args.cells, mean_depth=25.0, random_state=3)
    cache = args.encoder_cache
    if cache and os.path.exists(os.path.join(cache, "config.json")):
        model = sp.SpatiaModel.load(cache)
    else:
        model = sp.tl.fit(sdata, image_key="morphology", config=sp.SpatiaConfig.tiny(),
                          max_epochs=args.encoder_epochs, random_state=0)
        if cache:
            model.save(cache, overwrite=True)
    table = sdata["table"]
    counts = sp.pp.get_counts(table).toarray().astype(np.float32)
    genes = list(model.genes)
    counts = counts[:, table.var_names.get_indexer(genes)]
    types_all = table.obs["cell_type"].astype(str).to_numpy()
    size_genes = [g for g in table.var_names[(table.var["role"] == "size_program").to_numpy()] if g in genes]
    size_idx = [genes.index(g) for g in size_genes]
    high = float(np.percentile(counts[:, size_idx], 99))

    sets = _parse_set(args.set)  # DecoderConfig fields, or DecoderTrainConfig fields (its train section)
    training = {f.name for f in dataclasses.fields(DecoderTrainConfig)}
    config = DecoderConfig().replace(**{k: v for k, v in sets.items() if k not in training},
                                     train={k: v for k, v in sets.items() if k in training})
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(table.n_obs, min(args.n_eval, table.n_obs), replace=False))
    types = types_all[cells]
    x = counts[cells]
    perm = rng.permutation(len(cells))
    x_up, x_down = x.copy(), x.copy()
    x_up[:, size_idx], x_down[:, size_idx] = high, 0.0

    store = None
    kw = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        models = {}
        for name, dc in (("cond", config), ("uncond", config.replace(train={"cond_dropout": 1.0}))):
            m = sp.SpatiaModel.load(_save_tmp(model))
            t0 = time.time()
            sp.tl.fit_decoder(sdata, m, image_key="morphology", config=dc, max_epochs=args.epochs, random_state=seed)
            dt = time.time() - t0
            if name == "cond":
                n_steps = int(m.decoder_info.get("optimizer_steps", 0)) or None
                row["train s"] = dt
                row["steps/s"] = (n_steps / dt) if n_steps else float("nan")
                row["opt steps"] = n_steps
                row["loss"] = m.decoder_history[-1].get("train_loss", float("nan")) if m.decoder_history else np.nan
            models[name] = m
        if store is None:
            dec = models["cond"].decoder.config
            store = sp.pp.extract_crops(sdata, image_key="morphology", size=dec.size,
                                        crop_um=model.crop_params["crop_um"], channels=model.channels)
            real = sp.metrics.morphology_features(store.get(cells))
        feats = {
            "cond": models["cond"].sample_images(x, random_state=100 + seed, **kw),
            "shuffled": models["cond"].sample_images(x[perm], random_state=100 + seed, **kw),
            "uncond": models["uncond"].sample_images(x, random_state=100 + seed, unconditional=True, **kw),
        }
        feats = {k: sp.metrics.morphology_features(v) for k, v in feats.items()}
        for k, f in feats.items():
            row[f"W all {k}"] = _per_type(real, f, types)
            row[f"W area {k}"] = _per_type(real, f, types, "area")
        a_up, a_down = (
            sp.metrics.morphology_features(models["cond"].sample_images(xe, random_state=200 + seed, **kw))["area"]
            .to_numpy() for xe in (x_up, x_down)
        )
        row["Δarea"] = float(np.nanmean(a_up) / np.nanmean(a_down) - 1.0)
        row["up"] = float(np.mean(a_up > a_down))
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), file=sys.stderr, flush=True)

    cols = ["seed", "W all cond", "W all shuffled", "W all uncond", "W area cond", "W area shuffled",
            "W area uncond", "Δarea", "up", "opt steps", "steps/s", "train s", "loss"]
    real_area = real["area"].to_numpy()
    lines = [
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/generate_quality.py {shlex.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); {args.cells} simulated cells "
        f"(mean depth 25), tiny SPATIA encoder ({args.encoder_epochs} epochs); {len(cells)} evaluation cells, "
        f"{len(np.unique(types))} types; {args.steps} DDIM steps, guidance "
        f"{kw.get('guidance_scale', 'default')}; {len(size_genes)} size-programme genes, high = {high:g} counts.  ",
        f"Decoder: `{config}` (epochs: {args.epochs or config.train.max_epochs}).  ",
        f"Real crops: mean nuclear area {np.nanmean(real_area):.1f} px.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]

    def fmt(v):
        if isinstance(v, str):
            return v
        if v is None:
            return "-"
        if isinstance(v, int | np.integer):
            return str(int(v))
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.3f}"

    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    mean = {c: float(np.nanmean([r[c] for r in rows if r.get(c) is not None])) for c in cols[1:]}
    lines.append("| **mean** | " + " | ".join(fmt(mean[c]) for c in cols[1:]) + " |")
    lines += ["", f"Wall time: {time.time() - t_all:.0f} s."]
    print("\n".join(lines))


_TMP: list = []


def _save_tmp(model) -> str:
    """A fresh copy of the fitted encoder for each decoder (saved once)."""
    import tempfile

    if not _TMP:
        d = tempfile.mkdtemp(prefix="spatia_genq_")
        model.save(d, overwrite=True)
        _TMP.append(d)
    return _TMP[0]


if __name__ == "__main__":
    main()
