"""The state-transition flow module: confidence weights, losses, the morphology loss and its memory, batch
re-pairing, configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatia.module import FlowConfig, TransitionFlow
from spatia.nn import integrate


def _batch(b=4, s=16, conf=None):
    g = torch.Generator().manual_seed(0)
    return {
        "x0": torch.rand(b, 2, s, s, generator=g), "x1": torch.rand(b, 2, s, s, generator=g),
        "cell_emb": torch.randn(b, 8, generator=g), "transition": torch.zeros(b, dtype=torch.long),
        "confidence": torch.tensor(conf if conf is not None else [0.5] * b),
    }


def _flow(**loss):
    cfg = FlowConfig.tiny().replace(train={"cond_dropout": 0.0, "augment": False}, loss=loss)
    torch.manual_seed(0)
    return TransitionFlow(cfg, channels=2, size=16, emb_dim=8, n_genes=5, n_features=10, n_transitions=2)


def test_low_confidence_pairs_get_low_weight():
    flow = _flow(contrastive_weight=0.0, sw_weight=0.0)
    flow.mean_confidence.fill_(0.4)
    conf = [0.8, 0.4, 0.05, 0.01]
    out = flow(_batch(conf=conf), generator=torch.Generator().manual_seed(1))
    w = out.weights.numpy()
    np.testing.assert_allclose(w, np.array(conf) / 0.4, rtol=1e-6)
    assert w[3] < w[2] < w[1] < w[0]
    # the FM loss is the weighted mean: a pair's contribution scales with its confidence
    torch.testing.assert_close(out.losses["fm"], (out.weights * out.fm_error).mean())
    # gradient through the loss: the same pair contributes ~80x less at confidence 0.01 than at 0.8
    b = _batch(conf=conf)
    b["x1"] = b["x1"][[0, 0, 0, 0]].clone().requires_grad_(True)
    b["x0"] = b["x0"][[0, 0, 0, 0]]
    b["cell_emb"] = b["cell_emb"][[0, 0, 0, 0]]
    b["t"] = torch.full((4,), 0.5)  # the same point of the path for all four copies
    flow(b).loss.backward()
    gn = b["x1"].grad.flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(gn / gn[0], np.array(conf) / conf[0], rtol=1e-4)


def test_flow_losses_and_backward():
    flow = _flow()
    out = flow(_batch())
    assert set(out.losses) == {"fm", "contrastive", "sw"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in flow.named_parameters() if not n.startswith("null"))
    assert out.x1_hat.shape == (4, 2, 16, 16)
    x, nfe = flow.sample(_batch()["x0"], _batch()["cell_emb"], _batch()["transition"], steps=3, solver="euler")
    assert x.shape == (4, 2, 16, 16) and nfe == 3 and 0 <= float(x.min()) and float(x.max()) <= 1


def _discs(radius, brightness, n=8, s=16):
    """``(n, 1, s, s)`` crops of one centred disc each (radius in px, jittered), in [0, 1]."""
    g = torch.Generator().manual_seed(int(radius * 10))
    yy, xx = torch.meshgrid(torch.arange(s) - s / 2 + 0.5, torch.arange(s) - s / 2 + 0.5, indexing="ij")
    r = radius + 0.5 * torch.rand(n, generator=g)
    inside = (yy[None] ** 2 + xx[None] ** 2) <= r[:, None, None] ** 2
    return (0.05 + brightness * inside.float())[:, None]


def test_joint_morphology_loss_penalises_swapping_types():
    """The morphology loss compares the joint law of (source, endpoint) with that of (source, matched target):
    endpoints that give one type's target morphology to another type's sources are penalised, whereas the
    targets' marginal law (the same set of crops, only reassigned) cannot tell the two apart."""
    flow = _flow()
    x0 = torch.cat([_discs(2.0, 0.5), _discs(5.0, 0.5)])  # small- and large-nucleus sources
    x1 = torch.cat([_discs(3.0, 0.9), _discs(6.0, 0.9)])  # their targets: each grows and brightens
    swapped = x1[torch.cat([torch.arange(8, 16), torch.arange(0, 8)])]  # small sources get large targets
    tr = torch.zeros(16, dtype=torch.long)

    def loss(end, joint):
        g = torch.Generator().manual_seed(0)
        return float(flow._sw_per_transition(end * 2 - 1, x1, tr, g, x0r=x0 if joint else None))

    # the true pairs and the swapped pairs' marginal: no signal beyond float noise (every disc of a group has
    # the same eccentricity and intensities, so their tiny spread magnifies rounding errors)
    floor = max(loss(x1, joint=True), loss(swapped, joint=False))
    swap = loss(swapped, joint=True)
    assert swap > 0.3 and swap > 20 * floor, (swap, floor)


