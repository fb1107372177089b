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
    as ``train_loss``.
    """

    def __init__(self, decoder: DiffusionDecoder, encoder: SpatiaModule, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        self.encoder.eval()
        with torch.no_grad():
            tokens, pad = self.encoder.encode_expression(batch["counts"])
        x0 = batch["images"].float().div(127.5).sub(1.0)
        k = int(torch.randint(4, (1,)).item())
        x0 = torch.rot90(x0, k, dims=(2, 3))
        if torch.rand(()) < 0.5:
            x0 = x0.flip(3)
        loss = self.decoder.loss(x0, tokens.detach(), pad)
        self.log("train_loss", loss, on_epoch=True, on_step=False, prog_bar=True, batch_size=x0.shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.decoder.parameters(), lr=self.lr, weight_decay=self.weight_decay)
