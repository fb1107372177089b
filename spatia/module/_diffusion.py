"""Gene-conditioned diffusion decoder: cell crops from expression tokens (the paper's generation, v1).

A diffusers ``UNet2DConditionModel`` denoises crops in pixel space. The condition is the frozen SPATIA
expression branch's tokens (CLS, depth and gene tokens, before fusion with the image, so generation never
sees the target image), projected to ``cross_attention_dim``: the UNet cross-attends to all tokens and
adds a global embedding to its time embedding: the projected CLS token plus (``expression_embedding``) an
MLP of the cell's log-normalised expression of all genes and its library size. A learned null condition,
swapped in for a fraction ``cond_dropout`` of the training cells, gives classifier-free guidance at
sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..nn._tome import token_merging as _token_merging
from ._config import ConfigBase, check_fields


@dataclass(frozen=True)
class DecoderTrainConfig:
    """How the diffusion decoder trains (section ``train`` of :class:`~spatia.module.DecoderConfig`).

    Attributes
    ----------
    cond_dropout
        Fraction of training cells whose condition is replaced by the null condition (classifier-free
        guidance; 1.0 trains an unconditional model).
    lr, weight_decay, max_epochs, batch_size
        The optimiser and the length of the run (``fit_decoder``'s arguments override them).
    warmup_steps
        Linear learning-rate warmup over this many optimiser steps (0 = none).
    ema_decay
        Decay of the exponential moving average of the weights kept during training (0 = off); the averaged
        weights are the ones sampled from and saved. The decay is ramped up as ``(1 + n) / (10 + n)`` after
        ``n`` steps, so short trainings average over their last steps only.
    """

    cond_dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 40
    batch_size: int = 32
    warmup_steps: int = 100
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        check_fields(self, {"cond_dropout": (0, 1), "lr": (1e-12, 10), "weight_decay": (0, 10),
                            "max_epochs": (1, _BIG), "batch_size": (1, _BIG), "warmup_steps": (0, _BIG)})
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"DecoderTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}.")


@dataclass(frozen=True)
class DecoderConfig(ConfigBase):
    """Diffusion decoder configuration (saved with the model).

    Attributes
    ----------
    size
        Side of the generated crops in pixels (``None``: the encoder's crop size).
    block_out_channels
        UNet channels per resolution level (each level after the first halves the resolution).
    attention_levels
        Which levels have (self + cross) attention transformer blocks; the rest are plain ResNet levels.
        None at full resolution by default: attention over its ``S²`` tokens is the costliest part of a step,
        and the lower levels and the UNet's middle block (always with attention) see the whole crop.
    layers_per_block
        ResNet layers per level.
    attention_heads
        Heads of each attention layer.
    cross_attention_dim
        Width of the condition tokens the UNet attends to.
    norm_num_groups
        Group-norm groups (must divide every entry of ``block_out_channels``).
    num_train_timesteps, beta_schedule, prediction_type
        The DDPM noise schedule (diffusers ``DDPMScheduler``) and the training target. Keep
        ``"v_prediction"`` (default) for short trainings and few-step sampling: with the cosine schedule its
        crops stay clean, where a noise-predicting (``"epsilon"``) decoder gives speckled, over-bright crops
        until it has trained much longer (``benchmarks/results/generate_quality.md``).
    expression_embedding
        Add an MLP of the log-normalised expression of all genes (and the log library size) to the global
        (class) embedding, besides the projected CLS token. The frozen encoder's tokens before fusion are
        a weak summary of a cell's expression; this direct path lets a briefly trained decoder follow its
        condition. Turn it off to condition on the encoder's tokens alone.
    train
        How it trains: :class:`~spatia.module.DecoderTrainConfig`.

    Examples
    --------
    >>> cfg = DecoderConfig(block_out_channels=(16, 32, 32)).replace(train={"batch_size": 8, "lr": 2e-3})
    """

    size: int | None = None
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 4
    cross_attention_dim: int = 64
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    expression_embedding: bool = True
    train: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)

    def __post_init__(self) -> None:
        check_fields(self, _LIMITS)
        if not 1 <= len(self.block_out_channels) <= 8:
            raise ValueError(f"DecoderConfig.block_out_channels needs 1 to 8 levels, got {self.block_out_channels}.")
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per entry of block_out_channels.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry.")
        if self.size is not None and self.size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"size {self.size} must be divisible by 2^(levels - 1).")


_BIG = 1_000_000
_LIMITS = {
    "size": (4, 1024), "block_out_channels": (1, 4096), "layers_per_block": (1, 16), "attention_heads": (1, 64),
    "cross_attention_dim": (1, 8192), "norm_num_groups": (1, 1024), "num_train_timesteps": (1, _BIG),
}


def log_expression(counts: torch.Tensor) -> torch.Tensor:
    """Input of the expression embedding: ``log1p`` of counts per 10⁴ for each gene, and the log library size.

    ``counts (B, G)`` raw counts → ``(B, G + 1)``.
    """
    lib = counts.sum(1, keepdim=True)
    return torch.cat([torch.log1p(counts / lib.clamp(min=1) * 1e4), torch.log1p(lib)], dim=1)


def _scheduler(name: str, train_config: dict):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {sorted(classes)}, got {name!r}.")
    return classes[name].from_config(train_config)


class DiffusionDecoder(nn.Module):
    """UNet denoiser over ``(B, C, S, S)`` crops in [-1, 1], conditioned on expression tokens.

    Parameters
    ----------
    config
        The :class:`DecoderConfig` (``config.size`` must be set).
    channels
        Image channels ``C``.
    cond_dim
        Width ``D`` of the expression tokens.
    n_genes
        Genes ``G`` of the counts given to :meth:`condition` (needed with ``config.expression_embedding``).
    """

    def __init__(self, config: DecoderConfig, channels: int, cond_dim: int, n_genes: int | None = None) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DConditionModel

        if config.size is None:
            raise ValueError("DecoderConfig.size must be set to build a decoder.")
        self.config, self.channels, self.cond_dim, self.n_genes = config, channels, cond_dim, n_genes
        x = config.cross_attention_dim
        self.cond_proj = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, x))
        self.expr_embed = None
        if config.expression_embedding:
            if not n_genes:
                raise ValueError("expression_embedding needs n_genes.")
            self.expr_embed = nn.Sequential(nn.LayerNorm(n_genes + 1), nn.Linear(n_genes + 1, 2 * x), nn.SiLU(),
                                            nn.Linear(2 * x, x))
        self.null_tokens = nn.Parameter(torch.randn(1, 1, x) * 0.02)
        self.null_cls = nn.Parameter(torch.zeros(1, x))
        att = config.attention_levels
        self.unet = UNet2DConditionModel(
            sample_size=config.size, in_channels=channels, out_channels=channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in att),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            cross_attention_dim=x, attention_head_dim=config.attention_heads, norm_num_groups=config.norm_num_groups,
            class_embed_type="projection", projection_class_embeddings_input_dim=x,
        )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type, clip_sample=True,
        )

    # ---------------------------------------------------------------------------------------------
    def condition(self, tokens: torch.Tensor, pad: torch.Tensor, drop: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None):
        """Expression tokens ``(B, L, D)`` + padding ``(B, L)`` (True = pad) → UNet inputs.

        ``counts (B, G)``: the raw counts, for the expression embedding (required when the decoder has
        one). Rows with ``drop`` True get the null condition. Returns ``(enc (B, L, X), mask (B, L) 1 = keep,
        cls (B, X))``.
        """
        enc = self.cond_proj(tokens)
        cls = enc[:, 0]
        if self.expr_embed is not None:
            if counts is None:
                raise ValueError("This decoder embeds the expression of all genes: pass counts.")
            cls = cls + self.expr_embed(log_expression(counts.to(enc.dtype)))
        mask = (~pad).to(enc.dtype)
        if drop is not None and drop.any():
            d = drop[:, None, None]
            enc = torch.where(d, self.null_tokens.to(enc.dtype).expand_as(enc), enc)
            cls = torch.where(drop[:, None], self.null_cls.to(enc.dtype).expand_as(cls), cls)
            null_mask = torch.zeros_like(mask)
            null_mask[:, 0] = 1
            mask = torch.where(drop[:, None], null_mask, mask)
        return enc, mask, cls

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor,
                cls: torch.Tensor) -> torch.Tensor:
        """Model output (noise or velocity) ``(B, C, S, S)`` for noisy crops ``x_t`` at timesteps ``t (B,)``."""
        return self.unet(x_t, t, encoder_hidden_states=enc, encoder_attention_mask=mask, class_labels=cls).sample

    def loss(self, x0: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor,
             counts: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss of clean crops ``x0 (B, C, S, S)`` in [-1, 1] (``counts``: see :meth:`condition`).

        Steps: 1. condition dropout; 2. random timestep and noise; 3. MSE to the noise (or velocity).
        """
        b = x0.shape[0]
        drop = torch.rand(b, device=x0.device) < self.config.train.cond_dropout
        enc, mask, cls = self.condition(tokens, pad, drop, counts)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = noise if self.config.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        pred = self(x_t, t, enc, mask, cls)
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(
        self,
        tokens: torch.Tensor,
        pad: torch.Tensor,
        *,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 20,
        scheduler: str = "ddim",
        token_merging: float | None = None,
        generator: torch.Generator | None = None,
        unconditional: bool = False,
        counts: torch.Tensor | None = None,
        callback: Callable[[], Any] | None = None,
    ) -> torch.Tensor:
        """Crops ``(B, C, S, S)`` in [-1, 1] for expression tokens ``(B, L, D)`` (``counts``: see :meth:`condition`).

        ``guidance_scale`` ``w``: output = uncond + w · (cond - uncond) (1 = conditional only, 0 =
        unconditional only). ``unconditional=True`` samples from the null condition. ``token_merging``:
        ratio of tokens merged before each self-attention (``None`` = off). ``callback`` is called after each
        denoising step (a progress bar's ``update``).
        """
        b, s, dev = tokens.shape[0], self.config.size, tokens.device
        sched = _scheduler(scheduler, self.noise_scheduler.config)
        sched.set_timesteps(num_inference_steps, device=dev)
        x = torch.randn((b, self.channels, s, s), generator=generator, device="cpu").to(dev, tokens.dtype)
        x = x * sched.init_noise_sigma
        null = torch.ones(b, dtype=torch.bool, device=dev)
        if unconditional:
            guidance_scale = 0.0
        parts = []
        if guidance_scale != 0.0:
            parts.append(self.condition(tokens, pad, None, counts))
        if guidance_scale != 1.0:
            parts.append(self.condition(tokens, pad, null, counts))
        enc = torch.cat([p[0] for p in parts])
        mask = torch.cat([p[1] for p in parts])
        cls = torch.cat([p[2] for p in parts])
        with _token_merging(self.unet, token_merging):
            for t in sched.timesteps:
                xin = sched.scale_model_input(torch.cat([x] * len(parts)), t)
                out = self(xin, t.expand(xin.shape[0]).to(dev), enc, mask, cls)
                if len(parts) == 2:
                    c, u = out.chunk(2)
                    out = u + guidance_scale * (c - u)
                x = sched.step(out, t, x, generator=generator if dev.type == "cpu" else None).prev_sample
                if callback is not None:
                    callback()
        return x.clamp(-1, 1)
