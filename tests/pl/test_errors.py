"""Plot errors name what is wrong and list the valid choices."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spatia as sp


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": ["a", "b"] * 10, "domain": ["x"] * 20}, index=[f"c{i}" for i in range(20)])
    return AnnData(X=rng.poisson(2, (20, 5)).astype(np.float32), obs=obs,
                   obsm={"X_spatia_cell": rng.normal(size=(20, 4)).astype(np.float32)})


def test_embedding_color_typo_lists_the_columns(table):
    with pytest.raises(KeyError) as e:
        sp.pl.embedding(table, level="cell", color="cel_type")
    msg = str(e.value)
    assert "did you mean 'cell_type'" in msg and "color=" in msg
    assert re.search(r"\['cell_type', 'domain'\]", msg)


def test_unrelated_name_lists_the_columns_without_a_guess(table):
    with pytest.raises(KeyError) as e:
        sp.pl.embedding(table, level="cell", color="zzz")
    assert "did you mean" not in str(e.value) and "'domain'" in str(e.value)


def test_many_columns_are_shortened():
    from spatia._utils import check_obs_column

    t = AnnData(obs=pd.DataFrame({f"col{i}": [0] for i in range(40)}, index=["c0"]))
    with pytest.raises(KeyError, match=r"\.\.\. \(10 more\)"):
        check_obs_column(t, "nothing", argument="color")
    check_obs_column(t, "col3", argument="color")  # present: no error
