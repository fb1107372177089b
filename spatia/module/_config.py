"""Model configuration: frozen nested dataclasses, saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal


@dataclass(frozen=True)
class ImageConfig:
    """Image branch: ViT over ``size × size`` crops with MAE masking.

    ``crop_um`` is the crop side in µm (coordinate-system units). A fixed window keeps each cell's
    absolute size in the image (nuclear size is a phenotype); ``None`` sizes crops from each cell's extent
    instead, which normalises size away.
    """

    enabled: bool = True
    size: int = 32
    crop_um: float | None = 16.0
    patch: int = 8
    depth: int = 2
    heads: int = 4
    mask_ratio: float = 0.75
    decoder_width: int = 32
    decoder_depth: int = 1


@dataclass(frozen=True)
class ExpressionConfig:
    """Expression branch: gene tokens of up to ``max_len`` expressed genes."""

    enabled: bool = True
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    dropout: float = 0.3  # fraction of expressed-gene tokens dropped from the input in training (paper: 0.6)
    mask_ratio: float = 0.2  # fraction of the remaining tokens whose value is hidden and predicted


@dataclass(frozen=True)
class FusionConfig:
    depth: int = 1
    heads: int = 4


@dataclass(frozen=True)
class NicheConfig:
    """Niche level: the ``k`` nearest cells (or those within ``radius`` µm) around each cell."""

    enabled: bool = True
    k: int = 10
    radius: float | None = None
    depth: int = 1
    heads: int = 4
    position_scale: float = 10.0  # µm per unit of the sin/cos offset encoding


@dataclass(frozen=True)
class TissueConfig:
    """Tissue level: square tiles of ``tile_um`` over the slide."""

    enabled: bool = True
    tile_um: float = 200.0
    depth: int = 1
    heads: int = 4
    position_scale: float = 100.0


@dataclass(frozen=True)
class LossConfig:
    likelihood: Literal["nb", "zinb"] = "nb"
    counts: float = 1.0
    cell_counts: float = 1.0
    masked_genes: float = 1.0
    pixels: float = 0.5
    niche_counts: float = 0.5
    labels: float = 1.0
    contrastive: float = 0.1
    temperature: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64  # centre cells per step
    max_epochs: int = 30
    val_fraction: float = 0.1
    patience: int = 5


@dataclass(frozen=True)
class SpatiaConfig:
    """Full SPATIA configuration.

    Use a preset (:meth:`tiny`, :meth:`default`, :meth:`large`) and :meth:`replace` fields, e.g.
    ``SpatiaConfig.default().replace(width=128, niche={"k": 20})``.
    """

    width: int = 64
    embed_dim: int = 32
    image: ImageConfig = field(default_factory=ImageConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    niche: NicheConfig = field(default_factory=NicheConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.width % 4 or self.width % self.image.heads or self.width % self.expression.heads:
            raise ValueError(f"width {self.width} must be divisible by 4 and by the number of heads.")
        if not (self.image.enabled or self.expression.enabled):
            raise ValueError("At least one of the image and expression branches must be enabled.")
        if self.image.crop_um is not None and self.image.crop_um <= 0:
            raise ValueError(f"image.crop_um must be positive or None, got {self.image.crop_um}.")
        if self.image.size % self.image.patch:
            raise ValueError(f"image.size {self.image.size} must be a multiple of image.patch {self.image.patch}.")

    # presets -----------------------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> SpatiaConfig:
        """For tests: trains in seconds on a CPU."""
        return cls(
            width=32, embed_dim=16,
            image=ImageConfig(size=16, patch=4, depth=1, heads=2, decoder_width=16),
            expression=ExpressionConfig(depth=1, heads=2, max_len=32),
            fusion=FusionConfig(depth=1, heads=2),
            niche=NicheConfig(k=8, depth=1, heads=2),
            tissue=TissueConfig(depth=1, heads=2),
            train=TrainConfig(batch_size=32, max_epochs=15, patience=4),
        )

    @classmethod
    def default(cls) -> SpatiaConfig:
        """CPU-friendly default (demo, laptops)."""
        return cls()

    @classmethod
    def large(cls) -> SpatiaConfig:
        """Paper-scale widths (GPU)."""
        return cls(
            width=256, embed_dim=128,
            image=ImageConfig(size=64, patch=8, depth=6, heads=8, decoder_width=128, decoder_depth=2),
            expression=ExpressionConfig(depth=8, heads=8, max_len=256, dropout=0.6),
            fusion=FusionConfig(depth=2, heads=8),
            niche=NicheConfig(k=20, depth=2, heads=8),
            tissue=TissueConfig(depth=2, heads=8),
            train=TrainConfig(batch_size=512, max_epochs=50),
        )

    # (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpatiaConfig:
        kw = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            sub = _SUB.get(f.name)
            kw[f.name] = sub(**_known(sub, v)) if sub is not None and isinstance(v, dict) else v
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown configuration fields: {sorted(unknown)}.")
        return cls(**kw)

    def replace(self, **changes: Any) -> SpatiaConfig:
        """A copy with fields changed; nested sections accept dicts of their fields."""
        kw = {}
        for k, v in changes.items():
            if k in _SUB and isinstance(v, dict):
                kw[k] = dataclasses.replace(getattr(self, k), **v)
            elif k in {f.name for f in fields(self)}:
                kw[k] = v
            else:
                raise ValueError(f"SpatiaConfig has no field {k!r}.")
        return dataclasses.replace(self, **kw)


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"Unknown fields for {cls.__name__}: {sorted(unknown)}.")
    return d


_SUB = {
    "image": ImageConfig, "expression": ExpressionConfig, "fusion": FusionConfig, "niche": NicheConfig,
    "tissue": TissueConfig, "loss": LossConfig, "train": TrainConfig,
}
