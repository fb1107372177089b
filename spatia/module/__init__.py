"""Composite nn.Modules: the SPATIA encoder, the state-transition flow (and, later, the diffusion decoder)."""

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
from ._flow import FlowConfig, FlowOutput, TransitionFlow
from ._spatia import SpatiaModule, SpatiaOutput

__all__ = [
    "SpatiaConfig", "ImageConfig", "ExpressionConfig", "FusionConfig", "NicheConfig", "TissueConfig",
    "LossConfig", "TrainConfig", "SpatiaModule", "SpatiaOutput", "FlowConfig", "FlowOutput", "TransitionFlow",
]
