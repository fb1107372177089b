"""Attention blocks on ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention, self or cross.

    ``forward(q (B, Lq, D), kv (B, Lk, D), key_padding_mask (B, Lk) bool, True = ignore) -> (B, Lq, D)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, d = q.shape
        lk = kv.shape[1]
        h = self.heads
        qh = self.q(q).view(b, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None:
            # rows whose keys are all padding attend to nothing: keep one key to avoid NaNs, zero them after
            allpad = key_padding_mask.all(dim=1)
            kpm = key_padding_mask.clone()
            kpm[allpad, 0] = False
            mask = (~kpm)[:, None, None, :]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        o = self.out(o.transpose(1, 2).reshape(b, lq, d))
        if key_padding_mask is not None and allpad.any():
            o = o.masked_fill(allpad[:, None, None], 0.0)
        return o


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out or dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + SA(LN(x))``, ``x + MLP(LN(x))``. ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.n1(x)
        x = x + self.attn(y, y, key_padding_mask)
        return x + self.mlp(self.n2(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` with a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, key_padding_mask)
        return self.norm(x)


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention: ``x + CA(LN(x), LN(ctx))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.nq = nn.LayerNorm(dim)
        self.nkv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.nq(x), self.nkv(ctx), ctx_padding_mask)
        return x + self.mlp(self.n2(x))


class BidirectionalFusion(nn.Module):
    """Gene tokens query image tokens and image tokens query gene tokens, ``depth`` times.

    ``forward(genes (B, Lg, D), image (B, Li, D), gene_pad (B, Lg)) -> (genes', image')``.
    Either side may be ``None`` (ablations): it is then returned unchanged.
    """

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.g2i = nn.ModuleList([CrossAttentionBlock(dim, heads) for _ in range(depth)])
        self.i2g = nn.ModuleList([CrossAttentionBlock(dim, heads) for _ in range(depth)])

    def forward(self, genes, image, gene_pad=None):
        if genes is None or image is None:
            return genes, image
        for g2i, i2g in zip(self.g2i, self.i2g, strict=True):
            genes, image = g2i(genes, image), i2g(image, genes, gene_pad)
        return genes, image
