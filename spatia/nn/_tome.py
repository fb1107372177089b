"""Token merging for diffusion UNets (ToMe for Stable Diffusion, Bolya & Hoffman 2023), our implementation.

Before the self-attention of each transformer block, a fraction ``ratio`` of the image tokens is merged
into their most similar partners (bipartite soft matching on cosine similarity); attention runs on the
shorter sequence; its output is copied back ("unmerged") to every token of each merged group. Installed
on a diffusers UNet as an attention processor of every ``attn1`` by :func:`token_merging`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def bipartite_soft_matching(
    x: torch.Tensor, h: int, w: int, r: int, *, stride: int = 2, generator: torch.Generator | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Merge/unmerge functions that remove ``r`` of the ``h · w`` tokens of ``x``.

    Steps: 1. one "destination" token per ``stride × stride`` cell of the token grid (at a random
    position in the cell when ``generator`` is given, else the cell's first), the others are "sources";
    2. each source's most cosine-similar destination; 3. the ``r`` sources with the highest similarity are
    averaged into their destinations.

    Parameters
    ----------
    x
        ``(B, N, C)`` tokens used for the similarity (``N = h · w``, row-major).
    h, w
        Token grid.
    r
        Number of tokens to remove (capped at the number of sources).
    stride
        Side of the grid cells holding one destination each.
    generator
        Draws the destination positions.

    Returns
    -------
    ``merge((B, N, C)) -> (B, N - r, C)`` and ``unmerge((B, N - r, C)) -> (B, N, C)``.
    """
    b, n, _ = x.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}×{w} grid.")
    dev = x.device
    # 1. destinations: one per stride×stride cell
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    if generator is not None:
        off = torch.randint(stride * stride, (gh, gw), generator=generator).to(dev)
    else:
        off = torch.zeros(gh, gw, dtype=torch.long, device=dev)
    ys = torch.arange(gh, device=dev)[:, None] * stride + off // stride
    xs = torch.arange(gw, device=dev)[None, :] * stride + off % stride
    ok = (ys < h) & (xs < w)
    dst_pos = (ys * w + xs)[ok]
    is_dst = torch.zeros(n, dtype=torch.bool, device=dev)
    is_dst[dst_pos] = True
    dst_pos = torch.nonzero(is_dst).squeeze(1)
    src_pos = torch.nonzero(~is_dst).squeeze(1)
    r = max(0, min(int(r), src_pos.numel()))

    # 2. best destination of every source
    with torch.no_grad():
        m = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)  # (B, Ns, Nd)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # (B, Ns)
    merged_src = order[:, :r]  # indices into sources
    kept_src = order[:, r:]
    merged_dst = torch.gather(best_dst, 1, merged_src)  # their destinations (indices into dst)
    n_kept = kept_src.shape[1]

    def merge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        src, dst = t[:, src_pos], t[:, dst_pos]
        kept = torch.gather(src, 1, kept_src[..., None].expand(-1, -1, c))
        if r:
            moved = torch.gather(src, 1, merged_src[..., None].expand(-1, -1, c))
            dst = dst.scatter_reduce(1, merged_dst[..., None].expand(-1, -1, c), moved, reduce="mean",
                                     include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        kept, dst = t[:, :n_kept], t[:, n_kept:]
        out = t.new_empty(t.shape[0], n, c)
        out[:, dst_pos] = dst
        src_full = t.new_empty(t.shape[0], src_pos.numel(), c)
        src_full.scatter_(1, kept_src[..., None].expand(-1, -1, c), kept)
        if r:
            src_full.scatter_(1, merged_src[..., None].expand(-1, -1, c),
                              torch.gather(dst, 1, merged_dst[..., None].expand(-1, -1, c)))
        out[:, src_pos] = src_full
        return out

    return merge, unmerge


class ToMeAttnProcessor:
    """Attention processor that merges tokens before self-attention and unmerges its output.

    Wraps diffusers' default processor: it receives the normalised hidden states ``(B, N, C)`` of a
    ``BasicTransformerBlock``'s ``attn1``, merges ``⌊ratio · N⌋`` of them, attends over the rest and
    unmerges. ``ratio = 0`` runs the same code path and merges nothing.
    """

    def __init__(self, ratio: float, *, stride: int = 2, generator: torch.Generator | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token merging ratio must be in [0, 1), got {ratio}.")
        self.ratio, self.stride, self.generator = float(ratio), stride, generator
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        n = hidden_states.shape[1]
        side = int(round(math.sqrt(n)))
        if side * side != n:  # not a square grid: leave it alone
            return self.inner(attn, hidden_states, None, attention_mask, temb, **kw)
        merge, unmerge = bipartite_soft_matching(hidden_states, side, side, int(self.ratio * n),
                                                 stride=self.stride, generator=self.generator)
        out = self.inner(attn, merge(hidden_states), None, attention_mask, temb, **kw)
        return unmerge(out)


@contextmanager
def token_merging(unet: nn.Module, ratio: float | None, *, stride: int = 2, seed: int | None = 0) -> Iterator[int]:
    """Context manager: token merging on every self-attention (``attn1``) of ``unet``; restored on exit.

    ``ratio=None`` changes nothing. Yields the number of self-attention layers patched.

    Examples
    --------
    >>> with token_merging(decoder.unet, 0.5):
    ...     images = decoder.sample(...)
    """
    if ratio is None:
        yield 0
        return
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token merging ratio must be in [0, 1), got {ratio}.")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    old = {}
    for name, mod in unet.named_modules():
        if name.endswith("attn1") and hasattr(mod, "set_processor"):
            old[name] = (mod, mod.processor)
            mod.set_processor(ToMeAttnProcessor(ratio, stride=stride, generator=gen))
    try:
        yield len(old)
    finally:
        for mod, proc in old.values():
            mod.set_processor(proc)
