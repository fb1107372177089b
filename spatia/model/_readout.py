"""The image readout: expression from what a cell's image shows, fitted on the cells a model was trained on.

``sp.tl.predict_expression`` reads it. Its inputs are the measured nucleus features of each crop (size, shape,
intensity, chromatin texture) and the model's image-only cell embedding; its output is log1p expression per
10,000 counts. A ridge regression: it cannot fit the training slide's noise, and the weight of the learned
embedding beside the measured features is chosen on the training cells (leave-one-out error, one-standard-
error rule), so an embedding that adds nothing is given none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

#: Weights tried for the embedding block against the (standardised) nucleus features; 0 drops it.
EMBEDDING_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
#: Ridge penalties tried (on standardised features).
ALPHAS = tuple(np.logspace(-2, 4, 13).tolist())
#: Training cells the readout is fitted on at most (a seeded sample beyond that).
MAX_CELLS = 10_000


@dataclass
class ImageReadout:
    """Ridge map ``[nucleus features, weight × cell embedding]`` → log1p expression per 10,000 counts.

    Attributes
    ----------
    mean, scale
        ``(F,)`` standardisation of the features (the embedding's scale includes its weight).
    coef, intercept
        ``(F, n_genes)`` and ``(n_genes,)`` in the model's gene order.
    info
        ``alpha``, ``embedding_weight``, ``n_cells``, ``n_nucleus_features``, ``loo_mse`` (per gene, mean).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    info: dict = field(default_factory=dict)

    def predict(self, nucleus: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """``(n, n_genes)`` float32 predictions (log1p per 10,000, clipped at 0) from ``(n, 12)`` nucleus
        features and ``(n, d)`` embeddings."""
        x = np.hstack([nucleus, embedding]).astype(np.float64)
        if x.shape[1] != len(self.mean):
            raise ValueError(f"The readout reads {len(self.mean)} features, got {x.shape[1]}: the model and "
                             "its readout do not match.")
        y = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return np.maximum(y, 0.0).astype(np.float32)

    def tensors(self) -> dict:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float32))
                for k in ("mean", "scale", "coef", "intercept")}

    @classmethod
    def from_tensors(cls, tensors: dict, info: dict) -> ImageReadout:
        arrays = {k: tensors[k].numpy().astype(np.float64) for k in ("mean", "scale", "coef", "intercept")}
        f, g = arrays["coef"].shape
        if arrays["mean"].shape != (f,) or arrays["scale"].shape != (f,) or arrays["intercept"].shape != (g,):
            raise ValueError("The readout's arrays have inconsistent shapes.")
        if not all(np.isfinite(a).all() for a in arrays.values()) or (arrays["scale"] <= 0).any():
            raise ValueError("The readout's arrays hold NaN, infinite or non-positive scale values.")
        return cls(**arrays, info=dict(info))


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
        fit_dot_y = np.einsum("if,if->i", ud, m)
        fit_sq = np.einsum("if,fk,ik->i", ud, ppt, ud)
        resid_sq = np.maximum(yy - 2 * fit_dot_y + fit_sq, 0.0)
        h = (u**2) @ d + 1.0 / n  # leverage, the intercept's 1/n included
        out[a] = resid_sq / np.maximum(1.0 - h, 1e-6) ** 2 / y.shape[1]
    return out, (u, sv, vt, p)


def fit_readout(nucleus: np.ndarray, embedding: np.ndarray, target: np.ndarray) -> ImageReadout:
    """Fit the readout on standardised features: for each weight of :data:`EMBEDDING_WEIGHTS`, the ridge penalty of
    :data:`ALPHAS` with the lowest exact leave-one-out error; then the smallest weight whose error is within one
    standard error (paired over cells) of the best (the one-standard-error rule: the embedding has to earn its
    place)."""
    n_nuc = nucleus.shape[1]
    x = np.hstack([nucleus, embedding]).astype(np.float64)
    mean = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mean) / sd
    y = np.asarray(target, dtype=np.float64)
    y_mean = y.mean(0)
    yc = y - y_mean
    fits = []
    for w in EMBEDDING_WEIGHTS:
        zw = z[:, :n_nuc] if w == 0 else np.hstack([z[:, :n_nuc], w * z[:, n_nuc:]])
        errors, svd = _loo_errors(zw, yc)
        a = int(np.argmin(errors.mean(1)))
        fits.append((w, a, errors[a], svd))
    best = min(range(len(fits)), key=lambda i: fits[i][2].mean())
    chosen = best
    for i, fit in enumerate(fits[:best]):  # ascending weights: the first within one SE of the best wins
        diff = fit[2] - fits[best][2]
        if diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
            chosen = i
            break
    w, a, err, (u, sv, vt, p) = fits[chosen]
    coef = np.zeros((x.shape[1], y.shape[1]))
    width = n_nuc if w == 0 else x.shape[1]
    coef[:width] = vt.T @ ((sv / (sv**2 + ALPHAS[a]))[:, None] * p)
    scale = sd.copy()
    if w > 0:
        scale[n_nuc:] /= w
    info = {"alpha": float(ALPHAS[a]), "embedding_weight": float(w), "n_cells": int(len(x)),
            "n_nucleus_features": int(n_nuc), "loo_mse": float(err.mean())}
    return ImageReadout(mean, scale, coef, y_mean, info)


def log_expression(counts) -> np.ndarray:
    """log1p of counts per 10,000 (the readout's target), dense."""
    from ..pp._expression import cp10k

    return np.log1p(cp10k(counts))


def image_only(arrays):
    """A view of ``arrays`` in which no cell shows its expression (the model reads images only)."""
    return dataclasses.replace(arrays, drop_expression=np.ones(arrays.n, dtype=bool))


def readout_features(model, arrays, cells: np.ndarray | None = None, batch_size: int | None = None,
                     device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The readout's inputs for ``cells`` (default all): nucleus features of their crops and their image-only
    cell embeddings (expression hidden from every cell, as on a slide without it)."""
    from ..tl._nucleus import nucleus_features

    emb = model.infer(image_only(arrays), outputs=("cell",), cells=cells, batch_size=batch_size,
                      device=device)["cell"]
    return nucleus_features(arrays.crops, cells), emb


def train_readout(model, arrays, cells: np.ndarray, random_state: int = 0) -> ImageReadout:
    """Fit ``model``'s readout on ``cells`` of ``arrays`` (their counts are the target; at most
    :data:`MAX_CELLS` of them, a seeded sample beyond that)."""
    cells = np.unique(np.asarray(cells, dtype=np.int64))
    if len(cells) > MAX_CELLS:
        cells = np.sort(np.random.default_rng(random_state).choice(cells, MAX_CELLS, replace=False))
    nucleus, emb = readout_features(model, arrays, cells)
    return fit_readout(nucleus, emb, log_expression(arrays.counts[cells]))
