"""FrozenVarianceAdamW (1-bit Adam's frozen second moment): AdamW before the freeze, linear after."""

from __future__ import annotations

import copy

import pytest
import torch

from paratrain.compression.frozen_adam import FrozenVarianceAdamW

KW = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _groups(ps):
    return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]


def _grads(step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(8, 5, generator=g), torch.randn(5, generator=g)]


def _step(opt, ps, grads):
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("freeze", [0, 6])
def test_equals_adamw_before_freeze(freeze):
    a, b = _params(), _params()
    ref = torch.optim.AdamW(_groups(a), foreach=False, **KW)
    opt = FrozenVarianceAdamW(_groups(b), freeze_after=freeze, **KW)
    for t in range(freeze or 10):
        _step(ref, a, _grads(t))
        _step(opt, b, _grads(t))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    for x, y in zip(a, b, strict=True):  # same state layout as AdamW
        torch.testing.assert_close(ref.state[x]["exp_avg_sq"], opt.state[y]["exp_avg_sq"], atol=1e-6, rtol=0)


def test_variance_frozen_and_update_linear_after_freeze():
    ps = _params()
    opt = FrozenVarianceAdamW(_groups(ps), freeze_after=3, **KW)
    for t in range(3):
        _step(opt, ps, _grads(t))
    v = [opt.state[p]["exp_avg_sq"].clone() for p in ps]
    for t in range(3, 6):
        _step(opt, ps, _grads(t))
        for p, v0 in zip(ps, v, strict=True):
            assert torch.equal(opt.state[p]["exp_avg_sq"], v0)
    # after the freeze: update(g1 + g2) - update(0) == (update(g1) - update(0)) + (update(g2) - update(0))
    g1, g2 = _grads(10), _grads(11)
    zero = [torch.zeros_like(g) for g in g1]

    def delta(grads):
        o, q = copy.deepcopy((opt, ps))
        before = [p.detach().clone() for p in q]
        _step(o, q, grads)
        return [p.detach() - b for p, b in zip(q, before, strict=True)]

    d0, d1, d2 = delta(zero), delta(g1), delta(g2)
    d12 = delta([x + y for x, y in zip(g1, g2, strict=True)])
    for a, b, c, z in zip(d12, d1, d2, d0, strict=True):
        torch.testing.assert_close(a - z, (b - z) + (c - z), atol=1e-6, rtol=1e-5)
        assert (b - z).abs().max() > 1e-4  # the gradient does move the weights


def test_state_dict_resume_matches_uninterrupted():
    a, b = _params(), _params()
    full = FrozenVarianceAdamW(_groups(a), freeze_after=2, **KW)
    part = FrozenVarianceAdamW(_groups(b), freeze_after=2, **KW)
    for t in range(3):
        _step(full, a, _grads(t))
        _step(part, b, _grads(t))
    sd = copy.deepcopy(part.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = FrozenVarianceAdamW(_groups(c), freeze_after=2, **KW)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["freeze_after"] == 2
    for t in range(3, 6):
        _step(full, a, _grads(t))
        _step(resumed, c, _grads(t))
    for x, y in zip(a, c, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_variance_floor_applied_once_at_freeze():
    a, b = _params(), _params()
    ref = torch.optim.AdamW(_groups(a), foreach=False, **KW)
    opt = FrozenVarianceAdamW(_groups(b), freeze_after=2, variance_floor=0.5, **KW)
    for t in range(2):
        _step(ref, a, _grads(t))
        _step(opt, b, _grads(t))
    for x, y in zip(a, b, strict=True):
        v = ref.state[x]["exp_avg_sq"]
        torch.testing.assert_close(opt.state[y]["exp_avg_sq"], v.clamp(min=float(v.mean()) * 0.5))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        FrozenVarianceAdamW(_params(), freeze_after=-1)
    with pytest.raises(ValueError):
        FrozenVarianceAdamW(_params(), betas=(0.9, 1.0))
