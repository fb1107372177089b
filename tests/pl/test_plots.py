"""sp.pl: each plot returns a Figure (None with show=True), takes scanpy's arguments, and draws what it reads."""

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


def _painted_in_their_colour(sd, ax, key="spatia_niche") -> np.ndarray:
    """For each cell whose centroid is in view: is the canvas there the colour of its category?"""
    t = sd["table"]
    fig = ax.figure
    fig.canvas.draw()
    canvas = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    xy = sp.pp.cell_geometry(sd, t).xy
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    inside = (xy[:, 0] > x0 + 2) & (xy[:, 0] < x1 - 2) & (xy[:, 1] > y0 + 2) & (xy[:, 1] < y1 - 2)
    disp = ax.transData.transform(xy[inside])
    rows, cols = (canvas.shape[0] - disp[:, 1]).astype(int), disp[:, 0].astype(int)
    cats = [str(c) for c in t.obs[key].cat.categories]
    colors = t.uns[f"{key}_colors"]
    want = np.array([matplotlib.colors.to_rgb(colors[cats.index(str(c))]) for c in t.obs[key][inside]])
    return np.abs(canvas[rows, cols] - want).max(1) < 0.05


def test_niches(clustered, tmp_path):
    sd, _ = clustered
    t = sd["table"]
    t.uns.pop("spatia_niche_colors", None)
    fig = sp.pl.niches(sd, save=tmp_path / "n.png")
    assert isinstance(fig, plt.Figure) and (tmp_path / "n.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert len(ax.images) == 2  # the morphology image, then the cells' segmentation coloured by niche
    assert len(fig.axes) == 1  # no colour bar for the image's intensities (as scanpy and squidpy draw it)
    cats = [str(c) for c in t.obs["spatia_niche"].cat.categories]
    colors = t.uns["spatia_niche_colors"]  # scanpy's palette convention, written on first use
    assert len(colors) == len(cats)
    legend = {x.get_text(): h for x, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles,
                                               strict=True)}
    present = {str(c) for c in t.obs["spatia_niche"].unique()}
    assert set(legend) == present
    for c in present:  # the legend shows the stored colours
        np.testing.assert_allclose(np.ravel(legend[c].get_facecolor())[:3], matplotlib.colors.to_rgb(
            colors[cats.index(c)]), atol=1e-6)
    plt.close(fig)
    # each cell is painted in its niche's colour (opaque fill)
    fig = sp.pl.niches(sd, alpha=1.0)
    assert _painted_in_their_colour(sd, fig.axes[0]).mean() > 0.9
    plt.close(fig)


def test_niches_palette_and_show(clustered, monkeypatch):
    sd, _ = clustered
    sd = copy.deepcopy(sd)
    cats = list(sd["table"].obs["spatia_niche"].cat.categories)
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    out = sp.pl.niches(sd, palette={c: "red" for c in cats}, title="mine", show=True)
    assert out is None and shown == [1]  # as scanpy: show=True shows and returns nothing
    assert sd["table"].uns["spatia_niche_colors"] == ["#ff0000"] * len(cats)
    fig = sp.pl.niches(sd, title="mine")
    assert fig.axes[0].get_title() == "mine"
    plt.close("all")


def test_niches_zoom_and_ax(clustered):
    sd, _ = clustered
    xy = sp.pp.cell_geometry(sd, sd["table"]).xy
    x0, y0 = xy.min(0)
    fig, ax = plt.subplots()
    out = sp.pl.niches(sd, ax=ax, zoom=(x0, x0 + 100, y0, y0 + 100))
    assert out is fig
    assert ax.get_xlim() == (x0, x0 + 100) and ax.get_ylim() == (y0 + 100, y0)
    plt.close(fig)
    fig = sp.pl.niches(sd, alpha=1.0, zoom=(x0, x0 + 100, y0, y0 + 100))
    ax = fig.axes[0]
    painted = _painted_in_their_colour(sd, ax)
    assert len(painted) > 5 and painted.mean() > 0.9  # the colours survive the window's subset of categories
    # only the window is read: the drawn images are a small part of the slide
    full = sd.images["morphology"].shape[-1] * sd.images["morphology"].shape[-2]
    assert all(np.asarray(im.get_array()).shape[0] * np.asarray(im.get_array()).shape[1] < full / 2
               for im in ax.images)
    plt.close(fig)
    with pytest.raises(ValueError, match="xmin < xmax"):
        sp.pl.niches(sd, zoom=(10, 0, 0, 10))


