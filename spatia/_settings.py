"""Global settings (``sp.settings``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpatiaSettings:
    """Package-wide settings.

    Attributes
    ----------
    seed
        Default random seed used when a function gets ``random_state=None``.
    progress_bar
        Show progress bars for long work (crop extraction, training, generation).
    device
        Default device for models: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ...
    num_workers
        Number of DataLoader worker processes.
    """

    seed: int = 0
    progress_bar: bool = True
    device: str = "auto"
    num_workers: int = 0


settings = SpatiaSettings()
