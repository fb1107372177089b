"""sp.pl: each plot returns a Figure, accepts ax= and save=, and draws what it reads."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import spatia as sp  # noqa: E402


@pytest.fixture(scope="module")
def clustered(fitted):
    sd, model = fitted
    sd = copy.deepcopy(sd)
    sp.tl.cluster(sd, level="niche", resolution=0.3)
    return sd, model


def test_niches(clustered, tmp_path):
    sd, _ = clustered
    fig = sp.pl.niches(sd, save=tmp_path / "n.png")
    assert isinstance(fig, plt.Figure) and (tmp_path / "n.png").stat().st_size > 1000
    ax = fig.axes[0]
    n_pts = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_pts == sd["table"].n_obs
    assert len(ax.images) == 1  # the morphology image under the cells
    ncat = sd["table"].obs["spatia_niche"].nunique()
    assert len(ax.get_legend().get_texts()) == ncat
    # points lie on the image extent (both in µm)
    x0, x1, y1, y0 = ax.images[0].get_extent()
    xy = np.concatenate([c.get_offsets() for c in ax.collections])
    assert (xy[:, 0] >= x0).all() and (xy[:, 0] <= x1).all() and (xy[:, 1] >= y0).all() and (xy[:, 1] <= y1).all()
    plt.close(fig)


def test_niches_zoom_and_ax(clustered):
    sd, _ = clustered
    # the plot places cells by their segmentation (through the transformations), as cell_geometry does
    xy = sp.pp.cell_geometry(sd, sd["table"]).xy
    x0, y0 = xy.min(0)
    fig, ax = plt.subplots()
    out = sp.pl.niches(sd, ax=ax, zoom=(x0, x0 + 100, y0, y0 + 100))
    assert out is fig
    n_pts = sum(len(c.get_offsets()) for c in ax.collections)
    inside = ((xy[:, 0] <= x0 + 100) & (xy[:, 1] <= y0 + 100)).sum()
    assert n_pts == inside < sd["table"].n_obs
    plt.close(fig)


def test_niches_channel_by_name(clustered):
    sd, _ = clustered
    img = np.asarray(sd.images["morphology"].data[1])  # the membrane channel
    fig = sp.pl.niches(sd, channel="Membrane")  # names match case-insensitively
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == img.shape
    assert np.corrcoef(np.asarray(shown).ravel(), img.ravel())[0, 1] > 0.9  # membrane, not DAPI
    plt.close(fig)
    with pytest.raises(KeyError, match=r"no channel 'dapi2'.*\['DAPI', 'membrane'\]"):
        sp.pl.niches(sd, channel="dapi2")
    with pytest.raises(ValueError, match="channel must be"):
        sp.pl.niches(sd, channel=5)


def test_niches_needs_clusters(sim):
    with pytest.raises(KeyError, match="sp.tl.cluster"):
        sp.pl.niches(sim)


def test_history_and_embedding(clustered, tmp_path):
    sd, model = clustered
    fig = sp.pl.history(model, save=tmp_path / "h.png")
    lines = fig.axes[0].get_lines()
    assert {ln.get_label() for ln in lines} == {"train_loss", "val_loss"}
    assert len(lines[0].get_xdata()) == len(model.history)
    with pytest.raises(KeyError, match="not logged"):
        sp.pl.history(model, keys=["nope"])
    fig2 = sp.pl.embedding(sd, level="niche", color="domain")
    assert sum(len(c.get_offsets()) for c in fig2.axes[0].collections) == sd["table"].n_obs
    plt.close("all")


def test_embedding_umap_is_stored_and_reused(clustered, monkeypatch):
    """The first plot stores the UMAP; later plots reuse it until the embedding is rewritten."""
    import scanpy as sc

    sd, model = clustered
    sd = copy.deepcopy(sd)
    t = sd["table"]
    calls = []
    umap = sc.tl.umap
    monkeypatch.setattr(sc.tl, "umap", lambda *a, **k: (calls.append(1), umap(*a, **k))[1])
    sp.pl.embedding(sd, level="cell", color="cell_type")
    first = t.obsm["X_umap_spatia_cell"].copy()
    assert len(calls) == 1 and t.uns["spatia"]["umap"]["cell"]["embedding"] == "X_spatia_cell"
    assert "cell_type_colors" in t.uns  # scanpy's palette convention
    fig = sp.pl.embedding(sd, level="cell", color="domain", title="mine", palette="Set2")
    assert len(calls) == 1 and fig.axes[0].get_title() == "mine"
    np.testing.assert_array_equal(t.obsm["X_umap_spatia_cell"], first)
    sp.tl.embed(sd, model, overwrite=True)  # a new run wrote the embedding: the UMAP is recomputed
    sp.pl.embedding(sd, level="cell")
    assert len(calls) == 2
    plt.close("all")


def test_imputation_plot(clustered, tmp_path):
    sd, model = clustered
    sd = copy.deepcopy(sd)
    genes = list(sd["table"].var_names[:2])
    with pytest.raises(KeyError, match="sp.tl.impute"):
        sp.pl.imputation(sd, genes)
    sp.tl.impute(sd, model)
    fig = sp.pl.imputation(sd, genes, save=tmp_path / "imp.png")
    assert (tmp_path / "imp.png").stat().st_size > 1000
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == 4
    # each panel draws every cell, coloured by the gene's values
    t = sd["table"]
    for ax in axes:
        assert len(ax.collections[0].get_offsets()) == t.n_obs
    x = t.X.toarray()
    measured = np.log1p(x[:, 0] / x.sum(1) * 1e4)
    np.testing.assert_allclose(axes[0].collections[0].get_array(), measured, rtol=1e-5)
    assert "Pearson" in axes[1].get_title()
    with pytest.raises(KeyError, match="not in the table"):
        sp.pl.imputation(sd, ["nope"])
    plt.close(fig)
