"""spatia: one model of a tissue from cell images, expression and spatial context (SPATIA)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._constants import Keys
from ._settings import settings
from ._version import __version__

if TYPE_CHECKING:
    from . import datasets, metrics, pl, pp, tl
    from .model import SpatiaConfig, SpatiaModel

__all__ = ["pp", "tl", "pl", "datasets", "metrics", "settings", "Keys", "SpatiaModel", "SpatiaConfig", "__version__"]

# the public subpackages, and the internal ones code may reach as attributes (``spatia.module``)
_SUBPACKAGES = ("pp", "tl", "pl", "datasets", "metrics", "data", "model", "module", "nn", "train")


def __getattr__(name: str):
    # subpackages and the model pull in torch / spatialdata / scanpy: import them when first used, so that
    # `import spatia` and `spatia --help` stay fast
    if name in _SUBPACKAGES:
        from ._logging import configure

        configure()  # the "spatia" logger follows settings.verbosity from the first use on, not on import
        return importlib.import_module(f".{name}", __name__)
    if name in ("SpatiaModel", "SpatiaConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'spatia' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
