"""Small helpers shared across the package (random state, devices, logging of written keys)."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any

import numpy as np

from ._logging import configure as configure_logging
from ._logging import interactive
from ._settings import settings

logger = logging.getLogger("spatia")

RandomState = int | np.random.Generator | None


def get_rng(random_state: RandomState = None) -> np.random.Generator:
    """Return a :class:`numpy.random.Generator` from an int, a generator or ``None`` (``settings.seed``)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None:
        random_state = settings.seed
    if isinstance(random_state, np.random.RandomState):  # legacy
        random_state = int(random_state.randint(0, 2**31 - 1))
    if not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an int, a numpy Generator or None, got {type(random_state).__name__}.")
    return np.random.default_rng(int(random_state))


def seed_from(random_state: RandomState = None) -> int:
    """An integer seed derived from ``random_state`` (for torch / Lightning)."""
    if isinstance(random_state, int | np.integer):
        return int(random_state)
    return int(get_rng(random_state).integers(0, 2**31 - 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, k)`` logits (shifted by each row's maximum; ``-inf`` gives probability 0)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def resolve_device(device: str | None = None) -> str:
    """``"auto"`` → ``"cuda"`` if available, else ``"cpu"``; anything else is returned as given."""
    import torch

    device = device or settings.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int if it is a whole number >= ``minimum``; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_obs_names(table: Any) -> None:
    """Cells are matched to crops, graphs and results by ``obs_names``: they must be unique."""
    if not table.obs_names.is_unique:
        dup = table.obs_names[table.obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"The table has duplicated obs names (e.g. {dup}): cells are matched by name. Call "
                         "`table.obs_names_make_unique()` (and rename the cells' labels or shapes to match).")


def check_obs_column(table: Any, key: str, *, argument: str, hint: str = "") -> None:
    """A ``KeyError`` naming the columns of ``table.obs`` (and the closest to ``key``) if ``key`` is not one."""
    if key in table.obs.columns:
        return
    import difflib

    columns = [str(c) for c in table.obs.columns]
    close = difflib.get_close_matches(str(key), columns, n=1)
    shown = columns if len(columns) <= 30 else [*columns[:30], f"... ({len(columns) - 30} more)"]
    msg = f"No obs column {key!r} ({argument}=)"
    msg += f": did you mean {close[0]!r}?" if close else "."
    msg += f" The table's obs columns: {shown}." if columns else " The table has no obs columns."
    raise KeyError(msg + (f" {hint}" if hint else ""))


def log_added(where: str, key: str, level: int = logging.INFO) -> None:
    """Log the squidpy-style line ``Adding `adata.obsm['X']```."""
    configure_logging()
    logger.log(level, "Adding `%s[%r]`", where, key)


def progress(iterable: Any = None, *, desc: str, total: int | None = None, unit: str = "it", **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or one updated by hand, ``total=``) for long work.

    Drawn when ``settings.progress_bar`` is on and the output is a terminal or a notebook; otherwise a
    disabled tqdm that iterates (and takes ``update``) at no cost. The bar disappears when done
    (``leave=False``) unless ``leave=True`` is passed.

    Examples
    --------
    >>> for batch in progress(batches, desc="embedding", unit="batch"):
    ...     ...
    >>> with progress(total=n_cells, desc="crops", unit="cell") as bar:
    ...     bar.update(len(chunk))
    """
    configure_logging()
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    show = settings.progress_bar and interactive()
    return _tqdm_class(show)(iterable, desc=desc, total=total, unit=unit, disable=not show, **kwargs)


def _tqdm_class(show: bool) -> type:
    # a widget in a notebook that has ipywidgets; text otherwise (tqdm.auto would warn "IProgress not found"
    # on import in a notebook without ipywidgets, even for a bar that is off)
    import importlib.util

    if show and "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def release_memory() -> None:
    """Hand the C heap's free pages back to the operating system (``malloc_trim``; glibc only, else nothing).

    A loop over batches frees large buffers (crops, activations) between long-lived small objects; glibc keeps
    those freed pages, and the process's resident memory then grows with the number of batches instead of
    staying at one batch's worth. Calling this every few dozen batches keeps a streaming step's memory flat
    (it costs about a millisecond).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


def release_mapped(array: Any) -> None:
    """Write a :class:`numpy.memmap`'s changed pages to its file and drop its pages from the process.

    The data stays in the file (and the system's page cache, which the kernel can reclaim); the process's
    resident memory stops counting it. Anything that is not a memmap is left alone.
    """
    import mmap

    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    m = getattr(base, "_mmap", None)
    if m is None:
        return
    m.flush()
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def trimmed(iterable: Any, every: int = 32) -> Any:
    """Yield from ``iterable``, calling :func:`release_memory` every ``every`` items and at the end."""
    for i, item in enumerate(iterable, 1):
        yield item
        if i % every == 0:
            release_memory()
    release_memory()


@contextlib.contextmanager
def keep_torch_threads():
    """Restore torch's intra-op thread count on exit.

    numba's parallel kernels (crop resampling) share the OpenMP runtime with torch and set its thread count
    to all cores; a user (or a test worker) who limited torch to fewer threads would then oversubscribe a
    shared CPU, which slows training several times over.
    """
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)


def scanpy_neighbors(adata: Any, *, use_rep: str, n_neighbors: int = 15, random_state: int = 0) -> None:
    """:func:`scanpy.pp.neighbors` on ``obsm[use_rep]``, on any number of cells.

    Above 4,096 cells scanpy 1.11 uses pynndescent, whose graph comes back as a ``scipy.sparse.csr_array``,
    which scanpy then queries with ``getnnz`` (gone from sparse arrays in scipy 1.17): it fails. The same
    approximate index is used here, its graph handed to scanpy as a ``csr_matrix``.
    """
    import scanpy as sc

    n_neighbors = int(min(n_neighbors, adata.n_obs - 1))
    transformer = None
    if adata.n_obs > 4096:
        transformer = _csr_pynndescent(n_neighbors=n_neighbors, random_state=random_state)
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, random_state=random_state,
                    transformer=transformer)


def _csr_pynndescent(**kwargs: Any) -> Any:
    """pynndescent's kNN transformer returning ``csr_matrix`` (what scanpy expects); imported on first use."""
    import scipy.sparse as sps
    from pynndescent import PyNNDescentTransformer

    class CsrPyNNDescent(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **kw):
            return sps.csr_matrix(super().fit_transform(X, y, **kw))

        def transform(self, X, **kw):
            return sps.csr_matrix(super().transform(X, **kw))

    return CsrPyNNDescent(**kwargs)
