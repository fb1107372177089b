"""Logging the user controls: ``sp.settings.verbosity``, quiet dependencies inside spatia's calls only."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest

import spatia as sp
from spatia import _logging

LIGHTNING = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def fresh_lightning():
    """Lightning's loggers as Lightning leaves them on import (INFO; conftest quietens them for the suite),
    with a handler that collects what they let through."""
    loggers = [logging.getLogger(n) for n in LIGHTNING]
    levels = [lg.level for lg in loggers]
    for lg in loggers[:2]:
        lg.setLevel(logging.NOTSET)
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    collect = _Collect()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).addHandler(collect)
    yield collect
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).removeHandler(collect)
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def _embed(small_fitted) -> None:
    sd, model = small_fitted
    sp.tl.embed(copy.deepcopy(sd), model)  # a fresh copy: the keys are free each time


def _adding(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Adding")]


def test_adding_lines_follow_verbosity(small_fitted, caplog):
    _embed(small_fitted)  # at the default verbosity, 2 (test_import_installs_no_handler checks the default)
    assert "Adding `adata.obsm['X_spatia_cell']`" in _adding(caplog)
    caplog.clear()
    with sp.settings.override(verbosity=1):
        assert logging.getLogger("spatia").getEffectiveLevel() == logging.WARNING
        _embed(small_fitted)
    assert _adding(caplog) == []
    assert logging.getLogger("spatia").getEffectiveLevel() == logging.INFO  # restored with the setting


def test_spatia_prints_its_lines_where_nothing_is_configured(small_fitted, capsys, monkeypatch):
    """A notebook: no handler on the root logger, spatia's own handler writes the lines to stderr."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    _embed(small_fitted)
    err = capsys.readouterr().err
    assert "Adding `adata.obsm['X_spatia_niche']`" in err and "INFO" not in err
    sp.settings.verbosity = "warning"
    try:
        _embed(small_fitted)
        assert "Adding" not in capsys.readouterr().err
    finally:
        sp.settings.verbosity = 2


def test_spatia_handler_stands_aside_when_logging_is_configured(small_fitted, capsys):
    """Under pytest the root logger has handlers (as after ``logging.basicConfig``): no second copy."""
    assert logging.getLogger().handlers
    _embed(small_fitted)
    assert "Adding" not in capsys.readouterr().err


def _fit_tiny(small_fitted):
    sd, _ = small_fitted
    return sp.tl.fit(copy.deepcopy(sd), image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1,
                     random_state=1)


def _state():
    return [logging.getLogger(n).level for n in LIGHTNING], list(warnings.filters)


def test_fit_hides_lightning_banner_and_restores_global_state(small_fitted, fresh_lightning):
    before = _state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_tiny(small_fitted)
    text = "\n".join(fresh_lightning.messages)
    assert "GPU available" not in text and "Tip" not in text and "Trainer.fit` stopped" not in text
    noisy = [w for w in caught if any(m in w.filename for m in ("lightning", "torch", "docrep"))
             or issubclass(w.category, DeprecationWarning)]
    assert noisy == [], [str(w.message) for w in noisy]
    assert _state() == before
    # outside spatia's calls Lightning speaks as usual
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: outside")
    assert fresh_lightning.messages[-1] == "GPU available: outside"


def test_fit_shows_lightning_at_verbosity_3(small_fitted, fresh_lightning):
    with sp.settings.override(verbosity=3):
        _fit_tiny(small_fitted)
    text = "\n".join(fresh_lightning.messages)
    assert "GPU available" in text and "Tip" in text


def test_quiet_dependencies_passes_spatia_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _logging.quiet_dependencies():
            warnings.warn_explicit("deprecated in torch", DeprecationWarning, "torch/x.py", 1, module="torch.x")
            warnings.warn_explicit("lightning notice", UserWarning, "lightning/x.py", 1, module="lightning.x")
            warnings.warn_explicit("old numpy", FutureWarning, "anndata/x.py", 1, module="anndata.x")
            warnings.warn_explicit("a 3-D image", UserWarning, "spatia/pp/_crops.py", 1, module="spatia.pp._crops")
            warnings.warn_explicit("user's own", UserWarning, "nb.py", 1, module="__main__")
    assert [str(w.message) for w in caught] == ["a 3-D image", "user's own"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sp.settings.override(verbosity=3), _logging.quiet_dependencies():
            warnings.warn_explicit("deprecated in torch", DeprecationWarning, "torch/x.py", 1, module="torch.x")
    assert len(caught) == 1


def test_quiet_dependencies_restores_state_after_an_error():
    before = _state()
    with pytest.raises(RuntimeError), _logging.quiet_dependencies():
        assert logging.getLogger("lightning.pytorch").getEffectiveLevel() >= logging.WARNING
        raise RuntimeError("boom")
    assert _state() == before


@pytest.mark.parametrize("value", [4, -1, "loud", True, 2.5])
def test_bad_verbosity_lists_the_choices(value):
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        sp.settings.verbosity = value
    assert sp.settings.verbosity == 2


def test_verbosity_names_and_override():
    with sp.settings.override(verbosity="debug", progress_bar=False):
        assert sp.settings.verbosity == 3 and not sp.settings.progress_bar
        assert logging.getLogger("spatia").level == logging.DEBUG
    assert sp.settings.verbosity == 2 and logging.getLogger("spatia").level == logging.INFO
    with pytest.raises(TypeError, match="verbosity"):
        with sp.settings.override(verbose=3):
            pass


def test_import_installs_no_handler():
    import subprocess
    import sys

    code = ("import logging, spatia; lg = logging.getLogger('spatia'); "
            "print(len(lg.handlers), lg.level, len(logging.getLogger().handlers), spatia.settings.verbosity)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0", "0", "2"]  # verbosity 2 by default, applied on first use


def test_cli_quiet_flag_sets_verbosity_for_the_run_only(monkeypatch, tmp_path):
    import spatia.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "_demo", lambda args: seen.append(sp.settings.verbosity))
    assert cli.main(["demo", "--out", str(tmp_path), "-q"]) == 0
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert seen == [1, 2] and sp.settings.verbosity == 2
