"""The tutorials run from top to bottom on a fresh kernel (second half; see test_tutorials_a.py)."""

from __future__ import annotations

import pytest
from _run import run_notebook


@pytest.mark.parametrize("name", ["02_real_data.ipynb", "04_generation.ipynb"])
def test_tutorial_runs(name):
    run_notebook(name)
