"""The one place that builds and runs a Lightning Trainer: for the encoder, the decoder and the transition flow."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def default_precision(precision: str | int | None, accelerator: str) -> str | int:
    """``precision`` as given, else bf16 mixed precision on CUDA and 32-bit elsewhere."""
    if precision is not None:
        return precision
    from .._utils import resolve_device

    return "bf16-mixed" if resolve_device(accelerator if accelerator != "gpu" else "cuda") == "cuda" else "32-true"


def run_trainer(
    plan,
    loader,
    *,
    name: str,
    max_epochs: int,
    val_loader=None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: Any = "auto",
    precision: str | int | None = None,
    seed: int | None = None,
    callbacks: Sequence[Any] = (),
    checkpoint_dir: str | Path | None = None,
    monitor: str = "train_loss",
    ckpt_path: str | Path | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **fixed: Any,
):
    """Fit ``plan`` on ``loader`` (and ``val_loader``) with Lightning; return ``(trainer, history)``.

    Every training in spatia runs through here, so that precision, seeding, progress, checkpoints and resume
    behave the same everywhere.

    Parameters
    ----------
    plan, loader, val_loader
        The :class:`lightning.pytorch.LightningModule` and its training (validation) loaders.
    name
        What is trained, as the progress bar or the epoch log lines name it.
    max_epochs, accelerator, devices, strategy
        Passed to :class:`lightning.pytorch.Trainer`.
    precision
        Passed to the Trainer; ``None`` chooses with :func:`default_precision`.
    seed
        Seeds torch, numpy and python (:func:`lightning.pytorch.seed_everything`, loader workers included)
        just before the Trainer is built; ``None`` leaves the random states as they are.
    callbacks
        More Lightning callbacks of the caller.
    checkpoint_dir
        Where checkpoints go: the best by ``monitor`` and ``last.ckpt``; ``None`` writes none.
    ckpt_path
        A checkpoint of an earlier run to resume from: it is checked and read with ``weights_only=True``.
    trainer_kwargs
        The user's Trainer arguments; they win over everything else.
    **fixed
        The caller's own Trainer settings (gradient clipping, determinism...).

    Returns
    -------
    The fitted :class:`lightning.pytorch.Trainer` and the :class:`HistoryCallback` with the per-epoch metrics.
    The torch thread count is the same after the fit as before it (distributed launchers change it).
    """
    import lightning.pytorch as pl

    from .._logging import quiet_dependencies
    from .._utils import keep_torch_threads
    from ._plan import HistoryCallback, ReleaseMemoryCallback
    from ._progress import progress_options

    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    history = HistoryCallback()
    shown = progress_options(name)
    every = [history, ReleaseMemoryCallback(), *callbacks]
    if checkpoint_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        every.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=1, monitor=monitor))
    # Lightning needs a root folder even when it writes nothing there: a temporary one is removed afterwards
    root = str(checkpoint_dir) if checkpoint_dir is not None else tempfile.mkdtemp(prefix="spatia_")
    kw = dict(max_epochs=max_epochs, accelerator=accelerator, devices=devices, strategy=strategy,
              precision=default_precision(precision, accelerator), callbacks=every + shown["callbacks"],
              logger=False, enable_progress_bar=shown["enable_progress_bar"], enable_model_summary=False,
              enable_checkpointing=checkpoint_dir is not None, default_root_dir=root, **fixed)
    kw.update(trainer_kwargs or {})
    fit_kw: dict[str, Any] = {}
    if ckpt_path is not None:
        fit_kw["ckpt_path"] = str(check_checkpoint(ckpt_path))
        if "weights_only" in inspect.signature(pl.Trainer.fit).parameters:  # lightning >= 2.5
            fit_kw["weights_only"] = True
    try:
        with keep_torch_threads(), quiet_dependencies():
            trainer = pl.Trainer(**kw)
            trainer.fit(plan, train_dataloaders=loader, val_dataloaders=val_loader, **fit_kw)
    finally:
        if checkpoint_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return trainer, history


def check_checkpoint(ckpt_path: str | Path) -> Path:
    """A Lightning checkpoint to resume from, read with ``weights_only=True``: tensors and plain containers
    only, never arbitrary pickled objects (whatever torch's default)."""
    import pickle

    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: pass checkpoint_dir/last.ckpt of an earlier fit.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain values: refusing to unpickle it "
                         f"(resume only from checkpoints spatia wrote). {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable checkpoint ({e}).") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint of spatia.tl.fit (no state_dict / epoch).")
    return path
