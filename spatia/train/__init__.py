"""Lightning training plans and callbacks."""

from ._plan import HistoryCallback, SpatiaTrainingPlan

__all__ = ["SpatiaTrainingPlan", "HistoryCallback"]
