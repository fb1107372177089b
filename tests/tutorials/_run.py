"""Execute a tutorial notebook with nbclient; a failing cell fails the test with its traceback, and a Python
warning printed by any cell fails it too (the tutorials run without warning filters)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

TUTORIALS = Path(__file__).parents[2] / "tutorials"


def run_notebook(name: str, timeout: int = 900) -> None:
    import nbformat
    from nbclient import NotebookClient

    path = TUTORIALS / name
    assert path.exists(), f"missing tutorial {path}"
    nb = nbformat.read(path, as_version=4)
    assert any(c.cell_type == "code" and c.outputs for c in nb.cells), f"{name} is committed without outputs"
    for cell in nb.cells:  # run from a clean slate
        if cell.cell_type == "code":
            cell.outputs = []
    env_threads = os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, (name, env_threads, errors)
    # Python's warnings print as "<file>:<line>: SomeWarning: ..."; spatia's own log lines read "WARNING: ..."
    warned = [o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and re.search(r"\b[A-Z]\w*Warning: ", o.get("text", ""))]
    assert not warned, (name, warned)
