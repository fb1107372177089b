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
from ._diffusion import DecoderConfig, DecoderTrainConfig, DiffusionDecoder
from ._flow import FlowConfig, FlowLossConfig, FlowOutput, FlowSampleConfig, FlowTrainConfig, TransitionFlow
from ._spatia import SpatiaModule, SpatiaOutput

__all__ = [
    "SpatiaConfig", "ImageConfig", "ExpressionConfig", "FusionConfig", "NicheConfig", "TissueConfig",
    "LossConfig", "TrainConfig", "SpatiaModule", "SpatiaOutput", "DecoderConfig", "DecoderTrainConfig",
    "DiffusionDecoder",
    "FlowConfig", "FlowLossConfig", "FlowTrainConfig", "FlowSampleConfig", "FlowOutput", "TransitionFlow",
]
