"""Lightning training plan for the state-transition flow."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from ..module import TransitionFlow


class FlowTrainingPlan(pl.LightningModule):
    """Optimises :class:`~spatia.module.TransitionFlow`; logs ``train_loss`` and each term
    (``train_fm``, ``train_contrastive``, ``train_sw``) per epoch.

    The morphology (sliced-Wasserstein) loss is off for the first ``config.loss.sw_warmup`` fraction of the
    epochs: before the velocity field has learned the transport its endpoints are noise, and matching their
    morphology would fight the flow-matching loss.
    """

    def __init__(self, flow: TransitionFlow, lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.flow = flow
        self.lr, self.weight_decay = lr, weight_decay
        self.sw_scale = 1.0  # multiplier of the morphology loss: 0 during the warm-up

    def on_train_epoch_start(self) -> None:
        warm = self.flow.config.loss.sw_warmup * (self.trainer.max_epochs or 0)
        self.sw_scale = 0.0 if self.current_epoch < warm else 1.0

    def training_step(self, batch, batch_idx):
        out = self.flow(batch, sw_scale=self.sw_scale)
        bs = int(batch["x0"].shape[0])
        self.log("train_loss", out.loss, on_epoch=True, on_step=False, prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in out.losses.items():
            self.log(f"train_{k}", v.detach(), on_epoch=True, on_step=False, batch_size=bs, sync_dist=True)
        return out.loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.flow.config.train.lr_schedule != "cosine":
            return opt
        # cosine decay to 0 over the whole run: the last weights are an average-like, low-noise iterate
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
