"""The simulated gene panel and its negative binomial counts (the whole expression ground truth)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import sparse

from ._simulate_morphology import _PROGRAMS


def _panel_sizes(n_genes: int, n_types: int) -> tuple[int, int, int]:
    """Markers per type, genes per programme, niche-induced (= condition-response) genes."""
    per_program = n_niche = 1
    if n_genes >= max(30, n_types + 13):
        per_program, n_niche = 2, 3
    room = (n_genes - 3 * per_program - 2 * n_niche - 1) // n_types  # keep >= 1 housekeeping gene
    return int(np.clip(min(round(0.08 * n_genes), room), 1, 10)), per_program, n_niche


def _gene_panel(n_genes: int, types: list[str], inducer: str, rng: np.random.Generator) -> pd.DataFrame:
    """Gene roles and parameters (``var``), in a shuffled order."""
    n_markers, per_program, n_niche = _panel_sizes(n_genes, len(types))
    roles = [f"marker:{t}" for t in types for _ in range(n_markers)]
    roles += [p for p in _PROGRAMS for _ in range(per_program)]
    roles += [f"niche_induced:{inducer}"] * n_niche + ["condition_response"] * n_niche
    roles += ["housekeeping"] * (n_genes - len(roles))
    roles = np.asarray(roles, dtype=object)[rng.permutation(n_genes)]
    width = max(3, len(str(n_genes - 1)))
    var = pd.DataFrame(index=pd.Index([f"Gene_{i:0{width}d}" for i in range(n_genes)]))
    var["role"] = pd.Categorical(roles)
    abundant = ~var["role"].str.startswith("marker:").to_numpy() & (roles != "housekeeping")
    var["base_logit"] = rng.normal(0.0, 0.6, n_genes) + np.where(abundant, 0.8, 0.0)
    var["dispersion"] = np.exp(rng.normal(math.log(4.0), 0.3, n_genes))
    return var


def _expression(
    var: pd.DataFrame,
    types: list[str],
    type_idx: np.ndarray,
    obs: pd.DataFrame,
    inducer: str,
    transition_type: str,
    depth: np.ndarray,
    rng: np.random.Generator,
) -> tuple[sparse.csr_matrix, list[str]]:
    """Negative binomial counts: the whole expression ground truth in one place.

    ``logit[c, g] = base[g] + type_effect[type(c), g]`` (+2.0 on the type's markers) ``+ Σ_p β[p, g] z_p[c]``
    ``+ 1.8 (1 − exp(−niche[c] / 1.5))`` on niche genes of non-inducer cells, +2.3 on response genes and −1.6
    on half the markers of transitioned cells; ``mean = depth[c] · softmax(logit[c])``; counts are
    gamma-Poisson with per-gene dispersion, drawn in batches of cells. An empty cell gets one count of the
    most abundant housekeeping gene. ``type_idx`` indexes ``types``: the type whose expression each cell has
    (a morphology-only twin has its parent's). Returns the counts and the suppressed markers.
    """
    role = var["role"].astype(str).to_numpy()
    n_genes = len(var)
    type_effect = rng.normal(0.0, 0.25, (len(types), n_genes)) * np.where(role == "housekeeping", 0.3, 1.0)
    for t, name in enumerate(types):
        type_effect[t, role == f"marker:{name}"] += 2.0
    beta = np.zeros((len(_PROGRAMS), n_genes))
    for p, program in enumerate(_PROGRAMS):
        genes = np.flatnonzero(role == program)
        beta[p, genes] = np.linspace(0.9, 0.7, len(genes))
    markers = np.flatnonzero(role == f"marker:{transition_type}")
    lost = markers[: max(1, len(markers) // 2)]
    shift = 2.3 * (role == "condition_response")
    shift[lost] -= 1.6
    niche_gene = 1.8 * (role == f"niche_induced:{inducer}")

    z = obs[list(_PROGRAMS)].to_numpy()
    responder = (obs["cell_type"] != inducer).to_numpy()
    induction = (1.0 - np.exp(-obs["niche_signal"].to_numpy() / 1.5)) * responder
    moved = (obs["state"] == "transitioned").to_numpy().astype(float)
    base, theta = var["base_logit"].to_numpy(), var["dispersion"].to_numpy()
    hk = np.flatnonzero(role == "housekeeping")
    rescue = hk[np.argmax(base[hk])]
    blocks = []
    for start in range(0, len(obs), 65_536):
        b = slice(start, start + 65_536)
        logit = base + type_effect[type_idx[b]] + z[b] @ beta
        logit += np.multiply.outer(induction[b], niche_gene) + np.multiply.outer(moved[b], shift)
        p = np.exp(logit - logit.max(1, keepdims=True))
        mean = p * (depth[b] / p.sum(1))[:, None]
        x = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.int32)
        x[x.sum(1) == 0, rescue] = 1
        blocks.append(sparse.csr_matrix(x))
    return sparse.vstack(blocks, format="csr"), var.index[lost].tolist()
