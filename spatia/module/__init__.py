"""Composite nn.Modules: the SPATIA encoder, the diffusion decoder and the state-transition flow."""

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
from ._diffusion import DecoderConfig, DiffusionDecoder
from ._flow import FlowConfig, FlowOutput, TransitionFlow
from ._spatia import SpatiaModule, SpatiaOutput

__all__ = [
    "SpatiaConfig", "ImageConfig", "ExpressionConfig", "FusionConfig", "NicheConfig", "TissueConfig",
    "LossConfig", "TrainConfig", "SpatiaModule", "SpatiaOutput", "DecoderConfig", "DiffusionDecoder",
    "FlowConfig", "FlowOutput", "TransitionFlow",
]
