"""``SpatiaModel``: configuration + trained module + the gene panel; train, embed, save, load."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import check_count, progress, release_mapped, resolve_device, seed_from, trimmed
from ..data import BatchDataset, CellArrays
from ..module import SpatiaConfig, SpatiaModule
from ._decoder import DecoderMixin
from ._io import read_model, write_model
from ._transition import TransitionMixin

logger = logging.getLogger(__name__)

_MAX_PARAMETERS = 2e9  # 8 GB of float32 weights: refused before allocation (a damaged or absurd config)


class SpatiaModel(DecoderMixin, TransitionMixin):
    """A SPATIA model of a tissue: image + expression + spatial context.

    Create it with :func:`spatia.tl.fit` (or :meth:`SpatiaModel.load`); it keeps its gene panel,
    channel names and label categories, so it can embed new slides (:func:`spatia.tl.embed`).

    Parameters
    ----------
    config
        The :class:`~spatia.module.SpatiaConfig`.
    genes
        Gene panel (the order of the model's gene axis).
    channels
        Image channel names the image branch was trained on.
    label_categories
        Classes of the supervised head (empty for none).
    crop_params
        Crop extraction parameters used in training (reused for new slides).
    random_state
        Seed of the initial weights.
    """

    def __init__(
        self,
        config: SpatiaConfig,
        genes: list[str],
        channels: list[str] | None = None,
        label_categories: list[str] | None = None,
        crop_params: dict | None = None,
        random_state: int | None = 0,
    ) -> None:
        self.config = config
        self.genes = list(genes)
        self.channels = list(channels or [])
        self.label_categories = list(label_categories or [])
        self.crop_params = dict(crop_params or {})
        n_ch = len(self.channels) if config.image.enabled else 1
        if config.image.enabled and n_ch == 0:
            raise ValueError("The image branch is enabled but no image channels were given.")
        n = _approx_parameters(config, len(self.genes), n_ch)
        if n > _MAX_PARAMETERS:
            raise ValueError(f"This configuration would have about {n / 1e9:.0f} billion parameters (with "
                             f"{len(self.genes)} genes): reduce width and depths "
                             f"(limit {_MAX_PARAMETERS / 1e9:.0f} billion).")
        # initial weights from random_state only (not from whatever the global torch RNG holds)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_from(random_state))
            self.module = SpatiaModule(config, len(self.genes), n_ch, len(self.label_categories))
        self.history: list[dict[str, float]] = []
        self.is_trained = False
        self.train_info: dict[str, Any] = {}
        # the diffusion decoder (generation): built by fit_decoder, saved beside the encoder
        self.decoder = None
        self.decoder_history: list[dict[str, float]] = []
        self.decoder_info: dict[str, Any] = {}
        # state-transition flow (sp.tl.fit_transition): the module and its description (config, sizes,
        # transitions, pairing parameters, history), saved as flow.safetensors + flow.json
        self.flow = None
        self.flow_info: dict[str, Any] = {}
        # image readout (expression from nucleus features + image-only embedding), fitted by sp.tl.fit on the
        # training cells and read by sp.tl.predict_expression; saved as readout.safetensors
        self.readout = None

    # ---------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        state = "trained" if self.is_trained else "untrained"
        dec = "" if self.decoder is None else f", decoder {self.decoder.config.size} px"
        return (f"SpatiaModel({state}, {len(self.genes)} genes, channels={self.channels}, "
                f"{n / 1e6:.2f}M parameters{dec})")

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    # training ------------------------------------------------------------------------------------
    def train(
        self,
        arrays: CellArrays,
        *,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        strategy: str = "auto",
        precision: str | int | None = None,
        random_state: int | None = 0,
        early_stopping: bool = True,
        checkpoint_dir: str | Path | None = None,
        ckpt_path: str | Path | None = None,
        compile: bool = False,
        **trainer_kwargs: Any,
    ) -> SpatiaModel:
        """Train with PyTorch Lightning on prepared arrays (see :func:`spatia.tl.fit`).

        Examples
        --------
        >>> model = sp.SpatiaModel(sp.SpatiaConfig.tiny(), genes, channels)
        >>> model.train(prepared.arrays, max_epochs=10)  # sp.tl.fit does all of this from a SpatialData
        """
        from lightning.pytorch.callbacks import EarlyStopping

        from .._settings import settings
        from ..train import RandomStateCallback, SpatiaTrainingPlan, default_precision, run_trainer

        tc = self.config.train
        max_epochs = check_count("max_epochs", tc.max_epochs if max_epochs is None else max_epochs, 1)
        batch_size = check_count("batch_size", tc.batch_size if batch_size is None else batch_size, 2)
        seed = seed_from(random_state)
        rng = np.random.default_rng(seed)
        is_val = _validation_cells(arrays, tc.val_fraction, rng, hold_out=early_stopping)
        if not self.is_trained and ckpt_path is None:
            # expression normalisation target from the training cells (kept when training goes on)
            lib = np.asarray(arrays.counts[np.nonzero(~is_val)[0]].sum(1)).ravel()
            self.module.set_library_target(lib)
        train_batches = arrays.plan(batch_size, rng, np.nonzero(~is_val)[0])
        val_batches = arrays.plan(batch_size, None, np.nonzero(is_val)[0])
        if not train_batches:
            raise ValueError("No cells left for training.")
        precision = default_precision(precision, accelerator)
        if compile:
            self.module = torch.compile(self.module)  # type: ignore[assignment]
        plan = SpatiaTrainingPlan(self.module, lr=lr or tc.lr, weight_decay=tc.weight_decay)
        generator = torch.Generator().manual_seed(seed)  # the loader's shuffling, saved in checkpoints
        callbacks = [RandomStateCallback(generator)]
        if val_batches and early_stopping:
            callbacks.append(EarlyStopping(monitor="val_loss", patience=tc.patience, mode="min"))
        if isinstance(strategy, str) and strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
            # some heads (masked genes, labels, contrastive) can sit out a batch: DDP must allow it
            strategy = f"{strategy}_find_unused_parameters_true"
        loader = torch.utils.data.DataLoader(
            BatchDataset(arrays, train_batches), batch_size=None, shuffle=True, num_workers=settings.num_workers,
            generator=generator,
        )
        val_loader = (
            torch.utils.data.DataLoader(BatchDataset(arrays, val_batches), batch_size=None,
                                        num_workers=settings.num_workers)
            if val_batches else None
        )
        # without checkpoint_dir, checkpoints go to a temporary folder that is removed once training ends; a run
        # that stops with an error keeps its last checkpoint there, and the warning says where
        own_dir = checkpoint_dir is None
        ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="spatia_ckpt_"))
        try:
            trainer, history = run_trainer(
                plan, loader, val_loader=val_loader, name="training", max_epochs=max_epochs, accelerator=accelerator,
                devices=devices, strategy=strategy, precision=precision, seed=seed, callbacks=callbacks,
                checkpoint_dir=ckdir, monitor="val_loss" if val_batches else "train_loss", ckpt_path=ckpt_path,
                trainer_kwargs=trainer_kwargs, deterministic=True, num_sanity_val_steps=0,
                use_distributed_sampler=True,
            )
        except BaseException:
            if own_dir:
                if (ckdir / "last.ckpt").is_file():
                    logger.warning("Training stopped early. Its last checkpoint is kept at %s: pass "
                                   "ckpt_path='%s' to resume (same data and configuration), or delete the folder.",
                                   ckdir, ckdir / "last.ckpt")
                else:
                    shutil.rmtree(ckdir, ignore_errors=True)
            raise
        if own_dir:
            shutil.rmtree(ckdir, ignore_errors=True)
        trained = plan.module
        self.module = getattr(trained, "_orig_mod", trained).cpu()  # unwrap torch.compile
        if not history.history and trainer.callback_metrics:
            # spawned DDP: the callback lived in the workers; the main process gets the final metrics
            row = {"epoch": int(trainer.current_epoch) - 1}
            row.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            history.history.append(row)
        self.history.extend(history.history)
        self.is_trained = True
        self.train_info = {
            "epochs": int(trainer.current_epoch), "n_train_cells": int((~is_val).sum()),
            "n_val_cells": int(is_val.sum()), "batch_size": batch_size, "random_state": seed,
            "checkpoint_dir": None if own_dir else str(ckdir), "world_size": int(trainer.world_size), "precision": str(precision),
            "library_target": float(self.module.library_target),
        }
        self._trainer = trainer
        return self

    # inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(
        self, arrays: CellArrays, *, batch_size: int | None = None, device: str | None = None,
        outputs: tuple[str, ...] = ("cell", "niche", "tissue"), cells: np.ndarray | None = None,
        alloc: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeddings (and optionally ``"mu"`` expected counts, ``"rho"`` expected proportions,
        ``"label_proba"``) for every cell, once; with ``cells`` (row indices), for those cells only, in that
        order (their niches and tiles still read the whole slide).

        ``alloc(name, shape)`` gives the zeroed float32 array each output is written into instead of a new one in
        memory, e.g. a :class:`numpy.memmap` on disk for outputs that do not fit in memory: its pages are
        written back and released from the process every few batches.

        Under an initialised ``torch.distributed`` process group, each rank embeds a shard of the
        batches and the results are gathered; every rank returns the full arrays.

        Examples
        --------
        >>> emb = model.infer(prepared.arrays)  # {"cell": ..., "niche": ..., "tissue": ...}
        >>> mu = model.infer(prepared.arrays, outputs=("mu",))["mu"]  # expected counts
        """
        device = resolve_device(device)
        module = self.module.to(device).eval()
        rows = np.arange(arrays.n) if cells is None else np.asarray(cells, dtype=np.int64)
        where = None if cells is None else np.full(arrays.n, -1, dtype=np.int64)
        if where is not None:
            where[rows] = np.arange(len(rows))
        batches = arrays.plan(batch_size or self.config.train.batch_size, None, None if cells is None else rows)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mine = batches[rank::world]
        # one process: each batch goes straight into the (n_cells, ...) result, so the peak is the outputs
        # themselves; under DDP the shards are gathered, then laid out the same way
        full: dict[str, np.ndarray] = {}
        shard: dict[str, list] = {k: [] for k in outputs}
        idx = []
        use_bf16 = device.startswith("cuda")
        for i, core in enumerate(trimmed(progress(mine, desc="inference", unit="batch")), 1):
            if i % 32 == 0:
                for a in full.values():
                    release_mapped(a)
            batch = {k: v.to(device) for k, v in arrays.collate(core).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = module(batch, train=False)
            idx.append(core)
            for k in outputs:
                if k == "label_proba":
                    v = torch.softmax(out.label_logits.float(), -1) if out.label_logits is not None else None
                else:
                    v = getattr(out, k)
                if v is None:
                    continue
                v = v.float().cpu().numpy()
                if world > 1:
                    shard[k].append(v)
                    continue
                if k not in full:
                    full[k] = _output_array(alloc, (len(rows),) + v.shape[1:], k)
                full[k][core if where is None else where[core]] = v
        idx_arr = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        if world > 1:
            local = {k: (np.concatenate(v) if v else None) for k, v in shard.items()}
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (idx_arr, local))
            idx_arr = np.concatenate([g[0] for g in gathered])
            for k in outputs:
                parts = [g[1][k] for g in gathered if g[1][k] is not None]
                if parts:
                    v = np.concatenate(parts)
                    full[k] = _output_array(alloc, (len(rows),) + v.shape[1:], k)
                    full[k][idx_arr if where is None else where[idx_arr]] = v
        if len(np.unique(idx_arr)) != len(rows) or (where is not None and (where[idx_arr] < 0).any()):
            raise RuntimeError("Inference did not cover every cell exactly once.")
        for a in full.values():
            release_mapped(a)
        self.module.cpu()
        return full

    # persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``spatia_model.json`` (genes, channels, version).

        A state-transition flow (:func:`spatia.tl.fit_transition`) adds ``flow.safetensors`` and
        ``flow.json`` (its configuration, transitions and pairing parameters).

        The model is written to a temporary folder beside ``path`` and swapped in by renames, so that at
        every instant ``path`` holds either the previous or the new complete model: an interrupted save
        leaves no half-written model, and :meth:`load` recovers the previous one if the save was killed
        between the two renames. ``overwrite=True`` replaces a saved model only: a folder with other files
        is never deleted.

        Examples
        --------
        >>> model.save("my_model")  # config.json + model.safetensors (+ decoder / flow weights)
        >>> model.save("my_model", overwrite=True)  # replace it
        """
        write_model(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> SpatiaModel:
        """Load a model written by :meth:`save` (safetensors; nothing is unpickled).

        Examples
        --------
        >>> model = sp.SpatiaModel.load("my_model", map_location="cpu")
        >>> sp.tl.embed(sdata, model)
        """
        return read_model(cls, path, map_location)


def _validation_cells(arrays: CellArrays, fraction: float, rng: np.random.Generator, *, hold_out: bool) -> np.ndarray:
    """Cells held out for validation (boolean mask): a ``fraction`` of the tissue tiles, whole, so that validation
    is spatially apart from training; a random ``fraction`` of the cells where there are too few tiles. None
    without ``hold_out``."""
    tiles = np.unique(arrays.tile)
    n_val = int(round(len(tiles) * fraction)) if hold_out else 0
    val_tiles = rng.choice(tiles, size=n_val, replace=False) if 0 < n_val < len(tiles) else np.array([])
    is_val = np.isin(arrays.tile, val_tiles)
    if is_val.sum() == 0 and hold_out and arrays.n >= 20:
        is_val = rng.random(arrays.n) < fraction
    return is_val


def _approx_parameters(config: SpatiaConfig, n_genes: int, n_channels: int) -> float:
    """An upper estimate of the module's parameter count, computed before building it."""
    c, d = config, config.width
    blocks = (c.image.depth * c.image.enabled + c.expression.depth * c.expression.enabled + 2 * c.fusion.depth
              + c.niche.depth + c.tissue.depth + 2)
    image = (c.image.patch ** 2 * n_channels * d * 2 + 12 * c.image.decoder_width ** 2 * c.image.decoder_depth
             if c.image.enabled else 0)
    return 13.0 * d * d * blocks + image + 6.0 * (d + c.embed_dim) * n_genes


def _output_array(alloc, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The array ``infer`` fills for output ``name``: ``alloc``'s (checked) or new zeros."""
    if alloc is None:
        return np.zeros(shape, dtype=np.float32)
    given = alloc(name, shape)
    if tuple(given.shape) != tuple(shape) or given.dtype != np.float32:
        raise ValueError(f"alloc({name!r}, ...) must give a float32 array of shape {shape}, got {given.dtype} "
                         f"{tuple(given.shape)}.")
    return given
