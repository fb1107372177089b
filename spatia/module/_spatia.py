"""The SPATIA encoder: cell (image ⟷ expression) → niche → tissue, context fused back into each cell."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import (
    BidirectionalFusion,
    CrossAttentionBlock,
    ExpressionEncoder,
    PixelDecoder,
    Transformer,
    ViTEncoder,
    patchify,
    sample_expressed,
    sincos_2d,
)
from ._config import SpatiaConfig


@dataclass
class SpatiaOutput:
    """What :meth:`SpatiaModule.encode` returns (``M`` = centre cells of the batch).

    Attributes
    ----------
    cell, niche, tissue
        ``(M, E)`` embeddings.
    mu
        ``(M, G)`` expected counts (negative binomial mean) at each cell's library size.
    theta
        ``(G,)`` inverse dispersion.
    zi_logits
        ``(M, G)`` zero-inflation logits (ZINB) or ``None``.
    label_logits
        ``(M, n_labels)`` or ``None``.
    losses
        Named scalar losses of the batch (filled by :meth:`SpatiaModule.forward` in training).
    rho
        ``(M, G)`` expected expression proportions (``mu`` divided by the library size; defined also for
        cells whose expression was hidden).
    internals
        What :meth:`SpatiaModule.loss` needs besides the outputs: the per-cell tensors of
        :meth:`SpatiaModule.encode_cells` (``"cells"``) and the niche members ``(M, K + 1)`` (``"members"``).
    """

    cell: torch.Tensor
    niche: torch.Tensor
    tissue: torch.Tensor
    mu: torch.Tensor
    theta: torch.Tensor
    zi_logits: torch.Tensor | None
    label_logits: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    rho: torch.Tensor | None = None
    internals: dict[str, Any] = field(default_factory=dict, repr=False)


class SpatiaModule(nn.Module):
    """Multi-scale SPATIA model.

    Parameters
    ----------
    config
        The :class:`SpatiaConfig`.
    n_genes
        Panel size ``G``.
    n_channels
        Image channels ``C``.
    n_labels
        Number of classes of the optional supervised head (0 = none).
    """

    def __init__(self, config: SpatiaConfig, n_genes: int, n_channels: int, n_labels: int = 0) -> None:
        super().__init__()
        c, d = config, config.width
        self.config, self.n_genes, self.n_channels, self.n_labels = c, n_genes, n_channels, n_labels
        if c.image.enabled:
            self.vit = ViTEncoder(n_channels, c.image.size, c.image.patch, d, c.image.depth, c.image.heads)
            self.pixel_decoder = PixelDecoder(
                d, self.vit.n, c.image.patch, n_channels, c.image.decoder_width, c.image.decoder_depth,
                max(1, c.image.decoder_width // 16),
            )
        if c.expression.enabled:
            self.expr = ExpressionEncoder(n_genes, d, c.expression.depth, c.expression.heads)
            self.masked_head = nn.Linear(d, 1)
        self.fusion = BidirectionalFusion(d, c.fusion.depth, c.fusion.heads)
        n_parts = int(c.image.enabled) + int(c.expression.enabled)
        self.cell_proj = nn.Sequential(nn.LayerNorm(n_parts * d), nn.Linear(n_parts * d, c.embed_dim))
        self.cell_in = nn.Linear(c.embed_dim, d)
        if c.niche.enabled:
            self.niche_tf = Transformer(d, c.niche.depth, c.niche.heads)
            self.niche_proj = nn.Linear(d, c.embed_dim)
            self.niche_counts = nn.Sequential(nn.Linear(c.embed_dim, d), nn.GELU(), nn.Linear(d, n_genes))
        if c.tissue.enabled:
            self.tissue_tf = Transformer(d, c.tissue.depth, c.tissue.heads)
            self.tissue_proj = nn.Linear(d, c.embed_dim)
        if c.niche.enabled or c.tissue.enabled:
            self.context = CrossAttentionBlock(d, c.niche.heads)
        self.counts_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, n_genes))
        # the cell embedding alone must also explain the cell's counts (an scVI-like bottleneck), so that
        # it is a good summary of the cell and not only an input to the context-fused decoder
        self.cell_counts_head = nn.Sequential(nn.Linear(c.embed_dim, d), nn.GELU(), nn.Linear(d, n_genes))
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        self.zi_head = nn.Linear(d, n_genes) if c.loss.likelihood == "zinb" else None
        self.label_head = nn.Linear(c.embed_dim, n_labels) if n_labels > 0 else None
        # expression values are log1p(counts / library · target): ``target`` is the median library size of
        # the training cells (set once, before training; saved with the weights). A fixed 1e4 on shallow
        # panels (tens of counts per cell) turns one count into log1p(~400) ≈ 6 against 0 for none: the
        # input is then almost binary and the embedding loses to PCA of median-normalised expression.
        self.register_buffer("library_target", torch.tensor(1e4))

    # ---------------------------------------------------------------------------------------------
    def set_library_target(self, libraries: np.ndarray | torch.Tensor) -> float:
        """Set the expression normalisation target to the median of ``libraries`` (counts per cell > 0)."""
        lib = torch.as_tensor(libraries, dtype=torch.float64).flatten()
        lib = lib[lib > 0]
        target = float(lib.median()) if lib.numel() else 1e4
        self.library_target.fill_(max(target, 1.0))
        return float(self.library_target)

    def normalise(self, counts: torch.Tensor, lib: torch.Tensor | None = None) -> torch.Tensor:
        """``log1p(counts / library · library_target)`` per cell (the values of the expression tokens)."""
        lib = counts.sum(1) if lib is None else lib
        return torch.log1p(counts / lib.clamp(min=1)[:, None] * self.library_target.to(counts.dtype))

    def encode_cells(self, images, counts, *, corrupt: bool, drop_expression: torch.Tensor | None = None):
        """Cell level. ``images (N, C, S, S)``, ``counts (N, G)`` → dict of per-cell tensors.

        Steps: 1. gene tokens (sampled, corrupted in training); 2. image patch tokens (MAE-masked in
        training); 3. bidirectional cross-attention; 4. pooled cell token ``h (N, D)`` and embedding.
        """
        c = self.config
        out: dict[str, torch.Tensor | None] = {"keep": None, "img_tokens": None, "gene_tokens": None}
        parts = []
        genes = gpad = None
        if c.expression.enabled:
            gidx, vals, pad, vmask, log_depth = self._gene_tokens(counts, corrupt=corrupt,
                                                                 drop_expression=drop_expression)
            genes, gpad = self.expr(gidx, vals, pad, vmask, log_depth)
            out.update(gene_idx=gidx, gene_vals=vals, vmask=vmask)
        img = None
        if c.image.enabled:
            img, keep = self.vit(images, c.image.mask_ratio if corrupt else 0.0)
            out["keep"] = keep
        genes, img = self.fusion(genes, img, gpad)
        if genes is not None:
            out["gene_tokens"] = genes
            parts.append(genes[:, 0])
        if img is not None:
            out["img_tokens"] = img
            parts.append(img.mean(1))
        z = self.cell_proj(torch.cat(parts, dim=-1))
        out["z"] = z
        out["h"] = self.cell_in(z)
        return out

    def encode_expression(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expression tokens of ``counts (N, G)`` alone (no image, no corruption), before fusion.

        Returns ``tokens (N, 2 + L, D)`` (CLS, depth, then the ``L`` most expressed genes) and
        ``pad (N, 2 + L)`` (True = padding). The condition of the diffusion decoder.
        """
        if not self.config.expression.enabled:
            raise ValueError("The model has no expression branch: it cannot encode expression.")
        return self.expr(*self._gene_tokens(counts, corrupt=False))

    def _gene_tokens(self, counts: torch.Tensor, *, corrupt: bool, drop_expression: torch.Tensor | None = None):
        """Inputs of the expression encoder for ``counts (N, G)``: ``gene_idx``, ``values``, ``pad``,
        ``value_mask`` ``(N, L)`` and ``log_depth (N,)``.

        Up to ``max_len`` expressed genes (a random subset when ``corrupt``, else the most expressed); when
        ``corrupt``, a fraction ``expression.dropout`` of them is dropped and ``expression.mask_ratio`` of the
        rest hidden. ``drop_expression (N,)`` hides a cell's expression entirely. The depth token counts
        the genes actually shown.
        """
        c = self.config.expression
        norm = self.normalise(counts, counts.sum(1))
        gidx, pad = sample_expressed(counts, c.max_len, training=corrupt)
        vals = torch.gather(norm, 1, gidx)
        vmask = torch.zeros_like(pad)
        if corrupt:
            drop = torch.rand(pad.shape, device=pad.device) < c.dropout
            pad = pad | drop
            vmask = (torch.rand(pad.shape, device=pad.device) < c.mask_ratio) & ~pad
        if drop_expression is not None:
            pad = pad | drop_expression[:, None]
            vmask = vmask & ~pad
        shown = torch.zeros_like(counts).scatter(1, gidx, torch.gather(counts, 1, gidx) * (~pad).float())
        return gidx, vals, pad, vmask, torch.log2(1 + shown.sum(1))

    def forward(self, batch: dict[str, torch.Tensor], *, train: bool = False) -> SpatiaOutput:
        """:meth:`encode` the batch; in training also compute its :meth:`loss` (into ``losses``)."""
        out = self.encode(batch, train=train)
        if train:
            out.losses = self.loss(batch, out)
        return out

    def encode(self, batch: dict[str, torch.Tensor], *, train: bool = False) -> SpatiaOutput:
        """Embeddings and expression heads of one batch of centre cells with their niche members.

        ``batch``: ``images (N, C, S, S)`` in [0, 1]; ``counts (N, G)``; ``xy (N, 2)`` µm;
        ``core (M,)`` indices of the centre cells into N; ``nbr (M, K)`` niche members (indices into N,
        -1 = none); ``tile (M,)`` tissue tile of each centre cell (0..T-1); optional ``labels (M,)``
        (-1 = unknown) and ``drop_expression (N,)`` bool (image-only cells). ``train`` corrupts the inputs
        (gene dropout and masking, MAE masking, modality dropout ``train.modality_dropout``).

        Steps: 1. cells; 2. niches; 3. tissue tiles; 4. context fused back into each centre cell; 5. heads.
        """
        c = self.config
        counts = batch["counts"]
        core, nbr, tile, xy = batch["core"], batch["nbr"], batch["tile"], batch["xy"]
        m = core.shape[0]
        drop_expr = batch.get("drop_expression")
        if train and c.expression.enabled and c.image.enabled:
            # modality dropout: some cells are seen through the image alone, as image-only cells will be
            md = torch.rand(counts.shape[0], device=counts.device) < c.train.modality_dropout
            drop_expr = md if drop_expr is None else (drop_expr | md)
        # 1. cell level (all N cells: centres and niche members)
        cells = self.encode_cells(batch.get("images"), counts, corrupt=train, drop_expression=drop_expr)
        h_all, z_all = cells["h"], cells["z"]
        h_core = h_all[core]

        # 2. niche level: centre + members, offset-encoded
        ctx = []
        members = None
        if c.niche.enabled:
            members = torch.cat([core[:, None], nbr], dim=1)  # (M, K+1)
            npad = members < 0
            safe = members.clamp(min=0)
            off = xy[safe] - xy[core][:, None, :]
            tok = h_all[safe] + sincos_2d(off, c.width, scale=c.niche.position_scale).to(h_all.dtype)
            ntok = self.niche_tf(tok, npad)
            valid = (~npad).float()[..., None]
            n_h = (ntok * valid).sum(1) / valid.sum(1).clamp(min=1)
            # the niche embedding pools the neighbours' tokens (after they attended to the centre and to each
            # other), not the centre's own token: it describes the cell's surroundings
            nv = valid.clone()
            nv[:, 0] = (nv[:, 1:].sum(1) == 0).float()  # a cell without neighbours keeps its own token
            niche = self.niche_proj((ntok * nv).sum(1) / nv.sum(1).clamp(min=1))
            ctx.append((ntok, npad))
        else:
            n_h = h_core
            niche = z_all[core]
        # 3. tissue level: niche tokens of each tile, at their position in the tile (relative to the tile's
        #    centre, so that where the slide sits in its coordinate system changes nothing)
        if c.tissue.enabled:
            n_tiles = int(tile.max().item()) + 1 if m else 0
            order = torch.argsort(tile, stable=True)
            sizes = torch.bincount(tile, minlength=n_tiles)
            lmax = int(sizes.max().item())
            starts = torch.cumsum(sizes, 0) - sizes
            pos_in = torch.arange(m, device=tile.device) - starts[tile[order]]
            grid = n_h.new_zeros(n_tiles, lmax, c.width)
            tpad = torch.ones(n_tiles, lmax, dtype=torch.bool, device=tile.device)
            xy_core = xy[core].float()
            centre = xy_core.new_zeros(n_tiles, 2).index_add_(0, tile, xy_core)
            centre = centre / sizes.clamp(min=1)[:, None].to(centre.dtype)
            pe = sincos_2d(xy_core - centre[tile], c.width, scale=c.tissue.position_scale).to(n_h.dtype)
            grid[tile[order], pos_in] = (n_h + pe)[order]
            tpad[tile[order], pos_in] = False
            ttok = self.tissue_tf(grid, tpad)
            tv = (~tpad).float()[..., None]
            t_h = (ttok * tv).sum(1) / tv.sum(1).clamp(min=1)
            tissue = self.tissue_proj(t_h)[tile]
            ctx.append((t_h[tile][:, None, :], torch.zeros(m, 1, dtype=torch.bool, device=tile.device)))
        else:
            tissue = niche

        # 4. context fused back into each centre cell (residual cross-attention)
        q = h_core[:, None, :]
        if ctx:
            kv = torch.cat([t for t, _ in ctx], dim=1)
            kpm = torch.cat([p for _, p in ctx], dim=1)
            q = self.context(q, kv, kpm)
        h_ctx = q[:, 0]

        # 5. heads
        lib = counts[core].sum(1, keepdim=True)
        rho = F.softmax(self.counts_head(h_ctx).float(), dim=-1)
        mu = rho * lib
        theta = self.log_theta.exp()
        zi = self.zi_head(h_ctx).float() if self.zi_head is not None else None
        logits = self.label_head(z_all[core]) if self.label_head is not None else None
        return SpatiaOutput(z_all[core], niche, tissue, mu, theta, zi, logits, rho=rho,
                            internals={"cells": cells, "members": members})

    def loss(self, batch: dict[str, torch.Tensor], outputs: SpatiaOutput,
             weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        """The training objectives of a batch :meth:`encode`-d with ``train=True``, by name.

        ``weights`` (default: ``config.loss``) switch objectives off: one of weight 0 is not computed
        (counts and labels always are). Combine them with :meth:`total_loss`.
        """
        c = self.config
        w = self.loss_weights() if weights is None else dict(weights)
        counts, core = batch["counts"], batch["core"]
        cells, members = outputs.internals["cells"], outputs.internals["members"]
        m, g = core.shape[0], max(1, self.n_genes)  # the counts objectives are per gene, times counts_scale
        losses: dict[str, torch.Tensor] = {}
        if members is not None and w["niche_counts"] > 0:
            # the niche embedding predicts the pooled counts of the *neighbours* (the centre cell left
            # out): their expression composition, a property of the surroundings and not of the cell
            # itself, so that the niche embedding tracks tissue domains rather than the centre's type
            safe, nvalid = members.clamp(min=0), (members >= 0).float()[..., None][:, 1:]
            has = nvalid.sum(1)[:, 0] > 0
            ncounts = (counts[safe[:, 1:]] * nvalid).sum(1)
            nlib = ncounts.sum(1, keepdim=True)
            if has.any():
                nmu = F.softmax(self.niche_counts(outputs.niche[has]).float(), dim=-1) * nlib[has]
                losses["niche_counts"] = -self._log_nb(ncounts[has], nmu, None).mean() / c.niche.k
        lib = counts[core].sum(1, keepdim=True)
        losses["counts"] = -self._log_nb(counts[core], outputs.mu, outputs.zi_logits).mean() / g * c.loss.counts_scale
        if w["cell_counts"] > 0:
            mu_cell = F.softmax(self.cell_counts_head(outputs.cell).float(), dim=-1) * lib
            losses["cell_counts"] = -self._log_nb(counts[core], mu_cell, None).mean() / g * c.loss.counts_scale
        if c.expression.enabled and w["masked_genes"] > 0:
            vm = cells["vmask"][core]
            if vm.any():
                pred = self.masked_head(cells["gene_tokens"][core][:, 2:]).squeeze(-1).float()
                losses["masked_genes"] = F.mse_loss(pred[vm], cells["gene_vals"][core][vm])
        if c.image.enabled and w["pixels"] > 0:
            losses["pixels"] = self._pixel_loss(batch["images"][core], cells, core)
        if outputs.label_logits is not None and "labels" in batch:
            y = batch["labels"]
            known = y >= 0
            if known.any():
                losses["labels"] = F.cross_entropy(outputs.label_logits[known].float(), y[known])
        if c.expression.enabled and c.image.enabled and w["contrastive"] > 0 and m > 1:
            gi = F.normalize(cells["gene_tokens"][core][:, 0].float(), dim=-1)
            ii = F.normalize(cells["img_tokens"][core].mean(1).float(), dim=-1)
            sim = gi @ ii.T / c.loss.temperature
            tgt = torch.arange(m, device=sim.device)
            losses["contrastive"] = 0.5 * (F.cross_entropy(sim, tgt) + F.cross_entropy(sim.T, tgt))
        return losses

    def _pixel_loss(self, images: torch.Tensor, cells: dict, core: torch.Tensor) -> torch.Tensor:
        """MAE reconstruction error of the centre cells' ``images``, on the hidden patches (all without masking)."""
        keep = None if cells["keep"] is None else cells["keep"][core]
        rec = self.pixel_decoder(cells["img_tokens"][core], keep)
        err = ((rec.float() - patchify(images, self.config.image.patch).float()) ** 2).mean(-1)
        if keep is None:
            return err.mean()
        return err[torch.ones_like(err, dtype=torch.bool).scatter(1, keep, False)].mean()

    def _log_nb(self, x: torch.Tensor, mu: torch.Tensor, zi_logits: torch.Tensor | None) -> torch.Tensor:
        """Per-cell log-likelihood summed over genes (scvi-tools' NB / ZINB)."""
        from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

        theta = self.log_theta.exp().float()
        mu = mu.float().clamp(min=1e-8)
        if zi_logits is None:
            dist = NegativeBinomial(mu=mu, theta=theta, validate_args=False)
        else:
            dist = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits, validate_args=False)
        return dist.log_prob(x.float()).sum(-1)

    def loss_weights(self) -> dict[str, float]:
        """The weight of each objective, from ``config.loss``."""
        w = self.config.loss
        return {"counts": w.counts, "cell_counts": w.cell_counts, "masked_genes": w.masked_genes,
                "pixels": w.pixels, "niche_counts": w.niche_counts, "labels": w.labels,
                "contrastive": w.contrastive}

    def total_loss(self, losses: dict[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """The weighted sum of ``losses`` (``weights`` default to ``config.loss``)."""
        w = self.loss_weights() if weights is None else weights
        return sum(w[k] * v for k, v in losses.items())
