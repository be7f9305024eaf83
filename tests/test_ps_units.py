"""Parameter server, in one process: wire format, placement, consistency bookkeeping, and a real
server (a thread on a real socket) against raw sockets and PSWorker clients."""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time

import pytest
import torch
import zmq
from torch import nn

from paratrain.config import Config
from paratrain.ps.client import PSClient, connect_authenticated
from paratrain.ps.consistency import Clocks, Membership, SyncRound
from paratrain.ps.landing import Landing
from paratrain.ps.launch import free_ports
from paratrain.ps.placement import ParamInfo, place
from paratrain.ps.protocol import (
    HEADER,
    Flag,
    FrameRecord,
    Header,
    KeyRecord,
    Msg,
    ProtocolError,
    Signer,
    decode,
    encode,
    frame_tensors,
    tensor_frame,
)
from paratrain.ps.server import ParameterServer
from paratrain.ps.shard import group_slots
from paratrain.ps.strategy import param_infos
from paratrain.ps.wire import PushEncoder
from paratrain.ps.worker import PSWorker

SECRET = b"unit-test-secret-0123456789"


def cfg_for(mode: str = "sync", **extra: object) -> Config:
    over = [f"--ps.mode={mode}", "--train.optimizer=sgd", "--train.weight_decay=0.0", "--train.momentum=0.0",
            "--train.grad_clip=0.0", "--ps.heartbeat_s=0.1", "--ps.dead_after_s=1.5", "--ps.max_message_mb=0.05",
            "--train.warmup_steps=0"]
    over += [f"--{k}={v}" for k, v in extra.items()]
    return Config.load(None, over)


class ServerThread:
    """A ParameterServer serving from a thread; ``stop()`` ends it abruptly (like a crash)."""

    def __init__(self, cfg: Config, n_workers: int = 1, endpoint: str = "tcp://127.0.0.1:*", resume=None,
                 index: int = 0, n_servers: int = 1):
        self.srv = ParameterServer(cfg, index, endpoint, SECRET, n_workers, n_servers, resume=resume, job_id="unit")
        self._stop = threading.Event()
        self._th = threading.Thread(target=self.srv.serve, args=(self._stop,), daemon=True)
        self._th.start()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._th.join(5)
            self.srv.close()


@contextlib.contextmanager
def running_server(cfg: Config, n_workers: int = 1, endpoint: str = "tcp://127.0.0.1:*", resume=None):
    st = ServerThread(cfg, n_workers, endpoint, resume)
    try:
        yield st.srv
    finally:
        st.stop()


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))


@contextlib.contextmanager
def ps_worker(cfg: Config, endpoint: str, rank: int, model: nn.Module, keep_log: bool = False):
    params, infos = param_infos(model, cfg.train.optimizer)
    client = PSClient([endpoint], SECRET, rank, heartbeat_s=cfg.ps.heartbeat_s, dead_after_s=cfg.ps.dead_after_s,
                      max_bytes=int(cfg.ps.max_message_mb * 2**20), give_up_s=20)
    w = PSWorker(client, place(infos, 1), params, PushEncoder(cfg.compression), cfg.ps.mode, False, keep_log)
    try:
        yield w
    finally:
        client.close()


def set_grads(model: nn.Module, step: int, scale: float = 1.0) -> None:
    for i, p in enumerate(model.parameters()):
        g = torch.full_like(p, 0.01 * step * scale) + 0.1 * p.detach()
        if i == 0:  # embedding: only rows 2 and 5 touched -> sparse rows on the wire
            mask = torch.zeros(p.shape[0], 1)
            mask[[2, 5]] = 1
            g = g * mask
        p.grad = g


# ---- wire format ------------------------------------------------------------------------------
def test_encode_decode_round_trip_and_rejections():
    s = Signer(SECRET)
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    parts = encode(s, Header(int(Msg.PUSH), worker=1, seq=7, clock=3, f0=0.5), meta={"a": 1},
                   keys=[KeyRecord(4, 0, 1)], frame_recs=[FrameRecord(0, (2, 3))], frames=[t.numpy()])
    m = decode([bytes(p) if not isinstance(p, bytes) else p for p in parts], s, 1 << 20)
    assert m.header.worker == 1 and m.header.clock == 3 and m.meta == {"a": 1} and m.keys[0].key == 4
    assert torch.equal(frame_tensors(m)[0], t)
    for x in (torch.zeros(0, 4), torch.ones(3, 4), torch.tensor(2.0), torch.ones(5, dtype=torch.bfloat16)):
        assert tensor_frame(x).ndim == 1 and memoryview(tensor_frame(x)).cast("B").nbytes == x.nbytes  # flat bytes
    raw = [bytes(p) if not isinstance(p, bytes) else p for p in parts]
    cases = {
        "bad MAC": raw[:-1] + [bytes(32)],
        "malformed": [b"only one frame"],
        "oversized": raw,
    }
    for kind, msg in cases.items():
        with pytest.raises(ProtocolError) as e:
            decode(msg, s, 10 if kind == "oversized" else 1 << 20)
        assert e.value.kind == kind
    with pytest.raises(ProtocolError, match="bad MAC"):
        decode(raw, Signer(b"another-secret-of-16+"), 1 << 20)
    bad_len = Header(int(Msg.PUSH), nframes=1, length=99, flags=int(Flag.MAC))  # signed, but lies about its length
    head = bad_len.pack()
    with pytest.raises(ProtocolError, match="wrong length"):
        decode([head, b"abcd", s.mac([head, b"abcd"])], s, 1 << 20)


