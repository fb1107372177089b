import numpy as np
import pandas as pd
import pytest

import spatia as sp


@pytest.fixture
def annotated_input(fitted):
    import copy

    sd, model = fitted
    sd = copy.deepcopy(sd)
    t = sd["table"]
    rng = np.random.default_rng(0)
    hidden = rng.random(t.n_obs) < 0.7
    known = t.obs["cell_type"].astype(object).copy()
    known[hidden] = np.nan
    t.obs["known"] = known
    return sd, model, hidden


def test_annotate_transfers_labels_better_than_majority(annotated_input):
    sd, model, hidden = annotated_input
    t = sd["table"]
    before = t.obs["known"].copy()
    sp.tl.annotate(sd, model, labels_key="known", unknown_threshold=0.0)
    truth = t.obs["cell_type"].astype(str).to_numpy()[hidden]
    pred = t.obs["spatia_cell_type"].astype(str).to_numpy()[hidden]
    majority = pd.Series(truth).value_counts(normalize=True).iloc[0]
    acc = (pred == truth).mean()
    assert acc > majority + 0.3, (acc, majority)
    # the user's column is untouched; known cells keep their label
    pd.testing.assert_series_equal(t.obs["known"], before)
    np.testing.assert_array_equal(t.obs["spatia_cell_type"].astype(str)[~hidden], before[~hidden].astype(str))
    proba = t.obsm["spatia_cell_type_proba"]
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    stats = t.uns["spatia"]["annotate"]
    assert stats["cv_accuracy"] > majority + 0.3


def test_confidences_are_calibrated(annotated_input):
    sd, model, hidden = annotated_input
    t = sd["table"]
    sp.tl.annotate(sd, model, labels_key="known", unknown_threshold=0.0)
    stats = t.uns["spatia"]["annotate"]
    # out-of-fold calibration error is small after temperature scaling
    assert stats["ece"] < 0.08, stats
    # on the hidden cells: binned confidence matches accuracy
    conf = t.obs["spatia_cell_type_confidence"].to_numpy()[hidden]
    right = (t.obs["spatia_cell_type"].astype(str) == t.obs["cell_type"].astype(str)).to_numpy()[hidden]
    from spatia.tl._annotate import expected_calibration_error

    p = np.stack([conf, 1 - conf], 1)
    ece = expected_calibration_error(p, np.where(right, 0, 1), n_bins=10)
    assert ece < 0.1, ece
    # low-confidence calls are less often right than high-confidence ones
    assert right[conf > np.median(conf)].mean() > right[conf <= np.median(conf)].mean()


def test_unknown_threshold_marks_low_confidence(annotated_input):
    sd, model, hidden = annotated_input
    t = sd["table"]
    sp.tl.annotate(sd, model, labels_key="known", unknown_threshold=0.9)
    lab = t.obs["spatia_cell_type"]
    conf = t.obs["spatia_cell_type_confidence"]
    assert "unknown" in lab.cat.categories
    assert (lab[conf < 0.9] == "unknown").all()
    assert (lab[conf >= 0.9] != "unknown").all()
    assert t.uns["spatia"]["annotate"]["n_unknown"] == int((lab == "unknown").sum()) > 0


def test_annotate_from_reference_and_inplace_false(annotated_input, fitted):
    sd, model, hidden = annotated_input
    ref = fitted[0]  # labelled reference with the embedding (same slide here)
    res = sp.tl.annotate(sd, model, labels_key="cell_type", reference=ref, inplace=False, unknown_threshold=0)
    assert "spatia_cell_type" not in sd["table"].obs
    acc = (np.asarray(res["obs/spatia_cell_type"]).astype(str) == sd["table"].obs["cell_type"].astype(str)).mean()
    assert acc > 0.7
    assert set(res) == {"obs/spatia_cell_type", "obs/spatia_cell_type_confidence", "obsm/spatia_cell_type_proba",
                        "params"}
    assert res["params"]["function"] == "annotate" and res["params"]["reference"]


