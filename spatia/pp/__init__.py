"""Data preparation: cell crops, expression, niche and tissue graphs."""

from ._crop_store import CropStore
from ._crops import extract_crops
from ._elements import CellGeometry, cell_geometry, get_embedding, get_table
from ._expression import get_counts
from ._graphs import niche_graph, tissue_tiles
from ._units import Units, resolve_units, set_um_per_unit

__all__ = [
    "extract_crops", "CropStore", "get_counts", "get_table", "get_embedding", "cell_geometry", "CellGeometry",
    "niche_graph", "tissue_tiles", "set_um_per_unit", "resolve_units", "Units",
]
