"""A real parameter-server process under attack from raw sockets, on loopback.

Without the secret: random bytes and ZMTP streams straight onto the TCP port (200 MB single
frames, many-frame messages), wrong ZAP credentials and a 200-socket flood.  With the secret:
wrong challenge answers, unsigned/badly signed messages, deep JSON, absurd sizes and fields,
non-finite values, a thousand valid pushes of every codec broken one way each (none may be an
internal error), an empty push, a checkpoint outside the run directory, a peer lying about
its message size.  Throughout, the server's peak RSS stays under its baseline + 64 MB, its
parameters stay finite and unchanged by refused pushes, and a valid worker keeps being served;
a short real PS training job finishes with status ok while being flooded.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from torch import nn

from paratrain.config import Config
from paratrain.ps.auth import REFUSED, credential
from paratrain.ps.client import PSClient, connect_authenticated
from paratrain.ps.launch import free_ports
from paratrain.ps.placement import place
from paratrain.ps.protocol import (
    Flag,
    Header,
    KeyRecord,
    Msg,
    Signer,
    decode,
    encode,
    frame_record,
    read_header,
    tensor_frame,
)
from paratrain.ps.server import SECRET_ENV
from paratrain.ps.strategy import param_infos
from paratrain.ps.wire import PushEncoder
from paratrain.ps.worker import PSWorker
from tests.ps_mutations import mutated_pushes

SECRET = b"hostile-test-secret-0123456789"
MB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


@contextlib.contextmanager
def server_process(tmp_path: Path, integrity: str):
    port = free_ports("127.0.0.1", 1)[0]
    cfg = Config.load(None, [f'--run.dir="{tmp_path}"', "--parallel.sync=ps", "--ps.mode=async",
                             "--train.optimizer=sgd", "--train.momentum=0.0", "--train.weight_decay=0.0",
                             "--ps.max_message_mb=8", "--ps.heartbeat_s=0.2", "--ps.dead_after_s=60",
                             f"--ps.integrity={integrity}"])
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    cmd = [sys.executable, "-m", "paratrain.ps.server_main", "--config", str(tmp_path / "config.toml"),
           "--index", "0", "--endpoint", f"tcp://127.0.0.1:{port}", "--workers", "2", "--servers", "1",
           "--log", str(tmp_path / "server.log")]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{SECRET_ENV: SECRET.decode()}), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        ready = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert ready and ready[0].startswith("READY"), f"server did not start: {ready}"
        yield proc, f"tcp://127.0.0.1:{port}", port, cfg
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def valid_worker(cfg: Config, endpoint: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    params, infos = param_infos(model, "sgd")
    client = PSClient([endpoint], SECRET, 0, heartbeat_s=0.2, dead_after_s=60, max_bytes=8 * MB, give_up_s=20)
    w = PSWorker(client, place(infos, 1), params, PushEncoder(cfg.compression), "ssp", False, False)
    try:
        w.connect(0)
        yield w, model
    finally:
        client.close()


def served(w: PSWorker, model: nn.Module) -> None:
    """One push + reply within the client's timeout; the parameters stay finite."""
    version = w.versions[0]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    w.step(0.1, 1.0)
    assert w.versions[0] == version + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def zmtp_stream(port: int, mechanism: bytes, frames: int, frame_bytes: int, timeout: float = 3.0) -> int:
    """Raw TCP: a ZMTP 3.0 greeting, then ``frames`` long frames of random bytes; returns the bytes the
    kernel took before the server closed the connection (or stopped reading)."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\x00" + bytes(31)
    chunk, sent = os.urandom(MB), 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(greeting)
            for _ in range(frames):
                s.sendall(b"\x02" + frame_bytes.to_bytes(8, "big"))
                for _ in range(frame_bytes // MB):
                    s.sendall(chunk)
                    sent += MB
        except OSError:  # reset, broken pipe or timeout: the server does not take it
            pass
    return sent


def no_credentials_flood(port: int, endpoint: str, n: int = 200) -> None:
    """``n`` DEALERs with no or wrong credentials, each sending junk; everything closed."""
    ctx = zmq.Context()
    try:
        socks = []
        for i in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 100)
            if i % 2:
                user, _ = credential(b"another-secret-not-the-jobs", 1, 1)
                s.setsockopt(zmq.PLAIN_USERNAME, user)
                s.setsockopt(zmq.PLAIN_PASSWORD, b"0" * 64)
            s.connect(endpoint)
            with contextlib.suppress(zmq.ZMQError):
                s.send_multipart([os.urandom(80), os.urandom(random.randint(0, 4096))], zmq.NOBLOCK)
            socks.append(s)
        time.sleep(1.5)
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


class Peer:
    """An authenticated connection speaking the protocol by hand (as worker 1)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, incarnation: int = 77):
        self.sock, self.mac = connect_authenticated(ctx, endpoint, SECRET, 1, incarnation)
        self.signer, self.inc, self.seq = Signer(SECRET), incarnation, 0

    def send(self, mtype: Msg, **kw) -> int:
        self.seq += 1
        fields = {k: kw.pop(k) for k in list(kw) if k in Header.__dataclass_fields__}
        h = Header(int(mtype), worker=1, incarnation=self.inc, seq=self.seq, **fields)
        self.sock.send_multipart(encode(self.signer if self.mac else None, h, **kw), copy=False)
        return self.seq

    def raw(self, mtype: Msg, body: list[bytes], flags: int = 0, **fields) -> int:
        """A message whose body frames are given as they are (meta not JSON-encoded by us)."""
        self.seq += 1
        h = Header(int(mtype), worker=1, incarnation=self.inc, seq=self.seq, nframes=len(body),
                   length=sum(map(len, body)), flags=flags | (int(Flag.MAC) if self.mac else 0), **fields)
        parts = [h.pack(), *body]
        self.sock.send_multipart(parts + ([self.signer.mac(parts)] if self.mac else []))
        return self.seq

    def reply_to(self, seq: int):
        while True:
            m = self.recv()
            if m.header.seq == seq:
                return m

    def recv(self, timeout: float = 5.0):
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return decode(self.sock.recv_multipart(), self.signer, 64 * MB, require_mac=self.mac)

    def call(self, mtype: Msg, **kw):
        return self.reply_to(self.send(mtype, **kw))

    def refused(self, kind: str, mtype: Msg = Msg.PUSH, **kw) -> None:
        m = self.call(mtype, **kw)
        assert m.type == Msg.ERROR and m.meta["kind"] == kind, (m.type, m.meta)


