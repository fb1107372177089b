"""Random fields of the simulator, defined on *global* coordinates so that any chunk renders the same pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Waves:
    """A smooth random field: a normalised sum of plane waves, defined on global coordinates (µm)."""

    ky: np.ndarray
    kx: np.ndarray
    phase: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, length_scale: float, n: int = 8) -> _Waves:
        angle = rng.uniform(0, np.pi, n)
        k = 2 * np.pi / length_scale * rng.uniform(0.6, 1.4, n)
        return cls(k * np.sin(angle), k * np.cos(angle), rng.uniform(0, 2 * np.pi, n))

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Field at points ``(y, x)`` (same shape), unit variance."""
        arg = np.multiply.outer(y, self.ky) + np.multiply.outer(x, self.kx) + self.phase
        return np.cos(arg).sum(-1) * math.sqrt(2 / len(self.ky))

    def grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Field on the grid ``ys × xs`` (separable: cos(a+b) = cos a cos b − sin a sin b)."""
        a = np.multiply.outer(ys, self.ky) + self.phase  # (h, n)
        b = np.multiply.outer(xs, self.kx)  # (w, n)
        out = np.cos(a) @ np.cos(b).T - np.sin(a) @ np.sin(b).T
        return out * math.sqrt(2 / len(self.ky))


def _hash_normal(rows: np.ndarray, cols: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent standard normal fields, pure functions of the global pixel ``(row, col)`` and ``key``.

    A counter-based generator (splitmix64 of the pixel index, then Box-Muller on its two 32-bit halves), so
    the noise of a pixel does not depend on which chunk renders it.
    """
    with np.errstate(over="ignore"):
        z = (rows.astype(np.uint64)[:, None] << np.uint64(32)) | cols.astype(np.uint64)[None, :]
        z ^= np.uint64(key)
        z += np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    radius = np.sqrt(-2.0 * np.log(((z >> np.uint64(32)).astype(np.float64) + 1.0) / 4294967297.0))
    angle = (z & np.uint64(0xFFFFFFFF)).astype(np.float64) * (2 * np.pi / 4294967296.0)
    return radius * np.cos(angle), radius * np.sin(angle)
