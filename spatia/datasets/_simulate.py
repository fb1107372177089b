"""A simulated imaging-based spatial transcriptomics slide (Xenium-like) with known ground truth.

The generator works in three steps:

1. **Tissue.** Cell centres on a jittered hexagonal lattice with irregular holes; smooth tissue domains
   (a warped Voronoi partition); cell types drawn from a domain-specific mixture; a "disease" side of the
   slide where a fraction of one cell type transitions to another state.
2. **Cells.** Three latent programmes per cell (size, elongation, texture) drive both the morphology
   (nuclear radius, axis ratio, chromatin texture) and a few genes; cell types differ in marker genes and
   in morphology; niche genes respond to inducer cells among the neighbours; counts are negative binomial.
3. **Pixels.** The DAPI and membrane channels and the segmentation are rendered chunk by chunk. Each pixel
   is a deterministic function of its *global* position (textures, background and even the pixel noise are
   hashed from global coordinates), so a chunk computed lazily equals the same region computed eagerly,
   whatever the chunk size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

from .._constants import Defaults, Keys
from .._utils import RandomState, get_rng
from ._frames import FrameUnits, check_units, to_pixel_frame

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

IMAGE_KEY = "morphology"
LABELS_KEY = "cell_labels"
SHAPES_KEY = "cell_circles"
REGION_KEY = "region"
INSTANCE_KEY = "cell_id"
CHANNELS = ("DAPI", "membrane")
NICHE_RADIUS_UM = 30.0
LAZY_ABOVE = 50_000  # cells; above this the image and labels are dask graphs by default

_PROGRAMS = ("size_program", "elongation_program", "texture_program")
_MARGIN_UM = 20.0  # image border around the outermost cells
_PAD_PX = 8  # rendering halo around each chunk (blur + boundary detection), cropped away
_TEXTURE_WAVES = 8  # plane waves summed into each nucleus' chromatin texture
_EDGE_UM = 0.2  # softness of nuclear edges (before the optical blur)
_TRANSITION_SHIFT = {"size_program": 1.3, "elongation_program": 1.2, "texture_program": 1.0}
# photometry (uint16 counts)
_DAPI_PEAK, _MEMBRANE_PEAK, _BACKGROUND = 2600.0, 1300.0, 110.0
_SHOT_GAIN, _READ_NOISE = 3.0, 15.0

COLUMNS = {
    "cell_id": "Cell id: the cell's value in labels['cell_labels'] and the index of shapes['cell_circles'].",
    "region": "Element annotated by the table (always 'cell_labels').",
    "cell_type": "Ground-truth cell type (distinct marker genes and nuclear morphology).",
    "domain": "Ground-truth tissue domain (smooth region with its own cell-type mixture).",
    "condition": "'control' or 'disease' (the disease part of the slide is one contiguous side).",
    "state": "'normal' or 'transitioned' (only cells of uns['simulation']['transition_type'] in disease).",
    "size_program": "Latent ~N(0,1): raises nuclear radius/area, library size and the size_program genes.",
    "elongation_program": "Latent ~N(0,1): raises the nuclear axis ratio and the elongation_program genes.",
    "texture_program": "Latent ~N(0,1): raises chromatin texture amplitude and the texture_program genes.",
    "niche_signal": "Number of inducer-type cells within niche_radius_um (the cell itself excluded).",
    "nucleus_area_um2": "Area of the rendered nuclear ellipse in µm² (before clipping by neighbours).",
    "nucleus_eccentricity": "Eccentricity of the nuclear ellipse (0 = round).",
    "nucleus_orientation": "Angle of the nuclear major axis in radians, counter-clockwise from +x.",
    "cell_radius_um": "Equivalent radius of the cell-body ellipse (before neighbours clip it).",
    "dapi_intensity": "Relative DAPI brightness of the nucleus (type-specific, x1.4 when transitioned).",
}


# ------------------------------------------------------------------------------------------------ fields
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


# ------------------------------------------------------------------------------------------------ tissue
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


# ------------------------------------------------------------------------------------------------ genes
def _panel_sizes(n_genes: int, n_types: int) -> tuple[int, int, int]:
    """Markers per type, genes per programme, niche-induced (= condition-response) genes."""
    per_program = n_niche = 1
    if n_genes >= max(30, n_types + 13):
        per_program, n_niche = 2, 3
    room = (n_genes - 3 * per_program - 2 * n_niche - 1) // n_types  # keep >= 1 housekeeping gene
    return int(np.clip(min(round(0.08 * n_genes), room), 1, 10)), per_program, n_niche


def _gene_panel(n_genes: int, types: list[str], inducer: str, rng: np.random.Generator) -> pd.DataFrame:
    """Gene roles and parameters (``var``), in a shuffled order."""
    n_markers, per_program, n_niche = _panel_sizes(n_genes, len(types))
    roles = [f"marker:{t}" for t in types for _ in range(n_markers)]
    roles += [p for p in _PROGRAMS for _ in range(per_program)]
    roles += [f"niche_induced:{inducer}"] * n_niche + ["condition_response"] * n_niche
    roles += ["housekeeping"] * (n_genes - len(roles))
    roles = np.asarray(roles, dtype=object)[rng.permutation(n_genes)]
    width = max(3, len(str(n_genes - 1)))
    var = pd.DataFrame(index=pd.Index([f"Gene_{i:0{width}d}" for i in range(n_genes)]))
    var["role"] = pd.Categorical(roles)
    abundant = ~var["role"].str.startswith("marker:").to_numpy() & (roles != "housekeeping")
    var["base_logit"] = rng.normal(0.0, 0.6, n_genes) + np.where(abundant, 0.8, 0.0)
    var["dispersion"] = np.exp(rng.normal(math.log(4.0), 0.3, n_genes))
    return var


def _expression(
    var: pd.DataFrame,
    types: list[str],
    obs: pd.DataFrame,
    inducer: str,
    transition_type: str,
    depth: np.ndarray,
    rng: np.random.Generator,
) -> tuple[sparse.csr_matrix, list[str]]:
    """Negative binomial counts: the whole expression ground truth in one place.

    ``logit[c, g] = base[g] + type_effect[type(c), g]`` (+2.0 on the type's markers) ``+ Σ_p β[p, g] z_p[c]``
    ``+ 1.8 (1 − exp(−niche[c] / 1.5))`` on niche genes of non-inducer cells, +2.3 on response genes and −1.6
    on half the markers of transitioned cells; ``mean = depth[c] · softmax(logit[c])``; counts are
    gamma-Poisson with per-gene dispersion, drawn in batches of cells. An empty cell gets one count of the
    most abundant housekeeping gene. Returns the counts and the suppressed markers.
    """
    role = var["role"].astype(str).to_numpy()
    n_genes = len(var)
    type_effect = rng.normal(0.0, 0.25, (len(types), n_genes)) * np.where(role == "housekeeping", 0.3, 1.0)
    for t, name in enumerate(types):
        type_effect[t, role == f"marker:{name}"] += 2.0
    beta = np.zeros((len(_PROGRAMS), n_genes))
    for p, program in enumerate(_PROGRAMS):
        genes = np.flatnonzero(role == program)
        beta[p, genes] = np.linspace(0.9, 0.7, len(genes))
    markers = np.flatnonzero(role == f"marker:{transition_type}")
    lost = markers[: max(1, len(markers) // 2)]
    shift = 2.3 * (role == "condition_response")
    shift[lost] -= 1.6
    niche_gene = 1.8 * (role == f"niche_induced:{inducer}")

    type_idx = obs["cell_type"].cat.codes.to_numpy()
    z = obs[list(_PROGRAMS)].to_numpy()
    responder = (obs["cell_type"] != inducer).to_numpy()
    induction = (1.0 - np.exp(-obs["niche_signal"].to_numpy() / 1.5)) * responder
    moved = (obs["state"] == "transitioned").to_numpy().astype(float)
    base, theta = var["base_logit"].to_numpy(), var["dispersion"].to_numpy()
    hk = np.flatnonzero(role == "housekeeping")
    rescue = hk[np.argmax(base[hk])]
    blocks = []
    for start in range(0, len(obs), 65_536):
        b = slice(start, start + 65_536)
        logit = base + type_effect[type_idx[b]] + z[b] @ beta
        logit += np.multiply.outer(induction[b], niche_gene) + np.multiply.outer(moved[b], shift)
        p = np.exp(logit - logit.max(1, keepdims=True))
        mean = p * (depth[b] / p.sum(1))[:, None]
        x = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.int32)
        x[x.sum(1) == 0, rescue] = 1
        blocks.append(sparse.csr_matrix(x))
    return sparse.vstack(blocks, format="csr"), var.index[lost].tolist()


# ------------------------------------------------------------------------------------------------ pixels
@dataclass(frozen=True)
class _Scene:
    """Everything needed to render any chunk of the slide; cell arrays are indexed by ``cell_id - 1``."""

    shape: tuple[int, int]  # (ny, nx) pixels
    origin: tuple[float, float]  # (y0, x0) µm of the image's top-left corner
    pixel_size: float
    noise: float
    key: int  # seed of the pixel noise hash
    background: _Waves
    tree: cKDTree  # on (cy, cx)
    cy: np.ndarray
    cx: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    cell_a: np.ndarray  # semi-axes of the cell body (µm)
    cell_b: np.ndarray
    nuc_a: np.ndarray  # semi-axes of the nucleus (µm)
    nuc_b: np.ndarray
    dapi: np.ndarray
    tex_amp: np.ndarray
    tex_ky: np.ndarray  # (n, _TEXTURE_WAVES) wave vectors (rad/µm) and phases of the chromatin texture
    tex_kx: np.ndarray
    tex_phase: np.ndarray
    membrane: np.ndarray

    def render(self, r0: int, r1: int, c0: int, c1: int, with_image: bool = True):
        """Render pixel rows ``r0:r1`` and columns ``c0:c1``.

        Returns
        -------
        ``labels`` of shape ``(r1 - r0, c1 - c0)`` (int32) and, if ``with_image``, the image ``(2, h, w)``
        (uint16) — else ``None``.
        """
        ps, (oy, ox), pad = self.pixel_size, self.origin, _PAD_PX
        rows, cols = np.arange(r0 - pad, r1 + pad), np.arange(c0 - pad, c1 + pad)
        ys, xs = oy + (rows + 0.5) * ps, ox + (cols + 0.5) * ps  # pixel centres (µm) of the padded chunk
        # 1. cells whose bounding box may touch the padded chunk
        reach = float(self.cell_a.max()) + ps
        centre = [(ys[0] + ys[-1]) / 2, (xs[0] + xs[-1]) / 2]
        half = max(ys[-1] - ys[0], xs[-1] - xs[0]) / 2
        ids = np.sort(np.asarray(self.tree.query_ball_point(centre, half + reach, p=np.inf), dtype=np.int64))
        labels = self._labels(ids, ys, xs)
        if not with_image:
            return labels[pad:-pad, pad:-pad], None
        dapi, nucleus = self._nuclei(ids, labels, ys, xs)
        # 4. channels: optics blur, cell boundaries, background, shot + read noise
        inside = labels > 0
        member = np.where(inside, self.membrane[labels - 1], 0.0)
        edge = np.zeros(labels.shape, bool)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[1:] |= labels[1:] != labels[:-1]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        mem = member * (edge & inside) + 0.18 * member * (1.0 - nucleus) * inside
        bg = _BACKGROUND * (1.0 + 0.3 * self.background.grid(ys, xs))
        channels = [
            ndimage.gaussian_filter(_DAPI_PEAK * dapi + 0.05 * _DAPI_PEAK * inside, 0.8) + bg,
            ndimage.gaussian_filter(_MEMBRANE_PEAK * mem, 1.0) + 0.8 * bg,
        ]
        core = (slice(pad, -pad), slice(pad, -pad))
        image = np.empty((len(channels), r1 - r0, c1 - c0), np.uint16)
        noise = _hash_normal(rows[core[0]], cols[core[1]], self.key) if self.noise > 0 else (0.0, 0.0)
        for k, (signal, z) in enumerate(zip(channels, noise, strict=True)):
            signal = signal[core]
            # shot (Poisson-like, variance ∝ signal) and read noise, summed into one Gaussian
            signal = signal + self.noise * np.sqrt(_SHOT_GAIN * signal + _READ_NOISE**2) * z
            image[k] = np.clip(np.rint(signal), 0, 65535)
        return labels[core], image

    def _frames(self, ids: np.ndarray, ys: np.ndarray, xs: np.ndarray, reach: np.ndarray):
        """Per cell: its id, the chunk slices of its box ``centre ± reach`` and pixel offsets ``(u, v)`` in
        its own frame (µm, u along the major axis)."""
        ps = self.pixel_size
        cy, cx, c, s = (v[ids].astype(np.float64) for v in (self.cy, self.cx, self.cos, self.sin))
        i0 = np.maximum(np.floor((cy - reach - ys[0]) / ps).astype(np.int64), 0)
        i1 = np.minimum(np.ceil((cy + reach - ys[0]) / ps).astype(np.int64) + 1, len(ys))
        j0 = np.maximum(np.floor((cx - reach - xs[0]) / ps).astype(np.int64), 0)
        j1 = np.minimum(np.ceil((cx + reach - xs[0]) / ps).astype(np.int64) + 1, len(xs))
        for k in np.flatnonzero((i0 < i1) & (j0 < j1)).tolist():
            sl = (slice(int(i0[k]), int(i1[k])), slice(int(j0[k]), int(j1[k])))
            dy, dx = ys[sl[0], None] - cy[k], xs[None, sl[1]] - cx[k]
            yield k, sl, dx * c[k] + dy * s[k], dy * c[k] - dx * s[k]

    def _labels(self, ids: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """2. Each pixel goes to the nearest centre (elliptic distance) among the cell bodies covering it."""
        best = np.full((len(ys), len(xs)), np.inf)
        labels = np.zeros((len(ys), len(xs)), np.int32)
        cell_a, cell_b = self.cell_a[ids].tolist(), self.cell_b[ids].tolist()
        for k, sl, u, v in self._frames(ids, ys, xs, self.cell_a[ids] + self.pixel_size):
            a, b = cell_a[k], cell_b[k]
            rho2 = (u / a) ** 2 + (v / b) ** 2
            dist = rho2 * (a * b)  # squared elliptic distance (µm²): monotone in the distance
            sub_best, sub_lab = best[sl], labels[sl]
            win = (rho2 < 1.0) & (dist < sub_best)
            sub_best[win] = dist[win]
            sub_lab[win] = ids[k] + 1
        return labels

    def _nuclei(self, ids: np.ndarray, labels: np.ndarray, ys: np.ndarray, xs: np.ndarray):
        """3. Nuclei: soft ellipses with a brighter rim and chromatin texture, clipped to their own cell.

        The texture is a sum of plane waves in *global* coordinates (deterministic per cell, any chunking).
        Returns the DAPI signal and the nuclear occupancy (0–1) of the padded chunk.
        """
        dapi, nucleus = np.zeros(labels.shape), np.zeros(labels.shape)
        a_all, b_all = self.nuc_a[ids].astype(np.float64), self.nuc_b[ids].astype(np.float64)
        # the soft edge is cut where it has decayed to ~3e-4 (8 edge widths): every pixel's value depends on
        # that pixel alone, never on the box, so chunks agree exactly
        cut = 1.0 + 8 * _EDGE_UM / np.sqrt(a_all * b_all)
        bright, amp = self.dapi[ids].tolist(), self.tex_amp[ids].tolist()
        norm = math.sqrt(2 / _TEXTURE_WAVES)
        for k, sl, u, v in self._frames(ids, ys, xs, a_all * cut + self.pixel_size):
            i, a, b = int(ids[k]), float(a_all[k]), float(b_all[k])
            rn2 = (u / a) ** 2 + (v / b) ** 2
            own = (labels[sl] == i + 1) & (rn2 < cut[k] ** 2)
            # soft edge: logistic in the (approximate) signed distance to the ellipse, width _EDGE_UM
            soft = 0.5 - 0.5 * np.tanh((np.sqrt(rn2) - 1.0) * (0.5 * math.sqrt(a * b) / _EDGE_UM))
            ay = self.tex_ky[i, :, None] * ys[None, sl[0]] + self.tex_phase[i, :, None]  # (waves, h)
            bx = self.tex_kx[i, :, None] * xs[None, sl[1]]  # (waves, w)
            tex = (np.cos(ay).T @ np.cos(bx) - np.sin(ay).T @ np.sin(bx)) * norm
            value = bright[k] * soft * np.maximum(1.0 + amp[k] * tex + 0.3 * np.minimum(rn2, 1.0), 0.05)
            dapi[sl] += np.where(own, value, 0.0)
            nucleus[sl] = np.where(own, soft, nucleus[sl])
        return dapi, nucleus


def _tokenize(parameters: dict, key: int) -> str:
    """A dask key for the rendered arrays: the same slide (parameters and seed) gives the same key."""
    from dask.base import tokenize

    return tokenize(sorted(parameters.items()), key)


def _labels_block(scene: _Scene, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return scene.render(r0, r1, c0, c1, with_image=False)[0]


def _image_block(scene: _Scene, block_info=None) -> np.ndarray:
    _, (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return scene.render(r0, r1, c0, c1, with_image=True)[1]


def _rasters(scene: _Scene, chunk_size: int, lazy: bool, token: str):
    """Labels ``(y, x)`` and image ``(c, y, x)``: dask graphs (lazy) or numpy arrays filled chunk by chunk."""
    ny, nx = scene.shape
    if lazy:
        import dask.array as da

        ychunks = da.core.normalize_chunks(chunk_size, (ny,))[0]
        xchunks = da.core.normalize_chunks(chunk_size, (nx,))[0]
        # `name` given: dask does not hash the scene (a million cells) to build the graph
        labels = da.map_blocks(
            _labels_block, scene=scene, chunks=(ychunks, xchunks), dtype=np.int32,
            meta=np.empty((0, 0), np.int32), name=f"spatia-simulate-labels-{token}",
        )  # fmt: skip
        image = da.map_blocks(
            _image_block, scene=scene, chunks=((len(CHANNELS),), ychunks, xchunks), dtype=np.uint16,
            meta=np.empty((0, 0, 0), np.uint16), name=f"spatia-simulate-image-{token}",
        )  # fmt: skip
        return labels, image
    labels = np.zeros((ny, nx), np.int32)
    image = np.zeros((len(CHANNELS), ny, nx), np.uint16)
    for r0 in range(0, ny, chunk_size):
        for c0 in range(0, nx, chunk_size):
            r1, c1 = min(r0 + chunk_size, ny), min(c0 + chunk_size, nx)
            labels[r0:r1, c0:c1], image[:, r0:r1, c0:c1] = scene.render(r0, r1, c0, c1)
    return labels, image


# ------------------------------------------------------------------------------------------------ public
def simulate(
    n_cells: int = 2000,
    *,
    n_genes: int = 40,
    n_cell_types: int = 5,
    n_domains: int = 3,
    pixel_size: float = 0.5,
    cell_spacing: float = 14.0,
    mean_depth: float = 150.0,
    noise: float = 1.0,
    condition_fraction: float = 0.5,
    transition_rate: float = 0.6,
    random_state: RandomState = 0,
    chunk_size: int = 1024,
    lazy: bool | None = None,
    units: FrameUnits = "um",
) -> SpatialData:
    """Simulate an imaging-based spatial transcriptomics slide (10x Xenium-like) with known ground truth.

    Cells sit on a jittered hexagonal lattice with holes, in smooth tissue domains that each have their own
    cell-type mixture. Every cell has a type, three latent programmes (size, elongation, texture), a niche
    signal (inducer cells nearby) and, on the disease side of the slide, possibly a transitioned state. These
    drive **both** its negative binomial counts and its rendered morphology: a DAPI channel (nuclei: soft
    ellipses with chromatin texture, a brighter rim, optical blur, shot and read noise) and a membrane channel
    (bright ring at the segmented cell boundary, dim cytoplasm), plus the cell segmentation.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Panel size. Each type gets ``round(0.08 * n_genes)`` markers (1–10, fewer if the panel is short);
        with ``n_genes >= 30`` there are 2 genes per programme and 3 niche-induced and 3 condition-response
        genes (else 1 each); the rest are housekeeping genes. At least ``n_cell_types + 6``.
    n_cell_types
        Number of cell types (at least 2: one is the niche inducer, another one transitions).
    n_domains
        Number of tissue domains.
    pixel_size
        Image resolution in µm per pixel (Xenium morphology images: ~0.2125; 0.5 keeps the demo small).
    cell_spacing
        Distance between neighbouring cell centres in µm (nuclear sizes are in absolute µm, so small spacings
        make nuclei clip each other).
    mean_depth
        Mean library size (counts per cell); per cell it is log-normal and grows with nuclear area.
    noise
        Scale of the pixel noise (shot + read noise); 0 renders noise-free images.
    condition_fraction
        Fraction of cells on the "disease" side of the slide.
    transition_rate
        Probability that a disease cell of the transitioning type is in the ``"transitioned"`` state.
    random_state
        Seed or :class:`numpy.random.Generator`; the same seed gives the same slide.
    chunk_size
        Chunk side in pixels of the image and labels (also the rendering block).
    lazy
        Build the image and labels as dask graphs rendered on demand (never the whole slide in memory).
        ``None``: lazy above 50,000 cells. Lazy and eager rendering give identical pixels.
    units
        ``"um"``: ``"global"`` in µm (described below). ``"px"``: the same slide as spatialdata-io's Xenium
        reader writes it: ``"global"`` is the image's pixel grid (image and labels Identity), the circles stay
        in µm with a µm → pixel transformation, ``obsm["spatial"]`` stays in µm.

    Returns
    -------
    :class:`spatialdata.SpatialData` with, all parsed by their spatialdata model:

    - ``images["morphology"]``: ``(c, y, x)`` uint16, channels ``["DAPI", "membrane"]``, mapped to the
      ``"global"`` coordinate system (µm) by ``Sequence([Scale([pixel_size] * 2), Translation([y0, x0])])``.
    - ``labels["cell_labels"]``: ``(y, x)`` int32 cell segmentation on the same grid and transformation;
      value = cell id (``1..n_cells``), 0 = background.
    - ``shapes["cell_circles"]``: circles in µm (identity to ``"global"``), index = cell id, ``radius``.
    - ``tables["table"]``: raw counts (CSR int32) annotating ``cell_labels`` (``region_key="region"``,
      ``instance_key="cell_id"``); ``obs_names`` = ``str(cell_id)``; ``obsm["spatial"]`` = centroids
      ``[x, y]`` in µm; ``var["role"]`` = ``"marker:<type>"``, ``"size_program"``, ``"elongation_program"``,
      ``"texture_program"``, ``"niche_induced:<inducer type>"``, ``"condition_response"`` or
      ``"housekeeping"``; ``uns["simulation"]``: parameters and ground truth (below).

    Ground truth in ``table.obs`` (also described in ``uns["simulation"]["columns"]``):

    ======================== ============================================================================
    column                   meaning
    ======================== ============================================================================
    ``cell_type``            ``"type_0"``, ``"type_1"``, ...: marker genes, type-specific expression and
                             morphology (nuclear size, elongation, DAPI brightness, texture grain,
                             cytoplasm size)
    ``domain``               ``"domain_0"``, ...: smooth tissue region with its own cell-type mixture: a
                             cell's type does not give its domain, its neighbourhood composition does
    ``condition``            ``"control"`` / ``"disease"``: one contiguous side of the slide
    ``state``                ``"normal"`` / ``"transitioned"``: in disease, a ``transition_rate`` fraction
                             of the ``transition_type`` cells: response genes up, half its markers down,
                             nuclei larger, more elongated, brighter and coarser
    ``size_program``         latent ≈N(0, 1) (type mean + cell noise, shifted if transitioned); drives the
                             nuclear radius ``3 µm · exp(0.22 z)``, library size and its genes
    ``elongation_program``   latent; drives the nuclear axis ratio and its genes
    ``texture_program``      latent; drives the chromatin texture amplitude and its genes
    ``niche_signal``         number of ``inducer_type`` cells within 30 µm; the ``niche_induced`` genes rise
                             with it (saturating) in every cell not of the inducer type
    ``nucleus_area_um2``     area of the nuclear ellipse (µm², before clipping by neighbours)
    ``nucleus_eccentricity`` eccentricity of the nuclear ellipse; ``nucleus_orientation``: its angle
    ``cell_radius_um``       equivalent radius of the cell-body ellipse (radius of ``cell_circles``)
    ``dapi_intensity``       relative nuclear brightness
    ======================== ============================================================================

    ``uns["simulation"]`` holds the parameters, ``random_state``, ``pixel_size``, ``channels``,
    ``transition_type``, ``inducer_type``, ``niche_genes`` (gene → inducer type), ``niche_radius_um``,
    ``markers`` (type → genes), ``program_genes``, ``response_genes``, ``suppressed_markers`` and
    ``columns`` (a description of every ground-truth column).

    Pixel ``(i, j)`` covers ``[i, i + 1) × [j, j + 1)`` in intrinsic coordinates, so its centre lies at
    ``y0 + (i + 0.5) · pixel_size`` µm. The pixel noise is a hash of the global pixel position, so the image
    does not depend on ``chunk_size`` or on ``lazy``.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.simulate(1000, random_state=0)
    >>> sdata["table"].obs[["cell_type", "domain", "size_program"]].head()
    """
    _check(n_cells, n_genes, n_cell_types, n_domains, pixel_size, cell_spacing, mean_depth, noise, chunk_size,
           condition_fraction=condition_fraction, transition_rate=transition_rate)  # fmt: skip
    n_cells = int(n_cells)
    lazy = n_cells > LAZY_ABOVE if lazy is None else bool(lazy)
    start = time.perf_counter()
    rng = get_rng(random_state)
    # 1. tissue: positions, domains, types, condition, state, niche
    tissue = _tissue(n_cells, n_cell_types, n_domains, cell_spacing, condition_fraction, transition_rate, rng)
    # 2. cells: latent programmes, then morphology from them
    obs, shape = _cells(tissue, cell_spacing, rng)
    # 3. expression
    var = _gene_panel(n_genes, tissue.types, tissue.types[tissue.inducer], rng)
    area_factor = obs["nucleus_area_um2"].to_numpy() ** 0.3
    depth = mean_depth * np.exp(rng.normal(-0.08, 0.4, n_cells)) * area_factor / area_factor.mean()
    counts, lost = _expression(
        var, tissue.types, obs, tissue.types[tissue.inducer], tissue.types[tissue.transition], depth, rng
    )
    # 4. pixels
    parameters = {
        "n_cells": n_cells, "n_genes": n_genes, "n_cell_types": n_cell_types, "n_domains": n_domains,
        "pixel_size": float(pixel_size), "cell_spacing": float(cell_spacing), "mean_depth": float(mean_depth),
        "noise": float(noise), "condition_fraction": float(condition_fraction),
        "transition_rate": float(transition_rate), "chunk_size": chunk_size, "lazy": lazy,
    }  # fmt: skip
    scene = _make_scene(tissue, shape, pixel_size, noise, rng)
    labels, image = _rasters(scene, chunk_size, lazy, token=_tokenize(parameters, scene.key))
    # 5. elements
    seed = int(random_state) if isinstance(random_state, int | np.integer) else type(random_state).__name__
    uns = _ground_truth(tissue, var, lost, parameters, seed)
    sdata = _elements(tissue, obs, var, counts, uns, labels, image, pixel_size, None if lazy else chunk_size)
    if check_units(units) == "px":
        to_pixel_frame(sdata, IMAGE_KEY)
    logger.info(
        "Simulated %d cells x %d genes, image %d x %d px (%s) in %.2fs",
        n_cells, n_genes, *scene.shape, "lazy" if lazy else "eager", time.perf_counter() - start,
    )  # fmt: skip
    return sdata


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


def _cells(tissue: _Tissue, spacing: float, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """Latent programmes and the morphology they drive; returns ``obs`` and the rendering parameters."""
    t, moved, n, n_types = tissue.type_idx, tissue.moved, len(tissue.type_idx), len(tissue.types)
    obs = pd.DataFrame(index=pd.Index(np.arange(1, n + 1).astype(str)))
    obs[INSTANCE_KEY] = np.arange(1, n + 1, dtype=np.int64)
    obs[REGION_KEY] = pd.Categorical.from_codes(np.zeros(n, np.int8), categories=[LABELS_KEY])
    obs["cell_type"] = pd.Categorical.from_codes(t, categories=tissue.types)
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
    return obs, shape


def _make_scene(tissue: _Tissue, shape: dict, pixel_size: float, noise: float, rng) -> _Scene:
    """The pixel grid covering all cells plus a margin, and the per-cell rendering parameters (float32)."""
    yx, origin = tissue.yx, tissue.origin
    ny, nx = np.ceil((yx.max(0) + _MARGIN_UM - origin) / pixel_size).astype(int)
    cells = {key: np.asarray(value, np.float32) for key, value in shape.items()}
    return _Scene(
        shape=(int(ny), int(nx)), origin=(float(origin[0]), float(origin[1])), pixel_size=float(pixel_size),
        noise=float(noise), key=int(rng.integers(0, 2**62)), background=_Waves.draw(rng, length_scale=150.0),
        tree=cKDTree(yx), cy=yx[:, 0].astype(np.float32), cx=yx[:, 1].astype(np.float32), **cells,
    )  # fmt: skip


def _ground_truth(tissue: _Tissue, var: pd.DataFrame, lost: list[str], parameters: dict, seed) -> dict:
    """``uns["simulation"]``: parameters and every ground truth that is not a per-cell column."""
    role, types = var["role"].astype(str), tissue.types
    inducer = types[tissue.inducer]
    return {
        "parameters": parameters,
        "random_state": seed,
        "pixel_size": parameters["pixel_size"],
        "origin_yx_um": [float(o) for o in tissue.origin],
        "channels": list(CHANNELS),
        "image_key": IMAGE_KEY,
        "labels_key": LABELS_KEY,
        "shapes_key": SHAPES_KEY,
        "cell_types": list(types),
        "transition_type": types[tissue.transition],
        "inducer_type": inducer,
        "niche_radius_um": NICHE_RADIUS_UM,
        "niche_genes": dict.fromkeys(role.index[role == f"niche_induced:{inducer}"], inducer),
        "markers": {t: role.index[role == f"marker:{t}"].tolist() for t in types},
        "program_genes": {p: role.index[role == p].tolist() for p in _PROGRAMS},
        "response_genes": role.index[role == "condition_response"].tolist(),
        "suppressed_markers": lost,
        "domain_mixture": {
            f"domain_{d}": dict(zip(types, row.round(4).tolist(), strict=True))
            for d, row in enumerate(tissue.mixture)
        },
        "columns": dict(COLUMNS),
    }


def _elements(tissue, obs, var, counts, uns, labels, image, pixel_size, chunk_size):
    """Parse every element with its spatialdata model and assemble the SpatialData object."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    axes = ("y", "x")
    to_global = {
        Defaults.COORDINATE_SYSTEM: Sequence(
            [Scale([pixel_size, pixel_size], axes=axes), Translation(list(tissue.origin), axes=axes)]
        )
    }
    chunks = None if chunk_size is None else (len(CHANNELS), chunk_size, chunk_size)
    image = Image2DModel.parse(
        image, dims=("c", "y", "x"), c_coords=list(CHANNELS), transformations=to_global, chunks=chunks
    )
    labels = Labels2DModel.parse(labels, dims=axes, transformations=to_global, chunks=chunk_size)
    xy = tissue.yx[:, ::-1].copy()
    circles = ShapesModel.parse(
        xy, geometry=0, radius=obs["cell_radius_um"].to_numpy(), index=pd.Index(obs[INSTANCE_KEY].to_numpy()),
        transformations={Defaults.COORDINATE_SYSTEM: Identity()},
    )  # fmt: skip
    adata = ad.AnnData(X=counts, obs=obs, var=var[["role"]].copy(), obsm={Keys.SPATIAL: xy})
    adata.uns[Keys.SIM_UNS] = uns
    table = TableModel.parse(adata, region=LABELS_KEY, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(
        images={IMAGE_KEY: image}, labels={LABELS_KEY: labels}, shapes={SHAPES_KEY: circles},
        tables={Defaults.TABLE: table},
    )  # fmt: skip


def demo() -> SpatialData:
    """The small fixed slide used by the README and tutorials: ``simulate(1500, random_state=0)``.

    Returns
    -------
    :class:`spatialdata.SpatialData` as described in :func:`simulate` (1,500 cells, 40 genes, 5 types).

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.demo()
    """
    return simulate(1500, random_state=0)


def _check(n_cells, n_genes, n_cell_types, n_domains, pixel_size, cell_spacing, mean_depth, noise, chunk_size,
           **fractions):  # fmt: skip
    """Raise a ``ValueError`` naming the first invalid argument."""
    if int(n_cells) != n_cells or n_cells < 10:
        raise ValueError(f"n_cells must be an integer >= 10, got {n_cells!r}.")
    if n_cell_types < 2:
        raise ValueError(f"n_cell_types must be >= 2 (an inducer, a transitioning type), not {n_cell_types}.")
    n_min = n_cell_types + 6  # a marker per type, a gene per programme, niche, response, housekeeping
    if n_genes < n_min:
        raise ValueError(
            f"n_genes={n_genes} is too small for {n_cell_types} cell types: pass n_genes >= {n_min} "
            "(markers, programme, niche and response genes and at least one housekeeping gene)."
        )
    if n_domains < 1:
        raise ValueError(f"n_domains must be >= 1, got {n_domains}.")
    positive = {"pixel_size": pixel_size, "cell_spacing": cell_spacing, "mean_depth": mean_depth}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}.")
    if chunk_size < 32:
        raise ValueError(f"chunk_size must be >= 32 pixels, got {chunk_size}.")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")


def simulate_with_reference(
    n_cells: int = 2000,
    *,
    n_genes: int = 60,
    panel_fraction: float = 0.6,
    mean_depth: float = 40.0,
    reference_depth: float = 200.0,
    random_state: RandomState = 0,
    **kwargs,
) -> tuple[SpatialData, AnnData]:
    """A spatial slide with a targeted panel plus a deeper, whole-transcriptome "scRNA-seq" reference.

    One tissue is simulated with ``n_genes`` genes at ``reference_depth``; its cells are split by position:
    the left half stays spatial (its counts thinned to ``mean_depth`` and restricted to a random
    ``panel_fraction`` of the genes, as a Xenium/CosMx panel would be), the right half becomes the
    dissociated reference (all genes, full depth, no image). The genes left out of the panel are the
    ground truth for imputation from the reference: the spatial cells' true counts of them are kept in
    ``uns["simulation"]["held_out_counts"]`` (cells × held-out genes, same depth as the panel).

    Parameters
    ----------
    n_cells
        Cells of the whole tissue (about half end up in each part).
    n_genes
        Genes of the reference (the panel has ``panel_fraction`` of them).
    panel_fraction
        Fraction of genes measured by the spatial panel (the type markers are kept in proportion).
    mean_depth, reference_depth
        Mean counts per cell of the spatial cells (over the panel) and of the reference cells (all genes).
    random_state
        Seed.
    **kwargs
        More :func:`simulate` arguments.

    Returns
    -------
    ``(sdata, reference)``: the SpatialData (its table annotates only the spatial cells; var has the
    panel genes and ``uns["simulation"]["held_out_genes"]`` lists the others) and the reference
    :class:`~anndata.AnnData` (raw counts, ``obs["cell_type"]`` and the other ground truth columns).

    Examples
    --------
    >>> sdata, reference = sp.datasets.simulate_with_reference(2000, random_state=0)
    >>> sp.tl.impute(sdata, model, reference=reference)
    """
    if not 0 < panel_fraction < 1:
        raise ValueError(f"panel_fraction must be in (0, 1), got {panel_fraction}.")
    if reference_depth < mean_depth:
        raise ValueError("reference_depth must be at least mean_depth (the spatial counts are thinned from it).")
    rng = get_rng(random_state)
    sdata = simulate(n_cells, n_genes=n_genes, mean_depth=reference_depth, random_state=rng, **kwargs)
    table = sdata.tables["table"]
    x = np.asarray(table.obsm["spatial"])[:, 0]
    is_ref = x > np.median(x)
    n_panel = max(2, int(round(panel_fraction * table.n_vars)))
    panel = np.sort(rng.choice(table.n_vars, n_panel, replace=False))
    held = np.setdiff1d(np.arange(table.n_vars), panel)
    counts = sparse.csr_matrix(table.X)
    # thin the spatial cells to the panel's depth (binomial thinning keeps the NB structure)
    sp_counts = counts[~is_ref].astype(np.int64)
    share = counts[~is_ref][:, panel].sum() / max(counts[~is_ref].sum(), 1)
    keep_p = min(1.0, mean_depth / (reference_depth * share))
    sp_counts.data = rng.binomial(sp_counts.data, keep_p)
    sp_counts.eliminate_zeros()
    import anndata as ad

    reference = ad.AnnData(X=counts[is_ref].astype(np.float32), obs=table.obs[is_ref].copy(), var=table.var.copy())
    reference.obs = reference.obs.drop(columns=[c for c in ("region", "cell_id") if c in reference.obs], errors="ignore")
    query = table[~is_ref, panel].copy()
    query.X = sp_counts[:, panel].astype(np.float32)
    empty = np.asarray(query.X.sum(1)).ravel() == 0
    if empty.any():  # an empty cell gets one count of its most abundant panel gene before thinning
        top = counts[~is_ref][empty][:, panel].toarray().argmax(1)
        q = query.X.tolil()
        q[np.flatnonzero(empty), top] = 1
        query.X = q.tocsr()
    sim = dict(query.uns[Keys.SIM_UNS])
    sim["held_out_genes"] = table.var_names[held].tolist()
    sim["held_out_counts"] = sp_counts[:, held].toarray().astype(np.int32)
    sim["reference_depth"] = float(reference_depth)
    sim["mean_depth"] = float(mean_depth)
    query.uns[Keys.SIM_UNS] = sim
    del sdata.tables["table"]
    sdata.tables["table"] = query
    return sdata, reference
