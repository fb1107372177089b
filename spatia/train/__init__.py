"""Lightning training plans and callbacks."""

from ._decoder import DecoderBatches, DecoderTrainingPlan
from ._flow_plan import FlowTrainingPlan
from ._plan import HistoryCallback, RandomStateCallback, SpatiaTrainingPlan
from ._progress import EpochLogCallback, progress_options
from ._runner import default_precision, run_trainer

__all__ = [
    "SpatiaTrainingPlan", "HistoryCallback", "RandomStateCallback", "DecoderTrainingPlan", "DecoderBatches",
    "FlowTrainingPlan", "EpochLogCallback", "progress_options", "run_trainer", "default_precision",
]
