"""The user-facing model class."""

from ..module import SpatiaConfig
from ._model import SpatiaModel

__all__ = ["SpatiaModel", "SpatiaConfig"]
