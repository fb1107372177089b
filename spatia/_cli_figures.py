"""The figures the ``spatia`` command writes after a run: the at-a-glance summary and one figure per result.

Nothing heavy is imported until a figure is drawn, so that ``spatia --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path


def group_column(table, groupby: str | None) -> str:
    """The ``obs`` column generated cells are grouped by: ``groupby`` when the table has it, else the clusters."""
    return groupby if groupby is not None and groupby in table.obs else "spatia_cluster"


def at_a_glance(sdata, model, path: Path, *, image_key, table_key, coordinate_system, gene, counts_layer, color,
                generated: bool, groupby):
    """One figure of the run's results: niches over the tissue, the cell embedding, the training curves, the
    best imputed gene (measured and imputed) and generated cells (or, without a decoder, the niche embedding)."""
    import matplotlib.pyplot as plt

    import spatia as sp

    fig = plt.figure(figsize=(16, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    sp.pl.niches(sdata, image_key=image_key, table_key=table_key, coordinate_system=coordinate_system,
                 ax=fig.add_subplot(grid[0, 0]), title="niches (sp.tl.cluster, level='niche')")
    sp.pl.embedding(sdata, level="cell", color=color, table_key=table_key, ax=fig.add_subplot(grid[0, 1]))
    sp.pl.history(model, ax=fig.add_subplot(grid[0, 2]), title="training (sp.tl.fit)")
    sp.pl.imputation(sdata, gene, table_key=table_key, counts_layer=counts_layer,
                     ax=[fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])])
    if generated:
        sp.pl.generated(sdata, groupby=group_column(sdata[table_key], groupby), image_key=image_key,
                        table_key=table_key, n_per_group=4, ax=fig.add_subplot(grid[1, 2]))
    else:
        sp.pl.embedding(sdata, level="niche", color="spatia_niche", table_key=table_key, ax=fig.add_subplot(grid[1, 2]))
    fig.savefig(path, dpi=110)
    return fig


def summary_figures(sdata, model, figs: Path, *, image_key, table_key, coordinate_system, gene, counts_layer,
                    color, generated: bool, groupby) -> list:
    """Write ``at_a_glance.png``, ``niches.png``, ``umap_cell.png``, ``umap_niche.png`` and ``history.png`` into
    ``figs``; returns the figures (for :func:`close`)."""
    import spatia as sp

    return [
        at_a_glance(sdata, model, figs / "at_a_glance.png", image_key=image_key, table_key=table_key,
                    coordinate_system=coordinate_system, gene=gene, counts_layer=counts_layer, color=color,
                    generated=generated, groupby=groupby),
        sp.pl.niches(sdata, image_key=image_key, table_key=table_key, coordinate_system=coordinate_system,
                     save=figs / "niches.png"),
        sp.pl.embedding(sdata, level="cell", color="spatia_cluster", table_key=table_key,
                        save=figs / "umap_cell.png"),
        sp.pl.embedding(sdata, level="niche", color="spatia_niche", table_key=table_key,
                        save=figs / "umap_niche.png"),
        sp.pl.history(model, save=figs / "history.png"),
    ]


def close(figures) -> None:
    """Close the figures written, so that a long process does not keep them in memory."""
    import matplotlib.pyplot as plt

    for f in figures:
        plt.close(f)
