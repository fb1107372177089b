"""Sinusoidal position encodings (1-D and 2-D)."""

from __future__ import annotations

import math

import torch


def sincos_1d(pos: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``(...,)`` positions → ``(..., dim)`` sin/cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    ang = pos.float()[..., None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


def sincos_2d(xy: torch.Tensor, dim: int, scale: float = 1.0, max_period: float = 10_000.0) -> torch.Tensor:
    """``(..., 2)`` coordinates (divided by ``scale``) → ``(..., dim)``: half the features for x, half for y."""
    if dim % 4:
        raise ValueError(f"2-D sin/cos encoding needs dim divisible by 4, got {dim}.")
    xy = xy.float() / scale
    return torch.cat([sincos_1d(xy[..., 0], dim // 2, max_period), sincos_1d(xy[..., 1], dim // 2, max_period)], dim=-1)


def grid_2d(n: int, dim: int) -> torch.Tensor:
    """Fixed encoding of an ``n × n`` patch grid, ``(n*n, dim)`` in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return sincos_2d(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), dim, max_period=100.0)
