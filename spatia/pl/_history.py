"""``sp.pl.history``: training curves."""

from __future__ import annotations

from pathlib import Path

from ._utils import finish, get_ax, line_colors


def history(model, *, keys: list[str] | None = None, palette=None, title: str | None = None, ax=None,
            show: bool | None = None, save: str | Path | None = None):
    """Training and validation losses per epoch from ``model.history``.

    Parameters
    ----------
    model
        A trained :class:`~spatia.SpatiaModel`.
    keys
        Logged metrics to draw (default: ``train_loss`` and ``val_loss``).
    palette
        Line colours: a list (one per key) or a matplotlib colormap name.
    title
        Axes title.
    ax, show, save
        Axes to draw into; ``True`` shows the figure and returns ``None``; file to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (``None`` when ``show=True``).

    Examples
    --------
    >>> fig = sp.pl.history(model, keys=["train_counts", "val_counts"])
    """
    hist = getattr(model, "history", None)
    if not hist:
        raise ValueError("The model has no training history: train it with `sp.tl.fit` first.")
    keys = keys or [k for k in ("train_loss", "val_loss") if any(k in h for h in hist)]
    unknown = [k for k in keys if not any(k in h for h in hist)]
    if unknown:
        avail = sorted({k for h in hist for k in h if k != "epoch"})
        raise KeyError(f"Metrics {unknown} were not logged; available: {avail}.")
    fig, ax = get_ax(ax, figsize=(5, 3.5))
    colors = line_colors(palette, len(keys))
    for k, c in zip(keys, colors, strict=True):
        pts = [(h["epoch"], h[k]) for h in hist if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k, color=c)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if title is not None:
        ax.set_title(title)
    ax.legend(frameon=False)
    return finish(fig, save, show)