def test_replies_land_in_the_parameters_memory():
    """Whole parameters become views of per-server runs, split ones are copied chunk by chunk,
    and a parameter whose storage is replaced afterwards still gets its values."""
    params = [torch.zeros(40, 8), torch.zeros(3), torch.zeros(5, 2), torch.zeros(7)]
    infos = [ParamInfo(f"p{i}", tuple(t.shape), decay=t.dim() > 1) for i, t in enumerate(params)]
    layout = place(infos, 2)
    assert len([k for k in layout.keys if k.param == 0]) == 2  # the big one is split over both servers
    keys_of = [layout.server_keys(i) for i in range(2)]
    landing = Landing(params, keys_of)

    def expected(flats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros(t.numel()) for t in params]
        for i, keys in enumerate(keys_of):
            sizes, slot = group_slots(keys)
            for k in keys:
                g, off = slot[k.id]
                start = off + (sizes[0] if g else 0)
                out[k.param][k.offset:k.offset + k.numel] = flats[i][start:start + k.numel]
        return out

    for step in range(3):
        if step == 2:
            params[1].data = torch.full((3,), -1.0)  # someone replaces a parameter's storage
        flats = [torch.randn(landing.numel(i)) for i in range(2)]
        for i in range(2):
            landing.land(i, memoryview(flats[i].numpy()).cast("B"))
        for t, want in zip(params, expected(flats), strict=True):
            assert torch.equal(t.view(-1), want)


def test_placement_balances_bytes_and_chunks_big_tensors():
    params = [ParamInfo("emb", (1000, 8), True, True), ParamInfo("w", (64, 8)), ParamInfo("b", (8,), False),
              ParamInfo("empty", (0, 4))]
    for order in ("ordered", "balanced"):
        layout = place(params, 3, order)
        loads = [layout.server_bytes(i) for i in range(3)]
        assert sum(loads) == 4 * (8000 + 512 + 8)
        assert max(loads) - min(loads) <= 4 * 8 * (1 if order == "ordered" else 334)  # a row / a chunk of rows
        emb = [k for k in layout.keys if k.name == "emb"]
        assert len(emb) > 1 and all(k.offset % 8 == 0 and k.shape[1] == 8 for k in emb)  # row-aligned chunks
        for i in range(3):  # each server owns one contiguous key range
            start, count = layout.key_range(i)
            assert [k.id for k in layout.server_keys(i)] == list(range(start, start + count))
        assert place(params, 3, order).digest == layout.digest != place(params, 2, order).digest
    ordered = place(params, 3)  # backward's order: server 0 holds the last parameters, the last server the first rows
    assert {k.name for k in ordered.server_keys(0)} == {"emb", "w", "b", "empty"}
    assert [k.offset for k in ordered.keys if k.name == "emb"] == sorted(
        (k.offset for k in ordered.keys if k.name == "emb"), reverse=True)
    assert place(params[:3], 1).digest == place(params[:3], 1, "balanced").digest  # one server: unchanged


def test_every_placement_covers_each_element_once_in_whole_rows():
    rng = random.Random(1)
    for _ in range(200):
        shapes = [tuple(rng.randint(0, 9) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 7))]
        params = [ParamInfo(f"p{i}", s) for i, s in enumerate(shapes)]
        n = rng.randint(1, 5)
        for order in ("ordered", "balanced"):
            layout = place(params, n, order)
            for i, s in enumerate(shapes):
                numel = math.prod(s) if s else 1
                row = math.prod(s[1:]) if len(s) >= 2 else 1
                keys = sorted((k for k in layout.keys if k.param == i), key=lambda k: k.offset)
                assert keys and sum(k.numel for k in keys) == numel, (order, s, keys)
                assert [k.offset for k in keys] == [sum(k.numel for k in keys[:j]) for j in range(len(keys))]
                assert all(k.offset % max(1, row) == 0 and math.prod(k.shape) == k.numel for k in keys)
            if order == "ordered":  # backward's order: a server holds no parameter after a later server's
                last = [max((k.param for k in layout.server_keys(j)), default=None) for j in range(n)]
                first = [min((k.param for k in layout.server_keys(j)), default=None) for j in range(n)]
                for a in range(n):
                    for b in range(a + 1, n):
                        if last[b] is not None and first[a] is not None:
                            assert last[b] <= first[a], (shapes, n, layout.keys)


