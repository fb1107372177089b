"""Model configuration: frozen nested dataclasses, saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

# sane ranges of the configuration fields, checked (with the field types) before anything is allocated:
# (lowest, highest), inclusive; a bound of None is open. Fields not listed have their type checked only.
_BIG = 1_000_000
LIMITS: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "ImageConfig": {"size": (4, 1024), "crop_um": (1e-6, 1e6), "patch": (1, 256), "depth": (0, 64),
                    "heads": (1, 64), "mask_ratio": (0, 0.99), "decoder_width": (1, 8192),
                    "decoder_depth": (0, 64)},
    "ExpressionConfig": {"depth": (0, 64), "heads": (1, 64), "max_len": (1, _BIG), "dropout": (0, 0.99),
                         "mask_ratio": (0, 0.99)},
    "FusionConfig": {"depth": (0, 64), "heads": (1, 64)},
    "NicheConfig": {"k": (1, 1024), "radius": (1e-6, 1e6), "depth": (0, 64), "heads": (1, 64),
                    "position_scale": (1e-6, 1e6)},
    "TissueConfig": {"tile_um": (1e-6, 1e7), "depth": (0, 64), "heads": (1, 64), "position_scale": (1e-6, 1e7)},
    "LossConfig": {"counts": (0, 1e6), "cell_counts": (0, 1e6), "masked_genes": (0, 1e6), "pixels": (0, 1e6),
                   "niche_counts": (0, 1e6), "labels": (0, 1e6), "contrastive": (0, 1e6),
                   "temperature": (1e-6, 1e6), "counts_scale": (1e-6, 1e6)},
    "TrainConfig": {"lr": (1e-12, 10), "weight_decay": (0, 10), "batch_size": (2, _BIG), "max_epochs": (1, _BIG),
                    "val_fraction": (0, 0.9), "patience": (0, _BIG), "modality_dropout": (0, 0.99)},
    "SpatiaConfig": {"width": (4, 8192), "embed_dim": (1, 8192)},
}


def check_fields(obj: Any, limits: dict[str, tuple[float | None, float | None]] | None = None) -> None:
    """Check the fields of the frozen dataclass ``obj`` against their annotated types and ``limits``.

    Types: ``bool``, ``int`` (not bool, not float), ``float`` (an int is accepted; finite), ``str``,
    ``Literal[...]`` (one of the values), ``X | None``, ``tuple[X, ...]`` (a list becomes a tuple) and
    nested dataclasses (a dict of a section's fields becomes the section). Raises a :class:`TypeError` / :class:`ValueError` naming ``Class.field``.
    """
    cls = type(obj)
    hints = _hints(cls)
    limits = LIMITS.get(cls.__name__, {}) if limits is None else limits
    for f in fields(obj):
        name = f"{cls.__name__}.{f.name}"
        value = _check_type(name, getattr(obj, f.name), hints[f.name])
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)
        lo, hi = limits.get(f.name, (None, None))
        for v in value if isinstance(value, tuple) else (value,):
            if v is None or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else (
                    f">= {lo}" if lo is not None else f"<= {hi}")
                raise ValueError(f"{name} must be in {rng}, got {value!r}.")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """``value`` if it matches ``tp`` (a list for a tuple type comes back as a tuple); raises otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _check_type(name, value, rest[0])
        for a in rest:
            try:
                return _check_type(name, value, a)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{name} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}.")
    if origin is Literal:
        if value not in args or not isinstance(value, str | bool | int):
            raise ValueError(f"{name} must be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise TypeError(f"{name} must be a list of {_type_name(args[0])}, got {value!r}.")
        item = args[0]
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {value!r}.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}.")
    elif tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):  # a section given as a dict of its fields
            unknown = sorted(set(value) - {f.name for f in fields(tp)})
            if unknown:
                raise ValueError(f"{name} ({tp.__name__}) has no field(s) {unknown}.")
            return tp(**value)
        if not isinstance(value, tp):
            raise TypeError(f"{name} must be {tp.__name__} (a section: a dict of its fields), got {value!r}.")
    return value


