"""The result contract of every tl function (docs/results_keys.md), checked the same way for each.

- ``inplace=False`` writes nothing (a fingerprint of the whole SpatialData is unchanged) and returns a dict
  ``{path: value, ..., "params": run parameters}`` (plus ``"model"`` / ``"pairing"``);
- ``inplace=True`` writes every path, logs each, merges the parameters into ``uns["spatia"][function]`` without
  touching the other entries, and returns ``None`` (the model for the training functions);
- an existing result is a ``KeyError`` naming ``overwrite=True`` (the data unchanged), ``overwrite=True``
  replaces it, and ``key_added`` keeps two runs apart.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest

import spatia as sp
from spatia import _results
from spatia.module import DecoderConfig, FlowConfig

TINY = sp.SpatiaConfig.tiny()
DECODER = DecoderConfig(size=16, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
                        attention_heads=2, cross_attention_dim=16, train={"batch_size": 64})
TRANSITION = [("control", "transitioned")]
EARLIER = {"function": "annotate", "keys": ["obs/earlier"], "run": 1}  # what another function recorded


def _hash_into(h, obj) -> None:
    if isinstance(obj, dict) or hasattr(obj, "keys") and not isinstance(obj, pd.DataFrame):
        for k in sorted(obj.keys(), key=str):
            h.update(repr(k).encode())
            _hash_into(h, obj[k])
    elif isinstance(obj, pd.DataFrame | pd.Series):
        h.update(obj.to_csv().encode())
    elif hasattr(obj, "toarray"):
        _hash_into(h, obj.toarray())
    elif isinstance(obj, np.ndarray):
        h.update(repr((obj.shape, obj.dtype)).encode() + np.ascontiguousarray(obj).tobytes())
    else:
        h.update(repr(obj).encode())


def fingerprint(sdata) -> str:
    """Every table (X, obs, var, obsm, layers, obsp, uns to the last entry) and the names of every element."""
    h = hashlib.sha256()
    for name in sorted(sdata.tables):
        t = sdata.tables[name]
        h.update(name.encode())
        for part in (t.X, t.obs, t.var, dict(t.obsm), dict(t.layers), dict(t.obsp), dict(t.uns)):
            _hash_into(h, part)
    for kind in ("images", "labels", "shapes", "points"):
        h.update(repr((kind, sorted(getattr(sdata, kind)))).encode())
    return h.hexdigest()


def _add_tstate(sd) -> None:
    o = sd["table"].obs
    is_t = (o["cell_type"] == sd["table"].uns["simulation"]["transition_type"]).to_numpy()
    lab = np.full(len(o), None, dtype=object)
    lab[is_t & (o["condition"] == "control").to_numpy()] = "control"
    lab[is_t & (o["state"] == "transitioned").to_numpy()] = "transitioned"
    o["tstate"] = lab


@dataclass
class Ctx:
    sim: Any
    model: Any
    decoder: Any
    flow: Any

    def slide(self):
        sd = copy.deepcopy(self.sim)
        _add_tstate(sd)
        return sd


@pytest.fixture(scope="module")
def ctx(sim, fitted):
    _, model = fitted
    sd = copy.deepcopy(sim)
    _add_tstate(sd)
    decoder = sp.tl.fit_decoder(sd, copy.deepcopy(model), image_key="morphology", config=DECODER, max_epochs=1,
                                random_state=0, inplace=False)["model"]
    flow = sp.tl.fit_transition(sd, copy.deepcopy(model), groupby="tstate", transitions=TRANSITION,
                                config=FlowConfig.tiny(), max_epochs=1, random_state=0, inplace=False)["model"]
    return Ctx(sim, model, decoder, flow)


@dataclass
class Spec:
    call: Any  # (sdata, ctx, **kw) -> result
    paths: list[str]  # returned by inplace=False, with the default key_added
    objects: set[str] = field(default_factory=set)  # keys beside the paths and "params"
    trains: bool = False  # returns the model with inplace=True
    key_added: Any = None  # another key_added, and the paths it gives
    other_paths: list[str] = field(default_factory=list)
    mosaic: bool = False  # writes a table of its own, whose uns["spatia"][function] holds the parameters


EMB = ["obsm/X_spatia_cell", "obsm/X_spatia_niche", "obsm/X_spatia_tissue"]
PAIR = ["obs/spatia_pair_match", "obs/spatia_pair_confidence", "obs/spatia_pair_shift_pvalue",
        "uns/spatia/transitions/control->disease"]
SPECS = {
    "fit": Spec(lambda sd, c, **kw: sp.tl.fit(sd, image_key="morphology", config=TINY, max_epochs=1, random_state=0,
                                              early_stopping=False, **kw),
                EMB, {"model"}, trains=True, key_added="X_run2",
                other_paths=["obsm/X_run2_cell", "obsm/X_run2_niche", "obsm/X_run2_tissue"]),
    "embed": Spec(lambda sd, c, **kw: sp.tl.embed(sd, c.model, image_key="morphology", **kw),
                  EMB, key_added={"cell": "X_c", "niche": "X_n", "tissue": "X_t"},
                  other_paths=["obsm/X_c", "obsm/X_n", "obsm/X_t"]),
    "impute": Spec(lambda sd, c, **kw: sp.tl.impute(sd, c.model, image_key="morphology", **kw),
                   ["layers/spatia_imputed"], key_added="imp2", other_paths=["layers/imp2"]),
    "predict_expression": Spec(lambda sd, c, **kw: sp.tl.predict_expression(sd, c.model, image_key="morphology", **kw),
                               ["layers/spatia_predicted"], key_added="pred2", other_paths=["layers/pred2"]),
    "fit_decoder": Spec(lambda sd, c, **kw: sp.tl.fit_decoder(sd, copy.deepcopy(c.model), image_key="morphology",
                                                              config=DECODER, max_epochs=1, random_state=0, **kw),
                        [], {"model"}, trains=True),
    "generate": Spec(lambda sd, c, **kw: sp.tl.generate(sd, c.decoder, cells=sd["table"].obs_names[:4],
                                                        num_inference_steps=2, **kw),
                     ["images/spatia_generated", "tables/spatia_generated_table"], key_added="gen2",
                     other_paths=["images/gen2", "tables/gen2_table"], mosaic=True),
    "pair_states": Spec(lambda sd, c, **kw: sp.tl.pair_states(sd, groupby="condition", source="control",
                                                              target="disease", crop_size=16, **kw),
                        PAIR, {"pairing"}, key_added="pair2",
                        other_paths=["obs/pair2_match", "obs/pair2_confidence", "obs/pair2_shift_pvalue", PAIR[-1]]),
    "fit_transition": Spec(lambda sd, c, **kw: sp.tl.fit_transition(sd, copy.deepcopy(c.model), groupby="tstate",
                                                                    transitions=TRANSITION, config=FlowConfig.tiny(),
                                                                    max_epochs=1, random_state=0, **kw),
                           ["uns/spatia/transitions/control->transitioned"], {"model"}, trains=True),
    "transition": Spec(lambda sd, c, **kw: sp.tl.transition(sd, c.flow, groupby="tstate", source="control",
                                                            target="transitioned", cells=_sources(sd), steps=1,
                                                            gate=None, **kw),
                       ["images/spatia_transition", "tables/spatia_transition_table"], key_added="tr2",
                       other_paths=["images/tr2", "tables/tr2_table"], mosaic=True),
}


def _sources(sd) -> np.ndarray:
    return np.flatnonzero((sd["table"].obs["tstate"] == "control").to_numpy())[:3]


def _value(sd, path):
    attr, _, key = path.partition("/")
    t = sd["table"]
    return {"obs": lambda: t.obs[key].to_numpy(), "obsm": lambda: t.obsm[key], "layers": lambda: t.layers[key]}[attr]()


def _same(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-6, equal_nan=True)
    else:
        np.testing.assert_array_equal(a.astype(str), b.astype(str))


def test_every_tl_function_is_covered():
    writers = {n for n in sp.tl.__all__ if callable(getattr(sp.tl, n)) and "inplace" in
               inspect.signature(getattr(sp.tl, n)).parameters}
    # annotate and cluster are tested in their own modules
    assert writers - {"annotate", "cluster"} == set(SPECS)
    for name in SPECS:
        params = inspect.signature(getattr(sp.tl, name)).parameters
        assert params["inplace"].default is True
        assert ("overwrite" in params) == (SPECS[name].key_added is not None) == ("key_added" in params), name
        if "overwrite" in params:
            assert params["overwrite"].default is False


@pytest.mark.parametrize("name", list(SPECS))
def test_inplace_false_writes_nothing_and_returns_the_paths(name, ctx):
    spec = SPECS[name]
    sd = ctx.slide()
    sd["table"].uns["spatia"] = {"annotate": dict(EARLIER)}
    before = fingerprint(sd)
    out = spec.call(sd, ctx, inplace=False)
    assert fingerprint(sd) == before, "inplace=False changed the data"
    assert isinstance(out, dict)
    paths = sorted(k for k in out if "/" in k)
    assert paths == sorted(spec.paths)
    assert set(out) - set(paths) == {"params"} | spec.objects
    assert out["params"]["function"] == name and set(paths) <= set(out["params"]["keys"])
    if "model" in spec.objects:
        assert isinstance(out["model"], sp.SpatiaModel)
    if "pairing" in spec.objects:
        assert isinstance(out["pairing"], sp.tl.PairResult)


@pytest.mark.parametrize("name", list(SPECS))
def test_inplace_writes_logs_merges_and_guards_results(name, ctx, monkeypatch):
    spec = SPECS[name]
    sd = ctx.slide()
    t = sd["table"]
    t.uns["spatia"] = {"annotate": dict(EARLIER)}
    expected = spec.call(sd, ctx, inplace=False)
    logged = []
    monkeypatch.setattr(_results, "log_added", lambda where, key, level=20: logged.append(f"{where}[{key!r}]"))

    # 1. write: every path, each logged; the parameters merged beside the earlier entry
    ret = spec.call(sd, ctx)
    assert isinstance(ret, sp.SpatiaModel) if spec.trains else ret is None
    assert t.uns["spatia"] == {"annotate": EARLIER} if spec.mosaic else t.uns["spatia"]["annotate"] == EARLIER
    own = sd.tables[spec.paths[-1].split("/")[1]] if spec.mosaic else t
    entry = own.uns["spatia"][name]
    assert entry["function"] == name and list(entry["keys"]) == list(expected["params"]["keys"])
    for path in entry["keys"]:
        assert _results.exists(sd, t, path), path
        assert _results.where(path) in logged, (path, logged)
    if not spec.mosaic:
        assert f"adata.uns['spatia'][{name!r}]" in logged
    for path in spec.paths:  # what inplace=False returned is what was written
        if path.split("/")[0] in ("obs", "obsm", "layers"):
            _same(_value(sd, path), expected[path])
    if spec.key_added is None:
        return

    # 2. again: the results are there, so a KeyError naming overwrite=True, and nothing changes
    before = fingerprint(sd)
    with pytest.raises(KeyError, match=r"overwrite=True"):
        spec.call(sd, ctx)
    assert fingerprint(sd) == before, "a refused call changed the data"
    ret = spec.call(sd, ctx, overwrite=True)
    assert isinstance(ret, sp.SpatiaModel) if spec.trains else ret is None

    # 3. another key_added: a second run beside the first
    first = {p: fingerprint_of(sd, p) for p in spec.paths if not p.startswith("uns/")}
    spec.call(sd, ctx, key_added=spec.key_added)
    for path in spec.other_paths:
        assert _results.exists(sd, t, path), path
    for path, fp in first.items():
        if path not in spec.other_paths:
            assert fingerprint_of(sd, path) == fp, f"{path} was changed by a run with another key_added"
    own = sd.tables[spec.other_paths[-1].split("/")[1]] if spec.mosaic else t
    assert set(spec.other_paths) <= set(own.uns["spatia"][name]["keys"])


def fingerprint_of(sd, path) -> str:
    h = hashlib.sha256()
    attr, _, key = path.partition("/")
    if attr in ("images", "labels", "tables"):
        el = getattr(sd, attr)[key]
        _hash_into(h, el.obs if attr == "tables" else np.asarray(el.data))
    else:
        _hash_into(h, _value(sd, path))
    return h.hexdigest()


def test_validate_imputation_writes_nothing(ctx):
    sd = ctx.slide()
    before = fingerprint(sd)
    scores = sp.tl.validate_imputation(sd, ctx.model, image_key="morphology", n_genes=5)
    assert fingerprint(sd) == before
    assert isinstance(scores, pd.DataFrame) and len(scores) == 5
    assert "inplace" not in inspect.signature(sp.tl.validate_imputation).parameters


def test_fit_and_embed_key_added_and_provenance(fitted, ctx):
    """Each embedding key knows the run that wrote it (and that run's configuration)."""
    sd, model = fitted

    def niche_k(table):
        return _results.written_by(table, "obsm/X_spatia_niche")["config"]["niche"]["k"]

    t = copy.deepcopy(sd["table"])
    assert _results.written_by(t, "obsm/X_spatia_niche")["function"] == "fit"
    assert niche_k(t) == TINY.niche.k
    with pytest.raises(TypeError, match="prefix"):
        sp.tl.embed(ctx.slide(), model, key_added=3, inplace=False)
    with pytest.raises(KeyError, match="unknown levels"):
        sp.tl.embed(ctx.slide(), model, key_added={"cells": "X"}, inplace=False)
    with pytest.raises(ValueError, match="same obsm key"):
        sp.tl.embed(ctx.slide(), model, key_added={"cell": "X_spatia_niche"}, inplace=False)
    # a later run over the same key is its writer; other keys keep theirs
    t.uns["spatia"]["embed"] = {"function": "embed", "keys": ["obsm/X_spatia_cell"], "run": 99,
                                "config": {"niche": {"k": 3}}}
    assert _results.written_by(t, "obsm/X_spatia_cell")["function"] == "embed"
    assert niche_k(t) == TINY.niche.k
    t.uns["spatia"]["embed"]["keys"] = ["obsm/X_spatia_niche"]
    assert niche_k(t) == 3
