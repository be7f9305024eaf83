"""Pushes during backward (ps.overlap): two real servers (threads on real sockets), one worker."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from paratrain.ps.client import PSClient
from paratrain.ps.overlap import EarlyPush
from paratrain.ps.placement import place
from paratrain.ps.strategy import param_infos
from paratrain.ps.wire import PushEncoder
from paratrain.ps.worker import PSWorker
from tests.test_ps_units import SECRET, ServerThread, cfg_for


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_each_server_is_pushed_once_its_gradients_are_final_and_updates_equal_local_sgd(mode):
    """With gradient accumulation (the first micro-batch must not push), 2 servers: the server
    holding the last layers is pushed before backward reaches the first layer, both are pushed
    during backward every step, and the parameters equal local SGD on the batch."""
    cfg = cfg_for(mode)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    params, infos = param_infos(model, "sgd")
    layout = place(infos, 2)
    assert 0 in {k.param for k in layout.server_keys(1)} and 0 not in {k.param for k in layout.server_keys(0)}
    servers = [ServerThread(cfg, index=i, n_servers=2) for i in range(2)]
    client = PSClient([s.srv.endpoint for s in servers], SECRET, 0, heartbeat_s=0.1, give_up_s=20)
    try:
        w = PSWorker(client, layout, params, PushEncoder(cfg.compression), mode, False, False)
        w.connect(0)
        events: list[object] = []

        def push(i: int) -> None:
            events.append(i)
            w.push_early(i, 0.1, 1.0)

        early = EarlyPush(params, w.keys_of, push)
        params[0].register_post_accumulate_grad_hook(lambda _: events.append("first layer"))
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss = lambda m, s: nn.functional.cross_entropy(m(x[s]), y[s], reduction="sum") / 8  # noqa: E731
        for _ in range(4):
            events.clear()
            early.arm()
            with early.paused():  # accumulation: gradients not final yet
                loss(model, slice(0, 4)).backward()
            assert events == ["first layer"] and not w.inflight
            loss(model, slice(4, 8)).backward()
            early.disarm()
            # server 0 left before backward reached the first layer; server 1 with it (EarlyPush's hook runs first)
            assert events == ["first layer", 0, 1, "first layer"], events
            w.step(0.1, 1.0, wait=False)  # nothing left to push
            w.finish()
            (loss(ref, slice(0, 4)) + loss(ref, slice(4, 8))).backward()
            opt.step()
            opt.zero_grad()
            for p, r in zip(model.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
        assert w.stats.early == 8 and w.stats.pushes == 4 and w.clock == 4
        assert [s.srv.shard.version for s in servers] == [4, 4]
        early.close()
        loss(model, slice(0, 8)).backward()  # hooks removed: a plain step pushes both servers
        w.step(0.1, 1.0)
        assert w.stats.early == 8 and [s.srv.shard.version for s in servers] == [5, 5]
    finally:
        client.close()
        for s in servers:
            s.stop()
