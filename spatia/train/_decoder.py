"""Lightning training plan of the diffusion decoder (the SPATIA encoder stays frozen)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from ..module import SpatiaModule
from ..module._diffusion import DiffusionDecoder


class DecoderBatches(Dataset):
    """Map-style dataset whose items are whole batches ``{"images": (B, C, S, S) uint8, "counts": (B, G)}``."""

    def __init__(self, counts, crops, batches: list[np.ndarray]) -> None:
        self.counts, self.crops, self.batches = counts, crops, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = np.sort(self.batches[i])
        return {
            "images": torch.from_numpy(np.asarray(self.crops.get(rows))),
            "counts": torch.from_numpy(np.asarray(self.counts[rows].toarray(), dtype=np.float32)),
        }


class DecoderTrainingPlan(pl.LightningModule):
    """Optimises a :class:`~spatia.module.DiffusionDecoder` on crops conditioned by the frozen encoder.

    Each step: 1. expression tokens from the frozen encoder (no gradient); 2. crops scaled to [-1, 1]
    with a random flip / 90° rotation (cell morphology has no orientation); 3. the denoising loss, logged
    as ``train_loss``; 4. after the optimiser step, the exponential moving average of the weights
    (``decoder.config.train.ema_decay``), copied into the decoder at the end of training (:meth:`on_train_end`).
    The learning rate warms up linearly over ``decoder.config.train.warmup_steps`` steps.
    """

    def __init__(self, decoder: DiffusionDecoder, encoder: SpatiaModule, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.lr, self.weight_decay = lr, weight_decay
        self._ema: list[torch.Tensor] | None = None
        self._ema_steps = 0

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = float(self.decoder.config.train.ema_decay)
        if decay <= 0:
            return
        params = [p.detach() for p in self.decoder.parameters()]
        if self._ema is None:
            self._ema = [p.clone().float() for p in params]
        d = min(decay, (1 + self._ema_steps) / (10 + self._ema_steps))
        torch._foreach_lerp_(self._ema, [p.float() for p in params], 1.0 - d)
        self._ema_steps += 1

    @torch.no_grad()
    def on_train_end(self) -> None:
        if self._ema is not None:
            for p, e in zip(self.decoder.parameters(), self._ema, strict=True):
                p.copy_(e.to(p.dtype))

    def training_step(self, batch, batch_idx):
        self.encoder.eval()
        with torch.no_grad():
            tokens, pad = self.encoder.encode_expression(batch["counts"])
        x0 = batch["images"].float().div(127.5).sub(1.0)
        k = int(torch.randint(4, (1,)).item())
        x0 = torch.rot90(x0, k, dims=(2, 3))
        if torch.rand(()) < 0.5:
            x0 = x0.flip(3)
        loss = self.decoder.loss(x0, tokens.detach(), pad, batch["counts"])
        self.log("train_loss", loss, on_epoch=True, on_step=False, prog_bar=True, batch_size=x0.shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.decoder.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warm = int(self.decoder.config.train.warmup_steps)
        if warm <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
