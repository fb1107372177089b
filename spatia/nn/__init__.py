"""Building blocks: ViT encoder, expression encoder, attention and fusion, position encodings, ODE solvers."""

from ._attention import (
    BidirectionalFusion,
    CrossAttentionBlock,
    MultiHeadAttention,
    Transformer,
    TransformerBlock,
)
from ._expression import ExpressionEncoder, sample_expressed
from ._ode import SOLVERS, integrate
from ._position import grid_2d, sincos_1d, sincos_2d
from ._vit import PixelDecoder, ViTEncoder, patchify, unpatchify

__all__ = [
    "MultiHeadAttention", "Transformer", "TransformerBlock", "CrossAttentionBlock", "BidirectionalFusion",
    "ExpressionEncoder", "sample_expressed", "ViTEncoder", "PixelDecoder", "patchify", "unpatchify",
    "sincos_1d", "sincos_2d", "grid_2d", "integrate", "SOLVERS",
]
