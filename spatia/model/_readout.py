"""The image readout: expression from what a cell's image shows, fitted on the cells a model was trained on.

``sp.tl.predict_expression`` reads it. Its inputs are the measured nucleus features of each crop (size, shape,
intensity, chromatin texture) and the model's image-only cell embedding; its output is log1p expression per
10,000 counts. A ridge regression: it cannot fit the training slide's noise, and the weight of the learned
embedding beside the measured features is chosen on the training cells (leave-one-out error), so an
embedding that adds nothing is given none.
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


def fit_readout(nucleus: np.ndarray, embedding: np.ndarray, target: np.ndarray) -> ImageReadout:
    """Fit the readout: for each embedding weight, a ridge over :data:`ALPHAS` with its efficient leave-one-out
    error; the weight and penalty with the lowest error win."""
    from sklearn.linear_model import RidgeCV

    n_nuc = nucleus.shape[1]
    x = np.hstack([nucleus, embedding]).astype(np.float64)
    mean = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mean) / sd
    y = np.asarray(target, dtype=np.float64)
    best = None
    for w in EMBEDDING_WEIGHTS:
        zw = z.copy()
        zw[:, n_nuc:] *= w
        ridge = RidgeCV(alphas=ALPHAS).fit(zw, y)
        mse = -float(ridge.best_score_)
        if best is None or mse < best[0] - 1e-12:
            best = (mse, w, ridge)
    mse, w, ridge = best
    scale = sd.copy()
    if w > 0:
        scale[n_nuc:] /= w
    coef = np.asarray(ridge.coef_, dtype=np.float64).T.reshape(x.shape[1], -1)
    if w == 0:
        coef[n_nuc:] = 0.0
        scale[n_nuc:] = 1.0
    info = {"alpha": float(ridge.alpha_), "embedding_weight": float(w), "n_cells": int(len(x)),
            "n_nucleus_features": int(n_nuc), "loo_mse": mse}
    return ImageReadout(mean, scale, coef, np.asarray(ridge.intercept_, dtype=np.float64).reshape(-1), info)


def log_expression(counts) -> np.ndarray:
    """log1p of counts per 10,000 (the readout's target), dense float64."""
    import scipy.sparse as sp_sparse

    x = counts.toarray() if sp_sparse.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1.0) * 1e4)


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
