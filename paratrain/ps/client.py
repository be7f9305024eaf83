"""The worker's transport: one DEALER socket per server, requests matched to replies, liveness.

:class:`PSClient` sends requests (at most one push in flight per server -- the caller's
discipline), waits for their replies on all servers at once, and tells a restarted server
apart from a slow one: when a reply is overdue it sends a PROBE (a HELLO the server answers
immediately, even while it holds the real reply back for a barrier); a reply from a new
server incarnation, or a "no session" error, marks the server as restarted so the caller can
recover (see :mod:`paratrain.ps.worker`).  A background thread sends heartbeats on its own
sockets.  Every socket has a linger of 0 and receive/send timeouts.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from paratrain.config import ConfigError
from paratrain.ps.protocol import Flag, Header, Message, Msg, ProtocolError, Signer, decode, encode, send

log = logging.getLogger("paratrain.ps.client")

RESTARTED = "restarted"  # wait() result for a server that came back as a new process
RESTART_KINDS = ("no session", "round lost", "not initialised")


class PSError(ConfigError):
    """The parameter servers cannot be reached or refuse this worker (one line, exit code 2)."""


def _socket(ctx: zmq.Context, endpoint: str, max_bytes: int) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    for opt, val in ((zmq.LINGER, 0), (zmq.RCVTIMEO, 1000), (zmq.SNDTIMEO, 1000), (zmq.SNDHWM, 1000),
                     (zmq.RCVHWM, 1000), (zmq.MAXMSGSIZE, 2 * max_bytes + (1 << 20)),
                     (zmq.RECONNECT_IVL, 50), (zmq.RECONNECT_IVL_MAX, 1000)):
        s.setsockopt(opt, val)
    s.connect(endpoint)
    return s


class PSClient:
    """Requests to the servers of one job on behalf of worker ``worker``."""

    def __init__(self, endpoints: list[str], secret: bytes, worker: int, *, heartbeat_s: float = 0.5,
                 dead_after_s: float = 5.0, max_bytes: int = 1 << 30, give_up_s: float = 120.0,
                 stats_fn: Callable[[], dict[str, Any]] | None = None):
        self.endpoints = list(endpoints)
        self.worker = worker
        self.signer = Signer(secret)
        self.max_bytes = max_bytes
        self.heartbeat_s = heartbeat_s
        self.probe_after = max(0.25, 2 * heartbeat_s)
        self.give_up_s = max(give_up_s, 4 * dead_after_s)
        self.incarnation = secrets.randbits(31) + 1
        self.ctx = zmq.Context()
        self.socks = [_socket(self.ctx, ep, max_bytes) for ep in endpoints]
        self.poller = zmq.Poller()
        for s in self.socks:
            self.poller.register(s, zmq.POLLIN)
        self.seq = 0
        self.server_inc: list[int | None] = [None] * len(endpoints)
        self.last_alive = [time.monotonic()] * len(endpoints)
        self.restarted: set[int] = set()
        self.stash: dict[tuple[int, int], Message] = {}
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.heartbeat_bytes = 0  # written by the heartbeat thread only
        self._stop = threading.Event()
        self._stats_fn = stats_fn
        self._hb = threading.Thread(target=self._heartbeats, name="ps-heartbeat", daemon=True)
        self._hb.start()

    @property
    def n_servers(self) -> int:
        return len(self.socks)

    # ---- requests ---------------------------------------------------------------------------------
    def send(self, server: int, mtype: Msg, meta: dict | None = None, keys: list | None = None,
             frame_recs: list | None = None, frames: list = (), **fields: Any) -> int:
        """Send one request to ``server``; returns its sequence number (the reply carries it)."""
        self.seq += 1
        h = Header(int(mtype), worker=self.worker, incarnation=self.incarnation, seq=self.seq, **fields)
        parts = encode(self.signer, h, meta=meta, keys=keys, frame_recs=frame_recs, frames=frames)
        try:
            send(self.socks[server], parts)
        except zmq.Again:  # queue full while the server is away: the wait() below will probe
            log.warning("send to server %d timed out (queue full)", server)
        self.bytes_sent += sum(p.nbytes if hasattr(p, "nbytes") else len(p) for p in parts)
        return self.seq

    def wait(self, pending: dict[int, int], timeout: float | None = None) -> dict[int, Message | str]:
        """Replies to ``{server: seq}``; a server found restarted maps to :data:`RESTARTED`.

        Raises :class:`PSError` when a server stays silent for ``give_up_s`` (or ``timeout``)."""
        pending = dict(pending)
        out: dict[int, Message | str] = {}
        start = time.monotonic()
        next_probe = {i: start + self.probe_after for i in pending}
        while pending:
            for i, seq in list(pending.items()):
                if i in self.restarted:
                    out[i] = RESTARTED
                    del pending[i]
                elif (i, seq) in self.stash:
                    msg = self.stash.pop((i, seq))
                    if msg.type == Msg.ERROR:
                        kind, err = msg.meta.get("kind", ""), msg.meta.get("error", "")
                        if kind in RESTART_KINDS:
                            self.restarted.add(i)
                            out[i] = RESTARTED
                        else:
                            raise PSError(f"parameter server {i} refused a request: {err}")
                    else:
                        out[i] = msg
                    del pending[i]
            if not pending:
                break
            now = time.monotonic()
            for i in pending:
                silent = now - max(self.last_alive[i], start)
                if silent > (timeout if timeout is not None else self.give_up_s):
                    raise PSError(f"parameter server {i} at {self.endpoints[i]} has not answered for "
                                  f"{silent:.0f} s; is it running (ps.* settings, firewall)?")
                if now >= next_probe[i]:
                    self._probe(i)
                    next_probe[i] = now + self.probe_after
            wake = max(0.001, min(next_probe[i] for i in pending) - now)
            for sock, _ in self.poller.poll(min(100, int(wake * 1000) + 1)):
                self._drain(self.socks.index(sock))
        return out

    def call(self, server: int, mtype: Msg, **kw: Any) -> Message | str:
        return self.wait({server: self.send(server, mtype, **kw)})[server]

    def _probe(self, i: int) -> None:
        self.send(i, Msg.HELLO, flags=int(Flag.PROBE))

    def _drain(self, i: int) -> None:
        while True:
            try:
                parts = self.socks[i].recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(parts, self.signer, self.max_bytes)
            except ProtocolError as e:
                log.warning("dropped a reply from server %d: %s", i, e)
                continue
            msg.received_at = time.perf_counter()
            self.bytes_recv += msg.header.length
            self.last_alive[i] = time.monotonic()
            inc = msg.header.incarnation
            if self.server_inc[i] is None:
                self.server_inc[i] = inc
            elif inc != self.server_inc[i]:
                if i not in self.restarted:
                    log.warning("parameter server %d restarted (incarnation %d -> %d)", i, self.server_inc[i], inc)
                self.restarted.add(i)
                continue
            if not (msg.header.flags & Flag.PROBE):
                self.stash[(i, msg.header.seq)] = msg
            if len(self.stash) > 10000:  # replies nobody waits for any more
                self.stash.clear()

    def reset_server(self, i: int) -> None:
        """Forget server ``i``'s incarnation (after a restart: the next reply defines it)."""
        self.server_inc[i] = None
        self.restarted.discard(i)
        self.stash = {k: v for k, v in self.stash.items() if k[0] != i}

    # ---- heartbeats ------------------------------------------------------------------------------------
    def _heartbeats(self) -> None:
        socks = [_socket(self.ctx, ep, self.max_bytes) for ep in self.endpoints]
        seq = 0
        try:
            while not self._stop.wait(self.heartbeat_s):
                stats = self._stats_fn() if self._stats_fn else None
                for i, s in enumerate(socks):
                    seq += 1
                    h = Header(int(Msg.HEARTBEAT), worker=self.worker, incarnation=self.incarnation, seq=seq)
                    parts = encode(self.signer, h, meta={"stats": stats} if stats and i == 0 else None)
                    try:
                        s.send_multipart(parts, zmq.NOBLOCK)
                        self.heartbeat_bytes += sum(len(p) for p in parts)
                    except zmq.ZMQError:
                        pass
        finally:
            for s in socks:
                s.close(linger=0)

    def stop_heartbeats(self) -> None:
        self._stop.set()
        self._hb.join(timeout=5)

    def close(self) -> None:
        """Stop heartbeats and close every socket (idempotent)."""
        if self.ctx.closed:
            return
        self.stop_heartbeats()
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()