def test_annotate_bad_input(annotated_input):
    sd, model, _ = annotated_input
    t = sd["table"]
    with pytest.raises(KeyError, match="nope"):
        sp.tl.annotate(sd, model, labels_key="nope")
    with pytest.raises(ValueError, match="your own labels"):
        sp.tl.annotate(sd, model, labels_key="known", key_added="known")
    t.obs["mine"] = "x"
    with pytest.raises(KeyError, match="overwrite=True"):
        sp.tl.annotate(sd, model, labels_key="known", key_added="mine")
    assert (t.obs["mine"] == "x").all()
    t.obs["one"] = pd.Series(["a"] * t.n_obs, index=t.obs_names)
    with pytest.raises(ValueError, match="single class"):
        sp.tl.annotate(sd, model, labels_key="one")
    with pytest.raises(KeyError, match="X_nothing"):
        sp.tl.annotate(sd, None, labels_key="known", use_rep="X_nothing")
    assert "spatia_cell_type" not in t.obs
    # a second run replaces the first only when asked
    sp.tl.annotate(sd, model, labels_key="known")
    with pytest.raises(KeyError, match="overwrite=True"):
        sp.tl.annotate(sd, model, labels_key="known")
    sp.tl.annotate(sd, model, labels_key="known", overwrite=True)
    assert t.uns["spatia"]["annotate"]["keys"] == ["obs/spatia_cell_type", "obs/spatia_cell_type_confidence",
                                                   "obsm/spatia_cell_type_proba"]


@pytest.fixture(scope="module")
def twins_slide():
    """A slide with two morphology-only types (a parent's expression, their own nuclei) and a tiny model."""
    sd = sp.datasets.simulate(900, random_state=3, morphology_types=2, pixel_size=0.5)
    t = sd["table"]
    rng = np.random.default_rng(3)
    y = t.obs["cell_type"].astype(str).to_numpy()
    train = rng.random(t.n_obs) < 0.5
    t.obs["known"] = pd.Categorical(np.where(train, y, None))
    model = sp.tl.fit(sd, image_key="morphology", config=sp.SpatiaConfig.tiny(), max_epochs=10, random_state=0)
    return sd, model, y, ~train


def test_nucleus_features_tell_morphology_only_types_apart(twins_slide):
    """With the nucleus measurements (the default when the model reads images), the types that share their
    parent's expression are found far better than from the embedding alone."""
    from sklearn.metrics import f1_score

    sd, model, y, test = twins_slide
    twins = sd["table"].uns["simulation"]["morphology_twins"]
    morph = sorted({*twins, *twins.values()})
    f1 = {}
    for flag in (None, False):
        res = sp.tl.annotate(sd, model, labels_key="known", morphology=flag, unknown_threshold=0, inplace=False)
        pred = np.asarray(res["obs/spatia_cell_type"]).astype(str)
        f1[flag] = f1_score(y[test], pred[test], labels=morph, average="macro")
        assert res["params"]["morphology"] is (flag is None)
    assert f1[None] > f1[False] + 0.08, f1  # measured 0.75 vs 0.61


def test_morphology_needs_a_model_and_an_image(twins_slide):
    sd, model, _, _ = twins_slide
    t = sd["table"]
    with pytest.raises(ValueError, match="morphology=False"):
        sp.tl.annotate(t, model, labels_key="known", morphology=True, inplace=False)
    # without a model: the embedding alone, recorded as such
    res = sp.tl.annotate(sd, None, labels_key="known", inplace=False)
    assert res["params"]["morphology"] is False


def test_morphology_finds_the_model_image_or_steps_aside(twins_slide, caplog):
    import copy

    sd, model, _, _ = twins_slide
    # a second image: the model's own (crop_params["image_key"]) is measured, as without it
    two = copy.deepcopy(sd)
    two.images["other"] = two.images["morphology"].copy(deep=True)
    res = sp.tl.annotate(two, model, labels_key="known", inplace=False)
    one = sp.tl.annotate(sd, model, labels_key="known", inplace=False)
    assert res["params"]["morphology"] and one["params"]["morphology"]
    np.testing.assert_allclose(res["obs/spatia_cell_type_confidence"], one["obs/spatia_cell_type_confidence"])
    # neither image is the model's: by default the embedding alone (with a warning); asked for, an error
    for name in ("morphology", "other"):
        two.images[f"{name}_renamed"] = two.images[name]
        del two.images[name]
    with caplog.at_level("WARNING", logger="spatia"):
        res = sp.tl.annotate(two, model, labels_key="known", inplace=False)
    assert res["params"]["morphology"] is False and "image_key=" in caplog.text
    with pytest.raises(KeyError, match="pass image_key="):
        sp.tl.annotate(two, model, labels_key="known", morphology=True, inplace=False)
