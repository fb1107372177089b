"""``sp.tl.fit_decoder`` and ``sp.tl.generate``: cell images from expression with the diffusion decoder."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import _results
from .._constants import Defaults, Keys
from .._version import __version__
from ._fit import _prepare_for_model

logger = logging.getLogger(__name__)

#: Token-merging ratio used by :func:`generate` by default (chosen from ``benchmarks/generate.py``).
DEFAULT_TOKEN_MERGING: float | None = None


def fit_decoder(
    data,
    model,
    *,
    size: int | None = None,
    config=None,
    image_key: str | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    coordinate_system: str | None = None,
    um_per_unit: float | None = None,
    crops=None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    precision: str | int | None = None,
    random_state: int | None = 0,
    allow_empty: bool = False,
    inplace: bool = True,
    **trainer_kwargs: Any,
):
    """Train the gene-conditioned diffusion decoder of a trained model (its encoder stays frozen).

    The decoder learns to generate each cell's crop from the cell's expression tokens (the frozen
    expression branch, without the image), with classifier-free guidance. It is kept in ``model`` and
    saved with it (:meth:`~spatia.SpatiaModel.save`).

    Parameters
    ----------
    data
        The :class:`~spatialdata.SpatialData` the model was trained on (or another slide of the same panel).
    model
        A trained :class:`~spatia.SpatiaModel`.
    size
        Side of the generated crops in pixels (default: the model's crop size). Crops are cut with the
        model's window (``crop_um``) at this resolution.
    config
        :class:`~spatia.module.DecoderConfig` (default: ``DecoderConfig()``).
    image_key, labels_key, shapes_key, table_key, layer, coordinate_system, um_per_unit, crops, allow_empty
        As in :func:`spatia.tl.fit`.
    max_epochs, batch_size
        Override ``config``.
    accelerator, devices, precision
        Passed to :class:`lightning.pytorch.Trainer`.
    random_state
        Seed of the weights, batches and noise.
    inplace
        Record the run parameters in the table and return the model; with ``False`` write nothing and return
        ``{"model": model, "params": run parameters}``.
    **trainer_kwargs
        More :class:`lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The model, with ``model.decoder`` trained and ``model.decoder_history`` (loss per epoch); the run
    parameters (decoder configuration, crop size, epochs) go to ``table.uns['spatia']['fit_decoder']``.

    Examples
    --------
    >>> model = sp.tl.fit(sdata, image_key="morphology")
    >>> sp.tl.fit_decoder(sdata, model, size=32, max_epochs=20)
    >>> sp.tl.generate(sdata, model, cells=sdata["table"].obs_names[:50])
    """
    from ..module import DecoderConfig

    config = config or DecoderConfig()
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}.")
    size = size if size is not None else config.size
    prepared = _prepare_for_model(
        data, model, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key, table_key=table_key,
        layer=layer, coordinate_system=coordinate_system, crops=crops, allow_empty=allow_empty, crop_size=size,
        um_per_unit=um_per_unit,
    )
    if not model.is_trained:
        raise ValueError("Train the model first (`sp.tl.fit`): the decoder is conditioned on its expression branch.")
    model.fit_decoder(prepared.arrays, config=config, max_epochs=max_epochs, batch_size=batch_size,
                      accelerator=accelerator, devices=devices, precision=precision, random_state=random_state,
                      **trainer_kwargs)
    params = {"version": __version__, "image_key": image_key, "size": int(model.decoder.config.size),
              "decoder": model.decoder.config.to_dict(), "epochs": len(model.decoder_history),
              "random_state": random_state}
    if not inplace:
        return _results.returned("fit_decoder", {}, params, model=model)
    _results.write(data, prepared.table, {}, function="fit_decoder", params=params, overwrite=False)
    return model


def _select(n: int, names: pd.Index, cells) -> np.ndarray:
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"A boolean cells mask needs {n} entries, got {arr.shape}.")
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"cells indices out of range for {n} cells.")
        return np.arange(n)[arr]
    idx = names.get_indexer(arr.astype(str))
    if (idx < 0).any():
        missing = arr[idx < 0].tolist()
        raise KeyError(f"{len(missing)} cells are not in the table: {missing[:10]}{'...' if len(missing) > 10 else ''}.")
    return idx


_MAX_EDIT = 1e6  # counts of one gene in one cell; far beyond any panel, far below float32 overflow


def _check_edits(edits: Mapping[str, float] | None, genes: list[str]) -> dict[str, float]:
    if not edits:
        return {}
    if not isinstance(edits, Mapping):
        raise TypeError(f"edits must be a dict {{gene: count}}, got {type(edits).__name__}.")
    unknown = [g for g in edits if g not in set(genes)]
    if unknown:
        raise KeyError(f"Genes not in the model's panel: {unknown}. The model knows {len(genes)} genes, "
                       f"e.g. {genes[:5]}.")
    out = {}
    for g, v in edits.items():
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating) or not np.isfinite(v) or v < 0:
            raise ValueError(f"edits[{g!r}] = {v!r}: values are raw counts (finite numbers >= 0).")
        if v > _MAX_EDIT:
            raise ValueError(f"edits[{g!r}] = {v!r} counts is beyond any measured cell (at most {_MAX_EDIT:g}): "
                             "values are raw counts of one gene in one cell.")
        out[str(g)] = float(v)
    return out


def _expression_counts(expression, model, layer: str | None) -> tuple[np.ndarray, pd.DataFrame]:
    """Counts of an AnnData in the model's gene order (missing genes → 0)."""
    from anndata import AnnData

    from ..pp._expression import align_genes, get_counts

    if not isinstance(expression, AnnData):
        raise TypeError(f"expression must be an AnnData of raw counts, got {type(expression).__name__}.")
    idx, missing = align_genes(expression.var_names.astype(str), model.genes)
    if (idx < 0).all():
        raise ValueError(
            "None of the model's genes are in expression.var_names (e.g. "
            f"{list(expression.var_names[:3])} vs the model's {model.genes[:3]}): use the model's gene names."
        )
    extra = len(set(expression.var_names.astype(str)) - set(model.genes))
    if missing or extra:
        logger.warning("expression: %d of the model's genes missing (set to 0), %d genes unknown to the model "
                       "(ignored).", len(missing), extra)
    x = get_counts(expression, layer, allow_empty=True)
    dense = np.zeros((expression.n_obs, len(model.genes)), dtype=np.float32)
    have = idx >= 0
    dense[:, have] = np.asarray(x[:, idx[have]].toarray(), dtype=np.float32)
    return dense, expression.obs


def generate(
    data,
    model,
    *,
    cells: Sequence | np.ndarray | None = None,
    expression=None,
    edits: Mapping[str, float] | None = None,
    n_samples: int = 1,
    guidance_scale: float = 2.0,
    num_inference_steps: int = 20,
    scheduler: str = "ddim",
    token_merging: float | None = DEFAULT_TOKEN_MERGING,
    random_state: int | None = 0,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    obs_keys: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    key_added: str = Keys.GENERATED,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Generate cell images from expression with the model's diffusion decoder.

    Three modes:

    - **reconstruction** (default): each selected cell of the table, from its own expression;
    - **expression**: from the profiles of ``expression`` (any cells × genes AnnData of raw counts, e.g.
      scRNA-seq or hand-made profiles), matched to the model's genes by name;
    - **counterfactual**: as one of the above, with ``edits`` applied first (``{"GENE": 40}``: this cell with
      GENE's raw count set to 40).

    The decoder never sees the cells' images: the condition is the frozen expression branch alone.

    Parameters
    ----------
    data
        The :class:`~spatialdata.SpatialData` to write into (and whose table gives the cells unless
        ``expression`` is given). An AnnData works with ``inplace=False``.
    model
        A :class:`~spatia.SpatiaModel` with a trained decoder (:func:`fit_decoder`).
    cells
        Cells to generate: obs names, integer positions or a boolean mask of the table (or of
        ``expression``); ``None`` = all.
    expression
        An AnnData of raw counts to generate from instead of the table.
    edits
        ``{gene: value}``: set each gene's **raw count** to ``value`` (a number >= 0, on the scale of the
        table's counts; 0 knocks a gene out) before encoding. Genes must be in the model's panel.
    n_samples
        Images per source profile (different noise).
    guidance_scale
        Classifier-free guidance weight ``w`` (output = uncond + w · (cond - uncond)); 1 = no guidance,
        0 = unconditional.
    num_inference_steps
        Sampler steps.
    scheduler
        ``"ddim"`` (deterministic DDIM), ``"dpm"`` (DPM-Solver++ multistep) or ``"ddpm"`` (ancestral).
    token_merging
        Fraction of the tokens merged before each self-attention (ToMe); ``None`` = off (the default,
        ``DEFAULT_TOKEN_MERGING``). Try ``0.5`` for large crops (128 px) sampled on a CPU, where attention
        dominates; leave it off on a GPU and for small crops, where merging costs more than it saves. It
        does not change sample quality measurably (``benchmarks/results/generate.md``).
    random_state
        Seed of the noise: the same seed gives the same images.
    table_key, layer
        Table of the cells and its raw-counts layer (``layer`` is also read from ``expression``).
    obs_keys
        Columns of the source ``obs`` copied to the output table (default: ``cell_type`` if present).
    batch_size, device
        Generation batch size and device (``"auto"``: CUDA if available).
    key_added
        Name of the image element.
    overwrite
        Replace elements of an earlier run with the same ``key_added``; otherwise they are a ``KeyError``.
    inplace
        Write into ``data`` (return ``None``); with ``False`` write nothing and return the dict below.

    Returns
    -------
    With ``inplace=True``, ``None``, writing:

    - ``sdata.images[key_added]``: a mosaic of the generated crops (:class:`~spatialdata.models.Image2DModel`,
      in its own coordinate system ``key_added``, in µm);
    - ``sdata.labels[f"{key_added}_labels"]``: each crop's tile labelled ``i + 1``;
    - ``sdata.tables[f"{key_added}_table"]``: one row per crop with ``source`` (source cell / profile name),
      ``mode``, ``edits``, ``sample``, ``guidance_scale``, ``num_inference_steps``, ``token_merging``, the
      ``obs_keys`` columns, and ``uns["spatia"]["generate"]`` = the run parameters.

    With ``inplace=False``: ``{"images/<key_added>": crops (N, C, S, S) uint8 (the crops, not tiled),
    "tables/<key_added>_table": the obs DataFrame, "params": run parameters}``.

    Examples
    --------
    >>> sp.tl.generate(sdata, model, cells=sdata["table"].obs_names[:20], n_samples=2)
    >>> sp.tl.generate(sdata, model, cells=["cell_1"], edits={"GENE_7": 50}, key_added="gene7_up")
    >>> sdata["spatia_generated_table"].obs[["source", "mode"]]
    >>> crops = sp.tl.generate(sdata, model, cells=["cell_1"], inplace=False)["images/spatia_generated"]
    """
    from .._utils import seed_from
    from ..model import SpatiaModel
    from ..pp._elements import _is_sdata

    if not isinstance(model, SpatiaModel):
        raise TypeError(f"model must be a SpatiaModel, got {type(model).__name__}.")
    decoder = model._require_decoder()
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    if token_merging is not None and not 0.0 <= token_merging < 1.0:
        raise ValueError(f"token_merging must be None or in [0, 1), got {token_merging}.")
    if inplace and not _is_sdata(data):
        raise TypeError("Writing generated images needs a SpatialData: pass one, or inplace=False.")
    from ._mosaic import add_crop_mosaic, mosaic_paths

    if inplace:  # before sampling
        _results.check_free(data, None, mosaic_paths(key_added), overwrite=overwrite)
    edits = _check_edits(edits, model.genes)

    # 1. source profiles
    x, src, mode = _source_profiles(data, model, expression, table_key=table_key, layer=layer, cells=cells,
                                    edits=edits)

    # 2. generate (each profile n_samples times, in a row)
    x = np.repeat(x, int(n_samples), axis=0)
    crops = model.sample_images(x, guidance_scale=guidance_scale, num_inference_steps=int(num_inference_steps),
                                scheduler=scheduler, token_merging=token_merging, random_state=random_state,
                                batch_size=batch_size, device=device)

    # 3. the table linking every crop to its source
    obs = _crops_table(src, mode, edits, int(n_samples), obs_keys, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, token_merging=token_merging)
    cp = model.decoder_info.get("crop_params", {}) or {}
    pixel = float(cp["crop_um"]) / decoder.config.size if cp.get("crop_um") else 1.0
    params = {
        "version": __version__, "mode": mode, "edits": edits, "n_samples": int(n_samples),
        "guidance_scale": float(guidance_scale), "num_inference_steps": int(num_inference_steps),
        "scheduler": scheduler, "token_merging": token_merging, "random_state": seed_from(random_state),
        "table_key": table_key if expression is None else None, "decoder": decoder.config.to_dict(),
        "pixel_size_um": pixel,
    }
    paths = mosaic_paths(key_added)
    if not inplace:
        return _results.returned("generate", {paths[0]: crops, paths[2]: obs}, params, keys=paths)
    channels = model.decoder_info.get("channels") or None
    add_crop_mosaic(data, crops, obs, key_added=key_added, channels=channels, pixel_size=pixel,
                    uns={"generate": _results.params_entry("generate", params, paths)}, overwrite=overwrite)
    return None


def _source_profiles(data, model, expression, *, table_key, layer, cells, edits):
    """The counts ``(n, G)`` (model gene order) to generate from, their source ``obs`` rows and the mode:
    ``"expression"`` (given profiles), ``"reconstruction"`` (the table's cells) or ``"counterfactual"``
    (either, with ``edits``)."""
    from ..pp._elements import get_table
    from ..pp._expression import get_counts

    if expression is not None:
        x, obs_src = _expression_counts(expression, model, layer)
        mode = "expression"
    else:
        table = get_table(data, table_key)
        idx, missing = _align(table, model)
        counts = get_counts(table, layer, allow_empty=True)
        x = np.zeros((table.n_obs, len(model.genes)), dtype=np.float32)
        have = idx >= 0
        x[:, have] = np.asarray(counts[:, idx[have]].toarray(), dtype=np.float32)
        obs_src = table.obs
        mode = "reconstruction"
    rows = _select(len(obs_src), obs_src.index, cells)
    x = x[rows]
    if edits:
        mode = "counterfactual"
        for g, v in edits.items():
            x[:, model.genes.index(g)] = v
    return x, obs_src.iloc[rows], mode


def _crops_table(src: pd.DataFrame, mode: str, edits: dict, n_samples: int, obs_keys, *, guidance_scale,
                 num_inference_steps, token_merging) -> pd.DataFrame:
    """One row per generated crop (each source ``n_samples`` times, in a row): its source, the run's settings
    and the ``obs_keys`` columns of the source (default ``cell_type`` where there is one)."""
    keys = list(obs_keys) if obs_keys is not None else [k for k in ("cell_type",) if k in src.columns]
    absent = [k for k in keys if k not in src.columns]
    if absent:
        raise KeyError(f"obs_keys {absent} are not columns of the source obs.")
    obs = pd.DataFrame({
        "source": np.repeat(src.index.astype(str).to_numpy(), n_samples),
        "mode": pd.Categorical([mode] * (len(src) * n_samples)),
        "edits": ";".join(f"{g}={v:g}" for g, v in edits.items()),
        "sample": np.tile(np.arange(n_samples), len(src)),
        "guidance_scale": float(guidance_scale),
        "num_inference_steps": int(num_inference_steps),
        "token_merging": float("nan") if token_merging is None else float(token_merging),
    })
    for k in keys:
        col = src[k].to_numpy().repeat(n_samples)
        obs[k] = pd.Categorical(col) if isinstance(src[k].dtype, pd.CategoricalDtype) else col
    return obs


def _align(table, model) -> tuple[np.ndarray, list[str]]:
    from ..pp._expression import align_genes

    idx, missing = align_genes(table.var_names.astype(str), model.genes)
    if (idx < 0).all():
        raise ValueError("None of the model's genes are in the table's var_names: is it the same panel?")
    if missing:
        logger.warning("%d of the model's genes are not in the table (set to 0).", len(missing))
    return idx, missing


__all__ = ["fit_decoder", "generate", "DEFAULT_TOKEN_MERGING"]
