"""Command line: ``spatia demo --out DIR`` (the whole pipeline on the built-in demo) and ``spatia fit``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _setup_logging(verbose: bool) -> None:
    import warnings

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spatia").setLevel(logging.INFO)
    # Lightning sets its loggers to INFO and adds a handler when it is first imported: import it now, then
    # quieten it (its banner and tips would print twice, once through the root handler)
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING)
        lg.handlers.clear()
    # notices meant for library developers, not for someone running the pipeline
    warnings.filterwarnings("ignore", category=SyntaxWarning)  # docrep docstrings (via squidpy)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*zarr v3 autosharding.*")


def _pipeline(sdata, out: Path, *, image_key, table_key, labels_key, shapes_key, layer, config, max_epochs,
              random_state, resolution, cell_type_key=None, decoder_epochs=0, groupby=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    import spatia as sp

    log = logging.getLogger("spatia")
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    t0 = time.time()
    model = sp.tl.fit(sdata, image_key=image_key, table_key=table_key, labels_key=labels_key, shapes_key=shapes_key,
                      layer=layer, config=config, max_epochs=max_epochs, random_state=random_state,
                      checkpoint_dir=out / "checkpoints")
    log.info("fit: %.0f s, %d epochs", time.time() - t0, model.train_info.get("epochs", 0))
    sp.tl.cluster(sdata, level="niche", resolution=resolution, table_key=table_key, random_state=random_state)
    sp.tl.cluster(sdata, level="cell", resolution=resolution, table_key=table_key, random_state=random_state)
    model.save(out / "model", overwrite=True)
    written = []
    if cell_type_key is not None:
        t1 = time.time()
        sp.tl.annotate(sdata, model, labels_key=cell_type_key, table_key=table_key, random_state=random_state)
        st = sdata[table_key].uns["spatia"]["annotate"]
        log.info("annotate: %.0f s; out-of-fold accuracy %.3f, calibration error %.3f", time.time() - t1,
                 st.get("cv_accuracy", float("nan")), st.get("ece", float("nan")))
        written.append(sp.pl.embedding(sdata, level="cell", color="spatia_cell_type", table_key=table_key,
                                       save=figs / "umap_cell_type.png"))
    t1 = time.time()
    scores = sp.tl.impute(sdata, model, table_key=table_key, layer=layer, image_key=image_key, labels_key=labels_key,
                          shapes_key=shapes_key, validate=True, random_state=random_state)
    scores.to_csv(out / "imputation_scores.csv")
    log.info("impute: %.0f s; held-out genes median Pearson %.3f", time.time() - t1, scores["pearson"].median())
    best = scores["pearson"].sort_values(ascending=False).index[:2].tolist()
    written.append(sp.pl.imputation(sdata, best, table_key=table_key, counts_layer=layer,
                                    save=figs / "imputation.png"))
    if decoder_epochs > 0:
        # generation: the decoder learns each cell's crop from its expression; one generated crop per cell of
        # a sample, next to real cells of the same group
        import torch

        from spatia.module import DecoderConfig

        t1 = time.time()
        # on a CPU, the small UNet in small batches (more optimiser steps per second: what a short training
        # learns from; benchmarks/results/generate_quality.md); the default decoder on a GPU
        dconf = DecoderConfig() if torch.cuda.is_available() else DecoderConfig(block_out_channels=(16, 32, 32),
                                                                                  batch_size=8)
        sp.tl.fit_decoder(sdata, model, image_key=image_key, table_key=table_key, labels_key=labels_key,
                          shapes_key=shapes_key, layer=layer, config=dconf, max_epochs=decoder_epochs,
                          random_state=random_state)
        table = sdata[table_key]
        n_gen = min(table.n_obs, 120)
        cells = table.obs_names[np.sort(np.random.default_rng(random_state).choice(table.n_obs, n_gen, replace=False))]
        sp.tl.generate(sdata, model, cells=cells, table_key=table_key, layer=layer, random_state=random_state)
        model.save(out / "model", overwrite=True)  # now with the decoder
        log.info("generation: %.0f s (%d decoder epochs, %d crops)", time.time() - t1, decoder_epochs, n_gen)
        by = groupby if groupby is not None and groupby in table.obs else "spatia_cluster"
        written.append(sp.pl.generated(sdata, groupby=by, image_key=image_key, table_key=table_key,
                                       n_per_group=5, save=figs / "generated.png"))
    written += [
        sp.pl.niches(sdata, image_key=image_key, table_key=table_key, save=figs / "niches.png"),
        sp.pl.embedding(sdata, level="cell", color="spatia_cluster", table_key=table_key,
                        save=figs / "umap_cell.png"),
        sp.pl.embedding(sdata, level="niche", color="spatia_niche", table_key=table_key,
                        save=figs / "umap_niche.png"),
        sp.pl.history(model, save=figs / "history.png"),
    ]
    import matplotlib.pyplot as plt

    for f in written:
        plt.close(f)
    zarr_path = out / "spatia.zarr"
    if zarr_path.exists():
        import shutil

        shutil.rmtree(zarr_path)
    sdata.write(zarr_path)
    print(f"SpatialData with embeddings, niches, labels and imputed expression: {zarr_path}")
    print(f"Per-gene imputation scores (held-out genes): {out / 'imputation_scores.csv'}")
    print(f"Model: {out / 'model'}")
    print(f"Figures: {', '.join(str(p) for p in sorted(figs.glob('*.png')))}")
    print(f"Total time: {time.time() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spatia", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fit, cluster niches and plot on the built-in demo slide")
    d.add_argument("--out", type=Path, default=Path("spatia_demo_out"))
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--decoder-epochs", type=int, default=3, help="diffusion decoder epochs (0: no generation)")
    d.add_argument("-q", "--quiet", action="store_true")
    f = sub.add_parser("fit", help="fit on a SpatialData zarr store and write the results")
    f.add_argument("path", type=Path, help="SpatialData .zarr")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--image-key")
    f.add_argument("--table-key", default="table")
    f.add_argument("--labels-key")
    f.add_argument("--shapes-key")
    f.add_argument("--cell-type-key", help="obs column of known cell types (NaN = unknown) to transfer")
    f.add_argument("--layer")
    f.add_argument("--epochs", type=int)
    f.add_argument("--preset", choices=["tiny", "default", "large"], default="default")
    f.add_argument("--resolution", type=float, default=0.5)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--decoder-epochs", type=int, default=0,
                   help="also train the diffusion decoder for this many epochs and generate crops (0: no)")
    f.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(not args.quiet)

    import spatia as sp

    if args.command == "demo":
        import numpy as np

        sdata = sp.datasets.demo()
        # pretend a pathologist labelled a third of the cells: spatia transfers the labels to the rest
        t = sdata["table"]
        known = t.obs["cell_type"].astype(object).copy()
        known[np.random.default_rng(args.seed).random(t.n_obs) > 1 / 3] = np.nan
        t.obs["cell_type_known"] = known
        _pipeline(sdata, args.out, image_key="morphology", table_key="table", labels_key=None, shapes_key=None,
                  layer=None, config=sp.SpatiaConfig.default(), max_epochs=args.epochs, random_state=args.seed,
                  resolution=0.5, cell_type_key="cell_type_known", decoder_epochs=args.decoder_epochs,
                  groupby="cell_type")
        return 0
    import spatialdata as sd

    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    sdata = sd.read_zarr(args.path)
    config = getattr(sp.SpatiaConfig, args.preset)()
    _pipeline(sdata, args.out, image_key=args.image_key, table_key=args.table_key, labels_key=args.labels_key,
              shapes_key=args.shapes_key, layer=args.layer, config=config, max_epochs=args.epochs,
              random_state=args.seed, resolution=args.resolution, cell_type_key=args.cell_type_key,
              decoder_epochs=args.decoder_epochs, groupby=args.cell_type_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
