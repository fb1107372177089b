"""Expression tokens: each expressed gene = gene-identity embedding + encoding of its normalised count."""

from __future__ import annotations

import torch
from torch import nn

from ._attention import Transformer


def sample_expressed(counts: torch.Tensor, max_len: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``max_len`` expressed genes per cell.

    ``counts (B, G) -> gene_idx (B, L) long, pad (B, L) bool`` (True = padding). In training the genes
    are a random subset of the expressed ones; at inference the most expressed ones (deterministic).
    """
    expressed = counts > 0
    score = counts.float().clone()
    if training:
        score = torch.rand_like(score)
    score = score.masked_fill(~expressed, -1.0)
    n_tok = min(max_len, counts.shape[1])
    top = score.topk(n_tok, dim=1)
    pad = top.values < 0
    return top.indices, pad


class ExpressionEncoder(nn.Module):
    """Transformer over [CLS, depth, gene tokens].

    ``forward(gene_idx (B, L), values (B, L), pad (B, L), value_mask (B, L), log_depth (B,))
    -> tokens (B, 2 + L, D), pad (B, 2 + L)``. ``values`` are log1p library-normalised counts;
    ``value_mask`` marks tokens whose value is hidden (masked-gene modelling): their identity stays,
    their value is replaced by a learned mask embedding.

    The CLS token starts from a linear read-out of the whole visible profile (the values of the shown,
    unmasked tokens scattered back onto the gene axis), so the cell summary does not have to be
    assembled by attention alone; on small data this is what lets the CLS match PCA-level structure.
    """

    def __init__(self, n_genes: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.gene = nn.Embedding(n_genes, dim)
        self.value = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.value_mask = nn.Parameter(torch.zeros(dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.profile = nn.Linear(n_genes, dim)
        self.n_genes = n_genes
        self.depth = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.blocks = Transformer(dim, depth, heads)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.value_mask, std=0.02)

    def forward(self, gene_idx, values, pad, value_mask, log_depth):
        b = gene_idx.shape[0]
        v = self.value(values[..., None].to(self.cls.dtype))
        v = torch.where(value_mask[..., None], self.value_mask.to(v.dtype).expand_as(v), v)
        tok = self.gene(gene_idx) + v
        visible = (~pad & ~value_mask).to(values.dtype)
        profile = values.new_zeros(b, self.n_genes).scatter_add(1, gene_idx, values * visible)
        cls = self.cls + self.profile(profile.to(self.cls.dtype))[:, None, :]
        pre = torch.cat([cls, self.depth(log_depth[:, None, None].to(self.cls.dtype))], dim=1)
        x = torch.cat([pre, tok], dim=1)
        pad_all = torch.cat([torch.zeros(b, 2, dtype=torch.bool, device=pad.device), pad], dim=1)
        return self.blocks(x, pad_all), pad_all
