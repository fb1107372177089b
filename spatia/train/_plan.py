"""Lightning training plan for the SPATIA encoder."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch

from .._utils import release_memory
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

    def state_dict(self) -> dict:
        # saved in Lightning checkpoints: a resumed run keeps the epochs before the interruption
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    def _record(self, trainer) -> None:
        row = {"epoch": int(trainer.current_epoch)}
        for k, v in trainer.callback_metrics.items():
            row[k] = float(v)
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1].update(row)
        else:
            self.history.append(row)


class ReleaseMemoryCallback(pl.Callback):
    """Hands freed heap pages back to the system every ``every`` batches and after each epoch
    (:func:`spatia._utils.release_memory`), so that a long training keeps the memory of a few batches."""

    def __init__(self, every: int = 32) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0:
            release_memory()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (batch_idx + 1) % self.every == 0:
            release_memory()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        release_memory()


class RandomStateCallback(pl.Callback):
    """Saves the random states in Lightning checkpoints and restores them on resume, so that a resumed
    run continues exactly as an uninterrupted one: torch (CPU and CUDA), numpy, python and the training
    loader's shuffling ``generator``.

    The states are taken when the checkpoint is written (at the end of an epoch, after validation) and put
    back when Lightning restores the checkpoint, before the next epoch's order is drawn. Stored as tensors
    and lists only (checkpoints load with ``weights_only=True``).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state user code seeds)
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": _to_lists(random.getstate()),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.generator is not None:
            state["loader"] = self.generator.get_state()
        return state

    def load_state_dict(self, s: dict) -> None:
        # Lightning restores callbacks before the fit loop draws the first resumed epoch's order from the
        # loader's generator: the states go back now, as they were when the checkpoint was written
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
        random.setstate(_to_tuples(s["python"]))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        if "loader" in s and self.generator is not None:
            self.generator.set_state(s["loader"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
