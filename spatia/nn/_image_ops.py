"""Differentiable image operations on crop batches ``(B, C, S, S)``: random right-angle turns, Gaussian blur,
Otsu thresholds, the largest connected region, morphology-feature stand-ins, and the sliced-Wasserstein
distance between feature sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each crop of ``x (B, C, S, S)`` turned by a random multiple of 90° and possibly mirrored."""
    k = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for code in range(8):
        sel = k == code
        if sel.any():
            y = torch.rot90(x[sel], code % 4, dims=(2, 3))
            out[sel] = y.flip(3) if code >= 4 else y
    return out


def principal_moments(m: torch.Tensor, mass: torch.Tensor, coords: torch.Tensor):
    """Eigenvalues (l1 ≥ l2) of the second moments of the soft masks ``m (B, S*S)`` of total ``mass (B,)``
    over a square grid of ``coords (S,)``, and half their difference."""
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.reshape(1, -1), xx.reshape(1, -1)
    cy, cx = (m * yy).sum(1) / mass, (m * xx).sum(1) / mass
    dy, dx = yy - cy[:, None], xx - cx[:, None]
    vyy, vxx, vxy = (m * dy * dy).sum(1) / mass, (m * dx * dx).sum(1) / mass, (m * dx * dy).sum(1) / mass
    tr, det = vyy + vxx, vyy * vxx - vxy**2
    disc = torch.sqrt(torch.clamp((tr / 2) ** 2 - det, min=0.0) + 1e-8)
    return tr / 2 + disc, torch.clamp(tr / 2 - disc, min=0.0), disc


def otsu_fraction(flat: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row of ``flat (B, N)`` as a fraction of the row's range (min → 0, max → 1).

    The histogram algorithm of ``skimage.filters.threshold_otsu`` (``nbins`` bins over the row's range,
    the threshold at the centre of the bin that maximises the between-class variance), vectorised over
    rows and without gradients. Constant rows give 0.5.
    """
    with torch.no_grad():
        x = flat.float()
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        span = (hi - lo).clamp(min=1e-12)
        idx = ((x - lo) / span * nbins).long().clamp(0, nbins - 1)
        counts = torch.zeros(x.shape[0], nbins, device=x.device).scatter_add_(1, idx, torch.ones_like(x))
        centers = (torch.arange(nbins, device=x.device, dtype=x.dtype) + 0.5) / nbins
        w1 = counts.cumsum(1)
        w2 = counts.flip(1).cumsum(1).flip(1)
        m1 = (counts * centers).cumsum(1) / w1.clamp(min=1e-12)
        m2 = (counts * centers).flip(1).cumsum(1).flip(1) / w2.clamp(min=1e-12)
        var = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
        frac = centers[var.argmax(1)]
        return torch.where((hi - lo).squeeze(1) > 1e-8, frac, torch.full_like(frac, 0.5)).to(flat.dtype)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of each boolean ``mask (B, H, W)`` (empty where the mask is), by
    label propagation (each pixel takes the largest index among its foreground neighbours until stable)."""
    with torch.no_grad():
        b, h, w = mask.shape
        fg = mask.float()[:, None]
        lab = (torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w) * fg)
        for _ in range(h * w):
            new = F.max_pool2d(lab, 3, stride=1, padding=1) * fg
            if torch.equal(new, lab):
                break
            lab = new
        lab = lab.view(b, -1).long()
        sizes = torch.zeros(b, h * w + 1, device=mask.device)
        sizes.scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float32))
        sizes[:, 0] = 0
        best = sizes.argmax(1, keepdim=True)
        return ((lab == best) & (best > 0)).view(b, h, w)


