"""Write the offline intersphinx inventories in this folder (``python docs/_inventories/make_inventories.py``).

The docs link to anndata, spatialdata, scanpy, squidpy, torch, numpy, pandas and Python through intersphinx.
``docs/conf.py`` reads each project's published ``objects.inv`` first and falls back to the file written
here when the network cannot be reached (the CI builds offline), so a strict build (``-W``) passes either
way. These files list only the objects spatia's docs refer to (see ``OBJECTS``), each with the address of
its page in that project's documentation: add a line when the docs start referring to another one.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).parent

#: project -> (documentation root, [(name, domain:role, page relative to the root)])
OBJECTS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "python": ("https://docs.python.org/3/", [
        *[(f"{t}", "py:class", "library/functions.html") for t in ("int", "float", "bool")],
        *[(f"{t}", "py:class", "library/stdtypes.html") for t in ("str", "dict", "list", "tuple", "set")],
        ("None", "py:data", "library/constants.html"),
        ("Ellipsis", "py:data", "library/constants.html"),
        ("pathlib.Path", "py:class", "library/pathlib.html"),
        *[(f"typing.{t}", "py:data", "library/typing.html") for t in ("Any", "Literal")],
        *[(f"collections.abc.{t}", "py:class", "library/collections.abc.html")
          for t in ("Callable", "Iterable", "Iterator", "Mapping", "Sequence")],
    ]),
    "numpy": ("https://numpy.org/doc/stable/", [
        ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html"),
        ("numpy.random.Generator", "py:class", "reference/random/generator.html"),
    ]),
    "pandas": ("https://pandas.pydata.org/docs/", [
        (f"pandas.{t}", "py:class", f"reference/api/pandas.{t}.html") for t in ("DataFrame", "Series", "Index")
    ]),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", [
        ("anndata.AnnData", "py:class", "generated/anndata.AnnData.html"),
    ]),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", [
        ("spatialdata.SpatialData", "py:class", "api/SpatialData.html"),
        *[(f"spatialdata.models.{t}", "py:class", "api/models.html")
          for t in ("Image2DModel", "Labels2DModel", "ShapesModel", "PointsModel", "TableModel")],
    ]),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", [
        (f"scanpy.{f}", "py:function", f"generated/scanpy.{f}.html")
        for f in ("pp.normalize_total", "pp.log1p", "pp.pca", "pp.neighbors", "tl.leiden", "tl.umap",
                  "pl.embedding", "pl.spatial")
    ]),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", [
        (f"squidpy.gr.{f}", "py:function", f"api/squidpy.gr.{f}.html") for f in ("spatial_neighbors", "nhood_enrichment")
    ]),
    "torch": ("https://pytorch.org/docs/stable/", [
        ("torch.Tensor", "py:class", "tensors.html"),
        ("torch.Generator", "py:class", "generated/torch.Generator.html"),
        ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html"),
        ("torch.compile", "py:function", "generated/torch.compile.html"),
    ]),
}


def inventory(project: str, objects: list[tuple[str, str, str]]) -> bytes:
    """Sphinx's inventory format, version 2: a plain header, then zlib-compressed lines
    ``name domain:role priority uri display-name`` (``$`` in the uri: the name; ``-``: display = name)."""
    header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
              "# The remainder of this file is compressed using zlib.\n")
    body = "".join(f"{name} {role} 1 {page}#$ -\n" for name, role, page in sorted(objects))
    return header.encode() + zlib.compress(body.encode())


def main() -> None:
    for project, (_, objects) in OBJECTS.items():
        (HERE / f"{project}.inv").write_bytes(inventory(project, objects))


if __name__ == "__main__":
    main()
