"""Metrics: morphology region features of cell crops and distances between sets of crops."""

from ._morphology import MORPHOLOGY_FEATURES, feature_distances, image_features, kid, morphology_features

__all__ = ["MORPHOLOGY_FEATURES", "morphology_features", "feature_distances", "kid", "image_features"]