class ConfigBase:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``replace``, shared by the configuration dataclasses
    (:class:`SpatiaConfig`, :class:`~spatia.module.DecoderConfig`, :class:`~spatia.module.FlowConfig`)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values (nested sections as dicts)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, complete: bool = False):
        """The configuration of :meth:`to_dict`. Fields and sections left out take their defaults, unless
        ``complete`` (a saved configuration): then every field must be there. Lists become tuples, and every
        value is checked."""
        return _from_dict(cls, d, complete=complete)

    def replace(self, **changes: Any):
        """A copy with fields changed; nested sections accept dicts of their fields."""
        names = {f.name for f in fields(self)}
        kw = {}
        for k, v in changes.items():
            if k not in names:
                raise ValueError(f"{type(self).__name__} has no field {k!r}.")
            current = getattr(self, k)
            kw[k] = dataclasses.replace(current, **v) if dataclasses.is_dataclass(current) and isinstance(v, dict) \
                else v
        return dataclasses.replace(self, **kw)


def _from_dict(cls, d: Any, *, complete: bool, section: str | None = None):
    where = "The configuration" if section is None else f"The configuration's {section!r} section"
    if not isinstance(d, dict):
        raise TypeError(f"A {cls.__name__} is read from a dict of its fields, got {type(d).__name__}.")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"Unknown configuration fields: {unknown}"
                         + ("." if section is None else f" in the {section!r} section."))
    missing = [n for n in names if n not in d] if complete else []
    if missing:
        raise KeyError(f"{where} has no field(s) {missing}.")
    hints = _hints(cls)
    kw = {}
    for name, v in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _from_dict(tp, v, complete=complete, section=name)
        kw[name] = v
    return cls(**kw)


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

    def __post_init__(self) -> None:
        check_fields(self)
        heads = max(1, self.decoder_width // 16)  # the pixel decoder's attention heads
        if self.decoder_width % heads:
            raise ValueError(f"ImageConfig.decoder_width {self.decoder_width} must be divisible by its heads "
                             f"(decoder_width // 16 = {heads}): use a multiple of 16 or a width under 32.")


@dataclass(frozen=True)
class ExpressionConfig:
    """Expression branch: gene tokens of up to ``max_len`` expressed genes."""

    enabled: bool = True
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    dropout: float = 0.3  # fraction of expressed-gene tokens dropped from the input in training (paper: 0.6)
    mask_ratio: float = 0.2  # fraction of the remaining tokens whose value is hidden and predicted

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FusionConfig:
    depth: int = 1
    heads: int = 4

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NicheConfig:
    """Niche level: the ``k`` nearest cells (or those within ``radius`` µm) around each cell."""

    enabled: bool = True
    k: int = 10
    radius: float | None = None
    depth: int = 1
    heads: int = 4
    position_scale: float = 10.0  # µm per unit of the sin/cos offset encoding

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TissueConfig:
    """Tissue level: square tiles of ``tile_um`` over the slide."""

    enabled: bool = True
    tile_um: float = 200.0
    depth: int = 1
    heads: int = 4
    position_scale: float = 100.0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training objectives (0 switches one off) and their likelihood.

    ``counts`` and ``cell_counts`` are negative-binomial (``likelihood="nb"``) or zero-inflated NB
    (``"zinb"``) log-likelihoods per gene, times ``counts_scale``, so that their size does not grow with the
    panel. ``temperature`` is the softmax temperature of the image ⟷ expression contrastive objective.
    """

    likelihood: Literal["nb", "zinb"] = "nb"
    counts: float = 1.0
    cell_counts: float = 1.0
    masked_genes: float = 1.0
    pixels: float = 0.5
    niche_counts: float = 0.5
    labels: float = 1.0
    contrastive: float = 0.1
    temperature: float = 0.1
    counts_scale: float = 10.0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the encoder.

    ``modality_dropout``: fraction of the cells whose expression is hidden in a training batch (when both
    branches are on), so that the embedding of image-only cells is learned too.
    """

    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64  # centre cells per step
    max_epochs: int = 30
    val_fraction: float = 0.1
    patience: int = 5
    modality_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SpatiaConfig(ConfigBase):
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
        check_fields(self)
        for section in ("image", "expression", "fusion", "niche", "tissue"):
            heads = getattr(self, section).heads
            if self.width % heads:
                raise ValueError(f"width {self.width} must be divisible by {section}.heads ({heads}).")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4.")
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
