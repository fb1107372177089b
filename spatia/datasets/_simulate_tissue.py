"""Where the simulated cells sit and what they are: layout, tissue domains, cell types, condition, niche."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from ._simulate_fields import _Waves

if TYPE_CHECKING:
    from ._simulate_morphology import _Twins

NICHE_RADIUS_UM = 30.0
_MARGIN_UM = 20.0  # image border around the outermost cells


def _layout(n_cells: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Cell centres ``(n, 2)``, ``(y, x)`` in µm from 0: a jittered hexagonal lattice with irregular holes."""
    n_sites = int(math.ceil(n_cells * 1.12))
    side = math.sqrt(n_sites * spacing**2 * math.sqrt(3) / 2)
    n_cols = max(int(math.ceil(side / spacing)), 1)
    n_rows = max(int(math.ceil(n_sites / n_cols)), 1)
    row, col = np.divmod(np.arange(n_rows * n_cols), n_cols)
    y = row * spacing * math.sqrt(3) / 2
    x = (col + 0.5 * (row % 2)) * spacing
    # holes (lumen-, vessel-like gaps): drop the sites where a smooth field is highest
    holes = _Waves.draw(rng, length_scale=6 * spacing).at(y, x) + 0.7 * rng.standard_normal(y.size)
    keep = np.sort(np.argsort(holes, kind="stable")[:n_cells])
    yx = np.column_stack([y[keep], x[keep]])
    r = 0.2 * spacing * np.sqrt(rng.uniform(size=n_cells))
    a = rng.uniform(0, 2 * np.pi, n_cells)
    yx += np.column_stack([r * np.sin(a), r * np.cos(a)])
    return yx - yx.min(0)


def _domains(yx: np.ndarray, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """Domain index per cell: Voronoi cells of well-spread seeds, boundaries warped by smooth noise."""
    extent = float(np.ptp(yx, axis=0).max()) + 1.0
    candidates = rng.uniform(0, 1, (64 * n_domains, 2)) * np.ptp(yx, axis=0)
    seeds = [candidates[0]]
    for _ in range(1, n_domains):  # farthest-point sampling: domains of comparable size
        d = np.min([np.linalg.norm(candidates - s, axis=1) for s in seeds], axis=0)
        seeds.append(candidates[int(np.argmax(d))])
    warp_y, warp_x = (_Waves.draw(rng, length_scale=0.4 * extent) for _ in range(2))
    amp = 0.1 * extent
    warped = yx + amp * np.column_stack([warp_y.at(yx[:, 0], yx[:, 1]), warp_x.at(yx[:, 0], yx[:, 1])])
    d2 = ((warped[:, None, :] - np.asarray(seeds)[None]) ** 2).sum(-1)
    return np.argmin(d2, axis=1)


def _neighbour_counts(yx: np.ndarray, is_inducer: np.ndarray, radius: float) -> np.ndarray:
    """Number of inducer cells within ``radius`` of each cell (itself excluded)."""
    pairs = cKDTree(yx).query_pairs(radius, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    n = len(yx)
    counts = np.bincount(i, weights=is_inducer[j], minlength=n)
    return counts + np.bincount(j, weights=is_inducer[i], minlength=n)


@dataclass(frozen=True)
class _Tissue:
    """Where cells are and what they are (indices into ``types`` and domains)."""

    yx: np.ndarray  # (n, 2) cell centres in global µm, (y, x)
    origin: np.ndarray  # (y0, x0) µm of the image corner
    types: list[str]
    type_idx: np.ndarray
    domain: np.ndarray
    mixture: np.ndarray  # (n_domains, n_types)
    inducer: int
    transition: int
    disease: np.ndarray
    moved: np.ndarray
    niche: np.ndarray
    twins: _Twins | None = None  # morphology-only types (their cells carry another type's expression)

    @property
    def base_types(self) -> list[str]:
        """The types with expression of their own (all types but the morphology-only twins)."""
        return self.types if self.twins is None else self.types[: self.twins.n_base]

    @property
    def expr_idx(self) -> np.ndarray:
        """Per cell, the index of the type whose expression (and programme means) it has."""
        return self.type_idx if self.twins is None else self.twins.expr_idx


def _tissue(n, n_types, n_domains, spacing, condition_fraction, transition_rate, rng) -> _Tissue:
    """Positions, domains, cell types, condition, transitioned state and niche signal."""
    origin = rng.uniform(80.0, 120.0, 2)  # the slide does not start at 0
    yx = _layout(n, spacing, rng) + origin + _MARGIN_UM
    domain = _domains(yx, n_domains, rng)
    mixture = 0.8 * rng.dirichlet(np.full(n_types, 0.8), n_domains) + 0.2 / n_types
    type_idx = (rng.uniform(size=(n, 1)) > np.cumsum(mixture[domain], 1)).sum(1).clip(max=n_types - 1)
    frequency = mixture[domain].mean(0)
    inducer = int(np.argmax(mixture.std(0) * np.sqrt(frequency)))  # domain-specific and not rare
    transition = int(np.argmax(np.where(np.arange(n_types) == inducer, -1.0, frequency)))  # most common other
    # disease: one side of the slide, behind a wavy boundary
    extent = float(np.ptp(yx, axis=0).max()) + 1.0
    side = yx[:, 1] + 0.1 * extent * _Waves.draw(rng, length_scale=0.5 * extent).at(yx[:, 0], yx[:, 1])
    disease = side > np.quantile(side, 1.0 - condition_fraction)
    if condition_fraction == 0:
        disease[:] = False
    moved = disease & (type_idx == transition) & (rng.uniform(size=n) < transition_rate)
    niche = _neighbour_counts(yx, (type_idx == inducer).astype(float), NICHE_RADIUS_UM)
    types = [f"type_{i}" for i in range(n_types)]
    return _Tissue(yx, origin, types, type_idx, domain, mixture, inducer, transition, disease, moved, niche)
