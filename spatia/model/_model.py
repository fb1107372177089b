"""``SpatiaModel``: configuration + trained module + the gene panel; train, embed, save, load."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import check_count, progress, resolve_device, seed_from
from .._version import __version__
from ..data import BatchDataset, CellArrays
from ..module import DecoderConfig, SpatiaConfig, SpatiaModule
from ._transition import TransitionMixin

logger = logging.getLogger(__name__)

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_META = "spatia_model.json"
_DECODER_WEIGHTS = "decoder.safetensors"
_FLOW_WEIGHTS = "flow.safetensors"
_FLOW_META = "flow.json"
_FILES = frozenset({_WEIGHTS, _CONFIG, _META, _DECODER_WEIGHTS, _FLOW_WEIGHTS, _FLOW_META})
_TMP_PREFIX = ".spatia_save_"  # a save in progress: .spatia_save_<name>_<random>, beside the target
_OLD_TAG = ".old-"  # the previous model during the swap: <name>.old-<id>, deleted once the new one is in
_MAX_PARAMETERS = 2e9  # 8 GB of float32 weights: refused before allocation (a damaged or absurd config)


class SpatiaModel(TransitionMixin):
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
        ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="spatia_ckpt_"))
        trainer, history = run_trainer(
            plan, loader, val_loader=val_loader, name="training", max_epochs=max_epochs, accelerator=accelerator,
            devices=devices, strategy=strategy, precision=precision, seed=seed, callbacks=callbacks,
            checkpoint_dir=ckdir, monitor="val_loss" if val_batches else "train_loss", ckpt_path=ckpt_path,
            trainer_kwargs=trainer_kwargs, deterministic=True, num_sanity_val_steps=0, use_distributed_sampler=True,
        )
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
            "checkpoint_dir": str(ckdir), "world_size": int(trainer.world_size), "precision": str(precision),
            "library_target": float(self.module.library_target),
        }
        self._trainer = trainer
        return self

    # inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(
        self, arrays: CellArrays, *, batch_size: int | None = None, device: str | None = None,
        outputs: tuple[str, ...] = ("cell", "niche", "tissue"),
    ) -> dict[str, np.ndarray]:
        """Embeddings (and optionally ``"mu"`` expected counts, ``"rho"`` expected proportions,
        ``"label_proba"``) for every cell, once.

        Under an initialised ``torch.distributed`` process group, each rank embeds a shard of the
        batches and the results are gathered; every rank returns the full arrays.

        Examples
        --------
        >>> emb = model.infer(prepared.arrays)  # {"cell": ..., "niche": ..., "tissue": ...}
        >>> mu = model.infer(prepared.arrays, outputs=("mu",))["mu"]  # expected counts
        """
        device = resolve_device(device)
        module = self.module.to(device).eval()
        batches = arrays.plan(batch_size or self.config.train.batch_size, None)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mine = batches[rank::world]
        res: dict[str, list] = {k: [] for k in outputs}
        idx = []
        use_bf16 = device.startswith("cuda")
        for core in progress(mine, desc="inference", unit="batch"):
            batch = {k: v.to(device) for k, v in arrays.collate(core).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = module(batch, train=False)
            idx.append(core)
            for k in outputs:
                if k == "label_proba":
                    v = torch.softmax(out.label_logits.float(), -1) if out.label_logits is not None else None
                else:
                    v = getattr(out, k)
                res[k].append(v.float().cpu().numpy())
        idx_arr = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        local = {k: (np.concatenate(v) if v else None) for k, v in res.items()}
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (idx_arr, local))
            idx_arr = np.concatenate([g[0] for g in gathered])
            local = {k: np.concatenate([g[1][k] for g in gathered if g[1][k] is not None]) for k in outputs}
        full = {}
        for k, v in local.items():
            if v is None:
                continue
            arr = np.zeros((arrays.n,) + v.shape[1:], dtype=np.float32)
            arr[idx_arr] = v
            full[k] = arr
        if len(np.unique(idx_arr)) != arrays.n:
            raise RuntimeError("Inference did not cover every cell exactly once.")
        self.module.cpu()
        return full

    # generation --------------------------------------------------------------------------------
    def fit_decoder(
        self,
        arrays: CellArrays,
        *,
        config: DecoderConfig | None = None,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        precision: str | int | None = None,
        random_state: int | None = 0,
        **trainer_kwargs: Any,
    ) -> SpatiaModel:
        """Train the diffusion decoder on prepared arrays, the encoder frozen (see :func:`spatia.tl.fit_decoder`).

        The crops of ``arrays`` set the generated size and channels (``config.size`` must match them).

        Examples
        --------
        >>> model.fit_decoder(prepared.arrays, max_epochs=20)  # or sp.tl.fit_decoder(sdata, model)
        """
        from ..module import DiffusionDecoder
        from ..train import DecoderBatches, DecoderTrainingPlan, run_trainer

        if not self.config.expression.enabled:
            raise ValueError("The decoder is conditioned on expression: the model needs its expression branch.")
        if arrays.crops is None:
            raise ValueError("Training the decoder needs cell crops (the images it learns to generate).")
        dc = config or DecoderConfig()
        if not isinstance(dc, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(dc).__name__}.")
        size = int(arrays.crops.size)
        if dc.size is not None and dc.size != size:
            raise ValueError(f"config.size is {dc.size} but the crops are {size} px.")
        dc = dc.replace(size=size)
        max_epochs = check_count("max_epochs", dc.max_epochs if max_epochs is None else max_epochs, 1)
        batch_size = check_count("batch_size", dc.batch_size if batch_size is None else batch_size, 1)
        seed = seed_from(random_state)
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = DiffusionDecoder(dc, len(arrays.crops.channels), self.config.width, len(self.genes))
        order = rng.permutation(arrays.n)
        batches = [order[i:i + batch_size] for i in range(0, arrays.n, batch_size)]
        from .._settings import settings

        plan = DecoderTrainingPlan(decoder, self.module, lr=lr or dc.lr, weight_decay=dc.weight_decay)
        loader = torch.utils.data.DataLoader(
            DecoderBatches(arrays.counts, arrays.crops, batches), batch_size=None, shuffle=True,
            num_workers=settings.num_workers, generator=torch.Generator().manual_seed(seed),
        )
        try:
            trainer, history = run_trainer(
                plan, loader, name="decoder training", max_epochs=max_epochs, accelerator=accelerator,
                devices=devices, precision=precision, seed=seed, trainer_kwargs=trainer_kwargs, deterministic="warn",
            )
        finally:
            self.module.requires_grad_(True)
            self.module.cpu()
        self.decoder = plan.decoder.cpu().eval()
        self.decoder_history = list(history.history)
        self.decoder_info = {"epochs": max_epochs, "n_cells": int(arrays.n), "batch_size": batch_size,
                             "optimizer_steps": int(trainer.global_step),
                             "random_state": seed, "channels": list(arrays.crops.channels),
                             "crop_params": dict(getattr(arrays.crops, "params", {}) or {})}
        return self

    def _require_decoder(self):
        if self.decoder is None:
            raise ValueError("This model has no trained diffusion decoder: train one with "
                             "`sp.tl.fit_decoder(sdata, model)` first.")
        return self.decoder

    @torch.no_grad()
    def sample_images(
        self,
        counts,
        *,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 20,
        scheduler: str = "ddim",
        token_merging: float | None = None,
        unconditional: bool = False,
        random_state: int | None = 0,
        batch_size: int = 64,
        device: str | None = None,
    ) -> np.ndarray:
        """Generated crops ``(n, C, S, S)`` uint8, one per row of ``counts (n, G)`` (model gene order).

        The same ``random_state`` gives the same images (on the same device).

        Examples
        --------
        >>> counts = sp.pp.get_counts(sdata["table"])[:8]
        >>> crops = model.sample_images(counts, num_inference_steps=20, guidance_scale=2.0)
        """
        import scipy.sparse as sp_sparse

        decoder = self._require_decoder()
        x = counts.toarray() if sp_sparse.issparse(counts) else np.asarray(counts)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            raise ValueError(f"counts must be (n, {len(self.genes)}) in the model's gene order, got {x.shape}.")
        dev = torch.device(resolve_device(device))
        gen = torch.Generator().manual_seed(seed_from(random_state))
        encoder = self.module.to(dev).eval()
        decoder = decoder.to(dev).eval()
        out = []
        n_batches = -(-len(x) // batch_size)
        try:
            with progress(total=n_batches * num_inference_steps, desc="generating", unit="step") as bar:
                for i in range(0, len(x), batch_size):
                    xb = torch.from_numpy(x[i:i + batch_size]).to(dev)
                    tokens, pad = encoder.encode_expression(xb)
                    img = decoder.sample(tokens, pad, guidance_scale=guidance_scale,
                                         num_inference_steps=num_inference_steps, scheduler=scheduler,
                                         token_merging=token_merging, generator=gen, unconditional=unconditional,
                                         counts=xb, callback=bar.update)
                    out.append(((img.float().cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8))
        finally:
            self.module.cpu()
            decoder.cpu()
        s = decoder.config.size
        return np.concatenate(out) if out else np.zeros((0, decoder.channels, s, s), dtype=np.uint8)

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
        from safetensors.torch import save_file

        path = Path(path)
        _check_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{path.name}_", dir=path.parent))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
            save_file(state, str(tmp / _WEIGHTS))
            (tmp / _CONFIG).write_text(self.config.to_json())
            meta = {
                "spatia_version": __version__, "genes": self.genes, "channels": self.channels,
                "label_categories": self.label_categories, "crop_params": self.crop_params,
                "history": self.history, "is_trained": self.is_trained,
                "train_info": {k: v for k, v in self.train_info.items() if isinstance(v, int | float | str)},
            }
            if self.decoder is not None:
                dstate = {k: v.detach().cpu().contiguous() for k, v in self.decoder.state_dict().items()}
                save_file(dstate, str(tmp / _DECODER_WEIGHTS))
                meta["decoder"] = {
                    "config": self.decoder.config.to_dict(), "channels": self.decoder.channels,
                    "history": self.decoder_history,
                    "info": {k: v for k, v in self.decoder_info.items()
                             if isinstance(v, int | float | str | list | dict)},
                }
            if self.flow is not None:
                fstate = {k: v.detach().cpu().contiguous() for k, v in self.flow.state_dict().items()}
                save_file(fstate, str(tmp / _FLOW_WEIGHTS))
                (tmp / _FLOW_META).write_text(json.dumps(self.flow_info, indent=1, default=float))
            # the metadata last: a folder is a complete model once spatia_model.json is in it
            (tmp / _META).write_text(json.dumps(meta, indent=1, default=float))
            _fsync_folder(tmp)
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_stale(path)

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> SpatiaModel:
        """Load a model written by :meth:`save` (safetensors; nothing is unpickled).

        Examples
        --------
        >>> model = sp.SpatiaModel.load("my_model", map_location="cpu")
        >>> sp.tl.embed(sdata, model)
        """

        path = Path(path)
        _recover(path)
        for f in (_WEIGHTS, _CONFIG, _META):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path} is not a saved SpatiaModel: {f} is missing.")
        device = resolve_device(map_location)
        # 1. everything read from the folder is checked before any weight is allocated
        config = _read_config(path / _CONFIG)
        meta = _read_json(path / _META, _META)
        _check_meta(meta, path / _META)
        decoder_config = flow_info = None
        if "decoder" in meta:  # saves from before the decoder have none
            if not (path / _DECODER_WEIGHTS).exists():
                raise FileNotFoundError(f"{path} describes a decoder but {_DECODER_WEIGHTS} is missing.")
            d = meta["decoder"]
            decoder_config = _in_file(path / _META, lambda: DecoderConfig.from_dict(d["config"]))
        if (path / _FLOW_META).exists() and (path / _FLOW_WEIGHTS).exists():  # older saves have no flow
            flow_info = _read_json(path / _FLOW_META, _FLOW_META)
            _check_flow_info(flow_info, path / _FLOW_META)
        # 2. the modules, then their weights (finite, and of the shapes the config gives)
        model = cls(config, meta["genes"], meta["channels"], meta["label_categories"], meta["crop_params"])
        state = _read_weights(path / _WEIGHTS, device)
        # models saved before the normalisation target was learned used a fixed 1e4
        state.setdefault("library_target", torch.tensor(1e4))
        _load_state(model.module, state, path / _WEIGHTS)
        model.module.to(device)
        model.history = meta.get("history", [])
        model.is_trained = bool(meta.get("is_trained", True))
        model.train_info = meta.get("train_info", {})
        if decoder_config is not None:
            from ..module import DiffusionDecoder

            d = meta["decoder"]
            decoder = DiffusionDecoder(decoder_config, int(d["channels"]), config.width, len(model.genes))
            _load_state(decoder, _read_weights(path / _DECODER_WEIGHTS, "cpu"), path / _DECODER_WEIGHTS)
            model.decoder = decoder.eval()
            model.decoder_history = d.get("history", [])
            model.decoder_info = d.get("info", {})
        if flow_info is not None:
            from ..module._flow import build_flow

            model.flow_info = flow_info
            model.flow = _in_file(path / _FLOW_META, lambda: build_flow(flow_info))
            _load_state(model.flow, _read_weights(path / _FLOW_WEIGHTS, device), path / _FLOW_WEIGHTS)
            model.flow.to(device)
        return model


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


# validated loads ---------------------------------------------------------------------------------
def _in_file(file: Path, build):
    """``build()``, its configuration errors prefixed with the file they come from."""
    try:
        return build()
    except (TypeError, ValueError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        raise type(e)(f"{file}: {msg}") from e


def _read_json(file: Path, what: str) -> dict:
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the model folder is damaged.") from e
    if not isinstance(d, dict):
        raise TypeError(f"{file}: {what} must hold a JSON object, got {type(d).__name__}.")
    return d


def _read_config(file: Path) -> SpatiaConfig:
    d = _read_json(file, _CONFIG)
    return _in_file(file, lambda: SpatiaConfig.from_dict(d, complete=True))


def _check_list_of_str(file: Path, meta: dict, key: str, *, empty: bool = True) -> None:
    v = meta[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"{file}: {key!r} must be a list of strings, got {v!r:.80}.")
    if not empty and not v:
        raise ValueError(f"{file}: {key!r} is empty.")
    if len(set(v)) != len(v):
        raise ValueError(f"{file}: {key!r} has duplicated entries.")


def _check_meta(meta: dict, file: Path) -> None:
    """Keys and types of ``spatia_model.json``."""
    missing = [k for k in ("genes", "channels", "label_categories", "crop_params") if k not in meta]
    if missing:
        raise KeyError(f"{file} has no {missing}: the model folder is damaged.")
    _check_list_of_str(file, meta, "genes", empty=False)
    _check_list_of_str(file, meta, "channels")
    _check_list_of_str(file, meta, "label_categories")
    if len(meta["label_categories"]) == 1:
        raise ValueError(f"{file}: 'label_categories' has one class; a supervised head has none or 2 and more.")
    kinds = {"crop_params": dict, "history": list, "train_info": dict, "is_trained": bool, "decoder": dict}
    for key, kind in kinds.items():
        if key in meta and not isinstance(meta[key], kind):
            raise TypeError(f"{file}: {key!r} must be a {kind.__name__}, got {meta[key]!r:.80}.")
    if "history" in meta and not all(isinstance(row, dict) for row in meta["history"]):
        raise TypeError(f"{file}: 'history' must be a list of objects (one per epoch).")
    d = meta.get("decoder")
    if d is not None:
        if not isinstance(d.get("config"), dict):
            raise TypeError(f"{file}: 'decoder.config' must be an object, got {d.get('config')!r:.80}.")
        ch = d.get("channels")
        if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 1024:
            raise ValueError(f"{file}: 'decoder.channels' must be an integer in [1, 1024], got {ch!r}.")


def _check_flow_info(info: dict, file: Path) -> None:
    """Keys and types of ``flow.json`` that shape the flow's modules."""
    missing = [k for k in ("config", "channels", "size", "emb_dim", "n_genes", "n_features", "transitions")
               if k not in info]
    if missing:
        raise KeyError(f"{file} has no {missing}: the model folder is damaged.")
    if not isinstance(info["config"], dict):
        raise TypeError(f"{file}: 'config' must be an object, got {info['config']!r:.80}.")
    limits = {"channels": 1024, "size": 1024, "emb_dim": 8192, "n_genes": 1_000_000, "n_features": 10_000}
    for key, hi in limits.items():
        v = info[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{file}: {key!r} must be an integer in [0, {hi}], got {v!r}.")
    if not isinstance(info["transitions"], list) or not info["transitions"]:
        raise ValueError(f"{file}: 'transitions' must be a non-empty list, got {info['transitions']!r:.80}.")


def _read_weights(file: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device=device)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a valid safetensors file ({e}): the model folder is damaged.") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{file} holds non-finite weights (NaN or inf) in {bad[:5]}"
                         f"{' and more' if len(bad) > 5 else ''}: refusing to load a model that would give NaN "
                         "results. Load an earlier save, or train again.")
    return state


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file} does not match the configuration saved beside it: {e}") from e


