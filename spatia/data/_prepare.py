"""From a SpatialData / AnnData to the arrays the model reads (crops, counts, niche graph, tiles)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp_sparse
from anndata import AnnData

from .._constants import Defaults, Keys
from .._utils import check_obs_names
from ..pp._crop_cache import cached_crops
from ..pp._crops import CropStore, crops_for
from ..pp._elements import _is_sdata, cell_geometry, get_image, get_table
from ..pp._expression import align_genes, get_counts
from ..pp._graphs import niche_members, obsm_um, tile_index
from ..pp._units import Units
from ._dataset import CellArrays

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Arrays plus what was learned about the input while preparing it."""

    arrays: CellArrays
    table: AnnData
    genes: list[str]
    missing_genes: list[str]
    channels: list[str]
    crop_params: dict
    coordinate_system: str | None
    units: Units
    #: what the crops were extracted with (``extract_crops`` keywords, the cells' geometry included); ``None``
    #: without an image (an AnnData, or the image branch off)
    crop_kwargs: dict | None = None


def prepare(*args, **kwargs) -> Prepared:
    """Validate the input and build :class:`CellArrays` (see :func:`_prepare`).

    Restores torch's thread count afterwards: a library under the crop / graph steps resets it, which made
    single-threaded runs on a shared CPU oversubscribe it. Hands the heap pages that crop extraction freed back
    to the system (about 190 MiB at a million cells).
    """
    import torch

    from .._utils import release_memory

    n_threads = torch.get_num_threads()
    try:
        return _prepare(*args, **kwargs)
    finally:
        torch.set_num_threads(n_threads)
        release_memory()


def _prepare(
    data,
    *,
    table_key: str | None = Defaults.TABLE,
    image_key: str | None = None,
    labels_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    layer: str | None = None,
    genes: list[str] | None = None,
    crops: CropStore | str | None = None,
    crop_kwargs: dict | None = None,
    use_image: bool = True,
    niche_k: int = Defaults.NICHE_K,
    niche_radius: float | None = None,
    tile_um: float = Defaults.TILE_UM,
    allow_empty: bool = False,
    spatial_key: str = Keys.SPATIAL,
    use_expression: bool = True,
    um_per_unit: float | None = None,
) -> Prepared:
    """Validate the input and build :class:`CellArrays` (nothing is written into ``data``).

    ``genes`` fixes the model's gene order (a trained model's panel): genes missing from the table are
    filled with zeros and reported in ``missing_genes``. ``use_expression=False`` (image-only prediction)
    does not read the table's counts at all: every cell gets an all-zero profile over ``genes``.

    Lengths (``niche_radius``, ``tile_um``, the crop window) are µm; cell positions are converted to µm
    through the coordinate system's µm-per-unit factor (``um_per_unit``, else found by
    :func:`~spatia.pp.resolve_units`), so a slide in pixels and the same slide in µm give the same arrays.
    """
    table = get_table(data, table_key)
    if table.n_obs == 0:
        raise ValueError("The table has no cells.")
    check_obs_names(table)
    missing: list[str] = []
    if not use_expression:
        if genes is None:
            raise ValueError("use_expression=False needs the model's genes.")
        counts = sp_sparse.csr_matrix((table.n_obs, len(genes)), dtype=np.float32)
    else:
        # the table's own CSR where it can be (integer counts too): batches are converted as they are read
        counts = get_counts(table, layer, allow_empty=allow_empty, keep_integers=True)
    if genes is not None and use_expression:
        idx, missing = align_genes(table.var_names, genes)
        if (idx < 0).all():
            raise ValueError(
                "None of the model's genes are in this table's var_names: is it the same panel (same gene "
                "naming, e.g. symbols vs Ensembl ids)?"
            )
        if missing:
            logger.warning("%d of the model's %d genes are not in the table (filled with zeros): %s%s",
                           len(missing), len(genes), missing[:10], "..." if len(missing) > 10 else "")
        counts = _reorder(counts, idx)
    else:
        genes = table.var_names.astype(str).tolist()

    # positions (µm) and crops
    cs = None
    store = None
    used_kwargs = None
    crop_params: dict = {}
    channels: list[str] = []
    if _is_sdata(data):
        shared = ()
        if use_image and crops is None:
            if image_key is not None and not isinstance(image_key, str):  # several images (e.g. CosMx FOVs)
                image_key = list(image_key)
                shared = tuple(data.images[get_image(data, k)[0]] for k in image_key)
            else:
                image_key, _ = get_image(data, image_key)
                shared = (data.images[image_key],)
        geo = cell_geometry(data, table, labels_key=labels_key, shapes_key=shapes_key,
                            coordinate_system=coordinate_system, spatial_key=spatial_key, shared_with=shared,
                            um_per_unit=um_per_unit)
        xy, cs, units = geo.xy_um, geo.coordinate_system, geo.units
        if use_image:
            kw = dict(crop_kwargs or {})
            kw.update(image_key=image_key, table_key=table_key, labels_key=labels_key, shapes_key=shapes_key,
                      coordinate_system=cs, geometry=geo, um_per_unit=units.um_per_unit)
            if crops is None:  # extracted once for the same cells, elements and window (sp.settings.cache_crops)
                store = cached_crops(data, table, kw, lambda: crops_for(data, None, **kw))
            else:
                store = crops_for(data, crops, **kw)
            crop_params, channels = store.params, list(store.channels)
            used_kwargs = kw
    else:
        if use_image and crops is None:
            raise ValueError("An AnnData has no image: pass a SpatialData, crops=, or disable the image branch.")
        xy, units = obsm_um(table, spatial_key, um_per_unit)
        if use_image:
            store = crops_for(data, crops, table_key=table_key)
            crop_params, channels = store.params, list(store.channels)
    if not np.isfinite(xy).all():
        raise ValueError("Some cell positions are NaN or infinite.")
    want = (crop_kwargs or {}).get("size")
    if store is not None and want is not None and store.size != want:
        raise ValueError(
            f"The crop store holds {store.size}-px crops but the model reads {want}-px crops "
            f"(config.image.size): extract crops with size={want}."
        )

    # niche members (niche_graph's graph, built chunk by chunk into the (n, k) table) and tissue tiles
    nbr = niche_members(xy, niche_k, niche_radius)
    tile = tile_index(xy, tile_um)
    arrays = CellArrays(counts=counts, crops=store, xy=xy.astype(np.float32), nbr=nbr, tile=np.asarray(tile))
    return Prepared(arrays, table, list(genes), missing, channels, crop_params, cs, units, used_kwargs)


def _reorder(counts: sp_sparse.csr_matrix, idx: np.ndarray) -> sp_sparse.csr_matrix:
    """Columns of ``counts`` in the order ``idx`` (-1 → an all-zero column); ``counts`` itself when that is
    already its order (no copy of a large slide's counts)."""
    n = counts.shape[0]
    if len(idx) == counts.shape[1] and np.array_equal(idx, np.arange(counts.shape[1])):
        return counts
    sel = np.where(idx >= 0, idx, 0)
    out = counts[:, sel].tocsc()
    if (idx < 0).any():
        keep = sp_sparse.diags((idx >= 0).astype(counts.dtype))  # integer counts stay integers
        out = out @ keep
    out = sp_sparse.csr_matrix(out)
    out.eliminate_zeros()
    assert out.shape == (n, len(idx))
    return out
