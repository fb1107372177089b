"""State-transition flow of a :class:`~spatia.SpatiaModel`: train it on paired cells, transform cells with it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _utils
from ..data import CellArrays
from ..data._pairs import TransitionPairs

logger = logging.getLogger(__name__)


def default_flow_epochs(n_batches: int, min_steps: int) -> int:
    """Epochs of a flow trained with ``FlowTrainConfig(max_epochs=None)``: enough for ``min_steps`` optimiser steps
    at ``n_batches`` batches per epoch, and at least 10."""
    return max(10, math.ceil(min_steps / max(1, n_batches)))


class TransitionMixin:
    """:meth:`fit_transition` and :meth:`sample_transition` of :class:`~spatia.SpatiaModel`."""

    def fit_transition(
        self,
        arrays: CellArrays,
        transitions: Sequence[TransitionPairs],
        *,
        config=None,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        precision: str | int | None = None,
        random_state: int | None = 0,
        info: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ):
        """Train a state-transition flow on paired cells and keep it as ``model.flow`` (see
        :func:`spatia.tl.fit_transition`, which pairs the cells).

        Parameters
        ----------
        arrays
            The prepared cells, with their crops; the rows of ``transitions`` index them.
        transitions
            One :class:`~spatia.data._pairs.TransitionPairs` per transition, in the order of the flow's
            transition index.
        config
            :class:`~spatia.module.FlowConfig` (default ``FlowConfig()``).
        max_epochs, batch_size
            Override ``config.train``; by default enough epochs for ``config.train.min_steps`` optimiser steps, at least 10.
        accelerator, devices, precision, **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.
        random_state
            Seed of the initial weights and the batches.
        info
            More description of the run, kept in ``model.flow_info`` (e.g. the pairing parameters).

        Returns
        -------
        The model, with ``flow`` and ``flow_info`` (configuration, sizes, transitions, epochs, steps, history).

        Examples
        --------
        >>> model.fit_transition(prepared.arrays, [pairs], max_epochs=50)  # or sp.tl.fit_transition(...)
        """
        from ..metrics import MORPHOLOGY_FEATURES
        from ..module import FlowConfig, TransitionFlow

        config = config or FlowConfig()
        if not isinstance(config, FlowConfig):
            raise TypeError(f"config must be a FlowConfig, got {type(config).__name__}.")
        if not self.config.image.enabled:
            raise ValueError("The model has no image branch: a morphology flow needs image crops.")
        if not transitions:
            raise ValueError("transitions is empty.")
        with _utils.keep_torch_threads():  # the crop and pairing steps' OpenMP kernels reset it
            emb = self.infer(arrays, outputs=("cell",))["cell"]
        seed = _utils.seed_from(random_state)
        feats = list(MORPHOLOGY_FEATURES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = TransitionFlow(config, channels=len(self.channels), size=arrays.crops.size, emb_dim=emb.shape[1],
                                  n_genes=len(self.genes), n_features=len(feats), n_transitions=len(transitions))
        _set_deltas(flow, transitions, self.genes, feats)
        t0 = time.perf_counter()
        trainer, history = _train_flow(flow, arrays, emb, transitions, seed, max_epochs=max_epochs,
                                       batch_size=batch_size, accelerator=accelerator, devices=devices,
                                       precision=precision, trainer_kwargs=trainer_kwargs)
        self.flow = flow.cpu().eval()
        self.flow_info = {
            "config": config.to_dict(), "channels": len(self.channels), "size": int(arrays.crops.size),
            "emb_dim": int(emb.shape[1]), "n_genes": len(self.genes), "n_features": len(feats), "features": feats,
            **(info or {}),
            "transitions": [{"name": t.name, "source": t.source, "target": t.target, **t.summary,
                             "n_train_pairs": len(t.source_rows)} for t in transitions],
            "epochs": int(trainer.current_epoch), "steps": int(trainer.global_step),
            "train_seconds": round(time.perf_counter() - t0, 2), "history": history.history,
        }
        return self

    def transition_index(self, groupby: str, source: str, target: str) -> int:
        """Index of the flow's ``source -> target`` transition of ``groupby``; a ``KeyError`` naming the known
        ones if the flow has none."""
        if getattr(self, "flow", None) is None:
            raise ValueError("The model has no state-transition flow: train one with `sp.tl.fit_transition` first.")
        info = self.flow_info
        known = [f"{info['groupby']}: {t['source']}->{t['target']}" for t in info["transitions"]]
        if groupby != info["groupby"]:
            raise KeyError(f"The flow was trained on groupby={info['groupby']!r}, not {groupby!r}; known "
                           f"transitions: {known}.")
        for i, t in enumerate(info["transitions"]):
            if t["source"] == str(source) and t["target"] == str(target):
                return i
        raise KeyError(f"The flow has no transition {source!r}->{target!r}; known transitions: {known}.")

    @torch.no_grad()
    def sample_transition(
        self,
        arrays: CellArrays,
        rows: np.ndarray,
        transition: int,
        *,
        guidance_scale: float | None = None,
        steps: int | None = None,
        solver: str | None = None,
        batch_size: int = 64,
        device: str | None = None,
    ) -> tuple[np.ndarray, int, int]:
        """Carry the crops of cells ``rows`` along the flow's ``transition`` (an index, see
        :meth:`transition_index`); the solver settings default to the flow's config.

        Returns the predicted crops ``(n, C, S, S)`` float in [0, 1], the velocity evaluations and the batches.

        Examples
        --------
        >>> i = model.transition_index("condition", "control", "disease")
        >>> crops, nfe, n_batches = model.sample_transition(prepared.arrays, rows, i, steps=50)
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.flow.channels, self.flow.size, self.flow.size), np.float32), 0, 0
        pred = np.asarray(arrays.crops.get(rows), dtype=np.float32) / 255.0
        with _utils.keep_torch_threads():
            emb = self.infer(arrays, outputs=("cell",))["cell"]
        dev = _utils.resolve_device(device)
        flow = self.flow.to(dev).eval()
        n_batches, nfe = 0, 0
        try:
            for i in _utils.progress(range(0, len(rows), batch_size), desc="transition", unit="batch"):
                j = slice(i, i + batch_size)
                x0 = torch.from_numpy(pred[j]).to(dev)
                e = torch.from_numpy(emb[rows[j]]).to(dev)
                tr = torch.full((len(x0),), transition, dtype=torch.long, device=dev)
                x1, n = flow.sample(x0, e, tr, guidance_scale=guidance_scale, steps=steps, solver=solver)
                pred[j] = x1.float().cpu().numpy()
                nfe += n
                n_batches += 1
        finally:
            self.flow.cpu()
        return pred, nfe, n_batches


