"""Crops extracted on the fly, kept for the next call on the same cells, image and window.

``fit``, ``embed``, ``annotate``, ``impute`` (and its validation), ``predict_expression``, ``generate`` and
``transition`` read the crops of the table's cells. Without a crop store (``crops=None``) each call would cut
them from the image again. This cache keeps the last extractions and hands one back when nothing it depends on
has changed:

- the SpatialData's image, labels and shapes elements are the same objects (replacing or deleting one
  invalidates);
- the cells are the same: obs_names, and their positions, diameters and regions as the geometry gives them;
- every extraction parameter is the same (image key, window, size, channels, percentiles, masking, ...).

Editing an element's pixels in place is not seen: set ``sp.settings.cache_crops = False`` (which also frees
what is kept) or call :func:`clear` after doing that.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: How many extractions are kept. Each in-memory one is at most ``MEMORY_CROPS_BYTES`` (larger ones live in a
#: temporary zarr store, removed when the entry is dropped).
MAX_ENTRIES = 2


@dataclass
class _Entry:
    elements: dict[tuple[str, str], weakref.ref]
    store: Any  # CropStore

    def valid_for(self, data) -> bool:
        current = _elements(data)
        if current.keys() != self.elements.keys():
            return False
        return all(ref() is current[k] for k, ref in self.elements.items())


_ENTRIES: OrderedDict[str, _Entry] = OrderedDict()


def _elements(data) -> dict[tuple[str, str], Any]:
    """Every element the crops can depend on, by (kind, name)."""
    return {(kind, name): el for kind in ("images", "labels", "shapes")
            for name, el in getattr(data, kind).items()}


def _freeze(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return repr(v)


def _key(table, kwargs: dict[str, Any]) -> str:
    """A digest of the cells (names and geometry) and of the extraction parameters."""
    geo = kwargs["geometry"]
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(sorted((k, _freeze(v)) for k, v in kwargs.items() if k != "geometry")).encode())
    h.update("\0".join(map(str, table.obs_names)).encode())
    for arr in (geo.xy, geo.diameter):
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    h.update("\0".join(map(str, geo.region)).encode())
    h.update(repr((geo.coordinate_system, geo.source, float(geo.units.um_per_unit))).encode())
    return h.hexdigest()


def cached_crops(data, table, kwargs: dict[str, Any], extract: Callable[[], Any]):
    """The crops ``extract()`` would return for ``table``'s cells of ``data``, from the cache when an earlier
    call extracted them with the same ``kwargs`` (which must hold the cells' ``geometry``) and ``data`` still
    holds the same elements; otherwise ``extract()``, remembered for the next call."""
    from .._settings import settings

    if not settings.cache_crops:
        clear()
        return extract()
    if kwargs.get("geometry") is None or kwargs.get("store") is not None:
        return extract()
    key = _key(table, kwargs)
    entry = _ENTRIES.get(key)
    if entry is not None and entry.valid_for(data) and entry.store.matches(table.obs_names):
        _ENTRIES.move_to_end(key)
        logger.debug("Reusing the crops of %d cells extracted by an earlier call.", len(entry.store))
        return entry.store
    _ENTRIES.pop(key, None)
    store = extract()
    _ENTRIES[key] = _Entry({k: weakref.ref(el) for k, el in _elements(data).items()}, store)
    while len(_ENTRIES) > MAX_ENTRIES:
        _ENTRIES.popitem(last=False)
    return store


def clear() -> None:
    """Forget every kept extraction (their memory, or temporary store, is freed with the last reference)."""
    _ENTRIES.clear()