def test_without_the_secret_a_peer_costs_the_server_nothing(tmp_path):
    with server_process(tmp_path, "none") as (proc, endpoint, port, cfg), valid_worker(cfg, endpoint) as (w, model):
        served(w, model)
        base = memory(proc.pid)
        ctx = zmq.Context()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:  # random bytes
                with contextlib.suppress(OSError):
                    s.sendall(os.urandom(4 * MB))
            for mech in (b"NULL", b"PLAIN", b"CURVE"):  # a 200 MB frame, then 50 frames of 4 MB
                assert zmtp_stream(port, mech, 1, 200 * MB) < 64 * MB
                assert zmtp_stream(port, mech, 50, 4 * MB) < 64 * MB
            served(w, model)
            no_credentials_flood(port, endpoint)
            # the right ZAP credential but a wrong challenge answer, then bulk on that connection
            sock, _ = connect_authenticated(ctx, endpoint, SECRET, 1, 5)
            sock.close(linger=0)
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            user, password = credential(SECRET, 1, 6)
            s.setsockopt(zmq.PLAIN_USERNAME, user)
            s.setsockopt(zmq.PLAIN_PASSWORD, password)
            s.connect(endpoint)
            s.send_multipart([Header(int(Msg.AUTH), worker=1, incarnation=6).pack()])
            assert s.poll(5000)
            s.recv_multipart()  # the challenge
            s.send_multipart([Header(int(Msg.AUTH), worker=1, incarnation=6, flags=int(Flag.PROOF)).pack(), bytes(32)])
            big = torch.zeros(2 * MB).numpy()  # 8 MB, unread: the connection is not authenticated
            for _ in range(5):
                s.send_multipart([Header(int(Msg.PUSH), worker=1, incarnation=6, nframes=1).pack(), big], copy=False)
            assert s.poll(5000)
            assert s.recv_multipart()[1:] == [REFUSED]  # the wrong answer is refused
            for _ in range(5):  # and each push answered "unauthenticated", unread
                assert s.poll(5000)
                assert read_header(s.recv_multipart()[0]).type == Msg.ERROR
            s.close(linger=0)
            served(w, model)
            end = memory(proc.pid)
            assert end["VmHWM"] < base["VmHWM"] + 64 * MB, (base, end)
            stats = w.try_stats(0)
            deadline = time.monotonic() + 20  # ZAP handshakes of closed sockets may finish late on a busy host
            while stats["refused_connections"] < 90 and time.monotonic() < deadline:
                time.sleep(0.2)
                stats = w.try_stats(0)
            assert stats["rejected"].get("bad proof", 0) >= 1 and stats["counters"].get("unauthenticated", 0) >= 1
            # the flood's 100 wrong credentials, refused by the ZAP gate (a few sockets may close
            # before their handshake reaches it on a busy host)
            assert stats["refused_connections"] >= 90
        finally:
            ctx.destroy(linger=0)  # (closes what a failed assertion left open)
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log


