"""Cell morphology of the simulator: latent programmes, the nuclei and cell bodies they drive, and the
morphology-only cell types ("twins": another type's expression, a nucleus of their own)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._simulate_fields import _Waves

if TYPE_CHECKING:
    from ._simulate_tissue import _Tissue

_PROGRAMS = ("size_program", "elongation_program", "texture_program")
_TRANSITION_SHIFT = {"size_program": 1.3, "elongation_program": 1.2, "texture_program": 1.0}
_TEXTURE_WAVES = 8  # plane waves summed into each nucleus' chromatin texture
# what each programme drives in the image (uns["simulation"]["morphology_drivers"])
_DRIVES = {
    "size_program": (
        "nucleus_area_um2",
        "nuclear radius 3 µm · exp(0.22 z); cell body and library size follow",
    ),
    "elongation_program": ("nucleus_eccentricity", "nuclear axis ratio 1 + 0.4 softplus(z + 0.2)"),
    "texture_program": ("chromatin_texture", "chromatin texture amplitude 0.15 + 0.45 sigmoid(z)"),
}
# twins: |log| of the multiplier on each feature at morphology_strength=1 (the sign is drawn per twin)
_TWIN_EFFECTS = {
    "nucleus_radius": 0.25,  # nuclear (and cell-body) radius
    "axis_ratio_excess": 0.7,  # (axis ratio − 1): elongation
    "texture_grain": 0.5,  # spatial frequency of the chromatin texture
    "texture_amplitude": 0.3,  # contrast of the chromatin texture
}
_TWIN_FRACTION = 0.5  # share of the parent type's cells that become the twin


@dataclass(frozen=True)
class _Twins:
    """Morphology-only types: twin ``j`` is type ``n_base + j``, with the expression of type ``parent[j]``."""

    n_base: int  # types with expression of their own
    parent: np.ndarray  # (m,) parent type index of each twin
    effects: np.ndarray  # (m, len(_TWIN_EFFECTS)) multipliers, columns in the order of _TWIN_EFFECTS
    expr_idx: np.ndarray  # (n,) per cell, the type whose expression it has

    def factors(self, type_idx: np.ndarray) -> np.ndarray:
        """Per-cell multipliers ``(n, len(_TWIN_EFFECTS))``: a twin's effects, 1 for every other cell."""
        table = np.vstack([np.ones((self.n_base, self.effects.shape[1])), self.effects])
        return table[type_idx]


def _add_twins(tissue: _Tissue, n_twins: int, strength: float, rng: np.random.Generator) -> _Tissue:
    """Give ``n_twins`` types a morphology-only twin: a random ``_TWIN_FRACTION`` of each parent's cells.

    Parents are the most frequent types that are neither the niche inducer nor the transitioning type, so
    twins sit where their parent sits, share its niche role and differ from it only in their nuclei.
    """
    n_base = len(tissue.types)
    frequency = np.bincount(tissue.type_idx, minlength=n_base).astype(float)
    frequency[[tissue.inducer, tissue.transition]] = -1.0
    parent = np.sort(np.argsort(-frequency, kind="stable")[:n_twins])
    n_effects = len(_TWIN_EFFECTS)  # a different pattern of signs for each twin
    bits = rng.permutation(2**n_effects)[:n_twins, None] >> np.arange(n_effects) & 1
    signs = 2.0 * bits - 1.0
    effects = np.exp(signs * strength * np.asarray(list(_TWIN_EFFECTS.values())))
    type_idx = tissue.type_idx.copy()
    draw = rng.uniform(size=len(type_idx))
    for j, p in enumerate(parent):
        type_idx[(tissue.type_idx == p) & (draw < _TWIN_FRACTION)] = n_base + j
    mixture = np.hstack([tissue.mixture, tissue.mixture[:, parent] * _TWIN_FRACTION])
    mixture[:, parent] *= 1.0 - _TWIN_FRACTION
    twins = _Twins(n_base=n_base, parent=parent, effects=effects, expr_idx=tissue.type_idx)
    types = tissue.types + [f"type_{n_base + j}" for j in range(n_twins)]
    return dataclasses.replace(tissue, types=types, type_idx=type_idx, mixture=mixture, twins=twins)


def _twin_truth(tissue: _Tissue) -> dict:
    """``uns["simulation"]`` entries of the morphology-only types (empty lists/dicts without twins)."""
    twins, types = tissue.twins, tissue.types
    if twins is None:
        return {"morphology_twins": {}, "morphology_only_types": [], "morphology_effects": {}}
    pairs = {types[twins.n_base + j]: types[p] for j, p in enumerate(twins.parent.tolist())}
    effects = {
        twin: dict(zip(_TWIN_EFFECTS, np.round(twins.effects[j], 4).tolist(), strict=True))
        for j, twin in enumerate(pairs)
    }
    only = [t for t in types if t in pairs or t in pairs.values()]
    return {"morphology_twins": pairs, "morphology_only_types": only, "morphology_effects": effects}


