"""Plots: each returns a matplotlib Figure, takes ax= and save=."""
