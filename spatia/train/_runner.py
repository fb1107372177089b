"""One place that builds and runs a Lightning Trainer for the decoder and the transition flow."""

from __future__ import annotations

import tempfile
from typing import Any


def default_precision(precision: str | int | None, accelerator: str) -> str | int:
    """``precision`` as given, else bf16 mixed precision on CUDA and 32-bit elsewhere."""
    if precision is not None:
        return precision
    from .._utils import resolve_device

    return "bf16-mixed" if resolve_device(accelerator if accelerator != "gpu" else "cuda") == "cuda" else "32-true"


def run_trainer(plan, loader, *, name: str, max_epochs: int, accelerator: str = "auto", devices: int | str = "auto",
                precision: str | int | None = None, trainer_kwargs: dict[str, Any] | None = None, **fixed: Any):
    """Fit ``plan`` on ``loader`` with Lightning; return ``(trainer, history)``.

    The trainer logs nothing to disk (no logger, no checkpoints), shows spatia's progress (``name``) and keeps
    the per-epoch losses (``history``, a :class:`HistoryCallback`). ``fixed`` are the caller's own Trainer
    settings (gradient clipping, determinism...); ``trainer_kwargs`` the user's, which win.
    """
    import lightning.pytorch as pl

    from .._logging import quiet_dependencies
    from ._plan import HistoryCallback
    from ._progress import progress_options

    history = HistoryCallback()
    shown = progress_options(name)
    kw = dict(max_epochs=max_epochs, accelerator=accelerator, devices=devices,
              precision=default_precision(precision, accelerator), callbacks=[history, *shown["callbacks"]],
              logger=False, enable_progress_bar=shown["enable_progress_bar"], enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tempfile.mkdtemp(prefix="spatia_"), **fixed)
    kw.update(trainer_kwargs or {})
    with quiet_dependencies():
        trainer = pl.Trainer(**kw)
        trainer.fit(plan, train_dataloaders=loader)
    return trainer, history
