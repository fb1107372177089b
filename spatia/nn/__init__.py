"""Building blocks: ViT encoder, expression encoder, attention and fusion, position encodings, ODE solvers,
differentiable image operations."""

from ._attention import (
    BidirectionalFusion,
    CrossAttentionBlock,
    MultiHeadAttention,
    Transformer,
    TransformerBlock,
)
from ._expression import ExpressionEncoder, sample_expressed
from ._image_ops import (
    gaussian_blur,
    largest_component,
    morphology_proxies,
    otsu_fraction,
    random_dihedral,
    sliced_wasserstein,
)
from ._ode import SOLVERS, integrate
from ._position import grid_2d, sincos_1d, sincos_2d
from ._vit import PixelDecoder, ViTEncoder, patchify, unpatchify

__all__ = [
    "MultiHeadAttention", "Transformer", "TransformerBlock", "CrossAttentionBlock", "BidirectionalFusion",
    "ExpressionEncoder", "sample_expressed", "ViTEncoder", "PixelDecoder", "patchify", "unpatchify",
    "sincos_1d", "sincos_2d", "grid_2d", "integrate", "SOLVERS", "random_dihedral", "gaussian_blur",
    "otsu_fraction", "largest_component", "morphology_proxies", "sliced_wasserstein",
]
