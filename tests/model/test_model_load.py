"""SpatiaModel.load refuses tampered model folders with errors naming the field, before allocating."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import spatia as sp
from spatia.model import _model as model_mod

GENES = [f"g{i}" for i in range(12)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m"
    sp.SpatiaModel(sp.SpatiaConfig.tiny(), GENES, ["dapi"], ["a", "b"], random_state=0).save(path)
    return path


@pytest.fixture
def model_dir(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "m")


def _edit(path, name, fn):
    d = json.loads((path / name).read_text())
    fn(d)
    (path / name).write_text(json.dumps(d))


@pytest.fixture
def no_alloc(monkeypatch):
    """Fails the test if the module is built (the check must come first)."""
    def build(*args, **kwargs):
        raise AssertionError("the module was allocated before the check")

    monkeypatch.setattr(model_mod, "SpatiaModule", build)


def _set(section, key, value):
    def fn(d):
        (d[section] if section else d)[key] = value
    return fn


def _del(section, key):
    def fn(d):
        del (d[section] if section else d)[key]
    return fn


CONFIG_TAMPERING = [
    ("width as a string", _set(None, "width", "64"), TypeError, r"SpatiaConfig\.width must be an integer"),
    ("width absurd", _set(None, "width", 2**20), ValueError, r"SpatiaConfig\.width must be in \[4, 8192\]"),
    ("patch 0", _set("image", "patch", 0), ValueError, r"ImageConfig\.patch must be in \[1, 256\]"),
    ("heads 0", _set("image", "heads", 0), ValueError, r"ImageConfig\.heads must be in \[1, 64\]"),
    ("niche heads 0", _set("niche", "heads", 0), ValueError, r"NicheConfig\.heads"),
    ("k as a float", _set("niche", "k", 1e9), TypeError, r"NicheConfig\.k must be an integer"),
    ("k absurd", _set("niche", "k", 10**9), ValueError, r"NicheConfig\.k must be in"),
    ("unknown likelihood", _set("loss", "likelihood", "evil"), ValueError,
     r"LossConfig\.likelihood must be one of \['nb', 'zinb'\], got 'evil'"),
    ("enabled as a string", _set("image", "enabled", "yes"), TypeError, r"ImageConfig\.enabled must be true or false"),
    ("nan learning rate", _set("train", "lr", float("nan")), ValueError, r"TrainConfig\.lr must be finite"),
    ("negative loss weight", _set("loss", "counts", -1.0), ValueError, r"LossConfig\.counts"),
    ("section not a dict", _set(None, "image", 5), TypeError, r"SpatiaConfig\.image must be ImageConfig"),
    ("missing field", _del(None, "width"), KeyError, r"no field\(s\) \['width'\]"),
    ("missing section field", _del("niche", "k"), KeyError, r"'niche' section has no field\(s\) \['k'\]"),
    ("unknown field", _set(None, "evil", 1), ValueError, r"Unknown configuration fields: \['evil'\]"),
]


@pytest.mark.parametrize(("edit", "error", "match"), [c[1:] for c in CONFIG_TAMPERING],
                         ids=[c[0] for c in CONFIG_TAMPERING])
def test_tampered_config_refused_before_allocation(model_dir, no_alloc, edit, error, match):
    _edit(model_dir, "config.json", edit)
    with pytest.raises(error, match=match) as e:
        sp.SpatiaModel.load(model_dir)
    assert "config.json" in str(e.value)


META_TAMPERING = [
    ("missing genes", _del(None, "genes"), KeyError, r"has no \['genes'\]"),
    ("genes not a list", _set(None, "genes", "g0"), TypeError, r"'genes' must be a list of strings"),
    ("no genes", _set(None, "genes", []), ValueError, r"'genes' is empty"),
    ("duplicated genes", _set(None, "genes", ["g0"] * 12), ValueError, r"'genes' has duplicated entries"),
    ("label_categories a number", _set(None, "label_categories", 5), TypeError, r"'label_categories' must be a list"),
    ("channels of numbers", _set(None, "channels", [1]), TypeError, r"'channels' must be a list of strings"),
    ("crop_params a list", _set(None, "crop_params", []), TypeError, r"'crop_params' must be a dict"),
    ("is_trained a string", _set(None, "is_trained", "no"), TypeError, r"'is_trained' must be a bool"),
]


@pytest.mark.parametrize(("edit", "error", "match"), [c[1:] for c in META_TAMPERING],
                         ids=[c[0] for c in META_TAMPERING])
def test_tampered_metadata_refused_before_allocation(model_dir, no_alloc, edit, error, match):
    _edit(model_dir, "spatia_model.json", edit)
    with pytest.raises(error, match=match):
        sp.SpatiaModel.load(model_dir)


@pytest.mark.parametrize("name", ["config.json", "spatia_model.json"])
def test_invalid_json_refused(model_dir, no_alloc, name):
    (model_dir / name).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sp.SpatiaModel.load(model_dir)
    (model_dir / name).write_text("[1, 2]")
    with pytest.raises(TypeError, match="must hold a JSON object"):
        sp.SpatiaModel.load(model_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(model_dir, value):
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = torch.full_like(state[name], value)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=f"non-finite weights.*{name}"):
        sp.SpatiaModel.load(model_dir)


def test_weights_of_other_shape_refused(model_dir):
    _edit(model_dir, "config.json", _set(None, "embed_dim", 24))
    with pytest.raises(ValueError, match="model.safetensors does not match the configuration"):
        sp.SpatiaModel.load(model_dir)


def test_damaged_weights_file_refused(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        sp.SpatiaModel.load(model_dir)


def test_untampered_folder_loads(model_dir):
    m = sp.SpatiaModel.load(model_dir)
    assert m.genes == GENES and m.label_categories == ["a", "b"]
    assert all(np.isfinite(v.numpy()).all() for v in m.module.state_dict().values() if v.is_floating_point())


def test_absurd_model_size_refused_before_allocation(no_alloc):
    cfg = sp.SpatiaConfig.default().replace(width=8192, image={"depth": 64, "heads": 64},
                                            expression={"depth": 64, "heads": 64})
    with pytest.raises(ValueError, match="billion parameters"):
        sp.SpatiaModel(cfg, GENES, ["dapi"])


def test_configs_validate_when_built_too():
    with pytest.raises(ValueError, match=r"ImageConfig\.patch"):
        sp.SpatiaConfig.tiny().replace(image={"patch": 0})
    with pytest.raises(TypeError, match=r"TrainConfig\.batch_size must be an integer"):
        sp.SpatiaConfig.tiny().replace(train={"batch_size": 32.5})
    with pytest.raises(ValueError, match=r"width 36 must be divisible by fusion\.heads \(8\)"):
        sp.SpatiaConfig.tiny().replace(width=36, image={"heads": 2}, expression={"heads": 2},
                                       fusion={"heads": 8})
    from spatia.module import DecoderConfig, FlowConfig

    with pytest.raises(ValueError, match=r"DecoderConfig\.prediction_type must be one of"):
        DecoderConfig(prediction_type="evil")
    with pytest.raises(TypeError, match=r"DecoderConfig\.block_out_channels\[1\] must be an integer"):
        DecoderConfig.from_dict({"block_out_channels": [32, "64", 64]})
    with pytest.raises(ValueError, match=r"FlowSampleConfig\.steps must be in"):
        FlowConfig().replace(sample={"steps": 0})
    # lists read from JSON become tuples
    assert DecoderConfig.from_dict({"block_out_channels": [32, 64, 64]}).block_out_channels == (32, 64, 64)
