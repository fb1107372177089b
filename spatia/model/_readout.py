"""The image readout: expression from what a cell's image shows, fitted on the cells a model was trained on.

``sp.tl.predict_expression`` reads it. Its inputs are the measured features of each crop (the nucleus's size,
shape, intensity and chromatin texture; each channel's intensities around the centre, where the stains of a
multiplexed image tell cell types apart) and the model's image-only cell embedding; its output is log1p
expression per 10,000 counts. It has two parts, blended gene by gene:

- **a ridge regression** on a piecewise-linear basis of the nucleus features (each feature bent at its
  quintiles) and the embedding: smooth trends, such as a gene that follows nuclear size;
- **a mixture of cell states**: the training cells' expression is cut into states (KMeans), a logistic
  regression gives each cell's probability of each state from the same inputs, and the prediction is the
  probability-weighted mean of the states plus a ridge on what the states leave. Markers of a cell type are
  a step, not a trend: a ridge blurs them, the mixture does not.

Everything is chosen on the training cells: the ridge penalties by exact leave-one-out error; whether the channel
intensities are used, and the weight of the learned embedding beside the measured features, by the
one-standard-error rule (a block that adds nothing is given no weight); and each gene's blend of the two parts
by cross-validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .._utils import softmax

#: Weights tried for the embedding block against the (standardised) nucleus features; 0 drops it.
EMBEDDING_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
#: Ridge penalties tried (on standardised features).
ALPHAS = tuple(np.logspace(-2, 4, 13).tolist())
#: Training cells the readout is fitted on at most (a seeded sample beyond that).
MAX_CELLS = 10_000
#: Quantiles of each standardised nucleus feature where its piecewise-linear basis bends.
KNOT_QUANTILES = (0.2, 0.4, 0.6, 0.8)
#: Cell states of the mixture (fewer on small training sets: at least :data:`CELLS_PER_STATE` cells each).
N_STATES = 10
CELLS_PER_STATE = 20
#: Folds of the cross-validation that sets each gene's blend of the ridge and the mixture.
N_FOLDS = 5
#: Crops the nucleus features are measured on when the model's crops sample the image too coarsely: a window
#: of NUCLEUS_CROP_UM around the cell, at the image's own pixel size but no finer than NUCLEUS_UM_PER_PX.
NUCLEUS_CROP_UM = 12.0
NUCLEUS_UM_PER_PX = 0.25

#: The state classifier: an L2 logistic regression (lbfgs). It is most of the readout's cost on small slides
#: (some 10 s for 1,000 cells): the piecewise-linear basis is ill-conditioned and lbfgs takes ~200 iterations.
_CLASSIFIER = {"C": 1.0, "max_iter": 500, "tol": 1e-4}
#: Cells per block of :meth:`ImageReadout.predict`.
_PREDICT_BLOCK = 16_384

_ARRAYS = ("nucleus_mean", "nucleus_scale", "knots", "basis_mean", "basis_scale", "embedding_mean",
           "embedding_scale", "coef", "intercept", "state_coef", "state_intercept", "state_means")


@dataclass
class ImageReadout:
    """Measured crop features and cell embedding → log1p expression per 10,000 counts (see the module's docstring).

    The "nucleus features" here are what :func:`~spatia.tl._nucleus.nucleus_features` measures with
    ``channels=True``: the nucleus and each channel's intensities. With ``z`` the standardised features, the inputs are ``x = [basis(z), embedding]``, each column
    standardised (the embedding's scale includes its weight). The prediction is
    ``x @ coef + intercept + softmax(x @ state_coef + state_intercept) @ state_means``, clipped at 0: the two
    parts are already blended into ``coef``, ``intercept`` and ``state_means``.

    Attributes
    ----------
    nucleus_mean, nucleus_scale
        ``(F,)`` standardisation of the nucleus features.
    knots
        ``(K, F)`` where each standardised nucleus feature's basis bends.
    basis_mean, basis_scale, embedding_mean, embedding_scale
        Standardisation of the basis ``(F (K + 1),)`` and of the embedding ``(d,)``.
    coef, intercept
        ``(F (K + 1) + d, n_genes)`` and ``(n_genes,)`` in the model's gene order.
    state_coef, state_intercept, state_means
        ``(F (K + 1) + d, S)``, ``(S,)`` and ``(S, n_genes)``: the state classifier and the states' mean
        expression, weighted by each gene's blend (``S = 0``: no mixture).
    info
        ``alpha``, ``embedding_weight``, ``n_cells``, ``n_nucleus_features``, ``loo_mse`` (the ridge's, per gene,
        mean), ``n_states`` and ``mixture_weight`` (the genes' mean blend: 0 ridge only, 1 mixture only).
    """

    nucleus_mean: np.ndarray
    nucleus_scale: np.ndarray
    knots: np.ndarray
    basis_mean: np.ndarray
    basis_scale: np.ndarray
    embedding_mean: np.ndarray
    embedding_scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    state_coef: np.ndarray
    state_intercept: np.ndarray
    state_means: np.ndarray
    info: dict = field(default_factory=dict)

    def inputs(self, nucleus: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """The standardised inputs ``x`` of ``(n, F)`` nucleus features and ``(n, d)`` embeddings."""
        nucleus, embedding = np.asarray(nucleus, dtype=np.float64), np.asarray(embedding, dtype=np.float64)
        f, d = len(self.nucleus_mean), len(self.embedding_mean)
        if nucleus.ndim != 2 or embedding.ndim != 2 or nucleus.shape[1] != f or embedding.shape[1] != d:
            raise ValueError(f"The readout reads {f} nucleus features and a {d}-dimensional embedding, got "
                             f"{nucleus.shape[1:]} and {embedding.shape[1:]}: the model and its readout do not match.")
        basis = _basis((nucleus - self.nucleus_mean) / self.nucleus_scale, self.knots)
        return np.hstack([(basis - self.basis_mean) / self.basis_scale,
                          (embedding - self.embedding_mean) / self.embedding_scale])

    def predict(self, nucleus: np.ndarray, embedding: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(n, n_genes)`` float32 predictions (log1p per 10,000, clipped at 0) from ``(n, F)`` nucleus
        features and ``(n, d)`` embeddings; computed in blocks of cells, so the float64 temporaries stay small.
        ``out``: the ``(n, n_genes)`` float32 array to write them into (e.g. a memmap), else a new one."""
        from .._utils import release_mapped

        if out is None:
            out = np.empty((len(nucleus), self.n_genes), dtype=np.float32)
        elif out.shape != (len(nucleus), self.n_genes) or out.dtype != np.float32:
            raise ValueError(f"out must be a float32 array of shape {(len(nucleus), self.n_genes)}, got "
                             f"{out.dtype} {out.shape}.")
        for start in range(0, len(nucleus), _PREDICT_BLOCK):
            x = self.inputs(nucleus[start:start + _PREDICT_BLOCK], embedding[start:start + _PREDICT_BLOCK])
            y = x @ self.coef + self.intercept
            if self.state_means.shape[0]:
                y += softmax(x @ self.state_coef + self.state_intercept) @ self.state_means
            out[start:start + len(y)] = np.maximum(y, 0.0)
            release_mapped(out)
        return out

    def tensors(self) -> dict:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float32)) for k in _ARRAYS}

    @classmethod
    def from_tensors(cls, tensors: dict, info: dict) -> ImageReadout:
        missing = [k for k in _ARRAYS if k not in tensors]
        if missing:
            raise ValueError(f"The readout lacks {', '.join(missing)}: it was saved by an earlier development "
                             "version of spatia. Refit the model (sp.tl.fit), or delete readout.safetensors and "
                             "the 'readout' entry of spatia_model.json to predict with the decoder.")
        a = {k: tensors[k].numpy().astype(np.float64) for k in _ARRAYS}
        f, d = len(a["nucleus_mean"]), len(a["embedding_mean"])
        k = a["knots"].shape[0] if a["knots"].ndim == 2 else -1
        width = f * (k + 1) + d
        g = a["intercept"].shape[0] if a["intercept"].ndim == 1 else -1
        s = a["state_intercept"].shape[0] if a["state_intercept"].ndim == 1 else -1
        shapes = {"nucleus_scale": (f,), "knots": (k, f), "basis_mean": (f * (k + 1),),
                  "basis_scale": (f * (k + 1),), "embedding_scale": (d,), "coef": (width, g),
                  "state_coef": (width, s), "state_means": (s, g)}
        if min(k, g, s) < 0 or any(a[name].shape != shape for name, shape in shapes.items()):
            raise ValueError("The readout's arrays have inconsistent shapes.")
        scales = ("nucleus_scale", "basis_scale", "embedding_scale")
        if not all(np.isfinite(v).all() for v in a.values()) or any((a[n] <= 0).any() for n in scales):
            raise ValueError("The readout's arrays hold NaN, infinite or non-positive scale values.")
        return cls(**a, info=dict(info))

    @property
    def n_genes(self) -> int:
        return self.coef.shape[1]


