"""The tutorials run from top to bottom on a fresh kernel, offline (outputs are not written back).

Split over two files so that pytest-xdist's ``--dist loadfile`` runs them on both workers.
"""

from __future__ import annotations

import pytest
from _run import run_notebook


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "03_imputation.ipynb", "05_transitions.ipynb"])
def test_tutorial_runs(name):
    run_notebook(name)
