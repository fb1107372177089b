"""Lightning training plans and callbacks."""

from ._decoder import DecoderBatches, DecoderTrainingPlan
from ._flow_plan import FlowTrainingPlan
from ._plan import HistoryCallback, RandomStateCallback, SpatiaTrainingPlan
from ._progress import EpochLogCallback, progress_options

__all__ = [
    "SpatiaTrainingPlan", "HistoryCallback", "RandomStateCallback", "DecoderTrainingPlan", "DecoderBatches",
    "FlowTrainingPlan", "EpochLogCallback", "progress_options",
]
