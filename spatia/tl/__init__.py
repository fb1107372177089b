"""User-facing tools: fit, embed, annotate, cluster, impute, predict expression."""

from ._annotate import annotate
from ._cluster import cluster
from ._fit import embed, fit
from ._impute import impute, predict_expression, validate_imputation

__all__ = ["fit", "embed", "annotate", "cluster", "impute", "validate_imputation", "predict_expression"]