def test_ssp_clock_bound_holds_under_random_schedules():
    rng = random.Random(0)
    for s in (0, 1, 3):
        clocks, live, waiting = Clocks(s), {0, 1, 2}, set()
        speed = {0: 1.0, 1: 0.3, 2: 0.7}
        for _ in range(2000):
            w = rng.choice(sorted(live - waiting)) if live - waiting else None
            if w is not None and rng.random() < speed[w]:
                clocks.advance(w)  # w pushed; its reply is held until the gate opens
                waiting.add(w)
            low = clocks.slowest(live)
            for v in sorted(waiting):
                if clocks.release(v, low) is not None:
                    waiting.discard(v)
        assert clocks.max_gap <= s and max(clocks.clock.values()) > 100
        assert max(clocks.clock.values()) - min(clocks.clock.values()) <= s + 1


def test_membership_drops_silent_workers_and_rounds_stop_waiting():
    m = Membership(2, dead_after_s=1.0, join_grace_s=5.0, now=0.0)
    assert m.seen(0, 0.0) == "joined" and m.live() == {0, 1}  # 1 is still expected
    rnd = SyncRound(1)
    rnd.add(0, 1.0)
    assert not rnd.ready(m.live())
    m.seen(1, 0.5)
    m.seen(0, 1.2)
    assert m.expire(1.6) == [(1, pytest.approx(1.1))] and m.live() == {0} and rnd.ready(m.live())
    assert m.seen(1, 2.0) == "rejoined" and m.dropped == [1]


# ---- a real server -----------------------------------------------------------------------------
def test_server_rejects_bad_messages_and_keeps_serving(caplog):
    cfg = cfg_for("async", **{"ps.integrity": "mac"})
    with running_server(cfg) as srv:
        ctx = zmq.Context()
        raw, mac = connect_authenticated(ctx, srv.endpoint, SECRET, 0, 5)
        assert mac
        raw.setsockopt(zmq.RCVTIMEO, 300)
        good, evil = Signer(SECRET), Signer(b"not-the-job-secret!!")
        hello = encode(good, Header(int(Msg.HELLO), worker=0, incarnation=5, seq=1))
        bad_len = Header(int(Msg.PUSH), worker=0, incarnation=5, seq=2, nframes=1, length=5,
                         flags=int(Flag.MAC)).pack()
        msgs = [
            [b"garbage"],
            [b"P" * HEADER.size, b"x" * 32],
            encode(evil, Header(int(Msg.HELLO), worker=0, incarnation=5, seq=1)),
            encode(good, Header(99, worker=0, incarnation=5)),
            [bad_len, b"abcd", good.mac([bad_len, b"abcd"])],
            hello, hello,  # the second is a replay
            hello + [b"more than declared"],  # a liar: its connection is dropped
        ]
        for m in msgs:
            raw.send_multipart(m)
        deadline = time.monotonic() + 10
        want = {"malformed": 2, "bad MAC": 1, "unknown type": 1, "wrong length": 1, "oversized": 1, "replayed": 1}
        while time.monotonic() < deadline and any(srv.rejected[k] < n for k, n in want.items()):
            time.sleep(0.05)
        assert {k: srv.rejected[k] for k in want} == want
        replies = []
        with contextlib.suppress(zmq.Again):
            while True:
                replies.append(decode(raw.recv_multipart(), good, 1 << 20))
        kinds = sorted(r.meta.get("kind", Msg(r.type).name) for r in replies)
        assert kinds == ["REPLY", "replayed", "unknown type", "wrong length"]  # none to unauthenticated senders
        raw.close()
        ctx.term()
        model = tiny_model()
        with ps_worker(cfg, srv.endpoint, 0, model) as w:  # a valid worker is served afterwards
            w.connect(0)
            before = [p.detach().clone() for p in model.parameters()]
            set_grads(model, 1)
            w.step(lr=0.1, weight=1.0)
            w.finish()
            assert w.versions[0] == 1
            assert not torch.equal(before[1], model[1].weight)
            assert torch.equal(before[0][0], model[0].weight[0])  # untouched embedding row: no update
            assert not torch.equal(before[0][2], model[0].weight[2])


