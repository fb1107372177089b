"""spatia's log output: the ``"spatia"`` logger follows ``sp.settings.verbosity``; dependencies stay quiet inside
spatia's calls.

Nothing happens on ``import spatia``. The first time spatia logs a result, runs a trainer or shows progress (or
the user sets ``sp.settings.verbosity``), :func:`configure` gives the ``"spatia"`` logger its level and one
handler. That handler writes to the current ``sys.stderr`` (a notebook's cell output) and stands aside while the
root logger has handlers: an application that configured logging (``logging.basicConfig``) gets spatia's
records through its own handlers, once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from ._settings import VERBOSITY_LEVELS, settings

logger = logging.getLogger("spatia")

# the loggers Lightning writes its banner ("GPU available: ..."), tips and "`Trainer.fit` stopped" lines to
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# dependencies whose warnings, raised while spatia trains or samples, are notices for their own developers
_QUIET_MODULES = r"(lightning|lightning_fabric|lightning_utilities|pytorch_lightning|torch|torchmetrics|diffusers)(\.|$)"
_NOT_SPATIA = r"(?!spatia(\.|$))"


class _Formatter(logging.Formatter):
    """scanpy's look: results and progress as plain lines, ``WARNING: ...`` for warnings."""

    _plain = logging.Formatter("%(message)s")
    _tagged = logging.Formatter("%(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return (self._tagged if record.levelno >= logging.WARNING else self._plain).format(record)


class _Handler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment; silent while the root logger has handlers of its own."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # logging is configured: the record reaches those handlers instead
            return
        self.stream = sys.stderr  # a notebook (or pytest's capture) replaces sys.stderr after import
        super().emit(record)


_handler: _Handler | None = None


def configure() -> None:
    """Give the ``"spatia"`` logger its handler and the level of ``settings.verbosity`` (the first call only)."""
    global _handler
    if _handler is None:
        _handler = _Handler()
        logger.addHandler(_handler)
        apply_verbosity()


def apply_verbosity() -> None:
    """Set the ``"spatia"`` logger's level from ``settings.verbosity``."""
    logger.setLevel(VERBOSITY_LEVELS[settings.verbosity])


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Within the block, Lightning's INFO lines and dependencies' developer warnings are not shown.

    Lightning's banner ("GPU available: ..."), its tips and its "`Trainer.fit` stopped" line; warnings raised
    in Lightning, torch or diffusers; deprecation and syntax warnings raised outside spatia. spatia's own
    records and warnings pass. At ``settings.verbosity >= 3`` nothing is hidden. On exit the logger levels and
    warning filters are as they were.
    """
    configure()
    if settings.verbosity >= 3:
        yield
        return
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        # zarr 3 announces a future default on every array it creates (raised from contextlib, not zarr)
        warnings.filterwarnings("ignore", message=r"zarr v3 autosharding", category=UserWarning)
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, SyntaxWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOT_SPATIA)
        _ignore_lightning_categories()
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _ignore_lightning_categories() -> None:
    # Lightning attributes some of its warnings to the caller's frame (spatia's): match them by category
    mod = sys.modules.get("lightning.fabric.utilities.warnings")
    if mod is None:
        return
    for name in ("PossibleUserWarning", "LightningDeprecationWarning"):
        category = getattr(mod, name, None)
        if category is not None:
            warnings.filterwarnings("ignore", category=category)


def interactive() -> bool:
    """Whether progress can be drawn in place: stderr is a terminal, or this runs in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or unusual stream
        pass
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
