"""Shared plotting helpers: axes, one palette convention, save/show as scanpy does."""

from __future__ import annotations

from pathlib import Path


def get_ax(ax=None, figsize=(5, 5)):
    """``(figure, axes)``: the axes given, or a new figure with one axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def categorical_colors(table, key: str, palette=None) -> dict[str, str]:
    """Category → colour of ``obs[key]``, kept in ``uns[f"{key}_colors"]`` as scanpy keeps it.

    ``palette`` (a list, a dict category → colour, or a matplotlib colormap name) replaces the stored colours;
    without it, stored colours are reused when they cover the categories, else scanpy's defaults are written.
    """
    import pandas as pd
    from matplotlib.colors import to_hex

    values = table.obs[key]
    if not isinstance(values.dtype, pd.CategoricalDtype):
        table.obs[key] = values = values.astype("category")
    cats = [str(c) for c in values.cat.categories]
    ukey = f"{key}_colors"
    if palette is not None:
        if isinstance(palette, dict):
            missing = [c for c in cats if c not in {str(k) for k in palette}]
            if missing:
                raise ValueError(f"palette has no colour for categories {missing} of obs[{key!r}].")
            lookup = {str(k): v for k, v in palette.items()}
            colors = [to_hex(lookup[c]) for c in cats]
        elif isinstance(palette, str):
            import matplotlib

            cmap = matplotlib.colormaps[palette]
            n = getattr(cmap, "N", 256)
            colors = [to_hex(cmap(i % n if n < 256 else i / max(1, len(cats) - 1))) for i in range(len(cats))]
        else:
            colors = [to_hex(c) for c in palette]
            if len(colors) < len(cats):
                raise ValueError(f"palette has {len(colors)} colours for {len(cats)} categories of obs[{key!r}].")
            colors = colors[: len(cats)]
        table.uns[ukey] = colors
    elif ukey not in table.uns or len(table.uns[ukey]) < len(cats):
        from scanpy.plotting._utils import _set_default_colors_for_categorical_obs

        _set_default_colors_for_categorical_obs(table, key)
    return dict(zip(cats, [str(c) for c in table.uns[ukey]], strict=False))


def line_colors(palette, n: int) -> list:
    """``n`` colours from ``palette`` (a list, or a matplotlib colormap name); ``None``: matplotlib's cycle."""
    if palette is None:
        return [None] * n
    if isinstance(palette, str):
        import matplotlib

        cmap = matplotlib.colormaps[palette]
        big = getattr(cmap, "N", 256) >= 256
        return [cmap(i / max(1, n - 1)) if big else cmap(i % cmap.N) for i in range(n)]
    colors = list(palette)
    if len(colors) < n:
        raise ValueError(f"palette has {len(colors)} colours for {n} lines.")
    return colors[:n]


def finish(fig, save: str | Path | None, show: bool | None = None, dpi: int = 150):
    """Save the figure when asked; show it and return ``None`` when ``show=True``, else return it."""
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        return None
    return fig