def _set_deltas(flow, transitions: Sequence[TransitionPairs], genes: list[str], features: list[str]) -> None:
    """Each transition's Δg (model gene order) and Δm (standardised) into the flow's buffers, and the mean pair
    confidence."""
    dg = np.stack([t.delta_g.reindex(genes).fillna(0.0).to_numpy(np.float32) for t in transitions])
    dm = np.stack([t.delta_m.reindex(features).fillna(0.0).to_numpy(np.float32) for t in transitions])
    flow.delta_g.copy_(torch.from_numpy(dg))
    flow.delta_m.copy_(torch.from_numpy(dm))
    flow.mean_confidence.fill_(float(np.concatenate([t.confidence for t in transitions]).mean()))


def _train_flow(flow, arrays: CellArrays, emb: np.ndarray, transitions: Sequence[TransitionPairs], seed: int, *,
                max_epochs, batch_size, accelerator, devices, precision, trainer_kwargs):
    """Lightning training of ``flow`` on the pairs (new batches every epoch); ``(trainer, history)``."""
    from .._settings import settings
    from ..data import PairArrays, PairDataset
    from ..train import FlowTrainingPlan, run_trainer

    config = flow.config
    pairs = PairArrays(
        crops=arrays.crops, cell_emb=emb,
        source=np.concatenate([t.source_rows for t in transitions]),
        target=np.concatenate([t.target_rows for t in transitions]),
        transition=np.concatenate([np.full(len(t.source_rows), i) for i, t in enumerate(transitions)]),
        confidence=np.concatenate([t.confidence for t in transitions]),
    )
    batch_size = config.train.batch_size if batch_size is None else int(batch_size)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2, got {batch_size}.")
    dataset = PairDataset(pairs, batch_size, seed)
    max_epochs = config.train.max_epochs if max_epochs is None else int(max_epochs)
    if max_epochs is None:
        max_epochs = default_flow_epochs(len(dataset), config.train.min_steps)
    elif max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
    # new batches every epoch, drawn from (seed, epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=dataset.sampler,
                                         num_workers=settings.num_workers)
    plan = FlowTrainingPlan(flow, lr=config.train.lr, weight_decay=config.train.weight_decay)
    return run_trainer(
        plan, loader, name="transition training", max_epochs=max_epochs, accelerator=accelerator, devices=devices,
        precision=precision, seed=seed, trainer_kwargs=trainer_kwargs, gradient_clip_val=config.train.grad_clip or None,
        num_sanity_val_steps=0,
    )
