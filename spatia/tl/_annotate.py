"""``sp.tl.annotate``: transfer cell-type labels with a calibrated linear probe on SPATIA embeddings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .. import _results
from .._constants import Defaults, Keys
from .._utils import seed_from, softmax
from ..pp._elements import get_table

logger = logging.getLogger(__name__)


def _features(table, use_rep: str | list[str], model, data, table_key: str | None, **embed_kwargs) -> np.ndarray:
    """Stack the requested ``obsm`` keys; embed with ``model`` (without writing) when they are missing."""
    reps = [use_rep] if isinstance(use_rep, str) else list(use_rep)
    missing = [r for r in reps if r not in table.obsm]
    emb: dict[str, np.ndarray] = {}
    if missing:
        if model is None:
            raise KeyError(
                f"No obsm {missing} in the table: run `sp.tl.fit` / `sp.tl.embed` first, or pass the model."
            )
        from ._fit import embed

        inv = {v: k for k, v in Keys.LEVEL_TO_EMB.items()}
        unknown = [r for r in missing if r not in inv]
        if unknown:
            raise KeyError(f"No obsm {unknown} in the table, and the model only computes {list(inv)}.")
        out = embed(data, model, table_key=table_key, inplace=False, **embed_kwargs)
        emb = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("obsm/")}
    parts = [np.asarray(table.obsm[r]) if r in table.obsm else emb[r] for r in reps]
    # the embedding itself when one key is asked for (no copy of a million cells' features); the classifier
    # converts to float64 only the labelled cells it is fitted on and each chunk it predicts
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"obsm {reps} has NaN or infinite values.")
    return x


def _morphology_features(data, model, table_key: str | None, embed_kwargs: dict) -> np.ndarray:
    """Nucleus measurements of each cell's crop (the model's window and channels; crops from the cache)."""
    from ._impute import _PREPARE_KEYS, _prepare
    from ._nucleus import nucleus_features

    kw = {k: v for k, v in embed_kwargs.items() if k in _PREPARE_KEYS}
    cp = model.crop_params or {}
    elements = {"image_key": "images", "labels_key": "labels", "shapes_key": "shapes"}
    for key, kind in elements.items():  # the elements the model was fitted on, where this slide has them
        if kw.get(key) is None and isinstance(cp.get(key), str) and cp[key] in getattr(data, kind):
            kw[key] = cp[key]
    prepared = _prepare(data, model, {**kw, "table_key": table_key}, use_expression=False)
    return nucleus_features(prepared.arrays.crops)


def _with_morphology(x: np.ndarray, data, model, table_key, embed_kwargs, required: bool) -> np.ndarray | None:
    """``x`` with the nucleus features appended; ``None`` when they cannot be measured and were not
    required (logged as a warning)."""
    try:
        return np.hstack([x, _morphology_features(data, model, table_key, embed_kwargs)])
    except (KeyError, ValueError) as err:
        if required:
            raise
        logger.warning("annotate reads the embedding alone: the nucleus features could not be measured (%s). "
                       "Pass image_key= / labels_key= to describe the image, or morphology=False.", err)
        return None


def _use_morphology(morphology: bool | None, model, datas) -> bool:
    """Whether nucleus features join the embedding: asked for, or (``None``) possible for every input."""
    from ..pp._elements import _is_sdata

    why = None
    if model is None:
        why = "no model (its crop window and channels define the crops)"
    elif not model.config.image.enabled:
        why = "the model has no image branch"
    elif not all(_is_sdata(d) and len(d.images) for d in datas):
        why = "an input is not a SpatialData with an image"
    if why is not None and morphology:
        raise ValueError(f"morphology=True needs each cell's crop, but there is {why}: pass morphology=False.")
    return why is None and morphology is not False


def _logits(clf, x: np.ndarray) -> np.ndarray:
    d = clf.decision_function(x)
    return np.stack([np.zeros_like(d), d], 1) if d.ndim == 1 else d


def _predict_proba(clf, scaler, x: np.ndarray, temp: float) -> np.ndarray:
    """Calibrated class probabilities of every row of ``x``, a chunk of rows at a time (each chunk in float64),
    so that a million cells' features are never copied whole."""
    n_classes = max(len(clf.classes_), 2)  # two classes: one decision value, two logits
    proba = np.empty((len(x), n_classes), dtype=np.float64)
    for s in range(0, len(x), _PREDICT_CHUNK):
        part = scaler.transform(np.asarray(x[s : s + _PREDICT_CHUNK], dtype=np.float64))
        proba[s : s + _PREDICT_CHUNK] = softmax(_logits(clf, part) / temp)
    return proba


