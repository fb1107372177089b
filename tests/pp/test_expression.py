"""Counts validation: each bad input gets a clear error and leaves the table untouched."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp_sparse

import spatia as sp


@pytest.fixture
def table(sim):
    return sim["table"].copy()


def _unchanged(before, after):
    a = before.X.toarray() if sp_sparse.issparse(before.X) else before.X
    b = after.X.toarray() if sp_sparse.issparse(after.X) else after.X
    np.testing.assert_array_equal(a, b)


def test_valid_counts(table):
    x = sp.pp.get_counts(table)
    assert x.shape == table.shape and x.dtype == np.float32
    np.testing.assert_array_equal(x.toarray(), table.X.toarray())


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float32, np.float64])
def test_counts_of_any_numeric_dtype(table, dtype):
    """Readers store counts as int (simulated, some h5ad), uint16 or float: all give the same float32 CSR."""
    want = table.X.toarray()
    table.X = sp_sparse.csr_matrix(want.astype(dtype))
    x = sp.pp.get_counts(table)
    assert x.dtype == np.float32 and x.has_canonical_format
    np.testing.assert_array_equal(x.toarray(), want)


def test_float32_csr_is_not_copied_and_others_are(table):
    """A float32 CSR (what scanpy's read_10x_h5 gives) is the model's input as it is: a million-cell slide's
    counts are not held twice. Anything else is converted into a new matrix and the table is left as it was."""
    table.X = sp_sparse.csr_matrix(table.X.toarray().astype(np.float32))
    assert sp.pp.get_counts(table) is table.X
    with_zeros = table.X.copy()
    with_zeros.data[:5] = 0  # explicit zeros: removed in a copy, never in the user's matrix
    table.X = with_zeros
    x = sp.pp.get_counts(table)
    assert x is not table.X and x.nnz == with_zeros.nnz - 5 and table.X.nnz == with_zeros.nnz
    table.X = sp_sparse.csr_matrix(table.X.toarray().astype(np.int32))
    assert sp.pp.get_counts(table).data.base is not table.X.data


def test_bad_values_found_across_chunks(table, monkeypatch):
    """The checks run chunk by chunk: a bad value in the last chunk is found."""
    import spatia.pp._expression as expr

    monkeypatch.setattr(expr, "_CHUNK", 7)
    x = table.X.toarray().astype(np.float32)
    x[-1, -1] = 2.5
    table.X = sp_sparse.csr_matrix(x)
    with pytest.raises(ValueError, match="not integer counts"):
        sp.pp.get_counts(table)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x: x * 0.37, "not integer counts"),
        (lambda x: np.log1p(x) + 0.1, "not integer counts"),
        (lambda x: x - 5, "negative values"),
        (lambda x: np.where(np.arange(x.shape[1]) == 0, np.nan, x), "NaN"),
    ],
)
def test_bad_values(table, mutate, match):
    table.X = mutate(table.X.toarray().astype(float))
    before = table.copy()
    with pytest.raises(ValueError, match=match):
        sp.pp.get_counts(table)
    _unchanged(before, table)


def test_empty_cells(table):
    x = table.X.toarray()
    x[:3] = 0
    table.X = sp_sparse.csr_matrix(x)
    with pytest.raises(ValueError, match="3 of .* cells have zero counts"):
        sp.pp.get_counts(table)
    assert sp.pp.get_counts(table, allow_empty=True).shape == table.shape


def test_duplicated_genes(table):
    names = list(table.var_names)
    names[1] = names[0]
    table.var_names = names
    with pytest.raises(ValueError, match="var_names_make_unique"):
        sp.pp.get_counts(table)


def test_unknown_layer_and_layer_use(table):
    with pytest.raises(KeyError, match="No layer 'counts'"):
        sp.pp.get_counts(table, layer="counts")
    table.layers["counts"] = table.X.copy()
    table.X = np.log1p(table.X.toarray().astype(float))
    with pytest.raises(ValueError, match="layer='counts'"):
        sp.pp.get_counts(table)
    assert sp.pp.get_counts(table, layer="counts").nnz > 0


def test_fit_bad_input_leaves_sdata_untouched(sdata):
    import anndata as ad

    t = sdata["table"]
    bad = ad.AnnData(X=t.X.toarray() * 0.5, obs=t.obs.copy(), var=t.var.copy(), obsm={k: v.copy() for k, v in t.obsm.items()},
                     uns=dict(t.uns))
    sdata.tables["table"] = bad
    keys = set(bad.obsm), set(bad.uns)
    with pytest.raises(ValueError, match="not integer counts"):
        sp.tl.fit(sdata, config=sp.SpatiaConfig.tiny(), max_epochs=1)
    assert (set(bad.obsm), set(bad.uns)) == keys
    sdata.tables["table"] = t
    with pytest.raises(KeyError, match="No table 'nope'"):
        sp.tl.fit(sdata, table_key="nope", config=sp.SpatiaConfig.tiny(), max_epochs=1)
    with pytest.raises(KeyError, match="No image 'nope'"):
        sp.tl.fit(sdata, image_key="nope", config=sp.SpatiaConfig.tiny(), max_epochs=1)