def _cells(
    tissue: _Tissue, spacing: float, rng: np.random.Generator
) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """Latent programmes and the morphology they drive.

    Returns ``obs`` (ground-truth columns, index ``"1".."n"``), the rendering parameters and the nuclear area
    the programmes alone give (µm²; a twin's own nucleus does not change its library size).
    """
    t, moved, n = tissue.expr_idx, tissue.moved, len(tissue.type_idx)
    n_types = len(tissue.base_types)  # type-level draws: a twin gets its parent's
    obs = pd.DataFrame(index=pd.Index(np.arange(1, n + 1).astype(str)))
    obs["cell_type"] = pd.Categorical.from_codes(tissue.type_idx, categories=tissue.types)
    domains = [f"domain_{d}" for d in range(len(tissue.mixture))]
    obs["domain"] = pd.Categorical.from_codes(tissue.domain, categories=domains)
    conditions = ["control", "disease"]
    obs["condition"] = pd.Categorical.from_codes(tissue.disease.astype(int), categories=conditions)
    obs["state"] = pd.Categorical.from_codes(moved.astype(int), categories=["normal", "transitioned"])
    for program in _PROGRAMS:  # type mean + cell noise (≈ unit variance), shifted when transitioned
        z = rng.normal(0.0, 0.6, n_types)[t] + rng.normal(0.0, 0.8, n)
        obs[program] = z + _TRANSITION_SHIFT[program] * moved
    obs["niche_signal"] = tissue.niche.astype(np.int64)
    # nucleus: radius from the size programme, axis ratio from the elongation programme
    radius = 3.0 * np.exp(0.22 * obs["size_program"].to_numpy() + rng.normal(0.0, 0.03, n))
    ratio = 1.0 + 0.4 * np.logaddexp(0.0, obs["elongation_program"].to_numpy() + 0.2)
    nuc_a, nuc_b = radius * np.sqrt(ratio), radius / np.sqrt(ratio)
    program_area = np.pi * nuc_a * nuc_b
    twin = None if tissue.twins is None else tissue.twins.factors(tissue.type_idx)
    if twin is not None:  # a twin's own nucleus: larger or smaller, more or less elongated
        radius, ratio = radius * twin[:, 0], 1.0 + (ratio - 1.0) * twin[:, 1]
        nuc_a, nuc_b = radius * np.sqrt(ratio), radius / np.sqrt(ratio)
    yx = tissue.yx
    theta = 0.8 * _Waves.draw(rng, length_scale=8 * spacing).at(yx[:, 0], yx[:, 1]) + rng.normal(0.0, 0.5, n)
    # cell body: a type-specific multiple of the nucleus, elongated along it (less)
    cyto = (rng.uniform(1.8, 2.5, n_types)[t] * np.exp(rng.normal(0.0, 0.06, n))).clip(1.4)
    cell_a, cell_b = radius * cyto * ratio**0.25, radius * cyto / ratio**0.25
    brightness = rng.uniform(0.65, 1.25, n_types)[t] * np.exp(rng.normal(0.0, 0.12, n))
    brightness *= np.where(moved, 1.4, 1.0)
    # chromatin: amplitude from the texture programme, type-specific grain (coarser when transitioned)
    amplitude = 0.15 + 0.45 / (1.0 + np.exp(-obs["texture_program"].to_numpy()))
    grain = rng.uniform(0.35, 0.75, n_types)[t] * np.where(moved, 0.7, 1.0)  # cycles / µm
    if twin is not None:  # and its own chromatin: finer or coarser grain, more or less contrast
        grain, amplitude = grain * twin[:, 2], amplitude * twin[:, 3]
    k = 2 * np.pi * grain[:, None] * rng.uniform(0.5, 1.5, (n, _TEXTURE_WAVES))
    angle = rng.uniform(0.0, np.pi, (n, _TEXTURE_WAVES))
    obs["nucleus_area_um2"] = np.pi * nuc_a * nuc_b
    obs["nucleus_eccentricity"] = np.sqrt(1.0 - (nuc_b / nuc_a) ** 2)
    obs["nucleus_orientation"] = np.mod(theta + np.pi / 2, np.pi) - np.pi / 2
    obs["cell_radius_um"] = np.sqrt(cell_a * cell_b)
    obs["dapi_intensity"] = brightness
    shape = {
        "cos": np.cos(theta), "sin": np.sin(theta), "cell_a": cell_a, "cell_b": cell_b, "nuc_a": nuc_a,
        "nuc_b": nuc_b, "dapi": brightness, "tex_amp": amplitude, "tex_ky": k * np.sin(angle),
        "tex_kx": k * np.cos(angle), "tex_phase": rng.uniform(0, 2 * np.pi, (n, _TEXTURE_WAVES)),
        "membrane": np.exp(rng.normal(0.0, 0.2, n)),
    }  # fmt: skip
    return obs, shape, program_area