#: Rows per chunk of prediction (65,536 × 64 features in float64: 32 MB).
_PREDICT_CHUNK = 65_536


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    conf = proba.max(1)
    correct = proba.argmax(1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of out-of-fold logits (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def _known_labels(y_raw: pd.Series, labels_key: str, unknown_label: str):
    """Mask of labelled cells, their labels as strings, and the sorted classes with their counts.

    Raises ``ValueError`` when nothing can be learnt: no labelled cell, a single class, a class with fewer
    than 2 cells, or a class named like ``unknown_label``.
    """
    known = y_raw.notna().to_numpy()
    if known.sum() == 0:
        raise ValueError(f"obs[{labels_key!r}] has no labelled cells.")
    y_known = y_raw[known].astype(str).to_numpy()
    classes, counts = np.unique(y_known, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"obs[{labels_key!r}] has a single class ({classes[0]!r}): nothing to learn.")
    if counts.min() < 2:
        rare = classes[counts < 2].tolist()
        raise ValueError(f"Classes {rare} have fewer than 2 labelled cells: relabel or drop them.")
    if unknown_label in classes:
        raise ValueError(f"{unknown_label!r} is one of your classes: pass another unknown_label.")
    return known, y_known, classes, counts


def _probe(C: float):
    """The linear probe: an L2-regularised multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000)


def _calibrate(
    xs: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int, C: float, random_state: int | None
) -> tuple[float, dict]:
    """Temperature and cross-validated statistics from out-of-fold logits of the probe.

    Returns the temperature and the out-of-fold accuracy, macro-F1 and calibration error before / after
    temperature scaling; with fewer than 2 folds, temperature 1 and no statistics (with a warning).
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold

    seed = seed_from(random_state)  # drawn even without folds, so that a shared generator advances the same
    if folds < 2:
        logger.warning("Too few labelled cells per class for cross-validation: confidences are not calibrated.")
        return 1.0, {}
    oof = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(xs, y):
        clf = _probe(C).fit(xs[tr], y[tr])
        part = np.full((len(te), n_classes), -1e9)
        part[:, clf.classes_] = _logits(clf, xs[te])
        oof[te] = part
    temp = _fit_temperature(oof, y)
    p_raw, p_cal = softmax(oof), softmax(oof / temp)
    return temp, {
        "cv_accuracy": float(accuracy_score(y, p_cal.argmax(1))),
        "cv_macro_f1": float(f1_score(y, p_cal.argmax(1), average="macro")),
        "ece_uncalibrated": expected_calibration_error(p_raw, y),
        "ece": expected_calibration_error(p_cal, y),
    }


def annotate(
    data,
    model=None,
    *,
    labels_key: str,
    reference=None,
    use_rep: str | list[str] = Keys.CELL_EMB,
    morphology: bool | None = None,
    table_key: str | None = Defaults.TABLE,
    reference_table_key: str | None = Defaults.TABLE,
    unknown_threshold: float = 0.5,
    unknown_label: str = "unknown",
    keep_known: bool = True,
    key_added: str = Keys.CELL_TYPE,
    n_folds: int = 5,
    C: float = 1.0,
    random_state: int | None = 0,
    overwrite: bool = False,
    inplace: bool = True,
    **embed_kwargs: Any,
):
    """Transfer cell-type labels from labelled cells (or a labelled reference) to the other cells.

    A multinomial logistic regression (a linear probe, as in the SPATIA paper) on the standardised
    embedding and, when the model and the slide's image allow it, measured nucleus features of each cell's
    crop (``morphology``), with temperature scaling fitted on out-of-fold predictions so that the confidences are
    calibrated: among cells predicted with confidence 0.8, about 80 % are right. Cells whose confidence is
    below ``unknown_threshold`` are called ``unknown_label``.

    Parameters
    ----------
    data
        SpatialData or AnnData holding the cells to annotate (and, without ``reference``, the known labels).
    model
        A trained :class:`~spatia.SpatiaModel`, used only when ``use_rep`` is missing (then the cells are
        embedded on the fly and the embedding is not written).
    labels_key
        ``obs`` column of known labels: in ``data`` (NaN = unlabelled) or, with ``reference``, in the reference.
    reference
        Labelled SpatialData / AnnData to transfer from (embedded with ``model`` if it lacks ``use_rep``;
        an AnnData reference must already hold ``use_rep``).
    use_rep
        ``obsm`` key(s) of the features (several are concatenated), e.g.
        ``["X_spatia_cell", "X_spatia_niche"]``.
    morphology
        Also read 12 nucleus measurements of each cell's crop (area, perimeter, shape, intensity, axis lengths
        and GLCM texture of the Otsu region at the crop's centre, the cell's own nucleus, standardised with the
        embedding), so that types that differ in nuclear size, shape or chromatin texture more than in
        expression are told apart. ``None`` (default): when ``model`` is given, reads images and the inputs
        are SpatialData; ``False``: the embedding alone. The crops are the model's (window, size, channels), reused from an earlier call when
        possible. Measuring takes about 1 ms per cell on one CPU core (some 15 minutes for a million
        cells), in chunks of bounded memory.
    table_key, reference_table_key
        Tables when ``data`` / ``reference`` are SpatialData.
    unknown_threshold
        Calibrated confidence below which a cell is ``unknown_label`` (0 disables).
    unknown_label
        Name of the unknown category.
    keep_known
        Labelled cells of ``data`` keep their own label (confidence 1); otherwise they get the probe's.
    key_added
        ``obs`` column of the labels; ``f"{key_added}_confidence"`` (obs) and ``f"{key_added}_proba"``
        (obsm) hold the confidence and the class probabilities.
    n_folds
        Folds of the out-of-fold predictions used for calibration and the reported accuracy.
    C
        Inverse L2 regularisation of the logistic regression.
    random_state
        Seed of the folds.
    overwrite
        Replace existing ``obs[key_added]`` / confidence / probability columns (e.g. of an earlier annotate).
    inplace
        Write into the table and ``uns['spatia']['annotate']`` (return ``None``), or return
        ``{"obs/<key_added>": labels, "obs/<key_added>_confidence": ..., "obsm/<key_added>_proba": ...,
        "params": ...}`` and leave the data untouched.
    **embed_kwargs
        Passed to :func:`spatia.tl.embed` when embedding on the fly (``image_key=``, ``shapes_key=``...).

    Returns
    -------
    ``None``, writing into the table:

    - ``obs['spatia_cell_type']`` (categorical, with ``unknown_label``),
    - ``obs['spatia_cell_type_confidence']`` (calibrated top-class probability),
    - ``obsm['spatia_cell_type_proba']`` (DataFrame of class probabilities),
    - ``uns['spatia']['annotate']``: classes, temperature, out-of-fold accuracy and macro-F1, calibration
      error (ECE) before and after temperature scaling, number of unknown cells.

    Raises
    ------
    KeyError
        Unknown ``labels_key`` or ``use_rep``.
    KeyError
        ``key_added`` (or its confidence / probability columns) exists and ``overwrite`` is False.
    ValueError
        ``key_added`` equal to ``labels_key``; fewer than two classes or a class with fewer than 2 labelled
        cells.

    Examples
    --------
    >>> sp.tl.annotate(sdata, model, labels_key="cell_type")
    >>> sdata["table"].obs[["spatia_cell_type", "spatia_cell_type_confidence"]].head()
    """
    from sklearn.preprocessing import StandardScaler

    table = get_table(data, table_key)
    if not 0 <= unknown_threshold < 1:
        raise ValueError(f"unknown_threshold must be in [0, 1), got {unknown_threshold}.")
    if key_added == labels_key and reference is None:
        raise ValueError(f"key_added={key_added!r} is the column of your own labels: choose another key_added.")
    conf_key, proba_key = f"{key_added}_confidence", f"{key_added}_proba"
    paths = (f"obs/{key_added}", f"obs/{conf_key}", f"obsm/{proba_key}")
    if inplace:
        _results.check_free(data, table, paths, overwrite=overwrite)
    # training cells
    if reference is None:
        src_table, src_data, src_key = table, data, table_key
    else:
        src_table, src_data, src_key = get_table(reference, reference_table_key), reference, reference_table_key
    if labels_key not in src_table.obs:
        where = "the reference" if reference is not None else "the table"
        raise KeyError(f"No obs[{labels_key!r}] in {where}; available columns: {list(src_table.obs.columns)}.")
    known, y_known, classes, counts = _known_labels(src_table.obs[labels_key], labels_key, unknown_label)
    x_all = _features(table, use_rep, model, data, table_key, **embed_kwargs)
    x_src = x_all if reference is None else _features(src_table, use_rep, model, src_data, src_key, **embed_kwargs)
    with_morphology = _use_morphology(morphology, model, [data] + ([reference] if reference is not None else []))
    if with_morphology:
        m_all = _with_morphology(x_all, data, model, table_key, embed_kwargs, bool(morphology))
        m_src = m_all if reference is None or m_all is None else _with_morphology(
            x_src, reference, model, src_key, embed_kwargs, bool(morphology))
        with_morphology = m_all is not None and m_src is not None
        if with_morphology:
            x_all, x_src = m_all, m_src
    if x_src.shape[1] != x_all.shape[1]:
        raise ValueError(f"The reference's {use_rep} has {x_src.shape[1]} dimensions, the data's {x_all.shape[1]}.")
    y = np.searchsorted(classes, y_known)
    x_known = np.asarray(x_src[known], dtype=np.float64)
    scaler = StandardScaler().fit(x_known)
    xs = scaler.transform(x_known)
    folds = int(min(n_folds, counts.min()))
    temp, stats = _calibrate(xs, y, len(classes), folds=folds, C=C, random_state=random_state)
    clf = _probe(C).fit(xs, y)
    proba = _predict_proba(clf, scaler, x_all, temp)
    conf = proba.max(1)
    codes = proba.argmax(1)
    codes[conf < unknown_threshold] = len(classes)  # the unknown category
    if reference is None and keep_known:
        codes[known] = y
        conf[known] = 1.0
        proba[known] = np.eye(len(classes))[y]
    cats = list(classes) + ([unknown_label] if unknown_threshold > 0 else [])
    lab = pd.Categorical.from_codes(codes, categories=cats)
    proba_df = pd.DataFrame(proba, index=table.obs_names, columns=list(classes))
    stats.update({
        "classes": list(classes), "temperature": temp, "unknown_threshold": float(unknown_threshold),
        "n_unknown": int((lab == unknown_label).sum()), "n_labelled": int(known.sum()),
        "use_rep": use_rep, "morphology": with_morphology, "labels_key": labels_key, "key_added": key_added,
        "reference": reference is not None, "keep_known": bool(keep_known and reference is None),
    })
    results = dict(zip(paths, (lab, conf.astype(np.float32), proba_df), strict=True))
    if not inplace:
        return _results.returned("annotate", results, stats)
    _results.write(data, table, results, function="annotate", params=stats, overwrite=True)
    logger.info("Out-of-fold accuracy %.3f, calibration error %.3f (uncalibrated %.3f), %d unknown.",
                stats.get("cv_accuracy", np.nan), stats.get("ece", np.nan), stats.get("ece_uncalibrated", np.nan),
                stats["n_unknown"])
    return None
