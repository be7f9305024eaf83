"""1-bit Adam: sign packing, error feedback through the update, variance sync schedule, and the
whole step against a plain re-implementation (one rank; the 2-rank run is in test_compression_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from paratrain.grad_compression.onebit_adam import OneBitAdam, is_sync_step, pack_signs, unpack_signs

KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _grads(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(6, 5, generator=g) + 0.3, torch.randn(7, generator=g)]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 101])
def test_sign_packing_round_trips(n):
    x = torch.randn(n)
    x[0] = 0.0  # zero counts as +1
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_signs(packed, n), torch.where(x >= 0, 1.0, -1.0))


def test_sync_steps_are_powers_of_two():
    assert [t for t in range(1, 40) if is_sync_step(t)] == [1, 2, 4, 8, 16, 32]


def test_step_matches_plain_reimplementation_and_error_feedback_loses_nothing():
    ps, ref = _params(), _params()
    wds = (0.1, 0.0)

    def make():
        return OneBitAdam([{"params": [ps[0]], "weight_decay": wds[0]}, {"params": [ps[1]], "weight_decay": wds[1]}],
                          clip=6.3, **KW)

    opt = make()
    lr, eps, (b1, b2) = KW["lr"], KW["eps"], KW["betas"]
    m, e, u, v = ([torch.zeros_like(p) for p in ref] for _ in range(4))
    sent_sum, m_sum = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    v_step, clipped = 0, 0
    for t in range(1, 13):
        grads = _grads(t)
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        sent = []
        with torch.no_grad():
            norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
            coef = min(1.0, 6.3 / (norm + 1e-6))
            clipped += coef < 1
            assert opt.last_grad_norm == pytest.approx(norm, rel=1e-6)
            for i, g in enumerate(grads):
                u[i] = b2 * u[i] + (1 - b2) * g * g  # variance of the unclipped gradient
                m[i] = b1 * m[i] + (1 - b1) * coef * g
                x = m[i] + e[i]
                sent.append(torch.where(x >= 0, 1.0, -1.0) * x.abs().mean())
                e[i] = x - sent[i]
                sent_sum[i] += sent[i]
                m_sum[i] += m[i]
            for i, q in enumerate(ref):
                denom = sent[i].abs() + eps if v_step == 0 else (v[i] / (1 - b2 ** v_step)).sqrt() + eps
                q.mul_(1 - lr * wds[i])
                q.addcdiv_(sent[i], denom, value=-lr)
            if is_sync_step(t):  # variance synced (one rank: taken) after steps 1, 2, 4, 8; frozen in between
                v, v_step = [w.clone() for w in u], t
        for p, q in zip(ps, ref, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert 0 < clipped < 12  # the clip was exercised, and not on every step
    for i, p in enumerate(ps):
        st = opt.state[p]
        # error feedback: everything sent plus what is still held back is the momentum, exactly
        torch.testing.assert_close(sent_sum[i] + st["error"], m_sum[i], rtol=0, atol=1e-5)
        assert int(st["var_step"]) == 8
        torch.testing.assert_close(st["exp_avg_sq"], v[i])
    assert opt.take_comm_bytes() == 0  # one rank: nothing on the wire
    again = make()  # the state round-trips through state_dict (each rank checkpoints its own)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[ps[0]]["error"], opt.state[ps[0]]["error"])


@pytest.mark.parametrize("extra", [["--parallel.sync=ps"], ["--compression.gradient=topk"],
                                   ["--parallel.nproc=2", "--parallel.zero=1"]])
def test_config_rejects_onebit_outside_plain_data_parallel(extra):
    from paratrain.config import Config, ConfigError

    with pytest.raises(ConfigError, match="onebit_adam"):
        Config.load(None, ["--train.optimizer=onebit_adam", *extra])


def test_scales_cover_runs_of_chunk_coordinates():
    p = torch.nn.Parameter(torch.zeros(2500))
    opt = OneBitAdam([p], chunk=1024, **KW)
    x = torch.randn(2500)
    scales, counts = opt._scales(x)
    assert counts.tolist() == [1024, 1024, 452]
    torch.testing.assert_close(scales, torch.stack([r.abs().mean() for r in x.split(1024)]))
    total, own = opt._exchange([x.view(50, 50)])
    dec = own[0].reshape(-1)
    torch.testing.assert_close(dec[1024:2048], torch.where(x[1024:2048] >= 0, 1.0, -1.0) * scales[1])
    assert OneBitAdam([p], chunk=0, **KW)._scales(x)[1].tolist() == [2500]
    assert opt._scales(torch.zeros(0))[1].numel() == 0
    torch.testing.assert_close(total[0], own[0])  # one rank: the sum is its own message