def _basis(z: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Piecewise-linear basis of standardised features: each feature, then ``max(feature − knot, 0)`` per knot."""
    return np.hstack([z] + [np.maximum(z - q, 0.0) for q in knots])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sd = x.std(0)
    return x.mean(0), np.where(sd > 1e-12, sd, 1.0)


def _loo_errors(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Leave-one-out squared error of a ridge of ``y`` on ``z`` (both centred; intercept included), averaged
    over the columns of ``y``: ``(len(ALPHAS), n)``, one row per penalty. Exact and cheap (from the SVD of ``z``):
    no ``cells × genes × penalties`` array, so a 5,000-gene panel costs a few products of ``z`` with ``y``."""
    n = len(z)
    u, sv, vt = np.linalg.svd(z, full_matrices=False)
    p = u.T @ y  # (F, G)
    m = y @ p.T  # (n, F): y_i · (U^T y)_j
    ppt = p @ p.T  # (F, F)
    yy = np.einsum("ig,ig->i", y, y)
    out = np.empty((len(ALPHAS), n))
    for a, alpha in enumerate(ALPHAS):
        d = sv**2 / (sv**2 + alpha)  # shrinkage of each direction: fitted = U diag(d) U^T y
        ud = u * d
        fit_dot_y = (ud * m).sum(1)
        fit_sq = ((ud @ ppt) * ud).sum(1)  # a matrix product: a 3-operand einsum runs as slow loops
        resid_sq = np.maximum(yy - 2 * fit_dot_y + fit_sq, 0.0)
        h = (u**2) @ d + 1.0 / n  # leverage, the intercept's 1/n included
        out[a] = resid_sq / np.maximum(1.0 - h, 1e-6) ** 2 / y.shape[1]
    return out, (u, sv, vt, p)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(coef, intercept, alpha)`` of a ridge of ``y`` on ``x``; ``alpha=None``: the penalty of :data:`ALPHAS`
    with the lowest leave-one-out error."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    if alpha is None:
        errors, (u, sv, vt, p) = _loo_errors(xc, yc)
        alpha = ALPHAS[int(np.argmin(errors.mean(1)))]
    else:
        u, sv, vt = np.linalg.svd(xc, full_matrices=False)
        p = u.T @ yc
    coef = vt.T @ ((sv / (sv**2 + alpha))[:, None] * p)
    return coef, ym - xm @ coef, float(alpha)


def _states(y: np.ndarray, random_state: int) -> np.ndarray:
    """Cell states of the training cells: KMeans on a PCA of their standardised log-expression (``-1``: too
    few cells for a mixture)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n_states = min(N_STATES, len(y) // CELLS_PER_STATE)
    if n_states < 2:
        return np.full(len(y), -1)
    mean, sd = _standardise(y)
    n_comps = max(1, min(15, y.shape[1] - 1, len(y) - 1))
    pcs = PCA(n_comps, random_state=random_state).fit_transform((y - mean) / sd) if y.shape[1] > 1 else y - mean
    return KMeans(n_states, n_init=4, random_state=random_state).fit_predict(pcs)


def _fit_mixture(x: np.ndarray, y: np.ndarray, states: np.ndarray, n_states: int, random_state: int):
    """State classifier, state means and the ridge of what the states leave: ``(state_coef, state_intercept,
    state_means, coef, intercept)``. States absent from ``states`` get no probability."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    state_coef = np.zeros((x.shape[1], n_states))
    state_intercept = np.full(n_states, -np.inf)
    present = np.unique(states)
    means = np.tile(y.mean(0), (n_states, 1))
    for s in present:
        means[s] = y[states == s].mean(0)
    if len(present) == 1:
        state_intercept[present] = 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(**_CLASSIFIER, random_state=random_state).fit(x, states)
        if len(present) == 2:  # sklearn's binary case: one logit for the second class
            state_coef[:, present[1]], state_intercept[present] = clf.coef_[0], (0.0, clf.intercept_[0])
        else:
            state_coef[:, present], state_intercept[present] = clf.coef_.T, clf.intercept_
    coef, intercept, _ = _ridge(x, y - means[states])
    return state_coef, state_intercept, means, coef, intercept


def _mixture_predict(x, state_coef, state_intercept, means, coef, intercept) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # -inf logits of absent states → probability 0
        logits = x @ state_coef + state_intercept
    return softmax(logits) @ means + x @ coef + intercept


def _choose_embedding_weight(basis: np.ndarray, emb: np.ndarray, yc: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``(weight, alpha, per-cell loo error)``: for each weight of :data:`EMBEDDING_WEIGHTS` the penalty with the
    lowest leave-one-out error of the ridge, then the smallest weight within one standard error (paired over
    cells) of the best (the one-standard-error rule: the embedding has to earn its place)."""
    fits = []
    for w in EMBEDDING_WEIGHTS:
        zw = basis if w == 0 or emb.shape[1] == 0 else np.hstack([basis, w * emb])
        zw = zw - zw.mean(0)
        errors, _ = _loo_errors(zw, yc)
        a = int(np.argmin(errors.mean(1)))
        fits.append((w, a, errors[a]))
    chosen = _one_se(fits, lambda fit: fit[2])
    w, a, err = fits[chosen]
    return float(w), float(ALPHAS[a]), err


def _one_se(options: list, errors) -> int:
    """Index of the first of ``options`` (simplest first) whose per-cell errors are within one standard error
    (paired over cells) of the best option's."""
    best = min(range(len(options)), key=lambda i: errors(options[i]).mean())
    for i in range(best):
        diff = errors(options[i]) - errors(options[best])
        if diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
            return i
    return best


def fit_readout(nucleus: np.ndarray, embedding: np.ndarray, target: np.ndarray, random_state: int = 0,
                optional: int = 0) -> ImageReadout:
    """Fit the readout (see the module's docstring) on ``(n, F)`` nucleus features, ``(n, d)`` embeddings and
    ``(n, n_genes)`` log-expression targets. The last ``optional`` columns of ``nucleus`` (the channel
    intensities) are used only when they earn their place on the training cells: when the ridge's leave-one-out
    error with them is lower by more than one standard error (``info["channel_features"]``)."""
    nucleus = np.asarray(nucleus, dtype=np.float64)
    embedding = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    n, f = nucleus.shape
    nuc_mean, nuc_scale = _standardise(nucleus)
    z = (nucleus - nuc_mean) / nuc_scale
    knots = np.quantile(z, KNOT_QUANTILES, axis=0) if n else np.zeros((len(KNOT_QUANTILES), f))
    basis = _basis(z, knots)
    basis_mean, basis_scale = _standardise(basis)
    emb_mean, emb_scale = _standardise(embedding)
    basis = (basis - basis_mean) / basis_scale
    emb = (embedding - emb_mean) / emb_scale
    # which basis columns come from the optional block (the basis repeats the F features once per knot + 1)
    in_block = np.tile(np.arange(f) >= f - optional, len(KNOT_QUANTILES) + 1)
    yc = y - y.mean(0)
    candidates = [(False, *_choose_embedding_weight(basis[:, ~in_block], emb, yc))]
    if optional:
        candidates.append((True, *_choose_embedding_weight(basis, emb, yc)))
    use_block, w, alpha, loo_err = candidates[_one_se(candidates, lambda c: c[3])]
    loo_mse = float(loo_err.mean())
    if optional and not use_block:  # fitted on zeros, their coefficients are zero (and set so below)
        basis = np.where(in_block, 0.0, basis)
    if w > 0:
        x, emb_scale = np.hstack([basis, w * emb]), emb_scale / w
    else:  # the embedding gets no weight: fitted on zeros, its coefficients are zero (and set so below)
        x = np.hstack([basis, np.zeros_like(emb)])
    ridge_coef, ridge_intercept, _ = _ridge(x, y, alpha)

    states = _states(y, random_state)
    n_states = int(states.max()) + 1
    g = y.shape[1]
    blend = np.zeros(g)
    state_coef, state_intercept, means = np.zeros((x.shape[1], 0)), np.zeros(0), np.zeros((0, g))
    coef, intercept = ridge_coef, ridge_intercept
    if n_states >= 2:
        # each gene's blend b minimises the cross-validated error of (1 − b) ridge + b mixture:
        # b = −Σ (r − y)(m − r) / Σ (m − r)², clipped to [0, 1]
        cross, square = np.zeros(g), np.zeros(g)
        folds = np.random.default_rng(random_state).permutation(n) % N_FOLDS
        for k in range(N_FOLDS):
            tr, te = folds != k, folds == k
            if not te.any() or len(np.unique(states[tr])) < 2:
                continue
            rc, ri, _ = _ridge(x[tr], y[tr], alpha)
            r = x[te] @ rc + ri
            m = _mixture_predict(x[te], *_fit_mixture(x[tr], y[tr], states[tr], n_states, random_state))
            cross += np.einsum("ig,ig->g", r - y[te], m - r)
            square += np.einsum("ig,ig->g", m - r, m - r)
        blend = np.clip(-cross / np.where(square > 0, square, np.inf), 0.0, 1.0)
        state_coef, state_intercept, means, mix_coef, mix_intercept = _fit_mixture(x, y, states, n_states, random_state)
        coef = (1 - blend) * ridge_coef + blend * mix_coef
        intercept = (1 - blend) * ridge_intercept + blend * mix_intercept
        means = means * blend
        state_intercept = np.where(np.isfinite(state_intercept), state_intercept, -1e4)
    if w == 0:
        coef[basis.shape[1]:] = 0.0
        state_coef[basis.shape[1]:] = 0.0
    if optional and not use_block:
        coef[:basis.shape[1]][in_block] = 0.0
        state_coef[:basis.shape[1]][in_block] = 0.0
    info = {"alpha": alpha, "embedding_weight": w, "n_cells": int(n), "n_nucleus_features": int(f),
            "loo_mse": loo_mse, "n_states": int(means.shape[0]), "mixture_weight": float(blend.mean()),
            "channel_features": bool(use_block)}
    return ImageReadout(nuc_mean, nuc_scale, knots, basis_mean, basis_scale, emb_mean, emb_scale, coef, intercept,
                        state_coef, state_intercept, means, info)


def nucleus_crop(crop_params: dict) -> dict | None:
    """The crops the readout measures nuclei on, for a model whose crops were cut with ``crop_params``:
    ``{"size", "crop_um"}``, or ``None`` for the model's own crops.

    The model's default crop (32 px over 16 µm: 0.5 µm per pixel) samples a Xenium image (0.2125 µm/px) at less
    than half its resolution, and chromatin texture and the nuclear outline are lost. When the model's crops are
    more than 1.25× coarser than the image (or than 0.25 µm/px, for finer images), the nuclei are measured on
    crops of 12 µm around each cell at max(image pixel, 0.25 µm); otherwise on the model's crops."""
    px, size, crop_um = crop_params.get("pixel_size_um"), crop_params.get("size"), crop_params.get("crop_um")
    if px is None or crop_um is None or not size:
        return None
    target = max(float(np.min(px)), NUCLEUS_UM_PER_PX)
    if float(crop_um) / float(size) <= 1.25 * target:
        return None
    return {"size": int(round(NUCLEUS_CROP_UM / target)), "crop_um": NUCLEUS_CROP_UM}


def nucleus_store(data, prepared, geometry: dict, rows: np.ndarray | None = None):
    """Crops of ``geometry`` (:func:`nucleus_crop`) for the cells ``rows`` of ``prepared``'s table (default
    all, in table order), cut from the same image(s) as the model's crops; large sets go to a temporary store."""
    from ..pp._crops import crops_for

    kw = dict(prepared.crop_kwargs, size=int(geometry["size"]), crop_um=float(geometry["crop_um"]))
    kw.pop("store", None)  # never the model's store: crops_for keeps them in memory or in a temporary store
    if rows is not None:
        import spatialdata as sd

        key = next(k for k, t in data.tables.items() if t is prepared.table)
        data = sd.SpatialData(images=dict(data.images), labels=dict(data.labels), shapes=dict(data.shapes),
                              points=dict(data.points), tables={key: prepared.table[np.asarray(rows)].copy()})
        kw["table_key"] = key
        if kw.get("geometry") is not None:
            kw["geometry"] = kw["geometry"].subset(np.asarray(rows))
    return crops_for(data, None, **kw)


def log_expression(counts) -> np.ndarray:
    """log1p of counts per 10,000 (the readout's target), dense."""
    from ..pp._expression import cp10k

    return np.log1p(cp10k(counts))


def image_only(arrays):
    """A view of ``arrays`` in which no cell shows its expression (the model reads images only)."""
    return dataclasses.replace(arrays, drop_expression=np.ones(arrays.n, dtype=bool))


def readout_features(model, arrays, cells: np.ndarray | None = None, batch_size: int | None = None,
                     device: str | None = None, nuclei=None) -> tuple[np.ndarray, np.ndarray]:
    """The readout's inputs for ``cells`` (default all): nucleus features of their crops and their image-only
    cell embeddings (expression hidden from every cell, as on a slide without it). ``nuclei``: a crop store
    of exactly ``cells`` (in that order) to measure the nuclei on, instead of the model's crops."""
    from ..tl._nucleus import nucleus_features

    emb = model.infer(image_only(arrays), outputs=("cell",), cells=cells, batch_size=batch_size,
                      device=device)["cell"]
    nucleus = (nucleus_features(arrays.crops, cells, channels=True) if nuclei is None
               else nucleus_features(nuclei, channels=True))
    return nucleus, emb


def train_readout(model, arrays, cells: np.ndarray, random_state: int = 0, nuclei_for=None,
                  geometry: dict | None = None) -> ImageReadout:
    """Fit ``model``'s readout on ``cells`` of ``arrays`` (their counts are the target; at most
    :data:`MAX_CELLS` of them, a seeded sample beyond that). ``nuclei_for(rows)``: the crop store of those rows
    that the nuclei are measured on, cut with ``geometry`` (:func:`nucleus_crop`); ``None``: the model's crops."""
    cells = np.unique(np.asarray(cells, dtype=np.int64))
    if len(cells) > MAX_CELLS:
        cells = np.sort(np.random.default_rng(random_state).choice(cells, MAX_CELLS, replace=False))
    nuclei = None if nuclei_for is None else nuclei_for(cells)
    nucleus, emb = readout_features(model, arrays, cells, nuclei=nuclei)
    from ..tl._nucleus import N_NUCLEUS_FEATURES

    readout = fit_readout(nucleus, emb, log_expression(arrays.counts[cells]), random_state,
                          optional=nucleus.shape[1] - N_NUCLEUS_FEATURES)
    readout.info["nucleus_crop"] = None if nuclei is None else dict(geometry)
    return readout
