"""spatia: one model of a tissue from cell images, expression and spatial context (SPATIA)."""

from __future__ import annotations

from . import datasets, metrics, pl, pp, tl
from ._constants import Keys
from ._settings import settings
from ._version import __version__

__all__ = ["pp", "tl", "pl", "datasets", "metrics", "settings", "Keys", "SpatiaModel", "SpatiaConfig", "__version__"]


def __getattr__(name: str):
    # the model pulls in torch / lightning: import it only when asked for
    if name in ("SpatiaModel", "SpatiaConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'spatia' has no attribute {name!r}")
