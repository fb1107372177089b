"""A simulated imaging-based spatial transcriptomics slide (Xenium-like) with known ground truth.

The generator works in three steps, each in its own module:

1. **Tissue** (``_simulate_tissue``). Cell centres on a jittered hexagonal lattice with irregular holes;
   smooth tissue domains (a warped Voronoi partition); cell types drawn from a domain-specific mixture; a
   "disease" side of the slide where a fraction of one cell type transitions to another state.
2. **Cells** (``_simulate_morphology``, ``_simulate_expression``). Three latent programmes per cell (size,
   elongation, texture) drive both the morphology (nuclear radius, axis ratio, chromatin texture) and a few
   genes; cell types differ in marker genes and in morphology, optional morphology-only types share another
   type's expression; niche genes respond to inducer cells among the neighbours; counts are negative binomial.
3. **Pixels** (``_simulate_render``). The DAPI and membrane channels and the segmentation are rendered chunk
   by chunk, each pixel a deterministic function of its global position (any chunking gives the same image).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Defaults, Keys
from .._utils import RandomState, get_rng
from ._frames import FrameUnits, check_units, to_pixel_frame
from ._simulate_expression import _expression, _gene_panel
from ._simulate_morphology import _DRIVES, _PROGRAMS, _add_twins, _cells, _twin_truth
from ._simulate_render import CHANNELS, _make_scene, _rasters, _tokenize
from ._simulate_tissue import NICHE_RADIUS_UM, _tissue

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

IMAGE_KEY = "morphology"
LABELS_KEY = "cell_labels"
SHAPES_KEY = "cell_circles"
REGION_KEY = "region"
INSTANCE_KEY = "cell_id"
LAZY_ABOVE = 50_000  # cells; above this the image and labels are dask graphs by default

COLUMNS = {
    "cell_id": "Cell id: the cell's value in labels['cell_labels'] and the index of shapes['cell_circles'].",
    "region": "Element annotated by the table (always 'cell_labels').",
    "cell_type": "Ground-truth cell type (marker genes and nuclear morphology; see morphology_twins).",
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
    morphology_types: int = 0,
    morphology_strength: float = 1.0,
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
    morphology_types
        Number of **morphology-only** cell types (at most ``n_cell_types - 2``), added to the
        ``n_cell_types``. Each is the "twin" of one of the most frequent types that are neither the inducer
        nor the transitioning type: half of that parent's cells, chosen at random, become the twin. A twin has
        exactly its parent's expression (markers, programme means, library size), location and niche role;
        only its nuclei differ: size, elongation, chromatin grain and contrast, each scaled by
        ``exp(±morphology_strength · (0.25, 0.7, 0.5, 0.3))`` with signs drawn per twin. Expression alone cannot
        tell a twin from its parent; the image can. ``0`` (the default) gives exactly the slide of the same
        seed without the option, pixel for pixel and count for count.
    morphology_strength
        Scale of the twins' morphological differences (log-multipliers above; ``0`` makes them identical).
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
                             cytoplasm size); the last ``morphology_types`` types are morphology-only
                             twins of earlier ones (``uns["simulation"]["morphology_twins"]``)
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
    ``markers`` (type → genes; a twin has its parent's), ``program_genes``, ``response_genes``,
    ``suppressed_markers``, ``columns`` (a description of every ground-truth column) and the morphology
    ground truth:

    - ``morphology_drivers``: image feature → ``{"program", "genes", "effect"}``, the gene programmes that
      drive morphology: ``size_program`` → ``nucleus_area_um2``, ``elongation_program`` →
      ``nucleus_eccentricity``, ``texture_program`` → ``chromatin_texture`` (texture amplitude). Their genes
      rise with the programme, so image → expression can be checked on them;
    - ``morphology_twins``: twin type → parent type (the type whose expression it has); empty by default;
    - ``morphology_only_types``: the types that only morphology tells apart (every twin and its parent);
    - ``morphology_effects``: twin → multipliers of ``nucleus_radius``, ``axis_ratio_excess`` (axis ratio −
      1), ``texture_grain`` (spatial frequency) and ``texture_amplitude`` relative to its parent.

    Pixel ``(i, j)`` covers ``[i, i + 1) × [j, j + 1)`` in intrinsic coordinates, so its centre lies at
    ``y0 + (i + 0.5) · pixel_size`` µm. The pixel noise is a hash of the global pixel position, so the image
    does not depend on ``chunk_size`` or on ``lazy``.

    Examples
    --------
    >>> import spatia as sp
    >>> sdata = sp.datasets.simulate(1000, random_state=0)
    >>> sdata["table"].obs[["cell_type", "domain", "size_program"]].head()
    >>> twins = sp.datasets.simulate(2000, morphology_types=1)  # one type only the image tells apart
    >>> twins["table"].uns["simulation"]["morphology_twins"]  # e.g. {'type_5': 'type_2'}
    """
    _check(n_cells, n_genes, n_cell_types, n_domains, pixel_size, cell_spacing, mean_depth, noise, chunk_size,
           morphology_types, morphology_strength, condition_fraction=condition_fraction,
           transition_rate=transition_rate)  # fmt: skip
    n_cells = int(n_cells)
    lazy = n_cells > LAZY_ABOVE if lazy is None else bool(lazy)
    start = time.perf_counter()
    rng = get_rng(random_state)
    # 1. tissue: positions, domains, types, condition, state, niche
    tissue = _tissue(n_cells, n_cell_types, n_domains, cell_spacing, condition_fraction, transition_rate, rng)
    if morphology_types:  # a spawned stream: the draws of the slide without twins stay the same
        tissue = _add_twins(tissue, int(morphology_types), float(morphology_strength), rng.spawn(1)[0])
    # 2. cells: latent programmes, then morphology from them
    obs, shape, program_area = _cells(tissue, cell_spacing, rng)
    obs.insert(0, INSTANCE_KEY, np.arange(1, n_cells + 1, dtype=np.int64))
    obs.insert(1, REGION_KEY, pd.Categorical.from_codes(np.zeros(n_cells, np.int8), categories=[LABELS_KEY]))
    # 3. expression (a twin's is its parent's, library size included)
    types, inducer = tissue.base_types, tissue.types[tissue.inducer]
    var = _gene_panel(n_genes, types, inducer, rng)
    area_factor = program_area**0.3
    depth = mean_depth * np.exp(rng.normal(-0.08, 0.4, n_cells)) * area_factor / area_factor.mean()
    counts, lost = _expression(
        var, types, tissue.expr_idx, obs, inducer, tissue.types[tissue.transition], depth, rng
    )
    # 4. pixels
    parameters = {
        "n_cells": n_cells, "n_genes": n_genes, "n_cell_types": n_cell_types, "n_domains": n_domains,
        "pixel_size": float(pixel_size), "cell_spacing": float(cell_spacing), "mean_depth": float(mean_depth),
        "noise": float(noise), "condition_fraction": float(condition_fraction),
        "transition_rate": float(transition_rate), "morphology_types": int(morphology_types),
        "morphology_strength": float(morphology_strength), "chunk_size": chunk_size, "lazy": lazy,
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


def _ground_truth(tissue, var: pd.DataFrame, lost: list[str], parameters: dict, seed) -> dict:
    """``uns["simulation"]``: parameters and every ground truth that is not a per-cell column."""
    role, types = var["role"].astype(str), tissue.types
    inducer = types[tissue.inducer]
    twins = _twin_truth(tissue)
    parent = {t: t for t in tissue.base_types} | twins["morphology_twins"]  # whose markers each type has
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
        "markers": {t: role.index[role == f"marker:{parent[t]}"].tolist() for t in types},
        "program_genes": {p: role.index[role == p].tolist() for p in _PROGRAMS},
        "morphology_drivers": {
            feature: {"program": p, "genes": role.index[role == p].tolist(), "effect": effect}
            for p, (feature, effect) in _DRIVES.items()
        },
        **twins,
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
           morphology_types, morphology_strength, **fractions):  # fmt: skip
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
    if int(morphology_types) != morphology_types or not 0 <= morphology_types <= n_cell_types - 2:
        raise ValueError(
            f"morphology_types must be an integer in [0, n_cell_types - 2] = [0, {n_cell_types - 2}] (each twins "
            f"a type that is neither the inducer nor the transitioning type), got {morphology_types!r}."
        )
    if not morphology_strength >= 0:
        raise ValueError(f"morphology_strength must be >= 0, got {morphology_strength}.")
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
    capture_sd: float = 0.0,
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
    capture_sd
        Platform effect: each panel gene is captured on the slide at its own efficiency relative to the
        reference, log-normal with this standard deviation (0: the same proportions on both; 0.5 spreads the
        efficiencies over about 0.4–2.7×, as imaging panels and droplet scRNA-seq differ). The mean depth is
        kept. The efficiencies are in ``uns["simulation"]["capture_efficiency"]`` (one per panel gene).
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
    if capture_sd < 0:
        raise ValueError(f"capture_sd must be >= 0, got {capture_sd}.")
    if reference_depth < mean_depth:
        raise ValueError(
            "reference_depth must be at least mean_depth (the spatial counts are thinned from it)."
        )
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
    # each gene's capture relative to the reference, scaled so that the panel's mean depth is kept
    efficiency = np.ones(table.n_vars)
    if capture_sd > 0:
        efficiency[panel] = np.exp(rng.normal(0.0, capture_sd, size=len(panel)))
        weight = np.asarray(counts[~is_ref][:, panel].sum(0)).ravel()
        efficiency[panel] /= (efficiency[panel] * weight).sum() / max(weight.sum(), 1)
    gene_p = np.minimum(1.0, keep_p * efficiency)
    sp_counts.data = rng.binomial(sp_counts.data, gene_p[sp_counts.indices])
    sp_counts.eliminate_zeros()
    import anndata as ad

    reference = ad.AnnData(
        X=counts[is_ref].astype(np.float32), obs=table.obs[is_ref].copy(), var=table.var.copy()
    )
    reference.obs = reference.obs.drop(
        columns=[c for c in ("region", "cell_id") if c in reference.obs], errors="ignore"
    )
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
    sim["capture_efficiency"] = efficiency[panel]
    query.uns[Keys.SIM_UNS] = sim
    del sdata.tables["table"]
    sdata.tables["table"] = query
    return sdata, reference