def morphology_proxies(img: torch.Tensor, channel: int = 0, softness: float = 0.02,
                       beta: float = 30.0) -> torch.Tensor:
    """Differentiable stand-ins for the region features of :func:`spatia.metrics.morphology_features`.

    ``img (B, C, S, S)`` in [0, 1] → ``(B, 9)``: area, perimeter, squared eccentricity (stable for round
    shapes; same ranking), mean / max / min intensity, intensity std, major and minor axis length of the
    crop's main region (solidity has no smooth stand-in).
    The region follows the measured one: the foreground is the crop above Otsu's threshold, and of it the
    largest 8-connected region is kept (found without gradients). Gradients flow through a soft mask,
    a sigmoid around the threshold (width ``softness`` × the crop's range) inside that region grown by one
    pixel, so the region can grow or shrink. The threshold is placed at Otsu's fraction of the crop's
    range, and moves with it: brightening a whole crop does not grow its region. The range and the
    threshold carry no gradient: through them a loss asking for a larger region pulled the crop's maximum
    down, dimming the cells whose intensity it was also asked to raise. Max and min are soft
    (log-sum-exp with ``beta`` over the range for the max, a third of it for the min, which is taken inside
    the region proper). Lengths are in pixels.
    """
    x = img[:, channel]
    b, s, _ = x.shape
    flat = x.reshape(b, -1)
    with torch.no_grad():  # a region must not grow by dimming its brightest pixel (which lowers the threshold)
        lo, hi = flat.amin(1), flat.amax(1)
        span = (hi - lo).clamp(min=1e-6)
        thr = lo + otsu_fraction(flat) * span
    region = largest_component((flat > thr[:, None]).view(b, s, s))
    empty = ~region.flatten(1).any(1)
    zone = F.max_pool2d(region.float()[:, None], 3, stride=1, padding=1)[:, 0].flatten(1)
    zone = torch.where(empty[:, None], torch.ones_like(zone), zone)
    m = torch.sigmoid((flat - thr[:, None]) / (softness * span[:, None])) * zone
    mass = m.sum(1) + 1e-4
    mean_in = (flat * m).sum(1) / mass
    std_in = torch.sqrt(((flat - mean_in[:, None]) ** 2 * m).sum(1) / mass + 1e-6)
    logm = torch.log(m + 1e-6)
    z = beta / span[:, None]
    max_in = torch.logsumexp(flat * z + logm, 1) / z[:, 0] - torch.log(mass) / z[:, 0]
    inner = m * region.flatten(1).to(m.dtype) + 1e-6  # the minimum is taken inside the region, not its rim
    zmin = z / 3
    min_in = (torch.log(inner.sum(1)) - torch.logsumexp(-flat * zmin + torch.log(inner), 1)) / zmin[:, 0]
    l1, l2, disc = principal_moments(m, mass, torch.arange(s, device=img.device, dtype=img.dtype))
    ecc2 = 2 * disc / (l1 + 1e-6)  # squared eccentricity, 1 − l2/l1: no square root near round shapes
    mm = F.pad(m.view(b, 1, s, s), (2, 2, 2, 2))  # soft boundary length: |∇m| summed, central differences
    gy = (mm[:, :, 2:, 1:-1] - mm[:, :, :-2, 1:-1]) / 2
    gx = (mm[:, :, 1:-1, 2:] - mm[:, :, 1:-1, :-2]) / 2
    perim = torch.sqrt(gy**2 + gx**2 + 1e-8).sum((1, 2, 3))
    return torch.stack([m.sum(1), perim, ecc2, mean_in, max_in, min_in, std_in,
                        4 * torch.sqrt(l1 + 1e-6), 4 * torch.sqrt(l2 + 1e-6)], 1)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """``img (B, C, S, S)`` smoothed by a Gaussian of ``sigma`` pixels (reflect padding); ``sigma <= 0``: as is."""
    if sigma <= 0:
        return img
    r = min(max(1, int(round(3 * sigma))), img.shape[-1] - 1)
    x = torch.arange(-r, r + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    y = F.pad(img, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int, generator=None) -> torch.Tensor:
    """Squared sliced-Wasserstein-2 distance between two equal-size point sets ``(B, d)``.

    Features are standardised by ``b``'s (real) standard deviation first, so each counts equally.
    """
    scale = b.detach().std(0, keepdim=True).clamp(min=1e-3)
    a, b = a / scale, b / scale
    theta = torch.randn(a.shape[1], n_projections, device=a.device, dtype=a.dtype, generator=generator)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = (a @ theta).sort(0)
    pb, _ = (b @ theta).sort(0)
    return ((pa - pb) ** 2).mean()

