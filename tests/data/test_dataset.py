"""Batches of centre cells with their niche members."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp_sparse

from spatia.data import CellArrays, neighbours_from_graph


def test_neighbours_from_graph_drops_self_and_pads():
    m = sp_sparse.csr_matrix(np.array([[1, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))
    np.testing.assert_array_equal(neighbours_from_graph(m, 2), [[1, 3], [0, 2], [-1, -1], [0, 1]])


def test_plan_covers_every_cell_once_and_collate_maps_niches():
    rng = np.random.default_rng(0)
    n = 57
    xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    nbr = np.argsort(d, axis=1)[:, 1:4]
    arrays = CellArrays(counts=sp_sparse.csr_matrix(rng.poisson(2, (n, 5)).astype(np.float32)), crops=None,
                        xy=xy, nbr=nbr, tile=(xy[:, 0] // 50).astype(int))
    batches = arrays.plan(10, rng)
    cells = np.concatenate(batches)
    assert sorted(cells.tolist()) == list(range(n)) and max(len(b) for b in batches) <= 10
    b = arrays.collate(batches[0])
    idx = b["index"].numpy()
    members = np.unique(np.concatenate([idx, nbr[idx].ravel()]))
    # local indices point at the right global cells
    np.testing.assert_array_equal(members[b["core"].numpy()], idx)
    np.testing.assert_array_equal(members[b["nbr"].numpy()], nbr[idx])
    np.testing.assert_array_equal(b["counts"].numpy(), arrays.counts[members].toarray())


def test_prepare_reads_integer_counts_without_a_float_copy():
    import spatia as sp
    from spatia.data._prepare import prepare

    sdata = sp.datasets.simulate(150, random_state=0)
    table = sdata["table"]
    assert table.X.dtype == np.int32
    ints = prepare(sdata, use_image=False).arrays
    assert ints.counts is table.X  # the table's own matrix, not a float32 copy of it
    assert ints.nbr.dtype == np.int32 and ints.tile.dtype == np.int32  # half the memory of int64 indices
    table.X = table.X.astype(np.float32)
    floats = prepare(sdata, use_image=False).arrays
    a, b = ints.collate(np.arange(20)), floats.collate(np.arange(20))
    assert a.keys() == b.keys()
    for k in a:  # the batches the model reads are the same, dtypes included
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    # a model's gene order different from the table's: still integers, the same values
    genes = list(table.var_names[::-1])
    table.X = ints.counts
    reordered = prepare(sdata, use_image=False, genes=genes).arrays.counts
    assert reordered.dtype == np.int32
    np.testing.assert_array_equal(reordered.toarray(), ints.counts.toarray()[:, ::-1])
