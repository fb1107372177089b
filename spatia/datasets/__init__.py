"""Simulated and real example datasets."""

from ._cosmx import cosmx_lung_mini
from ._merscope import merscope_toy
from ._simulate import demo, simulate, simulate_with_reference
from ._xenium import xenium_toy

__all__ = ["simulate", "simulate_with_reference", "demo", "xenium_toy", "cosmx_lung_mini", "merscope_toy"]