def test_morphology_loss_on_the_flow_rollout():
    """By default the morphology loss sees the flow's own few-step sample from the source crop."""
    flow = _flow(contrastive_weight=0.0, sw_steps=3)
    b = _batch()
    cond = flow.condition(b["cell_emb"], b["transition"])
    out = flow(b)
    x_euler, _ = integrate(lambda x, t: flow.velocity(x, t, cond), b["x0"] * 2 - 1, steps=3, solver="euler")
    torch.testing.assert_close(out.x1_end, x_euler, atol=1e-5, rtol=1e-5)
    assert "sw" in out.losses
    # switched off (the warm-up sets the scale to 0): no morphology term, no rollout
    out = flow(_batch(), sw_scale=0.0)
    assert "sw" not in out.losses and out.x1_end is None
    for bad in (dict(sw_steps=0), dict(sw_warmup=1.0)):
        with pytest.raises(ValueError, match="sw_"):
            FlowConfig().replace(loss=bad)


def test_flow_config_round_trip_and_checks():
    """A saved configuration has every field (no defaults fill in for missing ones); values are checked."""
    cfg = FlowConfig.tiny()
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg == FlowConfig.from_dict(cfg.to_dict(), complete=True)
    assert FlowConfig.from_dict({"block_out_channels": [16, 32]}).block_out_channels == (16, 32)
    d = cfg.to_dict()
    d["loss"].pop("sw_blur")
    with pytest.raises(KeyError, match=r"'loss' section has no field\(s\) \['sw_blur'\]"):
        FlowConfig.from_dict(d, complete=True)
    with pytest.raises(ValueError, match=r"Unknown configuration fields: \['evil'\]"):
        FlowConfig.from_dict({"evil": 1})
    assert cfg.replace(loss={"sw_blur": 0.5}).loss.sw_blur == 0.5
    assert cfg.replace(loss={"sw_blur": 0.5}).loss.sw_weight == cfg.loss.sw_weight  # the rest of the section kept
    with pytest.raises(ValueError, match="has no field 'evil'"):
        cfg.replace(evil=1)
    for bad in (dict(train={"lr_schedule": "step"}), dict(loss={"sw_blur": -1.0}),
                dict(train={"batch_ot_emb_weight": -1.0}), dict(sample={"solver": "rk4"})):
        with pytest.raises(ValueError):
            FlowConfig().replace(**bad)
    with pytest.raises(ValueError, match="has no field 'lr'"):  # training settings live in their section
        cfg.replace(lr=1e-3)


def test_flow_config_rejects_the_removed_options():
    """``proxies``, ``sw_endpoint`` (with ``sw_min_t``), ``sw_joint`` and ``sw_memory`` are no longer options: a
    configuration that names them is refused, not silently trained another way."""
    for name, value in (("proxies", "soft"), ("sw_endpoint", "one_step"), ("sw_min_t", 0.5), ("sw_joint", False),
                        ("sw_memory", 8)):
        with pytest.raises(ValueError, match=rf"Unknown configuration fields: \['{name}'\]"):
            FlowConfig.from_dict({name: value})
    d = FlowConfig.tiny().to_dict() | {"proxies": "region", "sw_endpoint": "rollout"}
    with pytest.raises(ValueError, match=r"Unknown configuration fields: \['proxies', 'sw_endpoint'\]"):
        FlowConfig.from_dict(d, complete=True)
    assert not {"proxies", "sw_endpoint", "sw_min_t"} & set(FlowConfig().to_dict())


def test_default_flow_length_counts_steps():
    from spatia.model._transition import default_flow_epochs

    assert default_flow_epochs(3, 500) == 167  # a small slide's few shifted pairs: many epochs
    assert default_flow_epochs(50, 500) == 10 and default_flow_epochs(313, 500) == 10  # at least 10
    assert default_flow_epochs(0, 500) == 500
    assert FlowConfig().train.max_epochs is None and FlowConfig().train.min_steps == 500
    for bad in (dict(max_epochs=0), dict(min_steps=0)):
        with pytest.raises(ValueError, match="max_epochs|min_steps"):
            FlowConfig().replace(train=bad)


def test_batch_repair_keeps_the_targets_and_shortens_paths():
    from spatia.module._flow import batch_repair

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(12, 1, 8, 8, generator=g)
    x1 = x0[torch.randperm(12, generator=g)] + 0.01 * torch.rand(12, 1, 8, 8, generator=g)
    emb = torch.zeros(12, 4)
    group = torch.tensor([0] * 6 + [1] * 6)
    perm = batch_repair(x0, x1, emb, group)
    assert sorted(perm.tolist()) == list(range(12))  # a permutation: the same targets
    assert (group[perm] == group).all()  # within each transition only
    d_before = ((x1 - x0) ** 2).flatten(1).sum(1)
    d_after = ((x1[perm] - x0) ** 2).flatten(1).sum(1)
    assert d_after.sum() <= d_before.sum() + 1e-6
    # with a heavy embedding term, a source only takes the target of a source with the same embedding
    emb = torch.tensor([[0.0], [0.0], [10.0], [10.0]])
    x0 = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.05, 0.85, 0.9)])
    x1 = torch.stack([torch.full((1, 4, 4), v) for v in (0.9, 0.8, 0.0, 0.1)])  # pixel cost alone swaps groups
    perm = batch_repair(x0, x1, emb, torch.zeros(4, dtype=torch.long), emb_weight=100.0)
    assert set(perm[:2].tolist()) == {0, 1} and set(perm[2:].tolist()) == {2, 3}
    assert set(batch_repair(x0, x1, emb, torch.zeros(4, dtype=torch.long), emb_weight=0.0)[:2].tolist()) == {2, 3}
