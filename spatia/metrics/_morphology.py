"""The 10 region features of a cell crop (DESIGN.md) and distances between real and generated sets."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._utils import progress

#: Column order of :func:`morphology_features`.
MORPHOLOGY_FEATURES = (
    "area", "perimeter", "eccentricity", "solidity", "mean_intensity", "max_intensity", "min_intensity",
    "intensity_std", "major_axis_length", "minor_axis_length",
)


def _as_gray(crops, channel: int | None) -> np.ndarray:
    x = np.asarray(crops.detach().cpu().numpy() if hasattr(crops, "detach") else crops, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4:
        x = x[:, channel] if channel is not None else x.mean(1)
    if x.ndim != 3:
        raise ValueError(f"crops must be (N, H, W) or (N, C, H, W), got shape {x.shape}.")
    return x


def central_region(lab: np.ndarray) -> int:
    """Label of the region of ``lab`` nearest the crop's centre (where the cell's centroid is): the one holding
    the centre pixel, else the one with the pixel closest to it; among equals, the largest. 0 without regions."""
    from scipy import ndimage

    n = int(lab.max())
    if n == 0:
        return 0
    h, w = lab.shape
    yy, xx = np.ogrid[:h, :w]
    dist = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    ids = np.arange(1, n + 1)
    nearest = np.asarray(ndimage.minimum(dist, lab, ids))
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    return int(ids[np.lexsort((-area, nearest))[0]])


def morphology_features(crops, *, channel: int | None = 0, pixel_size: float | None = None,
                        region: str = "largest") -> pd.DataFrame:
    """Region features of each crop: Otsu mask → one connected region → 10 measurements.

    The features are those of the SPATIA paper's morphology metrics: area, perimeter, eccentricity,
    solidity, mean / max / min intensity and intensity standard deviation inside the region, and the major
    and minor axis lengths (scikit-image ``regionprops``).

    Parameters
    ----------
    crops
        ``(N, C, H, W)`` or ``(N, H, W)`` array (or tensor) of crops, e.g. :meth:`spatia.pp.CropStore.get`.
    channel
        Channel to measure (default 0, the nuclear stain in our crops); ``None`` averages the channels.
    pixel_size
        Size of a crop pixel (µm): areas are then in µm² and lengths in µm; ``None`` keeps pixels.
    region
        Which region is measured: ``"largest"`` (generated crops, one nucleus each) or ``"central"``, the one
        at the crop's centre (holding the centre pixel, else the nearest to it): the cell's own nucleus in a
        crop of dense tissue, where a neighbour's nucleus may be larger.

    Returns
    -------
    A :class:`~pandas.DataFrame` with one row per crop and the columns ``spatia.metrics.MORPHOLOGY_FEATURES``.
    Crops without foreground (constant, or nothing above the Otsu threshold) have area 0 and NaN shape
    and intensity features.

    Examples
    --------
    >>> store = sp.pp.extract_crops(sdata, image_key="morphology")
    >>> feats = sp.metrics.morphology_features(store.get(range(100)))
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    if region not in ("largest", "central"):
        raise ValueError(f"region must be 'largest' or 'central', got {region!r}.")
    x = _as_gray(crops, channel)
    out = np.full((x.shape[0], len(MORPHOLOGY_FEATURES)), np.nan, dtype=np.float64)
    s = 1.0 if pixel_size is None else float(pixel_size)
    for i, img in enumerate(progress(x, desc="morphology", unit="cell")):
        if not np.isfinite(img).all() or np.ptp(img) <= 1e-8:
            out[i, 0] = 0.0
            continue
        mask = img > threshold_otsu(img)
        lab = label(mask, connectivity=2)
        if lab.max() == 0:
            out[i, 0] = 0.0
            continue
        props = regionprops(lab, intensity_image=img)
        if region == "central":
            keep = central_region(lab)
            r = next(p for p in props if p.label == keep)
        else:
            r = max(props, key=lambda p: p.area)
        vals = img[lab == r.label]
        out[i] = (
            r.area * s * s, r.perimeter * s, r.eccentricity, r.solidity, vals.mean(), vals.max(), vals.min(),
            vals.std(), r.axis_major_length * s, r.axis_minor_length * s,
        )
    return pd.DataFrame(out, columns=list(MORPHOLOGY_FEATURES))


