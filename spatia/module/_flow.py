"""The state-transition flow: a conditioned velocity UNet moving a source cell's crop to a target-state crop.

Straight-path flow matching (x_t = (1 − t)·x0 + t·x1, target velocity x1 − x0) from a source crop x0 to
the crop x1 of its optimal-transport match, conditioned by an MLP over [source cell's SPATIA embedding ;
transition embedding ; proj(Δg) ; proj(Δm)]. Loss = confidence-weighted FM MSE + contrastive hinge
against shuffled conditions + sliced-Wasserstein distance between morphology-proxy features of the
flow's predicted targets and the real targets (DESIGN.md, "State transitions"; the prediction is a short
Euler rollout of the flow from the source crop, after a warm-up: see :class:`FlowConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn._image_ops import (
    gaussian_blur,
    morphology_proxies,
    random_dihedral,
    sliced_wasserstein,
)
from ..nn._ode import integrate
from ._config import ConfigBase, check_fields


@dataclass(frozen=True)
class FlowLossConfig:
    """The flow's training losses (section ``loss`` of :class:`~spatia.module.FlowConfig`).

    Flow matching (``fm_weight``), weighted by each pair's OT confidence; a contrastive hinge
    (``contrastive_weight``, ``margin``): the true condition must explain the velocity better than a shuffled
    one; a sliced-Wasserstein loss (``sw_weight``, ``n_projections`` directions; 0 = off) between morphology
    proxies of where the flow sends the source crops and of the real targets, within each transition. The
    proxies are 9 of the 10 measured region features, on the same Otsu region as the measurement
    (``spatia.nn.morphology_proxies``); the points compared are [source ; endpoint] against [source ; matched
    target] proxies (the pairs' joint law), so the loss cannot be lowered by giving one cell type's targets to
    another's sources.

    - ``sw_steps``: the endpoint the loss compares is the velocity integrated from the source crop in this many
      Euler steps, with gradients (the model's own sample). More steps follow the sampler more closely; each
      costs one more UNet pass, forward and backward.
    - ``sw_warmup``: fraction of the epochs without the morphology loss, while the velocity field is untrained.
    - ``sw_blur``: Gaussian blur (pixels) of every crop before its proxies are computed, so that the loss does
      not chase the pixel-scale texture the flow cannot render; 0 = none.
    """

    fm_weight: float = 1.0
    contrastive_weight: float = 0.1
    margin: float = 0.1
    sw_weight: float = 0.1
    sw_steps: int = 2
    sw_warmup: float = 0.5
    sw_blur: float = 1.0
    n_projections: int = 64

    def __post_init__(self) -> None:
        check_fields(self, {"fm_weight": (0, 1e6), "contrastive_weight": (0, 1e6), "sw_weight": (0, 1e6),
                            "sw_steps": (1, 1000), "sw_blur": (0, 1e3), "n_projections": (1, 100_000)})
        if not 0 <= self.sw_warmup < 1:
            raise ValueError(f"FlowLossConfig.sw_warmup must be in [0, 1), got {self.sw_warmup}.")


@dataclass(frozen=True)
class FlowTrainConfig:
    """How the flow trains (section ``train`` of :class:`~spatia.module.FlowConfig`).

    ``cond_dropout``: fraction of conditions replaced by a learned null condition (needed for classifier-free
    guidance). ``augment``: independent random right-angle rotations / flips of source and target crops (the
    pairing is between cells, not orientations; it multiplies the few pairs a slide has). ``batch_ot``:
    re-pair each batch's targets among its sources by an exact assignment on pixel distance plus
    ``batch_ot_emb_weight`` × source-embedding distance (minibatch OT: the same targets, shorter paths).
    ``lr``, ``lr_schedule`` (``"cosine"``: decay to 0 over the run, or ``"constant"``), ``grad_clip``,
    ``weight_decay``, ``batch_size``. ``max_epochs``: passes over the training pairs; ``None`` (default):
    enough epochs for ``min_steps`` optimiser steps, and at least 10. The pairs a flow trains on (those passing
    ``fit_transition``'s ``gate``) are often a few hundred, so a fixed number of epochs can be too few steps:
    raise ``min_steps`` when the flow under-fits, or fix ``max_epochs``.
    """

    cond_dropout: float = 0.1
    augment: bool = True
    batch_ot: bool = True
    batch_ot_emb_weight: float = 1.0
    lr: float = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    weight_decay: float = 1e-4
    max_epochs: int | None = None
    min_steps: int = 500
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_fields(self, {"cond_dropout": (0, 0.999), "batch_ot_emb_weight": (0, 1e6), "lr": (1e-12, 10),
                            "grad_clip": (0, 1e6), "weight_decay": (0, 10), "max_epochs": (1, _BIG),
                            "min_steps": (1, _BIG), "batch_size": (2, _BIG)})


@dataclass(frozen=True)
class FlowSampleConfig:
    """The defaults of :func:`spatia.tl.transition` (section ``sample`` of :class:`~spatia.module.FlowConfig`):
    ``steps``, ``solver`` (``"euler"``, ``"midpoint"``, ``"rk45"``) and ``guidance_scale``."""

    steps: int = 100
    solver: Literal["euler", "midpoint", "rk45"] = "midpoint"
    guidance_scale: float = 0.2

    def __post_init__(self) -> None:
        check_fields(self, {"steps": (1, 100_000), "guidance_scale": (0, 100)})


@dataclass(frozen=True)
class FlowConfig(ConfigBase):
    """Flow model configuration (saved next to the weights as ``flow.json``): the architecture, and the
    sections ``loss`` (:class:`~spatia.module.FlowLossConfig`), ``train``
    (:class:`~spatia.module.FlowTrainConfig`) and ``sample`` (:class:`~spatia.module.FlowSampleConfig`).

    ``block_out_channels``, ``layers_per_block`` and ``norm_num_groups`` shape the diffusers ``UNet2DModel``.
    The condition (width ``cond_dim``, added to the UNet's time embedding) is built by an MLP of width
    ``hidden`` from the cell's SPATIA embedding, a learned transition embedding (``transition_dim``) and
    projections of Δg and Δm (``delta_dim``). Wider blocks render finer crops and train slower.

    Examples
    --------
    >>> cfg = FlowConfig().replace(train={"max_epochs": 50}, sample={"steps": 50})
    """

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    cond_dim: int = 128
    transition_dim: int = 16
    delta_dim: int = 16
    hidden: int = 128
    loss: FlowLossConfig = field(default_factory=FlowLossConfig)
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    sample: FlowSampleConfig = field(default_factory=FlowSampleConfig)

    def __post_init__(self) -> None:
        check_fields(self, _LIMITS)
        if not 1 <= len(self.block_out_channels) <= 8:
            raise ValueError(f"FlowConfig.block_out_channels needs 1 to 8 levels, got {self.block_out_channels}.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups {self.norm_num_groups}.")

    @classmethod
    def tiny(cls) -> FlowConfig:
        """For tests: trains in tens of seconds on a CPU."""
        return cls(block_out_channels=(16, 32), cond_dim=64, hidden=64,
                   train=FlowTrainConfig(max_epochs=30, batch_size=32))


_BIG = 1_000_000
_LIMITS = {
    "block_out_channels": (1, 4096), "layers_per_block": (1, 16), "norm_num_groups": (1, 1024),
    "cond_dim": (1, 8192), "transition_dim": (1, 8192), "delta_dim": (1, 8192), "hidden": (1, 8192),
}


@dataclass
class FlowOutput:
    """``loss`` (weighted sum), ``losses`` (each term), ``weights`` ``(B,)`` per-pair FM weights,
    ``fm_error`` ``(B,)`` per-pair velocity MSE, ``x1_hat`` ``(B, C, S, S)`` one-step predicted targets,
    ``x1_end`` ``(B, C, S, S)`` the endpoints the morphology loss compared with the real targets (``None``
    when it was off)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    fm_error: torch.Tensor | None = None
    x1_hat: torch.Tensor | None = None
    x1_end: torch.Tensor | None = None


def batch_repair(x0: torch.Tensor, x1: torch.Tensor, emb: torch.Tensor, group: torch.Tensor,
                 emb_weight: float = 1.0) -> torch.Tensor:
    """Minibatch OT re-pairing: a permutation of the batch's targets ``x1`` among its sources ``x0``.

    Within each ``group`` (transition), source i is given target j (the match of source j) minimising
    Σ ‖x0_i − x1_j‖² / m_px + ``emb_weight`` · ‖e_i − e_j‖² / m_e (each term divided by its median over the
    group; ``e`` the sources' cell embeddings), by an exact assignment. The targets of the batch stay the same
    multiset (the target distribution is untouched), each goes to the source that looks most like it among
    sources that look like its own (embedding term), so the paths are shorter and cross less. Returns the
    permutation ``(B,)``.
    """
    from scipy.optimize import linear_sum_assignment

    b = x0.shape[0]
    perm = torch.arange(b)
    with torch.no_grad():
        d_px = torch.cdist(x0.flatten(1).float(), x1.flatten(1).float()) ** 2
        d_e = torch.cdist(emb.float(), emb.float()) ** 2
        for g in group.unique():
            idx = torch.nonzero(group == g).flatten().cpu()
            if len(idx) < 2:
                continue
            a, e = d_px[idx][:, idx].cpu(), d_e[idx][:, idx].cpu()
            cost = a / a.median().clamp(min=1e-12)
            if (e > 0).any():
                cost = cost + emb_weight * e / e[e > 0].median().clamp(min=1e-12)
            rows, cols = linear_sum_assignment(cost.double().numpy())
            perm[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return perm.to(x0.device)


def confidence_weights(confidence: torch.Tensor, mean_confidence: float | torch.Tensor) -> torch.Tensor:
    """FM weight of each pair: its OT confidence relative to the mean over all training pairs.

    A pair as confident as the average weighs 1; a pair near the uniform confidence weighs little.
    """
    return confidence / torch.clamp(torch.as_tensor(mean_confidence, dtype=confidence.dtype), min=1e-12)


class TransitionFlow(nn.Module):
    """Conditioner MLP + velocity UNet for one or more state transitions.

    Parameters
    ----------
    config
        :class:`FlowConfig`.
    channels, size
        Crop channels and side (pixels; a multiple of ``2 ** (len(block_out_channels) - 1)``).
    emb_dim
        Width of the SPATIA cell embedding.
    n_genes
        Length of ``Δg`` (the SPATIA model's gene panel).
    n_features
        Length of ``Δm`` (standardised morphology-feature shifts).
    n_transitions
        Transitions the model knows; their ``Δg`` / ``Δm`` sit in buffers ``delta_g (T, G)``,
        ``delta_m (T, F)``.
    """

    def __init__(self, config: FlowConfig, *, channels: int, size: int, emb_dim: int, n_genes: int,
                 n_features: int, n_transitions: int) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        c = config
        self.config = c
        down = 2 ** (len(c.block_out_channels) - 1)
        if size % down:
            raise ValueError(f"Crop size {size} must be a multiple of {down} for {len(c.block_out_channels)} "
                             "UNet levels.")
        self.channels, self.size = channels, size
        self.register_buffer("delta_g", torch.zeros(n_transitions, n_genes))
        self.register_buffer("delta_m", torch.zeros(n_transitions, n_features))
        self.register_buffer("mean_confidence", torch.ones(()))
        self.transition = nn.Embedding(n_transitions, c.transition_dim)
        self.proj_g = nn.Linear(n_genes, c.delta_dim)
        self.proj_m = nn.Linear(n_features, c.delta_dim)
        self.emb_norm = nn.LayerNorm(emb_dim)
        self.conditioner = nn.Sequential(
            nn.Linear(emb_dim + c.transition_dim + 2 * c.delta_dim, c.hidden), nn.SiLU(),
            nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.cond_dim),
        )
        self.null_cond = nn.Parameter(torch.zeros(c.cond_dim))
        n = len(c.block_out_channels)
        self.unet = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            norm_num_groups=c.norm_num_groups, add_attention=False, class_embed_type="identity",
            time_embedding_dim=c.cond_dim,
        )

    # ---------------------------------------------------------------------------------------------
    def condition(self, cell_emb: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
        """``cell_emb (B, E)``, ``transition (B,)`` long → condition ``(B, cond_dim)``."""
        parts = [
            self.emb_norm(cell_emb), self.transition(transition),
            self.proj_g(self.delta_g[transition]), self.proj_m(self.delta_m[transition]),
        ]
        return self.conditioner(torch.cat(parts, -1))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, C, S, S)`` in [-1, 1], ``t (B,)`` in [0, 1], ``cond (B, cond_dim)`` → ``(B, C, S, S)``."""
        return self.unet(x, t * 1000.0, class_labels=cond).sample

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None, *,
                sw_scale: float = 1.0) -> FlowOutput:
        """Training losses of a batch of pairs.

        ``batch``: ``x0`` / ``x1`` ``(B, C, S, S)`` source and matched target crops in [0, 1],
        ``cell_emb (B, E)``, ``transition (B,)``, ``confidence (B,)``; optionally ``t (B,)`` (default
        uniform on [0, 1]). ``sw_scale`` multiplies the morphology loss (0: not computed); the training plan
        computes it (the warm-up schedule).
        """
        c = self.config
        x0, x1r = batch["x0"], batch["x1"]
        if c.train.augment and self.training:
            x0, x1r = random_dihedral(x0, generator), random_dihedral(x1r, generator)
        if c.train.batch_ot and self.training:  # after the orientations are drawn: it sees the crops as trained on
            x1r = x1r[batch_repair(x0, x1r, batch["cell_emb"], batch["transition"], c.train.batch_ot_emb_weight)]
        batch_x0r = x0
        x0, x1 = x0 * 2 - 1, x1r * 2 - 1
        b = x0.shape[0]
        dev = x0.device
        # 1. condition, with dropout to the null condition (for classifier-free guidance)
        cond_full = self.condition(batch["cell_emb"], batch["transition"])
        dropped = torch.rand(b, device=dev, generator=generator) < c.train.cond_dropout
        cond = torch.where(dropped[:, None], self.null_cond.expand(b, -1), cond_full)
        # 2. straight path and velocity
        t = batch["t"] if "t" in batch else torch.rand(b, device=dev, generator=generator)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * x1
        target = x1 - x0
        v = self.velocity(xt, t, cond)
        err = ((v - target) ** 2).flatten(1).mean(1)
        # 3. confidence-weighted flow matching
        w = confidence_weights(batch["confidence"], self.mean_confidence)
        losses = {"fm": (w * err).mean()}
        total = c.loss.fm_weight * losses["fm"]
        # 4. contrastive hinge: the true condition must explain the velocity better than a shuffled one
        if c.loss.contrastive_weight > 0 and b > 1:
            perm = torch.roll(torch.arange(b, device=dev), 1)
            keep = ~(dropped | dropped[perm])
            if keep.any():
                v_shuf = self.velocity(xt[keep], t[keep], cond[perm][keep])
                err_shuf = ((v_shuf - target[keep]) ** 2).flatten(1).mean(1)
                losses["contrastive"] = F.relu(c.loss.margin + err[keep] - err_shuf).mean()
                total = total + c.loss.contrastive_weight * losses["contrastive"]
        x1_hat = xt + (1 - tt) * v  # one-step extrapolation, returned for inspection
        # 5. sliced Wasserstein between morphology proxies of the flow's rollout and the real targets
        x1_end = None
        if c.loss.sw_weight > 0 and sw_scale > 0:
            x1_end = self._rollout(x0, cond_full, c.loss.sw_steps)
            sw = self._sw_per_transition(x1_end, x1r, batch["transition"], generator, x0r=batch_x0r)
            if sw is not None:
                losses["sw"] = sw
                total = total + sw_scale * c.loss.sw_weight * sw
            x1_end = x1_end.detach()
        return FlowOutput(loss=total, losses=losses, weights=w.detach(), fm_error=err.detach(),
                          x1_hat=x1_hat.detach(), x1_end=x1_end)

    def _rollout(self, x0: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
        """Euler integration of the conditional velocity from ``x0`` (in [-1, 1]) to t = 1, with gradients."""
        x, h = x0, 1.0 / steps
        for k in range(steps):
            x = x + h * self.velocity(x, torch.full((x.shape[0],), k * h, device=x.device, dtype=x.dtype), cond)
        return x

    def _sw_per_transition(self, x_end: torch.Tensor, x1r: torch.Tensor, transition: torch.Tensor,
                           generator, x0r: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sliced Wasserstein between the proxies of ``x_end`` (in [-1, 1]) and of the real targets ``x1r``,
        within each transition of the batch (a transition's targets are not another's), weighted by size;
        ``None`` when no transition has two points.

        With ``x0r`` (the source crops in [0, 1], as in training) the points are [source proxies ; endpoint
        proxies] against [source proxies ; matched target proxies]: the joint law of the pairs, not only the
        targets' marginal, so the loss cannot be lowered by giving one cell type's targets to another's sources.
        """
        blur = self.config.loss.sw_blur
        fa = morphology_proxies(gaussian_blur(((x_end + 1) / 2).clamp(0, 1), blur))
        fb = morphology_proxies(gaussian_blur(x1r, blur))
        if x0r is not None:
            f0 = morphology_proxies(gaussian_blur(x0r, blur)).detach()
            fa, fb = torch.cat([f0, fa], 1), torch.cat([f0, fb], 1)
        parts, sizes = [], []
        for tr in transition.unique():
            sel = transition == tr
            if int(sel.sum()) > 1:
                parts.append(sliced_wasserstein(fa[sel], fb[sel], self.config.loss.n_projections, generator=generator))
                sizes.append(float(sel.sum()))
        if not parts:
            return None
        wts = torch.tensor(sizes, device=x_end.device, dtype=x_end.dtype)
        return (torch.stack(parts) * wts).sum() / wts.sum()

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x0: torch.Tensor, cell_emb: torch.Tensor, transition: torch.Tensor, *,
               guidance_scale: float | None = None, steps: int | None = None, solver: str | None = None,
               ) -> tuple[torch.Tensor, int]:
        """Transport source crops ``x0 (B, C, S, S)`` in [0, 1] to predicted target crops in [0, 1].

        Integrates the guided velocity ``v_c + w·(v_c − v_null)`` (``w = guidance_scale``; 0 = no guidance)
        from t = 0 to 1 with :func:`spatia.nn.integrate`. Returns the crops and the velocity evaluations.
        """
        c = self.config
        w = c.sample.guidance_scale if guidance_scale is None else float(guidance_scale)
        cond = self.condition(cell_emb, transition)
        null = self.null_cond.expand_as(cond)

        def vel(x, t):
            if w == 0:
                return self.velocity(x, t, cond)
            v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
            vc, vu = v.chunk(2)
            return vc + w * (vc - vu)

        x1, nfe = integrate(vel, x0 * 2 - 1, steps=steps or c.sample.steps, solver=solver or c.sample.solver)
        return ((x1 + 1) / 2).clamp(0, 1), nfe


def build_flow(info: dict[str, Any]) -> TransitionFlow:
    """An untrained :class:`TransitionFlow` shaped as described by ``info`` (``flow.json``)."""
    return TransitionFlow(
        FlowConfig.from_dict(info["config"], complete=True), channels=int(info["channels"]), size=int(info["size"]),
        emb_dim=int(info["emb_dim"]), n_genes=int(info["n_genes"]), n_features=int(info["n_features"]),
        n_transitions=len(info["transitions"]),
    )
