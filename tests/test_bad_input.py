"""Bad input gives a clear error and leaves the data as it was (issue 22: nothing silent).

Each case calls a public function on a fresh copy of a small simulated slide, expects an error whose
message says what to fix, and checks that the slide is unchanged (a fingerprint of every table's arrays,
obs, var, obsm / layers / uns keys and the element names, before and after). Add cases to ``CASES``.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest

import spatia as sp


@pytest.fixture(scope="module")
def slide():
    return sp.datasets.simulate(60, mean_depth=25.0, random_state=7)


@pytest.fixture(scope="module")
def model(slide):
    """An untrained model of the slide's panel with an (untrained) decoder: enough to reach the checks."""
    from spatia.module import DecoderConfig, DiffusionDecoder

    t = slide["table"]
    m = sp.SpatiaModel(sp.SpatiaConfig.tiny(), list(t.var_names), ["dapi"])
    dc = DecoderConfig(size=16, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
                       attention_heads=2, cross_attention_dim=16)
    m.decoder = DiffusionDecoder(dc, 1, m.config.width, len(m.genes))
    return m


def fingerprint(sdata) -> str:
    h = hashlib.sha256()
    for name in sorted(sdata.tables):
        t = sdata.tables[name]
        x = t.X.toarray() if hasattr(t.X, "toarray") else np.asarray(t.X)
        h.update(name.encode() + np.ascontiguousarray(x).tobytes())
        h.update(t.obs.to_csv().encode() + t.var.to_csv().encode())
        h.update(repr((sorted(t.obsm), sorted(t.layers), sorted(t.uns), sorted(t.obsp))).encode())
        for k in sorted(t.obsm):
            h.update(np.ascontiguousarray(np.asarray(t.obsm[k])).tobytes())
    h.update(repr(sorted(sdata.images) + sorted(sdata.labels) + sorted(sdata.shapes)).encode())
    return h.hexdigest()


def _dup_obs(sd):
    t = sd["table"]
    names = list(t.obs_names)
    names[1] = names[0]
    t.obs_names = names


def _one_cell(sd):
    sd.tables["table"] = sd["table"][:1].copy()


def _lognorm_reference(sd):
    import scanpy as sc

    ref = sd["table"].copy()
    ref.X = ref.X.astype(np.float32)
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    return ref


def _cluster_ready(sd):
    t = sd["table"]
    t.obsm["X_spatia_niche"] = np.random.default_rng(0).normal(size=(t.n_obs, 4)).astype(np.float32)


def _zero_counts(sd):
    t = sd["table"]
    t.X = t.X * 0


def _3d_image(sd):
    from spatialdata.models import Image3DModel
    from spatialdata.transformations import get_transformation

    img = sd.images["morphology"]
    t = get_transformation(img, "global")
    data = np.stack([np.asarray(img.data)] * 3, axis=1)
    sd.images["morphology"] = Image3DModel.parse(data, dims=("c", "z", "y", "x"), c_coords=list(img.coords["c"].values),
                                                 transformations={"global": t})


def _nan_image(sd):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    img = sd.images["morphology"]
    data = np.asarray(img.data).astype(np.float32)
    data[0, 5, 5] = np.nan
    sd.images["morphology"] = Image2DModel.parse(data, dims=("c", "y", "x"), c_coords=list(img.coords["c"].values),
                                                 transformations={"global": get_transformation(img, "global")})


tiny = sp.SpatiaConfig.tiny()

