"""Composite nn.Modules: the SPATIA encoder (and, later, the diffusion decoder and flow model)."""

from ._config import (
    ExpressionConfig,
    FusionConfig,
    ImageConfig,
    LossConfig,
    NicheConfig,
    SpatiaConfig,
    TissueConfig,
    TrainConfig,
)
from ._spatia import SpatiaModule, SpatiaOutput

__all__ = [
    "SpatiaConfig", "ImageConfig", "ExpressionConfig", "FusionConfig", "NicheConfig", "TissueConfig",
    "LossConfig", "TrainConfig", "SpatiaModule", "SpatiaOutput",
]
