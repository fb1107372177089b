"""The result contract of the ``tl`` functions: where results go, how they are written, what ``inplace=False`` returns.

Every result has a *path*: ``"<attr>/<key>"`` inside the table (``obs``, ``obsm``, ``layers``, ``obsp``,
``uns/spatia/...``) or ``"<element type>/<name>"`` inside the SpatialData (``tables``, ``images``, ``labels``).

- :func:`check_free` refuses to replace an existing result unless ``overwrite=True`` (called before the work);
- :func:`write` writes each result with :func:`save_data` (one key, one log line) and merges the run
  parameters into ``table.uns["spatia"][function]`` (:func:`save_params`), never replacing ``uns["spatia"]``;
- :func:`returned` builds what ``inplace=False`` returns: ``{path: value, ..., "params": {...}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ._constants import Keys
from ._utils import log_added

PARAMS = "params"  # key of the run parameters in what inplace=False returns
_TABLE_ATTRS = ("obs", "obsm", "layers", "obsp", "uns")
_ELEMENTS = ("tables", "images", "labels", "shapes", "points")


def sanitize(obj: Any) -> Any:
    """Make run parameters writable by anndata (zarr / h5ad): no None, tuples → lists, numpy → python."""
    if isinstance(obj, Mapping):
        return {str(k): sanitize(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        vals = [sanitize(v) for v in obj if v is not None]
        return vals if vals else np.array([], dtype=str)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bool | int | float | str | np.ndarray):
        return obj
    return str(obj)


def _split(path: str) -> tuple[str, list[str]]:
    attr, _, rest = path.partition("/")
    if attr not in _TABLE_ATTRS + _ELEMENTS or not rest:
        raise ValueError(f"Unknown result path {path!r}: expected '<attr>/<key>' with attr in "
                         f"{_TABLE_ATTRS + _ELEMENTS}.")
    # uns paths nest (uns/spatia/transitions/<name>; a name may hold '/'), the others are one key
    return attr, (rest.split("/", 2) if attr == "uns" else [rest])


def _where(attr: str, keys: list[str]) -> str:
    return ("sdata." if attr in _ELEMENTS else "adata.") + attr + "".join(f"[{k!r}]" for k in keys)


def where(path: str) -> str:
    """``"obsm/X"`` → ``"adata.obsm['X']"``; ``"tables/t"`` → ``"sdata.tables['t']"`` (as the log line says)."""
    return _where(*_split(path))


def exists(data, table, path: str) -> bool:
    """Whether ``path`` holds a result already."""
    attr, keys = _split(path)
    if attr in _ELEMENTS:  # SpatialData element names are unique across element types
        from .pp._elements import _is_sdata

        return _is_sdata(data) and keys[0] in data
    node = getattr(table, attr)
    for k in keys:
        if not isinstance(node, Mapping | pd.DataFrame) or k not in node:
            return False
        node = node[k]
    return True


def check_free(data, table, paths: Iterable[str], *, overwrite: bool) -> None:
    """A ``KeyError`` naming ``overwrite=True`` if any of ``paths`` (``uns`` entries excepted) is taken."""
    if overwrite:
        return
    taken = [where(p) for p in paths if not p.startswith("uns/") and exists(data, table, p)]
    if taken:
        raise KeyError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: pass overwrite=True to "
                       "replace, or another key_added.")


def save_data(data, table, path: str, value: Any) -> None:
    """Write one result at ``path`` and log it (squidpy's ``_save_data``). ``uns`` entries are merged."""
    attr, keys = _split(path)
    if attr in _ELEMENTS:
        from .pp._elements import _is_sdata

        if not _is_sdata(data):
            raise TypeError(f"Writing {where(path)} needs a SpatialData: pass one, or inplace=False.")
        if keys[0] in data:
            del data[keys[0]]
        getattr(data, attr)[keys[0]] = value
    elif attr == "uns":
        node = table.uns
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    else:
        getattr(table, attr)[keys[0]] = value
    log_added(_where(attr, keys[:-1]), keys[-1])


def params_entry(function: str, params: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The run parameters as written to ``uns["spatia"][function]``: ``function``, ``keys`` (the paths written)
    and the parameters, sanitised."""
    return sanitize({"function": function, "keys": sorted(keys), **params})


def save_params(table, function: str, params: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Merge the run parameters into ``table.uns["spatia"][function]``; ``run`` numbers the writes of a table."""
    uns = table.uns.setdefault(Keys.UNS, {})
    runs = [int(v["run"]) for v in uns.values() if isinstance(v, Mapping) and "run" in v]
    uns[function] = {**params_entry(function, params, keys), "run": max(runs, default=0) + 1}
    log_added(f"adata.uns[{Keys.UNS!r}]", function)


def write(data, table, results: Mapping[str, Any], *, function: str, params: Mapping[str, Any],
          overwrite: bool) -> None:
    """Write every result (all checked first: nothing is half-written) and record the run parameters."""
    check_free(data, table, results, overwrite=overwrite)
    for path, value in results.items():
        save_data(data, table, path, value)
    save_params(table, function, params, results)


def returned(function: str, results: Mapping[str, Any], params: Mapping[str, Any], *,
             keys: Iterable[str] | None = None, **objects: Any) -> dict:
    """What ``inplace=False`` returns: ``{path: value, ..., "params": run parameters, **objects}``.

    ``keys``: the paths ``inplace=True`` writes, when they are more than ``results`` (a crop mosaic's labels).
    """
    return {**results, PARAMS: params_entry(function, params, results if keys is None else keys), **objects}


def written_by(table, path: str) -> dict[str, Any]:
    """The run parameters of the latest run that wrote ``path`` into ``table`` (``{}`` if none is recorded)."""
    uns = table.uns.get(Keys.UNS, {})
    runs = [v for v in uns.values() if isinstance(v, Mapping) and path in list(v.get("keys", []))]
    return dict(max(runs, key=lambda v: int(v.get("run", 0)))) if runs else {}


__all__ = ["check_free", "exists", "params_entry", "returned", "sanitize", "save_data", "save_params", "where",
           "write", "written_by"]
