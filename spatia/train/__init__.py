"""Lightning training plans and callbacks."""

from ._flow_plan import FlowTrainingPlan
from ._plan import HistoryCallback, SpatiaTrainingPlan

__all__ = ["SpatiaTrainingPlan", "FlowTrainingPlan", "HistoryCallback"]
