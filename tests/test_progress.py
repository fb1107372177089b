"""Progress on long work: one helper switched by ``sp.settings.progress_bar``; epoch lines where no bar can be drawn."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import spatia as sp
from spatia import _utils
from spatia.train import EpochLogCallback, progress_options


@pytest.fixture
def bars(monkeypatch):
    """Progress bars on, output drawable (a terminal); records every bar the helper makes."""
    made = []
    real = _utils.progress

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        bar.shown = not bar.disable  # tqdm disables a bar when it closes
        made.append(bar)
        return bar

    monkeypatch.setattr(_utils, "interactive", lambda: True)
    for mod in ("spatia.model._model", "spatia.tl._transition", "spatia.tl._pairing", "spatia.metrics._morphology",
                "spatia.pp._crops"):
        import importlib

        m = importlib.import_module(mod)
        if hasattr(m, "progress"):
            monkeypatch.setattr(m, "progress", recording)
    monkeypatch.setattr(_utils, "progress", recording)
    with sp.settings.override(progress_bar=True):
        yield made


def test_progress_helper_follows_the_setting(monkeypatch, capsys):
    monkeypatch.setattr(_utils, "interactive", lambda: True)
    with sp.settings.override(progress_bar=True):
        assert list(_utils.progress(range(3), desc="work")) == [0, 1, 2]
        assert "work" in capsys.readouterr().err
    with sp.settings.override(progress_bar=False):
        bar = _utils.progress(range(3), desc="work")
        assert bar.disable and list(bar) == [0, 1, 2]
        assert capsys.readouterr().err == ""
    # a log file or a batch job: no bar even when progress_bar is on
    monkeypatch.setattr(_utils, "interactive", lambda: False)
    with sp.settings.override(progress_bar=True):
        with _utils.progress(total=5, desc="work") as bar:
            bar.update(5)
        assert bar.disable and capsys.readouterr().err == ""


def test_inference_shows_progress(small_fitted, bars, capsys):
    sd, model = small_fitted
    sp.tl.embed(copy.deepcopy(sd), model, batch_size=16)
    inference = [b for b in bars if b.desc == "inference"]
    assert len(inference) == 1 and inference[0].shown
    assert inference[0].n == inference[0].total >= 120 // 16
    assert "inference" in capsys.readouterr().err


def test_generation_counts_every_denoising_step(small_fitted, bars):
    from spatia.module import DecoderConfig, DiffusionDecoder

    _, model = small_fitted
    torch.manual_seed(0)
    model.decoder = DiffusionDecoder(DecoderConfig(block_out_channels=(16, 32, 32), size=16), len(model.channels),
                                     model.config.width, len(model.genes)).eval()
    try:
        counts = np.ones((5, len(model.genes)), dtype=np.float32)
        model.sample_images(counts, num_inference_steps=3, batch_size=2)
    finally:
        model.decoder = None
    gen = [b for b in bars if b.desc == "generating"]
    assert len(gen) == 1 and gen[0].shown and gen[0].total == 3 * 3 and gen[0].n == 9


def test_fit_draws_lightning_bar_or_logs_epochs(small_fitted, monkeypatch, caplog):
    import spatia.train._progress as progress_mod

    with sp.settings.override(progress_bar=True):
        monkeypatch.setattr(progress_mod, "interactive", lambda: True)
        assert progress_options("training") == {"enable_progress_bar": True, "callbacks": []}
        monkeypatch.setattr(progress_mod, "interactive", lambda: False)
        opts = progress_options("training")
        assert not opts["enable_progress_bar"] and isinstance(opts["callbacks"][0], EpochLogCallback)
        sd, _ = small_fitted
        caplog.clear()
        model = sp.tl.fit(copy.deepcopy(sd), image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=3,
                          random_state=0, early_stopping=False)
        lines = [r.getMessage() for r in caplog.records if r.name == "spatia.train._progress"]
        assert model._trainer.progress_bar_callback is None
        assert lines[0] == "Training: 3 epoch(s)"
        assert lines[-1].startswith("Training epoch 3/3: ") and "train_loss" in lines[-1]
    with sp.settings.override(progress_bar=False):
        assert progress_options("training") == {"enable_progress_bar": False, "callbacks": []}
        caplog.clear()
        sp.tl.fit(copy.deepcopy(sd), image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=1,
                  random_state=0)
        assert not [r for r in caplog.records if r.name == "spatia.train._progress"]


def test_epoch_lines_are_throttled(caplog):
    class Trainer:
        max_epochs = 50
        callback_metrics = {"train_loss": torch.tensor(1.5)}
        current_epoch = 0

    cb, tr = EpochLogCallback("training", min_interval=3600), Trainer()
    with caplog.at_level(logging.INFO, logger="spatia"):
        cb.on_train_start(tr, None)
        for e in range(50):
            tr.current_epoch = e
            cb.on_train_epoch_end(tr, None)
        tr.current_epoch = 50
        cb.on_train_end(tr, None)
    msgs = [r.getMessage() for r in caplog.records]
    # the start, and the last epoch: nothing in between within the interval, no duplicate at the end
    assert msgs[0] == "Training: 50 epoch(s)" and len(msgs) == 2 and msgs[1].startswith("Training epoch 50/50")


def test_notebook_bars_are_widgets_only_where_they_can_be(monkeypatch):
    import sys

    from tqdm.notebook import tqdm as widget
    from tqdm.std import tqdm as text

    assert _utils._tqdm_class(False) is text  # a bar that is off never needs tqdm.auto (it warns in notebooks)
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or object())
    assert _utils._tqdm_class(True) is widget
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ipywidgets" else object())
    assert _utils._tqdm_class(True) is text  # no ipywidgets: text, not tqdm's "IProgress not found" warning