def test_sync_two_workers_mean_update_drop_and_rejoin():
    cfg = cfg_for("sync")
    with running_server(cfg, n_workers=2) as srv:
        m0, m1 = tiny_model(), tiny_model()
        ref = [p.detach().clone() for p in m0.parameters()]
        with ps_worker(cfg, srv.endpoint, 0, m0) as w0:
            with ps_worker(cfg, srv.endpoint, 1, m1) as w1:
                w0.connect(0)
                w1.connect(0)
                set_grads(m0, 1, 1.0)
                set_grads(m1, 1, 3.0)
                g = [(a.grad + 3 * b.grad) / 4 for a, b in zip(m0.parameters(), m1.parameters(), strict=True)]
                th = threading.Thread(target=w1.step, args=(0.5, 3.0))
                th.start()
                w0.step(0.5, 1.0)  # weighted by label counts 1 and 3
                th.join(10)
                for p0, p1, r, gi in zip(m0.parameters(), m1.parameters(), ref, g, strict=True):
                    torch.testing.assert_close(p0, r - 0.5 * gi, rtol=0, atol=1e-6)
                    assert torch.equal(p0, p1)
                w1.client.close()  # worker 1 dies silently (no LEAVE)
            t0 = time.monotonic()
            set_grads(m0, 2)
            w0.step(0.5, 1.0)  # waits until the server drops worker 1, then goes on alone
            assert 1.0 < time.monotonic() - t0 < 10 and srv.members.dropped[-1] == 1
            m1b = tiny_model(seed=7)  # a restarted worker 1: new process, rejoins and pulls fresh values
            with ps_worker(cfg, srv.endpoint, 1, m1b) as w1b:
                w1b.connect(0)
                for a, b in zip(m0.parameters(), m1b.parameters(), strict=True):
                    assert torch.equal(a, b)
                set_grads(m0, 3)
                set_grads(m1b, 3)
                th = threading.Thread(target=w1b.step, args=(0.5, 1.0))
                th.start()
                w0.step(0.5, 1.0)
                th.join(10)
                assert srv.shard.version == 3 and srv.members.live() == {0, 1}


def test_restarted_server_replays_acknowledged_pushes(tmp_path):
    """Checkpoint at clock 2, crash after clock 4, restart from the checkpoint: the worker's
    replayed pushes make the state equal to an uninterrupted run."""
    cfg = cfg_for("async", **{"train.optimizer": "adamw", "train.weight_decay": 0.1, "run.dir": f'"{tmp_path}"'})
    ckpt = tmp_path / "step_2"
    ckpt.mkdir()
    port = free_ports("127.0.0.1", 1)[0]
    endpoint = f"tcp://127.0.0.1:{port}"

    def run(crash: bool) -> list[torch.Tensor]:
        model = tiny_model()
        servers = [ServerThread(cfg, endpoint=endpoint)]
        try:
            with ps_worker(cfg, endpoint, 0, model, keep_log=True) as w:
                w.connect(0)
                for step in range(1, 7):
                    set_grads(model, step)
                    w.step(0.01, 1.0)
                    w.finish()
                    if step == 2:
                        w.request(0, Msg.CHECKPOINT, {"path": str(ckpt)})
                        w.trim(0)
                    if step == 4 and crash:
                        servers[-1].stop()
                        servers.append(ServerThread(cfg, endpoint=endpoint, resume=ckpt / "ps_server0.pt"))
                if crash:
                    assert w.recoveries == 1 and servers[-1].srv.shard.version == 6
                return [p.detach().clone() for p in model.parameters()]
        finally:
            for st in servers:
                st.stop()

    plain, crashed = run(False), run(True)
    for a, b in zip(plain, crashed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_missing_or_unloadable_ps_checkpoint_is_one_line_exit_2(tmp_path):
    """Resuming from a checkpoint without loadable server state stops before anything starts;
    a server started on such a file exits 2 with one line (no crash loop, no silent re-seed)."""
    import os
    import subprocess
    import sys

    from paratrain.config import ConfigError
    from paratrain.ps.server_main import check_resume

    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match="ps_server0.pt is missing") as e:
        check_resume(ckpt, 1)
    assert "\n" not in str(e.value)
    (ckpt / "ps_server0.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be loaded") as e:
        check_resume(ckpt, 1)
    assert "\n" not in str(e.value)
    cfg = cfg_for("async", **{"run.dir": f'"{tmp_path}"'})
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    r = subprocess.run([sys.executable, "-m", "paratrain.ps.server_main", "--config", str(tmp_path / "config.toml"),
                        "--index", "0", "--endpoint", "tcp://127.0.0.1:*", "--workers", "1", "--servers", "1",
                        "--resume", str(ckpt)], env=dict(os.environ, PARATRAIN_PS_SECRET=SECRET.decode()),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot be loaded" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
