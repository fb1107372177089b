"""Lightning training plan for the SPATIA encoder."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from ..module import SpatiaModule


class SpatiaTrainingPlan(pl.LightningModule):
    """Optimises :class:`~spatia.module.SpatiaModule` on batches from :class:`~spatia.data.BatchDataset`.

    Logs every objective as ``train_<name>`` / ``val_<name>`` and the weighted sum as ``train_loss`` /
    ``val_loss`` (the early-stopping monitor).
    """

    def __init__(self, module: SpatiaModule, lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.module = module
        self.lr, self.weight_decay = lr, weight_decay

    def _step(self, batch, prefix: str):
        out = self.module(batch, train=True)
        loss = self.module.total_loss(out.losses)
        bs = int(batch["core"].shape[0])
        self.log(f"{prefix}_loss", loss, on_epoch=True, on_step=False, prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in out.losses.items():
            self.log(f"{prefix}_{k}", v.detach(), on_epoch=True, on_step=False, batch_size=bs, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class HistoryCallback(pl.Callback):
    """Collects epoch-level logged metrics into ``history`` (list of dicts), kept by the model."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # validation of this epoch has run by now: callback_metrics hold both train_* and val_*
        self._record(trainer)

    def _record(self, trainer) -> None:
        row = {"epoch": int(trainer.current_epoch)}
        for k, v in trainer.callback_metrics.items():
            row[k] = float(v)
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1].update(row)
        else:
            self.history.append(row)