# (id, prepare(sdata) -> None or a value passed on, call(sdata, model, prepared), error, message)
CASES = [
    ("fit max_epochs=0", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=0),
     ValueError, r"max_epochs must be an integer >= 1, got 0"),
    ("fit max_epochs=-1", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=-1),
     ValueError, r"max_epochs must be an integer >= 1, got -1"),
    ("fit max_epochs=2.5", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=2.5),
     ValueError, r"max_epochs must be an integer"),
    ("fit batch_size=1", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, batch_size=1),
     ValueError, r"batch_size must be an integer >= 2"),
    ("fit duplicated obs names", _dup_obs, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=1),
     ValueError, r"duplicated obs names.*obs_names_make_unique\(\)"),
    ("fit one cell", _one_cell, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=1),
     ValueError, r"The table has 1 cell\(s\)"),
    ("embed duplicated obs names", _dup_obs, lambda sd, m, _: sp.tl.embed(sd, m),
     ValueError, r"duplicated obs names.*obs_names_make_unique\(\)"),
    ("cluster n_neighbors=0", _cluster_ready, lambda sd, m, _: sp.tl.cluster(sd, n_neighbors=0),
     ValueError, r"n_neighbors must be an integer >= 2 .*got 0"),
    ("cluster n_neighbors=1", _cluster_ready, lambda sd, m, _: sp.tl.cluster(sd, n_neighbors=1),
     ValueError, r"n_neighbors must be an integer >= 2"),
    ("transition steps=0", None,
     lambda sd, m, _: sp.tl.transition(sd, m, groupby="condition", source="a", target="b", steps=0),
     ValueError, r"steps must be a whole number of solver steps >= 1, got 0"),
    ("generate edit NaN", None,
     lambda sd, m, _: sp.tl.generate(sd, m, cells=sd["table"].obs_names[:2], edits={m.genes[0]: float("nan")}),
     ValueError, r"values are raw counts \(finite numbers >= 0\)"),
    ("generate edit 1e30", None,
     lambda sd, m, _: sp.tl.generate(sd, m, cells=sd["table"].obs_names[:2], edits={m.genes[0]: 1e30}),
     ValueError, r"beyond any measured cell"),
    ("generate edit negative", None,
     lambda sd, m, _: sp.tl.generate(sd, m, cells=sd["table"].obs_names[:2], edits={m.genes[0]: -3}),
     ValueError, r"finite numbers >= 0"),
    ("fit all-zero counts with allow_empty", _zero_counts,
     lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=1, allow_empty=True),
     ValueError, r"Every cell of the table has zero counts"),
    ("embed one cell", _one_cell, lambda sd, m, _: sp.tl.embed(sd, m),
     ValueError, r"niche graph needs at least 2 cells"),
    ("fit um_per_unit=0", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=1, um_per_unit=0),
     ValueError, r"um_per_unit must be a positive finite number"),
    ("fit um_per_unit='0.2'", None, lambda sd, m, _: sp.tl.fit(sd, config=tiny, max_epochs=1, um_per_unit="0.2"),
     TypeError, r"um_per_unit must be a number"),
    ("extract_crops 3-D image, plane out of range", _3d_image,
     lambda sd, m, _: sp.pp.extract_crops(sd, z=7), ValueError, r"z must be a plane index 0..2"),
    ("extract_crops NaN pixels", _nan_image,
     lambda sd, m, _: sp.pp.extract_crops(sd), ValueError, r"NaN or infinite pixels"),
    ("impute misspelled input keyword", None,
     lambda sd, m, _: sp.tl.impute(sd, m, imgae_key="morphology"), TypeError, r"imgae_key"),
    ("niche_graph one cell", _one_cell, lambda sd, m, _: sp.pp.niche_graph(sd, n_neighs=5),
     ValueError, r"at least 2 cells"),
    ("impute log-normalised reference", _lognorm_reference,
     lambda sd, m, ref: sp.tl.impute(sd, m, reference=ref),
     ValueError, r"^reference\.X is not integer counts"),
]


@pytest.mark.parametrize(("prepare", "call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_data_unchanged(slide, model, prepare, call, error, match):
    sd = copy.deepcopy(slide)
    extra = prepare(sd) if prepare is not None else None
    before = fingerprint(sd)
    with pytest.raises(error, match=match):
        call(sd, model, extra)
    assert fingerprint(sd) == before, "the failed call changed the data"


def test_case_count():
    # the note counts the cases this module covers
    assert len(CASES) >= 22
