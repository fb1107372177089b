"""Execute the tutorials and write their outputs back (``python tutorials/run.py [NAME ...]``).

The committed notebooks carry their outputs so that they read well on GitHub; CI executes them again
(``tests/test_tutorials.py``) without writing. Run this after changing a tutorial or the API it uses.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def execute(path: Path, *, write: bool = True, timeout: int = 900) -> float:
    """Run every cell of ``path`` in a fresh kernel (working directory: a temporary folder)."""
    import tempfile

    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    if write:
        for cell in nb.cells:  # keep diffs small: no per-run execution metadata
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
    return time.time() - t0


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for p in paths:
        print(f"{p.name}: {execute(p):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