@pytest.mark.parametrize("integrity", ["none", "mac"])
def test_with_the_secret_bad_values_are_refused_and_logged(tmp_path, integrity):
    with server_process(tmp_path, integrity) as (proc, endpoint, port, cfg), \
            valid_worker(cfg, endpoint) as (w, model):
        base = memory(proc.pid)
        ctx = zmq.Context()
        try:
            p = Peer(ctx, endpoint)
            assert p.mac == (integrity == "mac")
            assert p.call(Msg.HELLO).type == Msg.REPLY
            keys = w.layout.server_keys(0)
            emb, lin = keys[0], keys[1]  # embedding 10x4, linear 3x4
            version = p.call(Msg.STATS).meta["version"]
            m = p.reply_to(p.raw(Msg.HELLO, [b"[" * 100_000], flags=int(Flag.META)))  # RecursionError once
            assert m.type == Msg.ERROR and m.meta["kind"] == "malformed"
            m = p.reply_to(p.raw(Msg.STATS, [b'{"a": 1'], flags=int(Flag.META)))
            assert m.type == Msg.ERROR and m.meta["kind"] == "malformed"
            grad = torch.full((lin.numel,), 0.5)

            def push(recs, tensors, **fields):
                return dict(keys=recs, frame_recs=[frame_record(t) for t in tensors],
                            frames=[tensor_frame(t) for t in tensors], clock=p.seq + 1, **fields)

            p.refused("bad value", **push([KeyRecord(lin.id, 0, 1)], [grad], f0=float("nan"), f1=1.0))
            p.refused("bad value", **push([KeyRecord(lin.id, 0, 1)], [grad], f0=1e30, f1=1.0))
            p.refused("bad value", **push([KeyRecord(lin.id, 0, 1)], [torch.full_like(grad, float("nan"))],
                                          f0=0.1, f1=1.0))
            p.refused("bad value", **push([KeyRecord(lin.id, 0, 1)], [torch.full_like(grad, float("inf"))],
                                          f0=0.1, f1=1.0))
            q, scale = torch.zeros(emb.numel, dtype=torch.int8), torch.ones(1)
            p.refused("malformed", **push([KeyRecord(emb.id, 3, 2, 0, 50_000_000)], [q, scale], f0=0.1, f1=1.0))
            rows = torch.ones(20, 4)  # more sparse rows than the table has
            p.refused("malformed", **push([KeyRecord(emb.id, 0, 2, 1)], [torch.zeros(20, dtype=torch.int64), rows],
                                          f0=0.1, f1=1.0))
            p.refused("malformed", **push([KeyRecord(9999, 0, 1)], [grad], f0=0.1, f1=1.0))
            p.refused("bad path", Msg.CHECKPOINT, meta={"path": "/tmp"})
            p.refused("bad path", Msg.CHECKPOINT, meta={"path": str(tmp_path / ".." / "elsewhere")})
            p.refused("bad path", Msg.CHECKPOINT, meta={"path": 12})
            p.refused("malformed", Msg.COLLECT, meta={"op": "sum", "values": [[[[[[[[[[1]]]]]]]]]]})
            p.refused("malformed", Msg.COLLECT, meta={"op": "sum", "values": ["x", 1.0]})
            assert p.call(Msg.STATS).meta["version"] == version  # nothing above was applied
            assert p.call(Msg.PUSH, **push([], [], f0=0.1, f1=1.0)).type == Msg.PARAMS  # empty: acknowledged...
            assert p.call(Msg.STATS).meta["version"] == version  # ... but not a step
            served(w, model)
            rejected = p.call(Msg.STATS).meta["rejected"]
            assert rejected["malformed"] >= 7 and rejected["bad value"] == 4 and rejected["bad path"] == 3
            for kw in mutated_pushes(keys, 1000, seed=len(integrity)):  # every codec, broken one way each
                m = p.call(Msg.PUSH, clock=p.seq + 1, **kw)
                assert m.type == Msg.PARAMS or m.meta["kind"] not in ("internal", "unauthenticated"), m.meta
            assert "internal" not in p.call(Msg.STATS).meta["rejected"]
            w.pull()  # (the pushes that were valid moved the version on)
            # a peer that lies about its size loses its connection (and its credential)
            p.seq += 1
            p.sock.send_multipart(encode(p.signer if p.mac else None, Header(int(Msg.PULL), worker=1, incarnation=p.inc,
                                                                               seq=p.seq)) + [b"x" * 4096])
            p.refused("unauthenticated", Msg.PULL)
            p.sock.close(linger=0)
            served(w, model)
            end = memory(proc.pid)
            assert end["VmHWM"] < base["VmHWM"] + 64 * MB, (base, end)
            assert proc.poll() is None
        finally:
            ctx.destroy(linger=0)
        log = (tmp_path / "server.log").read_text()
        assert "non-finite gradient" in log and "is not inside the run directory" in log and "nested" in log
        assert "Traceback" not in log  # every bad message above was expected, none an internal error


def test_a_real_job_finishes_while_flooded(tmp_path, corpus):
    from paratrain.training.launch import launch
    from tests.conftest import tiny_config

    port = free_ports("127.0.0.1", 1)[0]
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                zmtp_stream(port, b"NULL", 1, 8 * MB, timeout=1.0)
            with contextlib.suppress(Exception):
                no_credentials_flood(port, f"tcp://127.0.0.1:{port}", n=20)

    th = threading.Thread(target=attack, daemon=True)
    th.start()
    try:
        s = launch(tiny_config(tmp_path / "run", corpus, "--train.steps=6", "--model.n_layer=1", "--parallel.nproc=2",
                               "--data.batch_size=4", "--parallel.sync=ps", "--ps.mode=sync", f"--ps.port={port}",
                               "--ps.heartbeat_s=0.1", "--ps.dead_after_s=5.0"))
    finally:
        stop.set()
        th.join(30)
    assert s["status"] == "ok" and s["steps"] == 6, s
