"""The steps of a ``spatia fit`` / ``spatia demo`` run, in the order ``spatia.__main__._pipeline`` calls them.

Each step calls one ``sp.tl`` function, logs its time and what it achieved, and returns the figure it draws.
Nothing heavy is imported until a step runs, so that ``spatia --help`` stays light.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ._cli_figures import group_column

_log = logging.getLogger("spatia")


def fit_and_cluster(sdata, out: Path, *, elements: dict, config, max_epochs, random_state, resolution,
                    trainer: dict, outside: str, um_per_unit: float | None):
    """Train the model, record ``um_per_unit`` on the slide, cluster niches and cells, and save the model."""
    import spatia as sp

    table_key = elements["table_key"]
    units = {} if um_per_unit is None else {"um_per_unit": um_per_unit}
    t0 = time.time()
    model = sp.tl.fit(sdata, **elements, config=config, max_epochs=max_epochs, random_state=random_state,
                      outside=outside, checkpoint_dir=out / "checkpoints", **trainer, **units)
    if units and hasattr(sp.pp, "set_um_per_unit"):
        # record the value on the slide, for the frame the fit used: impute, the decoder and generation find
        # it there, and the written zarr keeps it
        fitted = sdata[table_key].uns.get(sp.Keys.UNS, {}).get("fit", {})
        frame = fitted.get("coordinate_system") or elements["coordinate_system"]
        sp.pp.set_um_per_unit(sdata, um_per_unit, coordinate_system=frame or "global")
    _log.info("fit: %.0f s, %d epochs", time.time() - t0, model.train_info.get("epochs", 0))
    sp.tl.cluster(sdata, level="niche", resolution=resolution, table_key=table_key, random_state=random_state)
    sp.tl.cluster(sdata, level="cell", resolution=resolution, table_key=table_key, random_state=random_state)
    model.save(out / "model", overwrite=True)
    return model


def annotate_cells(sdata, model, cell_type_key: str, *, table_key, random_state, figs: Path):
    """Transfer the known cell types to the other cells; returns the UMAP figure coloured by them."""
    import spatia as sp

    t1 = time.time()
    sp.tl.annotate(sdata, model, labels_key=cell_type_key, table_key=table_key, random_state=random_state)
    st = sdata[table_key].uns["spatia"]["annotate"]
    _log.info("annotate: %.0f s; out-of-fold accuracy %.3f, calibration error %.3f", time.time() - t1,
              st.get("cv_accuracy", float("nan")), st.get("ece", float("nan")))
    return sp.pl.embedding(sdata, level="cell", color="spatia_cell_type", table_key=table_key,
                           save=figs / "umap_cell_type.png")


def impute_genes(sdata, model, out: Path, *, elements: dict, random_state, device, figs: Path):
    """Impute with held-out validation and write ``imputation_scores.csv``; returns the genes by decreasing
    held-out Pearson correlation (the best two) and the figure of those two."""
    import pandas as pd

    import spatia as sp

    table_key, layer = elements["table_key"], elements["layer"]
    prepare_kwargs = {k: elements[k] for k in ("image_key", "labels_key", "shapes_key", "coordinate_system")}
    t1 = time.time()
    sp.tl.impute(sdata, model, table_key=table_key, layer=layer, validate=True, random_state=random_state,
                 device=device, **prepare_kwargs)
    scores = pd.DataFrame(sdata[table_key].uns["spatia"]["impute"]["validation"]).set_index("gene")
    scores.to_csv(out / "imputation_scores.csv")
    _log.info("impute: %.0f s; held-out genes median Pearson %.3f", time.time() - t1, scores["pearson"].median())
    best = scores["pearson"].sort_values(ascending=False).index[:2].tolist()
    fig = sp.pl.imputation(sdata, best, table_key=table_key, counts_layer=layer, save=figs / "imputation.png")
    return best, fig


def generate_crops(sdata, model, out: Path, *, elements: dict, decoder_epochs: int, random_state, trainer: dict,
                   device, image_key, groupby, figs: Path):
    """Train the diffusion decoder, generate one crop for each cell of a sample of 120, save the model with its
    decoder; returns the figure of generated cells next to real cells of the same group."""
    import numpy as np
    import torch

    import spatia as sp
    from spatia.module import DecoderConfig, DecoderTrainConfig

    table_key, layer = elements["table_key"], elements["layer"]
    t1 = time.time()
    # on a CPU, the small UNet in small batches at a higher learning rate: a short training learns from its
    # optimiser steps (benchmarks/results/generate_quality.md, demo_generation.md); the default decoder on a GPU
    dconf = DecoderConfig() if torch.cuda.is_available() else DecoderConfig(
        block_out_channels=(16, 32, 32), train=DecoderTrainConfig(batch_size=8, lr=4e-3))
    sp.tl.fit_decoder(sdata, model, **elements, config=dconf, max_epochs=decoder_epochs,
                      random_state=random_state, **trainer)
    table = sdata[table_key]
    n_gen = min(table.n_obs, 120)
    cells = table.obs_names[np.sort(np.random.default_rng(random_state).choice(table.n_obs, n_gen, replace=False))]
    sp.tl.generate(sdata, model, cells=cells, table_key=table_key, layer=layer, random_state=random_state,
                   device=device)
    model.save(out / "model", overwrite=True)  # now with the decoder
    _log.info("generation: %.0f s (%d decoder epochs, %d crops)", time.time() - t1, decoder_epochs, n_gen)
    return sp.pl.generated(sdata, groupby=group_column(table, groupby), image_key=image_key,
                           table_key=table_key, n_per_group=5, save=figs / "generated.png")


def write_results(sdata, out: Path, figs: Path, t0: float) -> None:
    """Write ``out/spatia.zarr`` and print the paths written and the total time. The store is written beside its
    path and swapped in by renames (:func:`spatia._fs.written_beside`): an interrupted write leaves an earlier
    ``spatia.zarr`` as it was, and the slide's own elements can be read from that earlier store while writing."""
    from spatia._fs import written_beside
    from spatia._logging import quiet_dependencies

    zarr_path = out / "spatia.zarr"
    with written_beside(zarr_path, what="results store") as tmp, quiet_dependencies():
        sdata.write(tmp)
    sdata.path = zarr_path
    print(f"SpatialData with embeddings, niches, labels and imputed expression: {zarr_path}")
    print(f"Per-gene imputation scores (held-out genes): {out / 'imputation_scores.csv'}")
    print(f"Model: {out / 'model'}")
    print(f"Figures: {', '.join(str(p) for p in sorted(figs.glob('*.png')))}")
    print(f"Total time: {time.time() - t0:.0f} s")
