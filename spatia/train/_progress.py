"""Training progress: Lightning's bar where it can be drawn, a log line per epoch where it cannot."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl

from .._logging import interactive
from .._settings import settings

logger = logging.getLogger(__name__)


class EpochLogCallback(pl.Callback):
    """Logs ``Epoch 3/20: train_loss 1.234, val_loss 1.345 (2.1 s/epoch)`` at INFO after each epoch.

    For output that is not a terminal or a notebook (a log file, a batch job), where a bar would be
    unreadable. Lines come at most every ``min_interval`` seconds; the last epoch is always logged.
    """

    def __init__(self, name: str = "training", min_interval: float = 5.0) -> None:
        self.name = name
        self.min_interval = float(min_interval)
        self._start = self._last = 0.0
        self._first = 0  # the first epoch of this run (a resumed run starts later)
        self._logged_epoch = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first = trainer.current_epoch
        self._logged_epoch = trainer.current_epoch - 1
        logger.info("%s: %d epoch(s)", self.name.capitalize(), trainer.max_epochs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if last or now - self._last >= self.min_interval:
            self._log(trainer, now)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._logged_epoch != trainer.current_epoch - 1:  # stopped early, after an epoch not yet logged
            self._log(trainer, time.perf_counter(), epoch=trainer.current_epoch - 1)

    def _log(self, trainer: pl.Trainer, now: float, epoch: int | None = None) -> None:
        epoch = trainer.current_epoch if epoch is None else epoch
        if epoch < self._first:
            return
        metrics = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                            if k.endswith("loss"))
        per_epoch = (now - self._start) / (epoch + 1 - self._first)
        logger.info("%s epoch %d/%s: %s (%.1f s/epoch)", self.name.capitalize(), epoch + 1, trainer.max_epochs,
                    metrics or "no loss logged", per_epoch)
        self._logged_epoch, self._last = epoch, now


def progress_options(name: str) -> dict[str, Any]:
    """Trainer keyword arguments for progress: ``enable_progress_bar`` and the extra ``callbacks``.

    Lightning's bar when ``settings.progress_bar`` is on and the output is a terminal or a notebook; an
    :class:`EpochLogCallback` instead when the output is not; nothing when ``progress_bar`` is off.
    """
    if not settings.progress_bar:
        return {"enable_progress_bar": False, "callbacks": []}
    if interactive():
        return {"enable_progress_bar": True, "callbacks": []}
    return {"enable_progress_bar": False, "callbacks": [EpochLogCallback(name)]}
