"""The diffusion decoder of a :class:`~spatia.SpatiaModel`: train it on cell crops, generate crops with it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _utils
from ..data import CellArrays
from ..module import DecoderConfig


class DecoderMixin:
    """:meth:`fit_decoder` and :meth:`sample_images` of :class:`~spatia.SpatiaModel`."""

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
    ):
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
        max_epochs = _utils.check_count("max_epochs", dc.train.max_epochs if max_epochs is None else max_epochs, 1)
        batch_size = _utils.check_count("batch_size", dc.train.batch_size if batch_size is None else batch_size, 1)
        seed = _utils.seed_from(random_state)
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = DiffusionDecoder(dc, len(arrays.crops.channels), self.config.width, len(self.genes))
        order = rng.permutation(arrays.n)
        batches = [order[i:i + batch_size] for i in range(0, arrays.n, batch_size)]
        from .._settings import settings

        plan = DecoderTrainingPlan(decoder, self.module, lr=lr or dc.train.lr, weight_decay=dc.train.weight_decay)
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
        dev = torch.device(_utils.resolve_device(device))
        gen = torch.Generator().manual_seed(_utils.seed_from(random_state))
        encoder = self.module.to(dev).eval()
        decoder = decoder.to(dev).eval()
        out = []
        n_batches = -(-len(x) // batch_size)
        try:
            with _utils.progress(total=n_batches * num_inference_steps, desc="generating", unit="step") as bar:
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