def feature_distances(real: pd.DataFrame, generated: pd.DataFrame) -> pd.DataFrame:
    """Per-feature 1-D Wasserstein distance and Kolmogorov–Smirnov statistic between two sets.

    Parameters
    ----------
    real, generated
        Outputs of :func:`morphology_features` (NaN rows are dropped per feature).

    Returns
    -------
    One row per feature: ``wasserstein`` (in the feature's units), ``wasserstein_std`` (divided by the
    real set's standard deviation, comparable across features), ``ks`` and ``ks_pvalue``; plus a final
    row ``"mean"`` averaging ``wasserstein_std`` and ``ks`` over the features.

    Examples
    --------
    >>> real = sp.metrics.morphology_features(real_crops)
    >>> gen = sp.metrics.morphology_features(generated_crops)
    >>> sp.metrics.feature_distances(real, gen).loc["mean"]
    """
    from scipy.stats import ks_2samp, wasserstein_distance

    cols = [c for c in real.columns if c in generated.columns]
    if not cols:
        raise ValueError("The two feature tables share no columns.")
    rows = {}
    for c in cols:
        a = real[c].to_numpy(float)
        b = generated[c].to_numpy(float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size < 2 or b.size < 2:
            rows[c] = (np.nan, np.nan, np.nan, np.nan)
            continue
        w = wasserstein_distance(a, b)
        sd = a.std()
        ks = ks_2samp(a, b)
        rows[c] = (w, w / sd if sd > 0 else np.nan, ks.statistic, ks.pvalue)
    df = pd.DataFrame.from_dict(rows, orient="index", columns=["wasserstein", "wasserstein_std", "ks", "ks_pvalue"])
    df.loc["mean"] = [np.nan, np.nanmean(df["wasserstein_std"]), np.nanmean(df["ks"]), np.nan]
    return df


def feature_distances_by_group(
    real: pd.DataFrame,
    generated: pd.DataFrame,
    groups,
    generated_groups=None,
    *,
    statistic: str = "wasserstein_std",
) -> pd.DataFrame:
    """Morphology distances within each group (e.g. cell type): real vs generated cells of the same group.

    :func:`~spatia.metrics.feature_distances` applied group by group.

    Parameters
    ----------
    real, generated
        Outputs of :func:`~spatia.metrics.morphology_features`.
    groups
        Group of each row of ``real`` (array-like).
    generated_groups
        Group of each row of ``generated``; default ``groups`` (generated row ``i`` made for real cell ``i``).
    statistic
        Column of :func:`~spatia.metrics.feature_distances` to report (``"wasserstein_std"``, ``"wasserstein"``
        or ``"ks"``).

    Returns
    -------
    Features (and ``"mean"``) × groups present in both sets; ``.loc["mean"].mean()`` is the mean over groups of
    the feature-averaged distance.

    Examples
    --------
    >>> d = sp.metrics.feature_distances_by_group(real, gen, types)
    >>> d.loc["area"]  # nuclear-area distance of each cell type
    """
    real_g = np.asarray(groups)
    gen_g = real_g if generated_groups is None else np.asarray(generated_groups)
    if len(real_g) != len(real) or len(gen_g) != len(generated):
        raise ValueError(
            "groups must have one entry per row of real (and generated_groups per row of generated)."
        )
    out = {}
    for g in pd.unique(real_g):
        if (gen_g == g).any():
            out[g] = feature_distances(real[real_g == g], generated[gen_g == g])[statistic]
    if not out:
        raise ValueError("No group is present in both sets.")
    return pd.DataFrame(out)


def kid(real: np.ndarray, generated: np.ndarray, *, n_subsets: int = 10, subset_size: int = 200,
        random_state: int | None = 0) -> tuple[float, float]:
    """Kernel Inception Distance between two sets of image features (mean and std over subsets).

    The unbiased squared MMD with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)^3`` of
    Bińkowski et al. (2018), averaged over random subsets. The feature space is the caller's choice: we
    use the frozen image encoder of a trained SPATIA model (no Inception weights can be downloaded here).

    Parameters
    ----------
    real, generated
        ``(n, d)`` and ``(m, d)`` features.
    n_subsets, subset_size
        Subsets drawn (``subset_size`` is capped at the smaller set).
    random_state
        Seed of the subset draws.

    Examples
    --------
    >>> f_real = sp.metrics.image_features(model, real_crops)
    >>> f_gen = sp.metrics.image_features(model, generated_crops)
    >>> mean, std = sp.metrics.kid(f_real, f_gen)
    """
    x = np.asarray(real, dtype=np.float64)
    y = np.asarray(generated, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"real and generated must be (n, d) with the same d, got {x.shape} and {y.shape}.")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set.")
    d = x.shape[1]
    rng = np.random.default_rng(random_state)
    vals = []
    for _ in range(n_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def image_features(model, crops, *, batch_size: int = 256) -> np.ndarray:
    """Image features for :func:`~spatia.metrics.kid`: mean-pooled patch tokens of a trained model's frozen ViT encoder.

    No Inception network can be downloaded offline, so the fixed feature space of KID (and of the
    benchmarks) is the image branch of a trained SPATIA model, run without masking and without the
    expression (no fusion). Crops of another size are resized (antialiased) to the encoder's input size.
    Compare only numbers computed with the same model.

    Parameters
    ----------
    model
        A trained :class:`~spatia.SpatiaModel` with an image branch.
    crops
        ``(N, C, H, W)`` uint8 (0–255) or float in [0, 1], with the model's channels.
    batch_size
        Crops per forward pass.

    Returns
    -------
    ``(N, D)`` float32 features (``D`` = the model's width).

    Examples
    --------
    >>> real = sp.metrics.image_features(model, store.get(range(500)))
    >>> gen = sp.metrics.image_features(model, generated)
    >>> sp.metrics.kid(real, gen)
    """
    import torch
    import torch.nn.functional as F

    if not model.config.image.enabled or not hasattr(model.module, "vit"):
        raise ValueError("The model has no image branch: it cannot embed images.")
    x = np.asarray(crops)
    if x.ndim != 4:
        raise ValueError(f"crops must be (N, C, H, W), got shape {x.shape}.")
    if x.shape[1] != model.module.n_channels:
        raise ValueError(f"crops have {x.shape[1]} channels, the model's image branch {model.module.n_channels}.")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    size = model.config.image.size
    vit = model.module.vit.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            b = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).float() / scale
            if b.shape[-1] != size or b.shape[-2] != size:
                b = F.interpolate(b, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            tok, _ = vit(b, 0.0)
            out.append(tok.mean(1).float().numpy())
    d = model.config.width
    return np.concatenate(out) if out else np.zeros((0, d), dtype=np.float32)
