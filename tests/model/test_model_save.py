"""SpatiaModel.save / load: atomic swaps, failures injected at each step, killed saves, recovery."""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest
import torch

import spatia as sp
from spatia.model import _io as io_mod

GENES = [f"g{i}" for i in range(12)]


def _model(seed: int) -> sp.SpatiaModel:
    return sp.SpatiaModel(sp.SpatiaConfig.tiny(), GENES, ["dapi"], random_state=seed)


def _same(a: sp.SpatiaModel, b: sp.SpatiaModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values(),
                                                  strict=True))


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".spatia_save_") or ".old-" in p.name)


@pytest.fixture(scope="module")
def models():
    a, b = _model(1), _model(2)
    assert not _same(a, b)
    return a, b


def test_overwrite_replaces_model(models, tmp_path):
    a, b = models
    a.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        b.save(tmp_path / "m")
    assert _same(sp.SpatiaModel.load(tmp_path / "m"), a)
    b.save(tmp_path / "m", overwrite=True)
    assert _same(sp.SpatiaModel.load(tmp_path / "m"), b)
    assert _leftovers(tmp_path) == []


def test_save_into_empty_folder_and_new_parents(models, tmp_path):
    a, _ = models
    (tmp_path / "empty").mkdir()
    a.save(tmp_path / "empty")
    a.save(tmp_path / "x" / "y" / "m")
    assert _same(sp.SpatiaModel.load(tmp_path / "empty"), a)
    assert _same(sp.SpatiaModel.load(tmp_path / "x" / "y" / "m"), a)


def test_overwrite_never_deletes_user_files(models, tmp_path):
    a, _ = models
    user = tmp_path / "results"
    user.mkdir()
    (user / "figure.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a saved SpatiaModel.*figure.png"):
        a.save(user, overwrite=True)
    assert (user / "figure.png").read_bytes() == b"precious" and len(list(user.iterdir())) == 1
    # a model folder the user added files to is not replaced either
    a.save(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        a.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    # and a file is not a folder
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        a.save(tmp_path / "f", overwrite=True)
    assert _leftovers(tmp_path) == []


class _FailOn:
    """Wraps a function so that its ``n``-th call (1-based) raises."""

    def __init__(self, fn, n: int) -> None:
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(f"injected failure at call {self.n}")
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("step", ["write", "rename_old", "rename_new", "rename_new_and_restore"])
def test_failed_overwrite_keeps_old_model(models, tmp_path, monkeypatch, step):
    a, b = models
    a.save(tmp_path / "m")
    if step == "write":
        monkeypatch.setattr("safetensors.torch.save_file", _FailOn(__import__("safetensors.torch").torch.save_file, 1))
    else:
        fail = {"rename_old": 1, "rename_new": 2}.get(step)
        if fail is not None:
            monkeypatch.setattr(io_mod.os, "replace", _FailOn(os.replace, fail))
        else:  # the new model cannot be moved in, nor the old one back: load finds it at <path>.old-<id>
            calls = {"n": 0}

            def replace(src, dst):
                calls["n"] += 1
                if calls["n"] >= 2:
                    raise OSError("injected")
                return os.replace(src, dst)

            monkeypatch.setattr(io_mod.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        b.save(tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spatia_save_")]  # temp folder removed
    assert _same(sp.SpatiaModel.load(tmp_path / "m"), a)
    assert _leftovers(tmp_path) == []
    # and the next save works
    b.save(tmp_path / "m", overwrite=True)
    assert _same(sp.SpatiaModel.load(tmp_path / "m"), b)


def test_failed_delete_of_old_model_keeps_new(models, tmp_path, monkeypatch, caplog):
    a, b = models
    a.save(tmp_path / "m")

    def rmtree(p, *args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(io_mod.shutil, "rmtree", rmtree)
    b.save(tmp_path / "m", overwrite=True)  # saved; the old copy stays behind with a warning
    monkeypatch.undo()
    assert "could not delete the previous one" in caplog.text
    assert _same(sp.SpatiaModel.load(tmp_path / "m"), b)
    assert len(_leftovers(tmp_path)) == 1
    a.save(tmp_path / "m", overwrite=True)  # the next save removes it
    assert _leftovers(tmp_path) == []


def test_load_recovers_previous_model_after_interrupted_swap(models, tmp_path, caplog):
    a, _ = models
    a.save(tmp_path / "m")
    os.replace(tmp_path / "m", tmp_path / "m.old-1234")  # killed between the two renames
    m = sp.SpatiaModel.load(tmp_path / "m")
    assert _same(m, a) and "restoring it" in caplog.text
    assert (tmp_path / "m").is_dir() and _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="not a saved SpatiaModel"):
        sp.SpatiaModel.load(tmp_path / "other")


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_killed_saves_always_leave_a_loadable_model(models, tmp_path):
    """SIGKILL a process that keeps overwriting the model, at 20 random moments: a complete model (the
    previous or the new one) is always at the path."""
    a, b = models
    path = tmp_path / "m"
    a.save(path)
    rng = random.Random(0)
    survived = 0
    for i in range(20):
        pid = os.fork()
        if pid == 0:  # child: overwrite forever, alternating the two models
            code = 0
            try:
                n = 0
                while True:
                    (b if n % 2 == 0 else a).save(path, overwrite=True)
                    n += 1
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"the saving process ended by itself (kill {i})"
        loaded = sp.SpatiaModel.load(path)
        assert _same(loaded, a) or _same(loaded, b), f"kill {i}: neither model at the path"
        survived += 1
    assert survived == 20
