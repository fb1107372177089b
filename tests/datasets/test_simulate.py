"""The simulator returns a valid SpatialData whose ground truth is really in the counts and the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.spatial import cKDTree
from scipy.stats import spearmanr
from skimage.filters import threshold_otsu
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel, get_table_keys
from spatialdata.transformations import get_transformation

from spatia.datasets import simulate

PIXEL_SIZE = 0.5


@pytest.fixture(scope="module")
def sdata():
    return simulate(700, random_state=1, pixel_size=PIXEL_SIZE)


@pytest.fixture(scope="module")
def table(sdata):
    return sdata.tables["table"]


@pytest.fixture(scope="module")
def lognorm(table):
    x = table.X.toarray().astype(float)
    return np.log1p(x / x.sum(1, keepdims=True) * 100)


@pytest.fixture(scope="module")
def nucleus_area(sdata, table):
    """Per-cell DAPI area (µm²) measured in the image: Otsu threshold inside the segmented cells."""
    dapi = sdata.images["morphology"].sel(c="DAPI").data.compute().astype(float)
    labels = sdata.labels["cell_labels"].data.compute()
    threshold = threshold_otsu(dapi[labels > 0])
    counts = np.bincount(labels[(dapi > threshold) & (labels > 0)], minlength=table.n_obs + 1)
    return counts[table.obs["cell_id"].to_numpy()] * PIXEL_SIZE**2


def _genes(table, names):
    return [table.var_names.get_loc(g) for g in names]


def test_valid_spatialdata(sdata, table):
    image, labels = sdata.images["morphology"], sdata.labels["cell_labels"]
    Image2DModel().validate(image)
    Labels2DModel().validate(labels)
    ShapesModel.validate(sdata.shapes["cell_circles"])
    TableModel().validate(table)
    assert list(image.coords["c"].values) == ["DAPI", "membrane"]
    assert image.dtype == np.uint16 and labels.dtype == np.int32
    assert image.shape[1:] == labels.shape
    assert get_table_keys(table) == ("cell_labels", "region", "cell_id")
    # instance ids = label values present in the segmentation
    present = np.unique(labels.data.compute())
    assert present[0] == 0
    np.testing.assert_array_equal(np.sort(table.obs["cell_id"].to_numpy()), present[1:])
    assert list(table.obs_names) == [str(i) for i in table.obs["cell_id"]]
    ids = table.obs["cell_id"].to_numpy()
    np.testing.assert_array_equal(sdata.shapes["cell_circles"].index.to_numpy(), ids)
    # raw counts: sparse, non-negative integers, no empty cell
    assert sparse.issparse(table.X) and np.issubdtype(table.X.dtype, np.integer)
    assert table.X.min() >= 0
    assert (np.asarray(table.X.sum(1)).ravel() > 0).all()
    assert table.var_names.is_unique and "role" in table.var
    for column in table.uns["simulation"]["columns"]:
        assert column in table.obs


def test_transformation_maps_pixels_to_micrometres(sdata, table):
    image, labels = sdata.images["morphology"], sdata.labels["cell_labels"]
    affine = get_transformation(image, "global").to_affine_matrix(("y", "x"), ("y", "x"))
    of_labels = get_transformation(labels, "global").to_affine_matrix(("y", "x"), ("y", "x"))
    np.testing.assert_allclose(affine, of_labels)
    np.testing.assert_allclose(np.diag(affine)[:2], [PIXEL_SIZE, PIXEL_SIZE])
    assert (np.abs(affine[:2, 2]) > 10).all()  # a real offset, not the identity
    # label centroids mapped to µm land on obsm["spatial"] ([x, y])
    lab = labels.data.compute()
    ids = table.obs["cell_id"].to_numpy()
    rows, cols = np.indices(lab.shape)
    n = np.bincount(lab.ravel(), minlength=ids.max() + 1)[ids]
    cy = np.bincount(lab.ravel(), weights=rows.ravel() + 0.5)[ids] / n
    cx = np.bincount(lab.ravel(), weights=cols.ravel() + 0.5)[ids] / n
    y = affine[0, 0] * cy + affine[0, 2]
    x = affine[1, 1] * cx + affine[1, 2]
    error = np.hypot(x - table.obsm["spatial"][:, 0], y - table.obsm["spatial"][:, 1])
    assert np.median(error) < 1.0


def test_cell_types_separable_by_expression(table, lognorm):
    accuracy = cross_val_score(LogisticRegression(max_iter=500), lognorm, table.obs["cell_type"], cv=3).mean()
    assert accuracy > 0.8


def test_domains_come_from_neighbourhoods_not_types(table):
    obs = table.obs
    assert obs["domain"].nunique() == 3
    onehot = np.eye(obs["cell_type"].nunique())[obs["cell_type"].cat.codes]
    _, neighbours = cKDTree(table.obsm["spatial"]).query(table.obsm["spatial"], k=16)
    composition = onehot[neighbours].mean(1)
    model = LogisticRegression(max_iter=500)
    from_niche = cross_val_score(model, composition, obs["domain"], cv=3).mean()
    from_type = cross_val_score(model, onehot, obs["domain"], cv=3).mean()
    assert from_niche > 0.8 and from_niche > from_type + 0.05


def test_size_program_drives_nuclear_area_and_genes(table, lognorm, nucleus_area):
    size = table.obs["size_program"].to_numpy()
    assert spearmanr(nucleus_area, size)[0] > 0.5
    genes = _genes(table, table.uns["simulation"]["program_genes"]["size_program"])
    assert spearmanr(lognorm[:, genes].sum(1), size)[0] > 0.3
    for program in ("elongation_program", "texture_program"):
        genes = _genes(table, table.uns["simulation"]["program_genes"][program])
        assert spearmanr(lognorm[:, genes].sum(1), table.obs[program])[0] > 0.3


def test_niche_genes_follow_inducer_neighbours(table, lognorm):
    truth = table.uns["simulation"]
    assert set(truth["niche_genes"].values()) == {truth["inducer_type"]}
    expression = lognorm[:, _genes(table, list(truth["niche_genes"]))].mean(1)
    signal = table.obs["niche_signal"].to_numpy()
    responder = (table.obs["cell_type"] != truth["inducer_type"]).to_numpy()
    none, many = responder & (signal == 0), responder & (signal >= 3)
    assert none.sum() >= 10 and many.sum() >= 10
    assert expression[many].mean() > expression[none].mean() + 0.5


def test_transitioned_cells_differ_in_expression_and_morphology(table, lognorm, nucleus_area):
    truth = table.uns["simulation"]
    of_type = (table.obs["cell_type"] == truth["transition_type"]).to_numpy()
    moved = (table.obs["state"] == "transitioned").to_numpy()
    assert moved.sum() >= 10 and (table.obs.loc[moved, "condition"] == "disease").all()
    assert not moved[~of_type].any()
    normal = of_type & ~moved
    response = lognorm[:, _genes(table, truth["response_genes"])].mean(1)
    assert response[moved].mean() > response[normal].mean() + 0.7
    lost = lognorm[:, _genes(table, truth["suppressed_markers"])].mean(1)
    assert lost[moved].mean() < lost[normal].mean()
    assert np.median(nucleus_area[moved]) > 1.3 * np.median(nucleus_area[normal])


def test_same_seed_same_slide():
    a, b, c = (simulate(200, random_state=seed) for seed in (5, 5, 6))
    for x, y in [(a.images["morphology"], b.images["morphology"]), (a["cell_labels"], b["cell_labels"])]:
        np.testing.assert_array_equal(x.data.compute(), y.data.compute())
    assert (a["table"].X != b["table"].X).nnz == 0
    np.testing.assert_array_equal(a["table"].obs["cell_type"], b["table"].obs["cell_type"])
    assert a["table"].X.shape != c["table"].X.shape or (a["table"].X != c["table"].X).nnz > 0
    assert not np.array_equal(a["table"].obsm["spatial"], c["table"].obsm["spatial"])


def test_lazy_chunks_equal_eager_rendering():
    eager = simulate(300, random_state=2, chunk_size=128, lazy=False)
    lazy = simulate(300, random_state=2, chunk_size=128, lazy=True)
    image, labels = lazy.images["morphology"].data, lazy.labels["cell_labels"].data
    assert image.chunks[1][0] == 128 and image.numblocks[1] > 1 and image.numblocks[2] > 1
    assert labels.chunks == image.chunks[1:]
    chunk = image.blocks[0, 1, 1].compute()
    expected = eager.images["morphology"].data[:, 128:256, 128:256].compute()
    np.testing.assert_array_equal(chunk, expected)
    np.testing.assert_array_equal(
        labels.blocks[1, 1].compute(), eager.labels["cell_labels"].data[128:256, 128:256].compute()
    )
    # the pixels do not depend on the chunking either
    other = simulate(300, random_state=2, chunk_size=200, lazy=False).images["morphology"]
    np.testing.assert_array_equal(other.data.compute(), eager.images["morphology"].data.compute())


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding")
def test_writes_to_zarr(tmp_path):
    sdata = simulate(100, random_state=0)
    sdata.write(tmp_path / "sim.zarr")
    from spatialdata import read_zarr

    back = read_zarr(tmp_path / "sim.zarr")
    truth = sdata["table"].uns["simulation"]
    assert back["table"].uns["simulation"]["transition_type"] == truth["transition_type"]
    labels = back.labels["cell_labels"].data.compute()
    np.testing.assert_array_equal(labels, sdata.labels["cell_labels"].data.compute())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_genes": 8}, "n_genes"),
        ({"n_cell_types": 1}, "n_cell_types"),
        ({"transition_rate": 1.5}, "transition_rate"),
        ({"pixel_size": 0}, "pixel_size"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(50, **kwargs)
