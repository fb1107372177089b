"""Sphinx configuration for the spatia documentation.

Build (warnings are errors): ``bash docs/build.sh`` or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from datetime import date
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # import the checkout even when it is not installed

import spatia  # noqa: E402

# -- project ---------------------------------------------------------------------------------------------
project = "spatia"
author = "spatia developers"
copyright = f"{date.today():%Y}, {author}"
version = release = spatia.__version__

# -- extensions ------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown pages and (later) notebooks; brings myst_parser with it
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx_autodoc_typehints",  # must come after napoleon
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
# No sphinx.ext.intersphinx: the build must work offline, and the inventories of numpy, anndata,
# spatialdata, torch, lightning ... cannot be fetched here. See ``nitpick_ignore_regex`` below.

# ".rst" first: autosummary writes its stub pages (reST) with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "build.sh"]
templates_path = ["_templates"]  # autosummary/class.rst: members documented on the class page

# -- MyST / myst-nb --------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "attrs_inline"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are executed (and checked) by their own job, not by the docs build

# -- autodoc / autosummary / napoleon --------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True
# spatia's "Returns" sections are prose naming every key written (types live in the signature, see
# STYLE.md); render them as written instead of parsing each "name: text" line as a return value.
napoleon_custom_sections = ["Returns"]
typehints_defaults = "braces"
typehints_document_rtype = True
always_document_param_types = False

# -- cross-references ------------------------------------------------------------------------------------
# Every reference into spatia itself must resolve (nitpicky). References to third-party objects cannot
# resolve without intersphinx (offline build, see above), so only those namespaces are ignored.
nitpicky = True
_EXTERNAL = (
    "anndata", "spatialdata", "xarray", "dask", "zarr", "numpy", "np", "scipy", "pandas", "pd", "torch",
    "lightning", "pytorch_lightning", "scvi", "squidpy", "scanpy", "matplotlib", "PIL", "skimage", "sklearn",
    "pathlib", "collections", "typing", "os", "datatree", "geopandas", "shapely", "multiscale_spatial_image",
    "spatial_image",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    # Names the type hints bring in (shown as text; their own docs live elsewhere).
    (r"py:.*", r"(AnnData|SpatialData|DataArray|DataTree|Path|Generator|Trainer|Tensor|ndarray|csr_matrix)"),
    # ``tuple[str, ...]`` in a signature becomes a reference to Python's ``Ellipsis`` (no Python inventory).
    (r"py:data", r"Ellipsis"),
]
# NOT external: private spatia classes that appear in public signatures. They are package issues, listed
# here one by one so the strict build passes meanwhile; delete each line once the package is fixed.
nitpick_ignore = [
    # SpatiaModel.train / .infer take ``arrays: CellArrays`` (spatia/data/_dataset.py), which is not public.
    ("py:class", "spatia.data._dataset.CellArrays"),
    # the flow's forward output (an internal dataclass) appears in a type hint
    ("py:class", "spatia.module._flow.FlowOutput"),
]

# -- HTML ------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "spatia"
html_theme_options = {"show_toc_level": 2}
html_static_path: list[str] = []


# -- references to spatia objects by another path ---------------------------------------------------------
# Type hints name classes by their defining module (``spatia.module._config.ImageConfig``), docstrings
# sometimes by a re-export (``spatia.module.SpatiaConfig``); the API pages document each object once, under
# its public name (``spatia.module.ImageConfig``, ``spatia.SpatiaConfig``). This resolves such a reference to
# the documented name of the *same* object. Unknown objects still warn.
@lru_cache(maxsize=None)
def _import(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_alias(app, env, node, contnode):
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("spatia."):
        return None
    obj = _import(target)
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
        return None  # constants (strings, ints) have no identity worth matching
    domain = env.get_domain("py")
    for name in list(domain.objects):
        if name != target and name.startswith("spatia.") and _import(name) is obj:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)
    return None


def setup(app):
    app.connect("missing-reference", _resolve_alias)
    # sphinx_autodoc_typehints puts a ":" under numpy "Returns" headers so that napoleon reads the section
    # as a typeless return field; our Returns sections are prose (see napoleon_custom_sections above), where
    # that ":" would be printed. The return type still comes from the annotation (typehints_document_rtype).
    from sphinx_autodoc_typehints.patches import napoleon_numpy_docstring_return_type_processor as _colon

    listeners = app.events.listeners["autodoc-process-docstring"]
    listeners[:] = [lst for lst in listeners if lst.handler is not _colon]
