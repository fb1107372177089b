"""``sp.tl.fit_transition`` and ``sp.tl.transition``: learn and apply state transitions of cell morphology."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from .. import _results
from .._constants import Defaults, Keys
from .._utils import keep_torch_threads, seed_from
from ..pp._elements import _is_sdata
from ._fit import _prepare_for_model
from ._pairing import PairResult, _group_rows, compute_pairing

logger = logging.getLogger(__name__)


def _transition_list(source, target, transitions) -> list[tuple[str, str]]:
    if transitions is None:
        if source is None or target is None:
            raise ValueError("Pass source= and target=, or transitions=[(source, target), ...].")
        transitions = [(source, target)]
    elif source is not None or target is not None:
        raise ValueError("Pass either source= / target= or transitions=, not both.")
    out = [(str(s), str(t)) for s, t in transitions]
    if not out:
        raise ValueError("transitions is empty.")
    if len(set(out)) != len(out):
        raise ValueError(f"Duplicated transitions in {out}.")
    for s, t in out:
        if s == t:
            raise ValueError(f"source and target are the same group {s!r}.")
    return out


def _pairs_for(table, arrays, groupby, source, target, *, layer, n_pcs, epsilon, max_iter, niche_key, min_cells,
               random_state, reg_m=None, marginals="composition") -> PairResult:
    srows = _group_rows(table, groupby, source, role="source", min_cells=min_cells)
    trows = _group_rows(table, groupby, target, role="target", min_cells=min_cells)
    res = compute_pairing(
        table, table, srows, trows, name=f"{source}->{target}", layer=layer, n_pcs=n_pcs, epsilon=epsilon, max_iter=max_iter,
        niche_key=niche_key, min_cells=min_cells, reg_m=reg_m, marginals=marginals, source_crops=arrays.crops,
        target_crops=arrays.crops, random_state=random_state,
    )
    res.info["groupby"] = groupby
    return res


def _check_gate(gate, gate_neighbors) -> None:
    if gate is not None and not 0 < gate <= 1:
        raise ValueError(f"gate must be a significance level in (0, 1], or None to use every cell; got {gate}.")
    if gate_neighbors < 2:
        raise ValueError(f"gate_neighbors must be at least 2, got {gate_neighbors}.")


def _train_pairs(res, gate, gate_neighbors) -> np.ndarray:
    """Indices of the pairs of ``res`` a flow trains on: those whose source cell passes the shift test."""
    every = np.arange(len(res.match))
    if gate is None:
        return every
    keep = np.flatnonzero(res.shift_test(gate_neighbors)["shift_pvalue"].to_numpy() < gate)
    if len(keep) < 2:
        logger.warning("Transition %s: %d source cell(s) with a significant morphology shift (gate=%s); the flow "
                       "trains on all %d pairs.", res.name, len(keep), gate, len(every))
        return every
    return keep


def fit_transition(
    data,
    model,
    *,
    groupby: str,
    source: str | None = None,
    target: str | None = None,
    transitions: list[tuple[str, str]] | None = None,
    config=None,
    image_key: str | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    coordinate_system: str | None = None,
    um_per_unit: float | None = None,
    crops=None,
    n_pcs: int = 50,
    epsilon: float = 0.05,
    max_iter: int = 1000,
    niche_key: str | None = None,
    min_cells: int = 10,
    reg_m: float | None = None,
    marginals: str = "composition",
    gate: float | None = Defaults.SHIFT_ALPHA,
    gate_neighbors: int = Defaults.SHIFT_NEIGHBORS,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    precision: str | int | None = None,
    random_state: int | None = 0,
    inplace: bool = True,
    **trainer_kwargs: Any,
):
    """Train a state-transition flow on a trained SPATIA model and store it on the model (``model.flow``).

    Each transition's source cells are paired with target cells by entropic OT (:func:`~spatia.tl.pair_states`); a
    velocity UNet conditioned on [the source cell's SPATIA embedding ; a learned transition embedding ;
    proj(Δg) ; proj(Δm)] learns the straight path from each source crop to its match's crop (flow matching,
    pairs weighted by their OT confidence), with a contrastive hinge against shuffled conditions and a
    sliced-Wasserstein loss on morphology proxies (weights in :class:`~spatia.module.FlowConfig`). Several
    transitions of one ``groupby`` column train into one flow model; a new call replaces the model's flow.

    Parameters
    ----------
    data
        The :class:`~spatialdata.SpatialData` the model was trained on (or another slide of the same panel).
    model
        A trained :class:`~spatia.SpatiaModel` (its image crops and cell embeddings are reused).
    groupby
        ``obs`` column holding the states.
    source, target
        One transition; or ``transitions=[(source, target), ...]`` for several.
    config
        :class:`~spatia.module.FlowConfig` (default ``FlowConfig()``).
    image_key, labels_key, shapes_key, table_key, layer, coordinate_system, um_per_unit, crops
        As in :func:`spatia.tl.embed`.
    n_pcs, epsilon, max_iter, niche_key, min_cells, reg_m, marginals
        Pairing parameters (:func:`~spatia.tl.pair_states`; ``reg_m`` = unbalanced OT, ``None`` = balanced;
        ``marginals="composition"`` keeps each expression cluster's share of the mass on both sides).
    gate, gate_neighbors
        Train on the pairs whose source cell passes the morphology-shift test of the pairing
        (``shift_pvalue < gate`` with ``gate_neighbors`` neighbours: see :func:`~spatia.tl.pair_states`), the
        cells :func:`~spatia.tl.transition` transforms by default. Cells whose neighbourhood does not change
        would otherwise make most of the pairs, and teach the flow to move every cell a little rather than
        the changing ones fully. A transition with fewer than two such cells trains on all its pairs (with a
        warning). ``None`` = all pairs.
    max_epochs, batch_size
        Override ``config``. By default (``FlowConfig.train.max_epochs=None``) the flow trains for as many epochs as
        give ``FlowConfig.train.min_steps`` (500) optimiser steps, and at least 10 (``flow_info["epochs"]``,
        ``flow_info["steps"]``).
    accelerator, devices, precision
        Passed to :class:`lightning.pytorch.Trainer`.
    random_state
        Seed of the pairing, the initial weights and the batches.
    inplace
        Write the pairing summaries and run parameters into the table's ``uns`` and return the model; with
        ``False`` write nothing and return ``{"model": model, "uns/spatia/transitions/<name>": summary, ...,
        "params": run parameters}``.
    **trainer_kwargs
        More :class:`lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The model, with ``model.flow`` (a ``spatia.module.TransitionFlow``) and ``model.flow_info``
    (configuration, transitions with their pairing summaries, training history), saved by
    :meth:`~spatia.SpatiaModel.save`. It writes ``uns['spatia']['transitions'][f"{source}->{target}"]`` (as
    :func:`~spatia.tl.pair_states`) and the run parameters to ``uns['spatia']['fit_transition']``.

    Examples
    --------
    >>> model = sp.tl.fit(sdata, image_key="morphology")
    >>> sp.tl.fit_transition(sdata, model, groupby="condition", source="control", target="disease")
    >>> sp.tl.transition(sdata, model, groupby="condition", source="control", target="disease")
    """
    from ..data._pairs import TransitionPairs
    from ..module import FlowConfig

    pairs_wanted = _transition_list(source, target, transitions)
    config = config or FlowConfig()
    _check_gate(gate, gate_neighbors)
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a FlowConfig, got {type(config).__name__}.")
    if not model.config.image.enabled:
        raise ValueError("The model has no image branch: a morphology flow needs image crops.")
    with keep_torch_threads():  # the crop and pairing steps' OpenMP kernels reset torch's thread count
        prepared = _on_model_image(data, model, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key,
                                   table_key=table_key, layer=layer, coordinate_system=coordinate_system,
                                   crops=crops, um_per_unit=um_per_unit)
        table, arrays = prepared.table, prepared.arrays
        # 1. pairing of every transition (validates groups before any training)
        results = [
            _pairs_for(table, arrays, groupby, s, t, layer=layer, n_pcs=n_pcs, epsilon=epsilon, max_iter=max_iter,
                       niche_key=niche_key, min_cells=min_cells, random_state=random_state,
                       reg_m=reg_m, marginals=marginals)
            for s, t in pairs_wanted
        ]
        train = [_train_pairs(r, gate, gate_neighbors) for r in results]
    # 2. the flow, on the pairs of each transition that pass the gate
    described = [
        TransitionPairs(
            name=r.name, source=s, target=t, source_rows=r.source_rows[k], target_rows=r.target_rows[r.match[k]],
            confidence=r.confidence[k], delta_g=r.delta_g, delta_m=r.delta_m_std,
            summary={"n_pairs": int(len(r.match)), "mean_confidence": float(r.confidence.mean()),
                     "pairing": r.info["pairing"]},
        )
        for r, (s, t), k in zip(results, pairs_wanted, train, strict=True)
    ]
    run = {
        "groupby": groupby,
        "pairing": {"n_pcs": n_pcs, "epsilon": epsilon, "max_iter": max_iter, "niche_key": niche_key,
                    "min_cells": min_cells, "random_state": seed_from(random_state),
                    "reg_m": None if reg_m is None else float(reg_m), "marginals": marginals},
        "train_gate": {"gate": None if gate is None else float(gate), "gate_neighbors": int(gate_neighbors)},
    }
    model.fit_transition(arrays, described, config=config, max_epochs=max_epochs, batch_size=batch_size,
                         accelerator=accelerator, devices=devices, precision=precision, random_state=random_state,
                         info=run, **trainer_kwargs)
    logger.info("Trained a flow for %d transition(s) of %r in %.1f s.", len(results), groupby,
                model.flow_info["train_seconds"])
    summaries = {f"uns/{Keys.UNS}/{Keys.TRANSITIONS}/{r.name}": _results.sanitize(r.to_uns()) for r in results}
    info = model.flow_info
    params = {"groupby": groupby, "transitions": [r.name for r in results], "layer": layer,
              "config": info["config"], "pairing": info["pairing"], "train_gate": info["train_gate"],
              "epochs": info["epochs"], "steps": info["steps"]}
    if not inplace:
        return _results.returned("fit_transition", summaries, params, model=model)
    _results.write(data, table, summaries, function="fit_transition", params=params, overwrite=False)
    return model


def _on_model_image(data, model, *, image_key, **kw):
    """The cells prepared for the model on the image it was trained on unless ``image_key`` names another (a
    slide may also hold mosaics written by earlier transitions)."""
    return _prepare_for_model(data, model, image_key=image_key or (model.crop_params or {}).get("image_key"),
                              allow_empty=True, **kw)


def _pairing_params(model) -> dict:
    """The pairing parameters the flow was trained with (``fit_transition`` records them in ``flow_info``)."""
    p = model.flow_info.get("pairing")
    keys = ("n_pcs", "epsilon", "max_iter", "niche_key", "min_cells", "reg_m", "marginals")
    missing = [k for k in keys if not isinstance(p, dict) or k not in p]
    if missing:
        raise ValueError(f"The model's flow has no pairing parameters {missing} in flow_info['pairing']: train it "
                         "with `sp.tl.fit_transition`.")
    return p


def _select_cells(table, source_rows: np.ndarray, cells) -> np.ndarray:
    if cells is None:
        return source_rows
    names = table.obs_names
    if isinstance(cells, pd.Index | list | tuple | np.ndarray) and len(cells) and isinstance(
            np.asarray(cells).flat[0], str | np.str_):
        idx = names.get_indexer(pd.Index(cells).astype(str))
        if (idx < 0).any():
            bad = list(pd.Index(cells)[idx < 0][:5])
            raise KeyError(f"cells not in the table's obs_names: {bad}.")
    else:
        arr = np.asarray(cells)
        idx = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64)
        if arr.dtype == bool and len(arr) != len(names):
            raise ValueError(f"A boolean cells mask must have {len(names)} entries, got {len(arr)}.")
    outside = ~np.isin(idx, source_rows)
    if outside.any():
        raise ValueError(f"{int(outside.sum())} of the selected cells are not in the source group.")
    if len(idx) == 0:
        raise ValueError("No cells selected.")
    return idx


def transition(
    data,
    model,
    *,
    groupby: str,
    source: str,
    target: str,
    cells=None,
    guidance_scale: float | None = None,
    steps: int | None = None,
    solver: str | None = None,
    gate: float | None = Defaults.SHIFT_ALPHA,
    gate_neighbors: int = Defaults.SHIFT_NEIGHBORS,
    batch_size: int = 64,
    image_key: str | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = Defaults.TABLE,
    layer: str | None = None,
    coordinate_system: str | None = None,
    um_per_unit: float | None = None,
    crops=None,
    device: str | None = None,
    random_state: int | None = 0,
    key_added: str = Keys.TRANSITION,
    overwrite: bool = False,
    inplace: bool = True,
):
    """Transform source cells' crops into predicted target-state crops with the model's flow.

    Each source crop is carried along the learned velocity field from t = 0 to 1 (classifier-free
    guidance ``v_c + w·(v_c − v_null)``), conditioned on the cell's own SPATIA embedding and the transition.
    Only cells the transition changes are transformed (``gate``): a cell whose neighbourhood in expression
    shows no significant morphology shift to its OT matches (:meth:`~spatia.tl.PairResult.shift_test`) is
    returned as it is, since a flow's rendering of a cell, even one that should not change, is never quite
    the cell; the gate may also leave some cells that do change (``gate=None`` transforms them all). Each
    prediction is linked to its source cell, to the
    source cell's OT-matched real target cell (the pairing recomputed with the parameters the flow was
    trained with)
    and to the real target cell nearest to it in morphology features.

    Parameters
    ----------
    data
        :class:`~spatialdata.SpatialData` with the cells.
    model
        A :class:`~spatia.SpatiaModel` with a flow from :func:`fit_transition`.
    groupby, source, target
        The transition (as trained).
    cells
        Source cells to transform (obs_names, row positions or a boolean mask); default all of the group.
    guidance_scale
        Guidance weight ``w`` (default ``FlowConfig.sample.guidance_scale``, 0.2; 0 = plain conditional).
    steps
        Steps of the fixed-step solvers (default ``FlowConfig.sample.steps``).
    solver
        ``"euler"``, ``"midpoint"`` (default) or ``"rk45"`` (adaptive).
    gate
        Significance level of the morphology-shift test: cells with ``shift_pvalue >= gate`` keep their
        crop (``transformed`` is ``False``). ``None`` transforms every selected cell.
    gate_neighbors
        Source cells per neighbourhood of the shift test.
    batch_size
        Cells per sampling batch.
    image_key, labels_key, shapes_key, table_key, layer, coordinate_system, um_per_unit, crops
        As in :func:`spatia.tl.embed`.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``.
    random_state
        Seed of the pairing's PCA (sampling itself is a deterministic ODE from the source crop).
    key_added
        Name of the image element (labels ``f"{key_added}_labels"``, table ``f"{key_added}_table"``).
    overwrite
        Replace the elements of an earlier run with the same ``key_added``; otherwise they are a ``KeyError``.
    inplace
        Write the elements (return ``None``); with ``False`` write nothing and return
        ``{"images/<key_added>": crops (N, C, S, S) float in [0, 1] (not tiled), "tables/<key_added>_table":
        the obs DataFrame, "params": run parameters}``.

    Returns
    -------
    ``None``, writing (one crop mosaic, as the generation functions do):

    - ``images[key_added]``: the predicted crops tiled in a grid;
    - ``labels[f"{key_added}_labels"]``: one label per predicted crop;
    - ``tables[f"{key_added}_table"]``: one row per prediction with ``obs`` columns ``source_cell``,
      ``transition``, ``groupby``, ``matched_target`` (OT match), ``nearest_target`` (nearest real target
      in standardised morphology features), ``shift_pvalue`` (the shift test), ``transformed`` (whether the
      flow was applied), ``guidance_scale``, ``steps``, ``solver``; ``uns['spatia']['transition']`` holds
      the run parameters.

    Examples
    --------
    >>> sp.tl.transition(sdata, model, groupby="condition", source="control", target="disease", steps=50)
    >>> sdata["spatia_transition_table"].obs.head()
    """
    from ..metrics import morphology_features

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1):
        raise ValueError(f"steps must be a whole number of solver steps >= 1, got {steps!r}.")
    tid = model.transition_index(groupby, source, target)
    if inplace and not _is_sdata(data):
        raise TypeError("transition(inplace=True) writes image elements: pass a SpatialData (or inplace=False).")
    from ._mosaic import add_crop_mosaic, mosaic_paths

    if inplace:  # before sampling
        _results.check_free(data, None, mosaic_paths(key_added), overwrite=overwrite)
    fcfg = model.flow.config
    steps = fcfg.sample.steps if steps is None else int(steps)
    solver = fcfg.sample.solver if solver is None else solver
    w = fcfg.sample.guidance_scale if guidance_scale is None else float(guidance_scale)
    _check_gate(gate, gate_neighbors)
    with keep_torch_threads():  # the crop and pairing steps' OpenMP kernels reset torch's thread count
        prepared = _on_model_image(data, model, image_key=image_key, labels_key=labels_key, shapes_key=shapes_key,
                                   table_key=table_key, layer=layer, coordinate_system=coordinate_system,
                                   crops=crops, um_per_unit=um_per_unit)
        table, arrays = prepared.table, prepared.arrays
        if arrays.crops.size != model.flow.size:
            raise ValueError(f"The crops are {arrays.crops.size} px but the flow was trained on {model.flow.size} px.")
        p = _pairing_params(model)
        res = _pairs_for(table, arrays, groupby, source, target, layer=layer, n_pcs=p["n_pcs"], epsilon=p["epsilon"],
                         max_iter=p["max_iter"], niche_key=p["niche_key"], min_cells=p["min_cells"],
                         random_state=random_state, reg_m=p["reg_m"],
                         marginals=p["marginals"])
        rows = _select_cells(table, res.source_rows, cells)
        pos = pd.Series(np.arange(len(res.source_rows)), index=res.source_rows)[rows].to_numpy()
        pvalue = res.shift_test(gate_neighbors)["shift_pvalue"].to_numpy()[pos]
    move = np.ones(len(rows), bool) if gate is None else pvalue < gate
    if not move.any():
        logger.warning("No selected cell has a significant morphology shift (gate=%s): every crop is returned "
                       "unchanged; pass gate=None to transform them all.", gate)
    pred = np.asarray(arrays.crops.get(rows), dtype=np.float32) / 255.0
    moving = np.flatnonzero(move)
    t0 = time.perf_counter()
    pred[moving], nfe, n_batches = model.sample_transition(
        arrays, rows[moving], tid, guidance_scale=w, steps=steps, solver=solver, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - t0
    # links: OT match of each source cell, and the real target nearest to the prediction in morphology
    matched = res.matched_obs[pos]
    f_pred = morphology_features(pred).to_numpy()
    f_tgt = res.target_features.to_numpy()  # measured by the pairing, on the same crops
    mu, sd = np.nanmean(f_tgt, 0), np.nanstd(f_tgt, 0)
    sd = np.where(sd > 0, sd, 1.0)
    a, b = np.nan_to_num((f_pred - mu) / sd), np.nan_to_num((f_tgt - mu) / sd)
    nearest = res.target_obs[((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).argmin(1)]
    name = f"{source}->{target}"
    obs = pd.DataFrame({
        "source_cell": table.obs_names.to_numpy()[rows].astype(str), "transition": name, "groupby": groupby,
        "matched_target": np.asarray(matched, dtype=str), "nearest_target": np.asarray(nearest, dtype=str),
        "shift_pvalue": pvalue, "transformed": move, "guidance_scale": w, "steps": steps, "solver": solver,
    })
    obs["transition"] = obs["transition"].astype("category")
    logger.info("Transformed %d of %d cells (%s; the others' morphology does not shift) in %.1f s (%d velocity "
                "evaluations per batch on average).", len(moving), len(rows), name, seconds, nfe // max(1, n_batches))
    params = {"transition": name, "groupby": groupby, "guidance_scale": w, "steps": steps, "solver": solver,
              "gate": gate, "gate_neighbors": int(gate_neighbors), "n_transformed": int(move.sum()),
              "velocity_evaluations": nfe, "seconds": seconds, "table_key": table_key, "layer": layer,
              "channels": model.channels, "crop_size": int(model.flow.size), "gap": 2,
              "crop_params": dict(model.crop_params or {})}
    paths = mosaic_paths(key_added)
    if not inplace:
        return _results.returned("transition", {paths[0]: pred, paths[2]: obs}, params, keys=paths)
    cp = model.crop_params or {}
    pixel = float(cp["crop_um"]) / model.flow.size if cp.get("crop_um") else 1.0
    add_crop_mosaic(data, pred, obs, key_added=key_added, channels=model.channels, pixel_size=pixel,
                    uns={"transition": _results.params_entry("transition", params, paths)}, gap=2,
                    overwrite=overwrite)
    return None


__all__ = ["fit_transition", "transition"]
