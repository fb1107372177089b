"""Global settings (``sp.settings``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

# scanpy's scale: 0 errors, 1 warnings, 2 information (the "Adding `...`" lines), 3 hints and debugging
VERBOSITY_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}
_VERBOSITY_NAMES = {"error": 0, "warning": 1, "info": 2, "hint": 3, "debug": 3}


@dataclass
class SpatiaSettings:
    """Package-wide settings.

    Attributes
    ----------
    seed
        Default random seed used when a function gets ``random_state=None``.
    progress_bar
        Show progress for long work: a bar (training, inference, generation, crop extraction) when the output
        is a terminal or a notebook, a log line per training epoch otherwise.
    device
        Default device for models: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ...
    num_workers
        Number of DataLoader worker processes.
    cache_crops
        Keep the crops a tool cut from the image (called without ``crops=``) for the next call on the same
        cells, elements and window, so that ``fit`` → ``embed`` → ``annotate`` → ``impute`` extract them once.
        The last two extractions are kept: in memory up to 256 MiB each, larger ones in a temporary zarr
        store. Replacing an element, changing the cells or the window extracts again; pixels edited in place
        are not seen. Set ``False`` to free what is kept and always extract; to keep crops across sessions,
        write them once with :func:`spatia.pp.extract_crops` (``store=``) and pass ``crops=``.
    verbosity
        What spatia logs, as in scanpy: ``0`` errors, ``1`` warnings, ``2`` information (default: the
        "Adding `adata.obsm['…']`" lines naming each result written, training summaries), ``3`` hints and
        debugging, which also shows what the libraries spatia drives print (Lightning's banner and tips,
        their deprecation warnings). Also ``"error"``, ``"warning"``, ``"info"``, ``"hint"`` or ``"debug"``.

    Examples
    --------
    >>> sp.settings.verbosity = 1  # warnings only
    >>> with sp.settings.override(verbosity=3, progress_bar=False):
    ...     model = sp.tl.fit(sdata, image_key="morphology")
    """

    seed: int = 0
    progress_bar: bool = True
    device: str = "auto"
    num_workers: int = 0
    cache_crops: bool = True
    _verbosity: int = field(default=2, repr=False)

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        level = _VERBOSITY_NAMES.get(value.lower()) if isinstance(value, str) else value
        if isinstance(level, bool) or level not in VERBOSITY_LEVELS:
            raise ValueError(f"verbosity must be 0, 1, 2 or 3 (or one of {sorted(_VERBOSITY_NAMES)}), got {value!r}.")
        self._verbosity = int(level)
        from . import _logging

        _logging.configure()
        _logging.apply_verbosity()

    @contextlib.contextmanager
    def override(self, **changes: Any) -> Iterator[SpatiaSettings]:
        """Change settings within a ``with`` block; they are restored on exit."""
        names = {f.name for f in fields(self) if not f.name.startswith("_")} | {"verbosity"}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"Unknown setting(s) {unknown}: the settings are {sorted(names)}.")
        before = {k: getattr(self, k) for k in changes}
        try:
            for k, v in changes.items():
                setattr(self, k, v)
            yield self
        finally:
            for k, v in before.items():
                setattr(self, k, v)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"SpatiaSettings({shown}, verbosity={self.verbosity!r})"


settings = SpatiaSettings()
