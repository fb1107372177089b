"""User-facing tools: fit, embed, annotate, cluster, impute, predict expression, generate, transitions, and
writing their results into a backed zarr store."""

from ._annotate import annotate
from ._cluster import cluster
from ._fit import embed, fit
from ._generate import fit_decoder, generate
from ._impute import impute, predict_expression, validate_imputation
from ._pairing import PairResult, pair_states
from ._transition import fit_transition, transition
from ._write import write_results

__all__ = ["fit", "embed", "annotate", "cluster", "impute", "validate_imputation", "predict_expression",
           "fit_decoder", "generate", "pair_states", "PairResult", "fit_transition", "transition",
           "write_results"]
