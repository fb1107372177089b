"""Streaming loops hand freed heap pages back every few dozen batches (``malloc_trim`` on glibc)."""

import sys

import pytest

from spatia import _utils
from spatia.train import _plan


def test_trimmed_yields_everything_and_releases_every_n(monkeypatch):
    calls = []
    monkeypatch.setattr(_utils, "release_memory", lambda: calls.append(len(seen)))
    seen = []
    for x in _utils.trimmed(range(10), every=4):
        seen.append(x)
    assert seen == list(range(10))
    assert calls == [4, 8, 10]  # after items 4 and 8, and once at the end


def test_callback_releases_every_n_batches_and_each_epoch(monkeypatch):
    calls = []
    monkeypatch.setattr(_plan, "release_memory", lambda: calls.append(1))
    cb = _plan.ReleaseMemoryCallback(every=3)
    for i in range(7):
        cb.on_train_batch_end(None, None, None, None, i)
    assert len(calls) == 2
    cb.on_train_epoch_end(None, None)
    assert len(calls) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_memory_finds_malloc_trim():
    assert _utils._libc() is not None
    _utils.release_memory()
