"""A small ViT over cell crops with MAE-style random masking and a light pixel decoder.

Written here (not timm) because timm pulls torchvision and a CUDA torch build; it is ~80 lines.
"""

from __future__ import annotations

import torch
from torch import nn

from ._attention import Transformer
from ._position import grid_2d


def patchify(img: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, S, S) -> (B, (S/p)², C·p·p)``, patches in row-major order."""
    b, c, s, _ = img.shape
    n = s // patch
    x = img.reshape(b, c, n, patch, n, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, n * n, c * patch * patch)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, n_patches, _ = x.shape
    n = int(round(n_patches**0.5))
    x = x.reshape(b, n, n, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, n * patch, n * patch)


class ViTEncoder(nn.Module):
    """Patch tokens of a crop.

    ``forward(img (B, C, S, S), mask_ratio) -> tokens (B, L_vis, D), keep_idx (B, L_vis) | None``.
    With ``mask_ratio > 0`` only a random ``1 - mask_ratio`` of the patches is encoded (MAE).
    """

    def __init__(self, channels: int, size: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"crop size {size} is not a multiple of the patch size {patch}.")
        self.patch, self.channels, self.n = patch, channels, (size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.register_buffer("pos", grid_2d(size // patch, dim), persistent=False)
        self.blocks = Transformer(dim, depth, heads)

    def forward(self, img: torch.Tensor, mask_ratio: float = 0.0):
        x = self.embed(patchify(img, self.patch)) + self.pos.to(img.dtype)
        keep = None
        if mask_ratio > 0:
            b = x.shape[0]
            n_keep = max(1, int(round(self.n * (1 - mask_ratio))))
            noise = torch.rand(b, self.n, device=x.device)
            keep = noise.argsort(dim=1)[:, :n_keep]
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.blocks(x), keep


class PixelDecoder(nn.Module):
    """Light MAE decoder: visible tokens + mask tokens → pixels of every patch.

    ``forward(tokens (B, L_vis, D), keep (B, L_vis) | None) -> (B, L, C·p·p)``.
    """

    def __init__(self, dim: int, n_patches: int, patch: int, channels: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.n = n_patches
        self.inp = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos", grid_2d(int(round(n_patches**0.5)), width), persistent=False)
        self.blocks = Transformer(width, depth, heads)
        self.out = nn.Linear(width, channels * patch * patch)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.inp(tokens)
        b, _, w = x.shape
        if keep is not None:
            full = self.mask_token.to(x.dtype).expand(b, self.n, w).clone()
            full.scatter_(1, keep[..., None].expand(-1, -1, w), x)
            x = full
        return self.out(self.blocks(x + self.pos.to(x.dtype)))
