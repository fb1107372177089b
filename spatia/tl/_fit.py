"""``sp.tl.fit`` and ``sp.tl.embed``: train a SPATIA model on a slide; embed a slide with a trained model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _results
from .._constants import Defaults, Keys
from .._utils import seed_from
from .._version import __version__
from ..module import SpatiaConfig

logger = logging.getLogger(__name__)


def _labels_array(table, cell_type_key: str | None) -> tuple[np.ndarray | None, list[str]]:
    if cell_type_key is None:
        return None, []
    if cell_type_key not in table.obs:
        raise KeyError(f"No obs column {cell_type_key!r} in the table (columns: {list(table.obs.columns)}).")
    col = table.obs[cell_type_key]
    cat = col.astype("category")
    cats = [str(c) for c in cat.cat.categories]
    codes = cat.cat.codes.to_numpy().astype(np.int64)  # -1 for NaN (unlabelled)
    if len(cats) < 2:
        raise ValueError(f"obs[{cell_type_key!r}] has {len(cats)} classes; a supervised head needs at least 2.")
    return codes, cats


def embedding_keys(key_added: str | Mapping[str, str] | None) -> dict[str, str]:
    """``obsm`` key of each level: the defaults, a prefix (``"X_run2"`` → ``X_run2_cell``...) or a dict
    overriding some levels (``{"cell": "X_mine"}``)."""
    keys = dict(Keys.LEVEL_TO_EMB)
    if key_added is None:
        return keys
    if isinstance(key_added, str):
        if not key_added:
            raise ValueError("key_added must be a non-empty prefix (e.g. 'X_run2') or a dict {level: key}.")
        return {level: f"{key_added}_{level}" for level in keys}
    if not isinstance(key_added, Mapping):
        raise TypeError(f"key_added must be a prefix (str) or a dict {{level: obsm key}}, got {type(key_added).__name__}.")
    unknown = sorted(set(key_added) - set(keys))
    if unknown:
        raise KeyError(f"key_added has unknown levels {unknown}; the levels are {list(keys)}.")
    keys.update({str(k): str(v) for k, v in key_added.items()})
    if len(set(keys.values())) < len(keys):
        raise ValueError(f"key_added gives two levels the same obsm key: {keys}.")
    return keys


def _embedding_results(emb: dict[str, np.ndarray], keys: dict[str, str]) -> dict[str, np.ndarray]:
    return {f"obsm/{keys[level]}": emb[level] for level in keys if level in emb}


def _run_params(model, prepared, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "version": __version__, "torch": str(torch.__version__), "config": model.config.to_dict(),
        "n_genes": len(model.genes), "missing_genes": prepared.missing_genes, "channels": model.channels,
        "coordinate_system": prepared.coordinate_system, "crop_params": prepared.crop_params,
        Keys.UNITS: prepared.units.to_dict(),
        "train_info": {k: v for k, v in model.train_info.items() if isinstance(v, int | float | str)},
        **extra,
    }


def fit(
    data,
    *,
    image_key: str | Sequence[str] | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    coordinate_system: str | None = None,
    cell_type_key: str | None = None,
    config: SpatiaConfig | None = None,
    crops=None,
    n_cells: int | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | int | None = None,
    random_state: int | None = 0,
    checkpoint_dir: str | Path | None = None,
    ckpt_path: str | Path | None = None,
    early_stopping: bool = True,
    compile: bool = False,
    allow_empty: bool = False,
    outside: str = "error",
    um_per_unit: float | None = None,
    key_added: str | Mapping[str, str] | None = None,
    overwrite: bool = False,
    inplace: bool = True,
    **trainer_kwargs: Any,
):
    """Train a SPATIA model on a slide and write the cell, niche and tissue embeddings.

    Parameters
    ----------
    data
        A :class:`~spatialdata.SpatialData` with an image, the cells' segmentation or shapes, and a table
        of raw counts.
    image_key
        Morphology image (the only image when ``None``), or a list of images (e.g. one per CosMx field of
        view): each cell is cropped from the first image that contains its centre.
    labels_key, shapes_key
        Element with the cells (default: the one the table annotates).
    table_key
        Table of counts.
    layer
        Layer with raw counts (``None``: ``X``).
    coordinate_system
        Coordinate system to match cells and image in (default: the shared one, ``"global"`` if present).
    cell_type_key
        Optional ``obs`` column of known labels (NaN = unknown) for the supervised head.
    config
        :class:`~spatia.SpatiaConfig` (default :meth:`~spatia.SpatiaConfig.default`). Its
        ``image.enabled`` / ``expression.enabled`` / ``niche.enabled`` / ``tissue.enabled`` switches ablate
        each part.
    crops
        A :class:`~spatia.pp.CropStore` (or its path) from :func:`spatia.pp.extract_crops` to reuse. Without
        it, crops are extracted on the fly: in memory for small slides, into a temporary zarr store for
        large ones (more than 256 MiB of crops). On a large slide that you fit more than once, extract
        them to a store first.
    n_cells
        Train on this many cells drawn at random (seeded by ``random_state``) instead of all of them; every
        cell is still embedded. Each sampled cell keeps its whole niche and tissue tile as context, so the
        model sees the slide's full spatial structure. An epoch then costs ``n_cells`` cells instead of
        the whole slide: on slides of hundreds of thousands of cells, tens of thousands of cells are
        usually enough to learn the cell types and niches (and the held-out tissue tiles still stop
        training early). ``None``: every cell.
    max_epochs, batch_size
        Override ``config.train``.
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``devices=4, strategy="ddp"``;
        ``precision="bf16-mixed"``, the default on CUDA).
    random_state
        Seed: the same seed gives the same embeddings on CPU.
    checkpoint_dir
        Where Lightning writes checkpoints during training, kept afterwards for resuming. Default: a temporary
        folder, removed when training ends (kept, with a warning naming it, when training stops with an error).
    ckpt_path
        Resume an interrupted run from this checkpoint (``checkpoint_dir/last.ckpt``). Checkpoints are
        Lightning (pickle-based) files: resume only from checkpoints you wrote yourself.
    early_stopping
        Stop when the loss on held-out tissue tiles stops improving (``config.train.patience`` epochs).
    compile
        Train a :func:`torch.compile`-d module (worth it on CUDA; the saved weights are the plain module's).
    allow_empty
        Keep cells with zero counts.
    outside
        Cells whose centre lies outside the image(s) (e.g. at the edge of a cropped slide): ``"error"``, or
        ``"pad"`` to give them blank crops (their embedding then rests on expression and context). The
        choice is saved with the model and reused by :func:`embed` and the other tools.
    um_per_unit
        µm per unit of the coordinate system. Every length of the model (crop window, niche radius, tissue
        tiles) is in µm, so a slide in pixels and the same slide in µm train the same model. Default: the
        value stored with :func:`~spatia.pp.set_um_per_unit`, else the scale of µm-valued shapes/points (as
        spatialdata-io writes Xenium and MERSCOPE), else an estimate from the cells' spacing, with a warning
        (CosMx pixel frames: pass it). The value used is recorded in ``uns['spatia']['fit']['units']``.
    key_added
        Where the embeddings go: ``None`` (``X_spatia_cell``, ``X_spatia_niche``, ``X_spatia_tissue``), a
        prefix (``"X_run2"`` → ``X_run2_cell``, ``X_run2_niche``, ``X_run2_tissue``) or a dict overriding some
        levels (``{"cell": "X_mine"}``). Use it to keep the embeddings of several runs side by side.
    overwrite
        Replace embeddings already under those keys; otherwise an existing key is a ``KeyError`` (checked
        before training).
    inplace
        Write the results into the table and return the model; with ``False`` write nothing and return
        ``{"model": model, "obsm/<key>": embedding, ..., "params": run parameters}``.
    **trainer_kwargs
        More :class:`lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The trained :class:`~spatia.SpatiaModel`. With the image branch, it also carries ``model.readout``, the map
    from what a crop shows to expression that :func:`predict_expression` reads: per gene, a blend of a ridge
    regression and a mixture of cell states on the measured nucleus and channel features of each crop and its
    image-only cell embedding, fitted after training on the training cells (at most 10,000, a seeded sample;
    one image-only inference pass over them). Writes into the table:

    - ``obsm['X_spatia_cell']``, ``obsm['X_spatia_niche']``, ``obsm['X_spatia_tissue']`` (or the
      ``key_added`` keys): one row per cell;
    - ``uns['spatia']['fit']``: run parameters, versions, configuration, missing genes, ``crop_params``,
      ``units`` (µm per unit and its source), ``n_cells`` (as given) and ``n_sampled_cells`` (the centre
      cells training drew from) and ``keys`` (what was written).

    With ``inplace=False``, the dict above (see :doc:`/results_keys`).

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.demo()
    >>> model = sp.tl.fit(sdata, image_key="morphology", labels_key="cell_labels", max_epochs=5)
    >>> sdata["table"].obsm["X_spatia_cell"].shape
    >>> sp.tl.fit(sdata, image_key="morphology", labels_key="cell_labels", key_added="X_run2")
    >>> sp.tl.fit(big_sdata, image_key="morphology", n_cells=50_000, crops="crops.zarr")  # every cell embedded
    """
    from ..data._prepare import prepare
    from ..model import SpatiaModel
    from ..pp._elements import get_table

    config = config or SpatiaConfig.default()
    if not isinstance(config, SpatiaConfig):
        raise TypeError(f"config must be a SpatiaConfig, got {type(config).__name__}.")
    _check_fit_args(data, table_key, max_epochs, batch_size, n_cells)
    keys = embedding_keys(key_added)
    if inplace:  # before training: an existing result is an error, not a lost hour
        _results.check_free(data, get_table(data, table_key), [f"obsm/{k}" for k in keys.values()],
                            overwrite=overwrite)
    prepared = prepare(
        data, table_key=table_key, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key,
        coordinate_system=coordinate_system, layer=layer, crops=crops,
        crop_kwargs={"size": config.image.size, "crop_um": config.image.crop_um, "outside": outside},
        use_image=config.image.enabled,
        niche_k=config.niche.k, niche_radius=config.niche.radius, tile_um=config.tissue.tile_um,
        allow_empty=allow_empty, um_per_unit=um_per_unit,
    )
    codes, cats = _labels_array(prepared.table, cell_type_key)
    prepared.arrays.labels = codes
    model = SpatiaModel(config, prepared.genes, prepared.channels, cats, prepared.crop_params, random_state=random_state)
    train_arrays = prepared.arrays
    if n_cells is not None:
        train_arrays = train_arrays.sample(n_cells, np.random.default_rng(seed_from(random_state)))
    model.train(
        train_arrays, max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, devices=devices,
        strategy=strategy, precision=precision, random_state=random_state, checkpoint_dir=checkpoint_dir,
        ckpt_path=ckpt_path, early_stopping=early_stopping, compile=compile,
        **trainer_kwargs,
    )
    if config.image.enabled:  # what sp.tl.predict_expression reads: fitted on the training cells
        from ..model._readout import nucleus_crop, nucleus_store, train_readout

        centres = train_arrays.centres if train_arrays.centres is not None else np.arange(prepared.arrays.n)
        # nuclei on finer crops than the model's when the image allows it and can be read (its key known)
        can_cut = prepared.crop_kwargs is not None and prepared.crop_kwargs.get("image_key") is not None
        geometry = nucleus_crop(prepared.crop_params) if can_cut else None
        nuclei_for = None if geometry is None else (lambda rows: nucleus_store(data, prepared, geometry, rows))
        model.readout = train_readout(model, prepared.arrays, centres, seed_from(random_state), nuclei_for, geometry)
    emb = model.infer(prepared.arrays)
    results = _embedding_results(emb, keys)
    n_sampled = prepared.arrays.n if train_arrays.centres is None else len(train_arrays.centres)
    params = _run_params(model, prepared, {"image_key": image_key, "cell_type_key": cell_type_key,
                                           "n_cells": n_cells, "n_sampled_cells": int(n_sampled)})
    if not inplace:
        return _results.returned("fit", results, params, model=model)
    if _is_rank_zero():
        _results.write(data, prepared.table, results, function="fit", params=params, overwrite=overwrite)
    return model


def _check_fit_args(data, table_key, max_epochs, batch_size, n_cells=None) -> None:
    """Arguments a fit would otherwise accept silently (no training) or fail on deep inside."""
    from .._utils import check_count, check_obs_names
    from ..pp._elements import get_table

    if n_cells is not None:
        check_count("n_cells", n_cells, 2)
    if max_epochs is not None:
        check_count("max_epochs", max_epochs, 1)
    if batch_size is not None:
        check_count("batch_size", batch_size, 2)
    table = get_table(data, table_key)
    check_obs_names(table)
    if table.n_obs < 2:
        raise ValueError(f"The table has {table.n_obs} cell(s): a model is trained on a slide of many cells.")


def _is_rank_zero() -> bool:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def embed(
    data,
    model,
    *,
    image_key: str | Sequence[str] | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    coordinate_system: str | None = None,
    crops=None,
    batch_size: int | None = None,
    device: str | None = None,
    allow_empty: bool = False,
    um_per_unit: float | None = None,
    key_added: str | Mapping[str, str] | None = None,
    overwrite: bool = False,
    inplace: bool = True,
    backed: bool = False,
):
    """Embed a (new) slide with a trained model.

    Genes are aligned to the model's panel by name; panel genes missing from the slide are filled with
    zeros and listed in ``uns['spatia']['embed']['missing_genes']`` (and a warning). Crops are cut with the
    parameters the model was trained with.

    Parameters
    ----------
    data
        :class:`~spatialdata.SpatialData` (or AnnData with ``crops=`` / an expression-only model).
    model
        A trained :class:`~spatia.SpatiaModel`.
    image_key, labels_key, shapes_key, table_key, layer, coordinate_system, crops, allow_empty, um_per_unit
        As in :func:`fit`. The slide's units are found anew (it may be in other units than the training
        slide); the model's lengths are µm.
    batch_size
        Cells per inference batch.
    device
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
    key_added, overwrite
        As in :func:`fit`.
    inplace
        Write into the table (return ``None``); with ``False`` write nothing and return
        ``{"obsm/<key>": embedding, ..., "params": run parameters}``.
    backed
        Also write the embeddings into the zarr store the SpatialData was read from as they are computed (a
        temporary file beside the store holds them meanwhile), then this run's ``uns`` entry; the table's
        ``obsm`` then reads them lazily (dask arrays). The store keeps each level's embedding even if the session
        ends later; without it, call :func:`write_results` after the step. Needs ``sd.read_zarr(...)`` data
        whose table is in the store. Each key is written beside its place and renamed in, and the ``uns`` entry
        last: an interrupted run leaves no half-written key.

    Returns
    -------
    ``None``, writing ``obsm['X_spatia_cell' | 'X_spatia_niche' | 'X_spatia_tissue']`` (or the ``key_added``
    keys) and ``uns['spatia']['embed']`` (as :func:`fit` writes ``uns['spatia']['fit']``); with
    ``inplace=False``, the dict above.

    Examples
    --------
    >>> sp.tl.embed(other_sdata, model, image_key="morphology_focus")
    >>> emb = sp.tl.embed(other_sdata, model, inplace=False)
    >>> emb["obsm/X_spatia_cell"].shape
    """
    from ..pp._elements import get_table
    from ._write import backed_table_dir, lazy_rows, spill_arrays, write_backed, write_results

    keys = embedding_keys(key_added)
    if inplace:
        _results.check_free(data, get_table(data, table_key), [f"obsm/{k}" for k in keys.values()],
                            overwrite=overwrite)
    group_dir = backed_table_dir(data, table_key, inplace=inplace) if backed else None
    prepared = _prepare_for_model(
        data, model, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key, table_key=table_key,
        layer=layer, coordinate_system=coordinate_system, crops=crops, allow_empty=allow_empty,
        um_per_unit=um_per_unit,
    )
    with spill_arrays(group_dir) as spill:
        emb = model.infer(prepared.arrays, batch_size=batch_size, device=device, alloc=spill)
        if group_dir is not None:  # each level from its file into the store, a block of cells at a time
            emb = {level: write_backed(group_dir, "obsm", keys[level], lazy_rows(
                lambda a, b, m=m: np.array(m[a:b]), *m.shape, source=m)) for level, m in emb.items()
                if level in keys}
    results = _embedding_results(emb, keys)
    params = _run_params(model, prepared, {"image_key": image_key, "backed": backed})
    if not inplace:
        return _results.returned("embed", results, params)
    _results.write(data, prepared.table, results, function="embed", params=params, overwrite=overwrite)
    if group_dir is not None:
        write_results(data, table_key=table_key, functions=["embed"])
    return None


def _prepare_for_model(data, model, *, image_key, labels_key, shapes_key, table_key, layer, coordinate_system,
                       crops, allow_empty, use_expression=True, crop_size: int | None = None,
                       um_per_unit: float | None = None):
    from ..data._prepare import prepare
    from ..model import SpatiaModel

    if not isinstance(model, SpatiaModel):
        raise TypeError(f"model must be a SpatiaModel (from sp.tl.fit or SpatiaModel.load), got {type(model).__name__}.")
    if not model.is_trained:
        logger.warning("The model has not been trained: its embeddings are random projections.")
    cp = model.crop_params or {}
    crop_kwargs = {k: cp[k] for k in ("size", "crop_um", "extent_factor", "min_um", "max_um", "outside") if k in cp}
    crop_kwargs.setdefault("size", model.config.image.size)
    if crop_size is not None:  # e.g. the diffusion decoder's resolution
        crop_kwargs["size"] = int(crop_size)
    if model.channels and model.config.image.enabled:
        crop_kwargs["channels"] = model.channels
    c = model.config
    prepared = prepare(
        data, table_key=table_key, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key,
        coordinate_system=coordinate_system, layer=layer, genes=model.genes, crops=crops, crop_kwargs=crop_kwargs,
        use_image=c.image.enabled, niche_k=c.niche.k, niche_radius=c.niche.radius, tile_um=c.tissue.tile_um,
        allow_empty=allow_empty, use_expression=use_expression, um_per_unit=um_per_unit,
    )
    if c.image.enabled and list(prepared.channels) != list(model.channels):
        raise ValueError(
            f"The crops have channels {prepared.channels} but the model was trained on {model.channels}: "
            "extract crops with channels= matching the model."
        )
    return prepared


__all__ = ["fit", "embed"]
