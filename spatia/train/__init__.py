"""Lightning training plans and callbacks."""

from ._decoder import DecoderBatches, DecoderTrainingPlan
from ._flow_plan import FlowTrainingPlan
from ._plan import HistoryCallback, SpatiaTrainingPlan

__all__ = ["SpatiaTrainingPlan", "HistoryCallback", "DecoderTrainingPlan", "DecoderBatches", "FlowTrainingPlan"]