def test_niches_channel_by_name(clustered):
    sd, _ = clustered
    from skimage.transform import resize

    fig = sp.pl.niches(sd, channel="Membrane")  # names match case-insensitively
    shown = np.asarray(fig.axes[0].images[0].get_array(), dtype=float)  # resampled to the figure's pixels
    dapi, membrane = (resize(np.asarray(sd.images["morphology"].data[c], dtype=float), shown.shape) for c in (0, 1))
    r_membrane, r_dapi = (np.corrcoef(shown.ravel(), ch.ravel())[0, 1] for ch in (membrane, dapi))
    assert r_membrane > 0.8 and r_membrane > r_dapi + 0.2, (r_membrane, r_dapi)
    plt.close(fig)
    with pytest.raises(KeyError, match=r"no channel 'dapi2'.*\['DAPI', 'membrane'\]"):
        sp.pl.niches(sd, channel="dapi2")
    with pytest.raises(ValueError, match="channel must be"):
        sp.pl.niches(sd, channel=5)


def _tiny_slide(image, transformation=None, scale_factors=None):
    """Four square cells on a 100 x 100 px grid, with ``image`` (c, y, x) under them."""
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel

    lab = np.zeros(image.shape[-2:], dtype=np.int32)
    h, w = lab.shape
    for i, (y, x) in enumerate([(h // 5, w // 5), (h // 5, 4 * w // 5), (4 * h // 5, w // 5), (4 * h // 5, 4 * w // 5)]):
        lab[y - 5:y + 5, x - 5:x + 5] = i + 1
    obs = pd.DataFrame({"region": pd.Categorical(["cells"] * 4), "cell_id": np.arange(1, 5),
                        "spatia_niche": pd.Categorical(list("abab"))}, index=[str(i) for i in range(4)])
    table = TableModel.parse(AnnData(np.ones((4, 2)), obs=obs), region="cells", region_key="region",
                             instance_key="cell_id")
    kw = {"transformations": {"global": transformation}} if transformation is not None else {}
    return SpatialData(images={"img": Image2DModel.parse(image, dims=("c", "y", "x"), scale_factors=scale_factors,
                                                          **kw)},
                       labels={"cells": Labels2DModel.parse(lab, dims=("y", "x"))}, tables={"table": table})


def _axes_pixels(fig, ax) -> np.ndarray:
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(-1)
    bb = ax.get_window_extent()
    top = buf.shape[0] - int(bb.y1)
    return buf[top + 2:buf.shape[0] - int(bb.y0) - 2, int(bb.x0) + 2:int(bb.x1) - 2]


def test_niches_draws_a_rotated_image_rotated():
    """An image registered with a 90° rotation is drawn rotated: its bright left half lands at the top."""
    from spatialdata.transformations import Affine

    image = np.zeros((1, 100, 100), dtype=np.uint8)
    image[:, :, :50] = 255  # bright where x < 50, in the image's own pixels
    rotation = Affine(np.array([[0, -1, 100], [1, 0, 0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y"))
    for transformation, bright in [(None, "left"), (rotation, "top")]:
        fig = sp.pl.niches(_tiny_slide(image, transformation), alpha=0.05)
        px = _axes_pixels(fig, fig.axes[0])
        h, w = px.shape
        halves = {"left": px[:, : w // 2].mean(), "right": px[:, w // 2:].mean(),
                  "top": px[: h // 2].mean(), "bottom": px[h // 2:].mean()}
        assert max(halves, key=halves.get) == bright, (bright, halves)
        plt.close(fig)


def test_niches_reads_a_coarse_level_of_a_pyramid():
    """On a multiscale image, a small figure is drawn from a coarse level, not the full-resolution one."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 2048, 2048), dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    sp.pl.niches(_tiny_slide(image, scale_factors=[2, 2, 2]), ax=ax)
    drawn = np.asarray(ax.images[0].get_array())
    assert drawn.shape[-1] <= 2048 // 4
    plt.close(fig)


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


@pytest.mark.parametrize("name", sp.pl.__all__)
def test_every_plot_takes_scanpys_arguments(name):
    import inspect

    params = set(inspect.signature(getattr(sp.pl, name)).parameters)
    assert {"ax", "show", "save", "title"} <= params, name
    colours_cells = {"niches", "embedding", "imputation"}
    if name in colours_cells:
        assert "color" in params, name
    if name in colours_cells - {"imputation"} | {"history"}:
        assert "palette" in params, name


def test_show_returns_none_everywhere(clustered, monkeypatch):
    """As scanpy: with show=True the figure is shown and nothing is returned."""
    from types import SimpleNamespace

    sd, _ = clustered
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    hist = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(3)]
    assert sp.pl.history(SimpleNamespace(history=hist), show=True, title="t") is None
    assert sp.pl.embedding(sd, level="niche", color="spatia_niche", show=True) is None
    plt.close("all")
