"""Write the results of the ``tl`` functions into the zarr store a SpatialData was read from, key by key."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from .._constants import Keys
from .._fs import written_beside
from .._logging import quiet_dependencies
from .._utils import release_mapped
from ..pp._elements import get_table

logger = logging.getLogger("spatia")

WRITE_WORKERS = 2  # blocks computed and written at once: each holds its block (~64 MB) and its temporaries
_TMP = ".spatia-tmp-"  # a key being written: <parent>/.spatia-tmp-<id>, renamed into place once complete


def write_results(sdata, *, table_key: str = "table", path: str | Path | None = None,
                  functions: list[str] | None = None) -> list[str]:
    """Write spatia's results into the SpatialData's zarr store, without rewriting the slide.

    On a large slide, ``sdata.write`` rewrites every image and the counts, and spatialdata refuses
    ``sdata.write_element("table", overwrite=True)`` on the store the table was read from. This writes only
    what the ``tl`` functions added, as recorded in ``table.uns["spatia"][function]["keys"]``:

    - ``obsm``, ``layers`` and ``obsp`` entries, each as its own array in the table's group;
    - the table's ``obs`` (when a function added columns to it) and ``uns["spatia"]``;
    - new elements (an imputed table, generated images) with :meth:`~spatialdata.SpatialData.write_element`.
      An element already in the store is left as it is, with a warning (spatialdata cannot overwrite an element
      in the store it reads from).

    Each key is written beside its place and then renamed into it: an interrupted write
    leaves the store as it was for that key, never half-written. Call it after each step (``fit``,
    ``cluster``, ...) to keep the results of a long session on disk as they come.

    Parameters
    ----------
    sdata
        A SpatialData read from (or written to) a local zarr store.
    table_key
        The table the results are in.
    path
        The zarr store; default ``sdata.path``. It must already hold the table (``sdata.write(path)`` first).
    functions
        Write only the results of these functions (``["impute"]``); default: of every function recorded.

    Returns
    -------
    The result paths written (``"obsm/X_spatia_cell"``, ...).

    Examples
    --------
    >>> sdata = sd.read_zarr("slide.zarr")
    >>> model = sp.tl.fit(sdata, image_key="morphology_focus")
    >>> sp.tl.write_results(sdata)  # the embeddings go into slide.zarr/tables/table/obsm
    """
    return _write(sdata, table_key, path, functions)


def _write(sdata, table_key: str, path: str | Path | None, functions: list[str] | None,
           with_elements: bool = True) -> list[str]:
    """:func:`write_results`; ``with_elements=False`` leaves new elements (tables, images) out."""
    import anndata
    import zarr

    table = get_table(sdata, table_key)
    store = Path(path) if path is not None else (Path(sdata.path) if getattr(sdata, "path", None) else None)
    if store is None:
        raise ValueError("This SpatialData has no zarr store: write it once with sdata.write('slide.zarr'), or "
                         "pass path=.")
    group_dir = _table_dir(store, table_key)
    runs = table.uns.get(Keys.UNS, {})
    paths = sorted({p for f, run in runs.items() if isinstance(run, Mapping) and (functions is None or f in functions)
                    for p in _keys(run)})
    elements = [p for p in paths if p.partition("/")[0] in ("tables", "images", "labels", "shapes", "points")
                and p.partition("/")[2] in sdata and with_elements]
    if elements and Path(sdata.path or "") != store:
        raise ValueError(f"Writing the elements {elements} needs path to be the store sdata was read from "
                         f"({sdata.path}): pass no path, or write them with sdata.write_element.")
    group = zarr.open_group(str(group_dir), mode="r+")
    _check_same_cells(group, table, group_dir)
    fmt = group.metadata.zarr_format
    written: list[str] = []
    with anndata.settings.override(zarr_write_format=fmt), quiet_dependencies():
        for attr in ("obsm", "layers", "obsp"):
            for p in paths:
                a, _, key = p.partition("/")
                if a == attr and key in getattr(table, attr):
                    value = getattr(table, attr)[key]
                    if getattr(value, "name", None) != _backed_name(group_dir, attr, key):  # else: already there
                        _write_key(group, attr, key, value)
                    written.append(p)
        obs = [p for p in paths if p.startswith("obs/") and p.split("/", 1)[1] in table.obs]
        if obs:
            _write_key(group, None, "obs", table.obs)
            written += obs
        if Keys.UNS in table.uns:
            _write_key(group, "uns", Keys.UNS, dict(table.uns[Keys.UNS]))
            written.append(f"uns/{Keys.UNS}")
        for p in elements:
            kind, _, name = p.partition("/")
            if (store / kind / name).exists():
                logger.warning("%s is already in %s and was left as it is (spatialdata cannot overwrite an element "
                               "in the store it reads from): delete it there first to write the new one.", p, store)
                continue
            sdata.write_element(name)
            written.append(p)
    if Path(sdata.path or "") == store:
        with quiet_dependencies():
            sdata.write_consolidated_metadata()
    logger.info("Wrote %d result(s) to %s: %s", len(written), store, ", ".join(written))
    return written


def _table_dir(store: Path, table_key: str) -> Path:
    group_dir = store / "tables" / table_key
    if not group_dir.is_dir():
        raise FileNotFoundError(f"{store} holds no table {table_key!r} (no folder {group_dir}): write the whole "
                                f"object once with sdata.write(path), then write_results after each step.")
    return group_dir


def _backed_name(group_dir: Path, attr: str, key: str) -> str:
    """The dask name of an array read from ``<group_dir>/<attr>/<key>`` by :func:`write_backed`."""
    return f"spatia-backed-{Path(group_dir).resolve() / attr / key}"


def backed_table_dir(sdata, table_key: str, *, inplace: bool = True, elements: list[str] = ()) -> Path | None:
    """The folder of ``table_key`` in the zarr store ``sdata`` was read from, for a ``backed=True`` run: checked
    before any work to hold the same cells, with none of the new ``elements`` (``"tables/<name>"``) already
    there (spatialdata cannot overwrite them). ``None`` under DDP on ranks other than 0, which keep their
    results in memory. Errors say what to do."""
    import zarr

    from ..pp._elements import _is_sdata
    from ._fit import _is_rank_zero

    if not inplace:
        raise ValueError("backed=True writes into the slide's store: it needs inplace=True.")
    if not _is_sdata(sdata) or not getattr(sdata, "path", None):
        raise ValueError("backed=True writes into the zarr store the SpatialData was read from, and this one has "
                         "none: write it once with sdata.write('slide.zarr') and read it back with "
                         "sd.read_zarr, or pass backed=False.")
    store = Path(sdata.path)
    group_dir = _table_dir(store, table_key)
    _check_same_cells(zarr.open_group(str(group_dir), mode="r"), get_table(sdata, table_key), group_dir)
    there = [p for p in elements if (store / p).exists()]
    if there:
        raise FileExistsError(f"{', '.join(there)} is already in {store}, and spatialdata cannot overwrite an element "
                              "in the store it reads from: delete it there first, or pass another key_added.")
    return group_dir if _is_rank_zero() else None


def write_backed(group_dir: Path, attr: str, key: str, value):
    """Write the (dask) array ``value`` as ``<attr>/<key>`` of the anndata zarr group ``group_dir``, block by
    block, beside its place and then renamed in; return a dask array that reads it from there."""
    import anndata
    import dask
    import dask.array as da
    import zarr

    group = zarr.open_group(str(group_dir), mode="r+")
    with (anndata.settings.override(zarr_write_format=group.metadata.zarr_format), quiet_dependencies(),
          dask.config.set(scheduler="threads", num_workers=WRITE_WORKERS)):
        _write_key(group, attr, key, value)
    arr = zarr.open_array(str(group_dir / attr / key), mode="r")
    return da.from_zarr(arr, name=_backed_name(group_dir, attr, key))


@contextlib.contextmanager
def spill_arrays(group_dir: Path | None):
    """``None`` without a store; with one, a function ``(name, shape) -> float32 memmap`` of zeroed arrays in a
    hidden folder beside the store (the same disk), removed on exit whatever happens."""
    if group_dir is None:
        yield None
        return
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix=".spatia-spill-", dir=Path(group_dir).parents[2]))
    try:
        yield lambda name, shape: np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=np.float32,
                                                             shape=shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def lazy_rows(block, n: int, n_cols: int, *, block_bytes: int = 64 << 20, source=None):
    """A ``(n, n_cols)`` float32 dask array whose blocks of rows ``block(a, b)`` computes when they are read
    (each about ``block_bytes``). ``source``: a memmap the blocks read, whose pages are dropped from the process
    after each block (else reading it through would leave all of it resident)."""
    import dask.array as da
    import numpy as np

    step = max(1, min(max(n, 1), block_bytes // max(4 * n_cols, 1)))
    starts = da.arange(0, n, step, chunks=1)

    def one(start):
        if not len(start):
            return np.zeros((0, n_cols), dtype=np.float32)
        a = int(start[0])
        out = block(a, min(a + step, n))
        if source is not None:
            release_mapped(source)
        return out

    chunks = (tuple(min(step, n - a) for a in range(0, n, step)) or (0,), (n_cols,))
    # named: dask would otherwise hash the function to name the array, pickling whatever it holds (the memmap)
    return da.map_blocks(one, starts, new_axis=1, chunks=chunks, dtype=np.float32,
                         meta=np.empty((0, 0), dtype=np.float32), name=f"spatia-rows-{uuid.uuid4().hex}")


def _check_same_cells(group, table, group_dir: Path) -> None:
    """The stored table must hold the same cells in the same order: per-cell results written next to another
    table's counts would misalign them."""
    import numpy as np

    obs = group["obs"]
    stored = np.asarray(obs[obs.attrs.get("_index", "_index")][:]).astype(object)  # zarr v3: numpy StringDType
    if len(stored) != table.n_obs or not np.array_equal(stored, table.obs_names.to_numpy().astype(object)):
        raise ValueError(f"The table in {group_dir} holds {len(stored):,} cells, not the {table.n_obs:,} cells of "
                         "this table in the same order (was it subset or reordered after reading?). Write it to a "
                         "new store with sdata.write(path) instead.")


def _keys(run: Mapping) -> list[str]:
    keys = run.get("keys", [])
    return [str(k) for k in (keys.tolist() if hasattr(keys, "tolist") else keys)]


def _write_key(group, attr: str | None, key: str, value) -> None:
    """Write ``value`` as ``<attr>/<key>`` of the anndata zarr ``group``: beside it first, then renamed in."""
    import anndata
    import zarr

    parent = group if attr is None else (group[attr] if attr in group else group.create_group(attr))
    parent_dir = Path(str(group.store.root)) / (group.path or "") / (attr or "")
    with written_beside(parent_dir / key, what=f"{attr + '/' if attr else ''}{key}",
                        tmp_name=f"{_TMP}{uuid.uuid4().hex[:12]}") as tmp:
        anndata.io.write_elem(parent, tmp.name, value)
    zarr.open_group(str(parent_dir), mode="r")  # the group still opens (fails loudly on a broken layout)
