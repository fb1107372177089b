import pytest
import torch

from spatia.module import DecoderConfig, DiffusionDecoder
from spatia.nn._tome import bipartite_soft_matching, token_merging


def test_merge_reduces_and_unmerge_is_exact_for_identical_tokens():
    torch.manual_seed(0)
    # 8x8 grid whose 2x2 blocks hold identical tokens: merging within a block loses nothing
    block = torch.randn(2, 4, 4, 16)
    x = block.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 16)
    merge, unmerge = bipartite_soft_matching(x, 8, 8, r=48)
    m = merge(x)
    assert m.shape == (2, 16, 16)
    torch.testing.assert_close(unmerge(m), x)


def test_merge_averages_and_unmerge_copies():
    torch.manual_seed(1)
    x = torch.randn(1, 16, 8)
    merge, unmerge = bipartite_soft_matching(x, 4, 4, r=6, generator=torch.Generator().manual_seed(0))
    m = merge(x)
    assert m.shape == (1, 10, 8)
    # the mean over tokens is preserved when weighting each output by the size of its group
    u = unmerge(m)
    groups = {}
    for i in range(16):
        groups.setdefault(tuple(u[0, i].tolist()), []).append(i)
    assert len(groups) == 10
    for members in groups.values():
        torch.testing.assert_close(u[0, members[0]], x[0, members].mean(0))
    # r = 0 is a permutation: unmerge(merge(x)) == x
    merge0, unmerge0 = bipartite_soft_matching(x, 4, 4, r=0)
    torch.testing.assert_close(unmerge0(merge0(x)), x)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    dc = DecoderConfig(size=16, block_out_channels=(16, 16), attention_levels=(True, True), attention_heads=2,
                       cross_attention_dim=16, expression_embedding=False)
    return DiffusionDecoder(dc, 2, 8).eval()


def test_ratio_zero_equals_off_and_merging_changes_output(decoder):
    tok, pad = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)

    def run(r):
        return decoder.sample(tok, pad, num_inference_steps=3, token_merging=r,
                              generator=torch.Generator().manual_seed(0))

    off = run(None)
    torch.testing.assert_close(run(0.0), off, atol=1e-5, rtol=1e-5)
    merged = run(0.5)
    assert merged.shape == off.shape
    assert not torch.allclose(merged, off, atol=1e-4)
    # processors are restored after sampling
    procs = {type(m.processor).__name__ for n, m in decoder.unet.named_modules() if n.endswith("attn1")}
    assert procs and "ToMeAttnProcessor" not in procs


def test_token_merging_patches_every_self_attention(decoder):
    with token_merging(decoder.unet, 0.5) as n:
        assert n == sum(1 for name, _ in decoder.unet.named_modules() if name.endswith("attn1")) > 0
    with pytest.raises(ValueError, match="ratio"):
        with token_merging(decoder.unet, 1.5):
            pass
