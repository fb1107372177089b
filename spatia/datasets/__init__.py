"""Simulated and real example datasets."""

from ._real import cosmx_lung_mini, merscope_toy, xenium_toy
from ._simulate import demo, simulate, simulate_with_reference

__all__ = ["simulate", "simulate_with_reference", "demo", "xenium_toy", "cosmx_lung_mini", "merscope_toy"]
