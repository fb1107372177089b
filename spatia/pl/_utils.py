"""Shared plotting helpers."""

from __future__ import annotations

from pathlib import Path


def get_ax(ax=None, figsize=(5, 5)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def finish(fig, save: str | Path | None, dpi: int = 150):
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    return fig
