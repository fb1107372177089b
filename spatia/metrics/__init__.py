"""Metrics: morphology region features of cell crops and distances between sets of crops."""

from ._morphology import (
    MORPHOLOGY_FEATURES,
    feature_distances,
    feature_distances_by_group,
    image_features,
    kid,
    morphology_features,
)

__all__ = [
    "MORPHOLOGY_FEATURES",
    "morphology_features",
    "feature_distances",
    "feature_distances_by_group",
    "kid",
    "image_features",
]