# atomic saves ------------------------------------------------------------------------------------
def _is_model_folder(path: Path) -> bool:
    """A folder :meth:`SpatiaModel.save` wrote: its metadata, config and weights, and nothing else."""
    if not path.is_dir() or not (path / _META).is_file():
        return False
    names = {p.name for p in path.iterdir()}
    return {_META, _CONFIG, _WEIGHTS} <= names and names <= _FILES


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a model folder: choose another path.")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True to replace the model in it.")
    if not _is_model_folder(path):
        other = sorted(p.name for p in path.iterdir() if p.name not in _FILES)
        raise FileExistsError(
            f"{path} is not a saved SpatiaModel (it holds {other[:5] or 'no ' + _META}): overwrite=True replaces "
            "a saved model only and never deletes other files. Choose another path, or empty the folder yourself."
        )


def _fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` and the folder itself to disk (no-op where the OS does not allow it)."""
    for p in [*folder.iterdir(), folder]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the complete model ``tmp`` to ``path`` by renames: old → ``<path>.old-<id>``, new → ``path``,
    then delete the old one. At every instant one complete model is at ``path`` or at ``<path>.old-<id>``
    (where :meth:`SpatiaModel.load` finds it when ``path`` is missing)."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}{_OLD_TAG}{uuid.uuid4().hex[:12]}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            try:
                os.replace(old, path)  # put the previous model back
            except OSError:
                logger.error("Could not move the previous model back from %s to %s: SpatiaModel.load(%r) will.",
                             old, path, str(path))
        raise
    _fsync_folder(path.parent)
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as e:  # the new model is in place; the next save removes the old one
            logger.warning("Saved the model to %s but could not delete the previous one in %s: %s", path, old, e)


def _stale_old(path: Path) -> list[Path]:
    """Previous models left by saves to ``path`` that were interrupted, oldest first."""
    import glob

    olds = [p for p in path.parent.glob(glob.escape(path.name) + _OLD_TAG + "*") if _is_model_folder(p)]
    return sorted(olds, key=lambda p: p.stat().st_mtime)


def _remove_stale(path: Path) -> None:
    try:
        for old in _stale_old(path):
            shutil.rmtree(old, ignore_errors=True)
    except OSError:  # the save is done; a leftover old copy is removed by the next one
        pass


def _recover(path: Path) -> None:
    """``path`` missing after a save was killed between its renames: move the previous model back."""
    if path.exists():
        return
    olds = _stale_old(path)
    if olds:
        logger.warning("%s is missing, but an interrupted save left the previous model in %s: restoring it.",
                       path, olds[-1])
        os.replace(olds[-1], path)
