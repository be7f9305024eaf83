"""The worker's transport: one DEALER socket per server, requests matched to replies, liveness.

:class:`PSClient` sends requests (at most one push in flight per server -- the caller's
discipline), waits for their replies on all servers at once, and tells a restarted server
apart from a slow one: when a reply is overdue it sends a PROBE (a HELLO the server answers
immediately, even while it holds the real reply back for a barrier); a reply from a new
server incarnation, or a "no session" error, marks the server as restarted so the caller can
recover (see :mod:`paratrain.ps.worker`).  A background thread sends heartbeats on its own
sockets.  Every socket has a linger of 0 and receive/send timeouts.

Every socket authenticates its connection (:mod:`paratrain.ps.auth`): a ZAP credential when
it connects, then the server's challenge.  Requests made before that, or refused by a server
that does not know the connection (it restarted), wait and go out once it is authenticated.
The server's answer to the challenge also says whether messages carry a MAC
(``ps.integrity``); the client follows it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from paratrain.config import ConfigError
from paratrain.ps.auth import REFUSED, ClientAuth, gate_socket
from paratrain.ps.protocol import (
    Flag,
    Header,
    Message,
    Msg,
    ProtocolError,
    Signer,
    decode,
    encode,
    read_header,
    send,
)

log = logging.getLogger("paratrain.ps.client")

RESTARTED = "restarted"  # wait() result for a server that came back as a new process
RESTART_KINDS = ("no session", "round lost", "not initialised")
AUTH_RETRY_S = 2.0  # AUTH again when no challenge came back within this
MAX_OUTSTANDING = 256  # requests kept per server for a resend after re-authentication
HANDSHAKE = (int(Msg.AUTH), int(Msg.REPLY))  # types of the handshake's messages (REPLY: "accepted")
POLLIN = int(zmq.POLLIN)


class PSError(ConfigError):
    """The parameter servers cannot be reached or refuse this worker (one line, exit code 2)."""


def _socket(ctx: zmq.Context, endpoint: str, max_bytes: int, secret: bytes, worker: int,
            incarnation: int) -> tuple[zmq.Socket, ClientAuth]:
    s = ctx.socket(zmq.DEALER)
    for opt, val in ((zmq.LINGER, 0), (zmq.RCVTIMEO, 1000), (zmq.SNDTIMEO, 1000), (zmq.SNDHWM, 1000),
                     (zmq.RCVHWM, 1000), (zmq.MAXMSGSIZE, max_bytes + 4096),
                     (zmq.RECONNECT_IVL, 50), (zmq.RECONNECT_IVL_MAX, 1000)):
        s.setsockopt(opt, val)
    user = gate_socket(s, secret, worker, incarnation)
    s.connect(endpoint)
    return s, ClientAuth(secret, user)


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
        self.secret = secret
        self.mac: bool | None = None  # the servers' ps.integrity is "mac" (learnt in the handshake)
        self.ctx = zmq.Context()
        socks = [_socket(self.ctx, ep, max_bytes, secret, worker, self.incarnation) for ep in endpoints]
        self.socks = [s for s, _ in socks]
        self.auth = [a for _, a in socks]
        self.outstanding: list[dict[int, tuple[Header, dict]]] = [{} for _ in endpoints]
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
             frame_recs: list | None = None, frames: list = (), desc: bytes | None = None, **fields: Any) -> int:
        """Send one request to ``server``; returns its sequence number (the reply carries it).
        ``desc``: the packed ``keys`` / ``frame_recs`` table, when the caller keeps it."""
        self.seq += 1
        h = Header(int(mtype), worker=self.worker, incarnation=self.incarnation, seq=self.seq, **fields)
        body = {"meta": meta, "keys": keys, "frame_recs": frame_recs, "frames": frames, "desc": desc}
        if self.auth[server].ok:
            self._transmit(server, h, body)
        else:  # goes out once the connection is authenticated
            self.auth[server].waiting[self.seq] = (h, body)
            self._start_auth(self.socks[server], self.auth[server])
        return self.seq

    def _transmit(self, i: int, h: Header, body: dict) -> None:
        parts = encode(self.signer if self.mac else None, h, **body)
        try:
            send(self.socks[i], parts)
        except zmq.Again:  # queue full while the server is away: the wait() below will probe
            log.warning("send to server %d timed out (queue full)", i)
        self.bytes_sent += len(parts[0]) + h.length
        out = self.outstanding[i]
        out[h.seq] = (h, body)
        if len(out) > MAX_OUTSTANDING:
            del out[next(iter(out))]

    def _start_auth(self, sock: zmq.Socket, auth: ClientAuth, force: bool = False) -> None:
        """Send AUTH (asking for a challenge) unless one went out within ``AUTH_RETRY_S``."""
        now = time.monotonic()
        if not force and auth.started and now - auth.started < AUTH_RETRY_S:
            return
        auth.ok, auth.started, auth.answered = False, now, b""
        h = Header(int(Msg.AUTH), worker=self.worker, incarnation=self.incarnation)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(encode(None, h), zmq.NOBLOCK)

    def _auth_step(self, sock: zmq.Socket, auth: ClientAuth, parts: list[Any], h: Header | None = None) -> bool:
        """Handle a handshake message on ``sock`` (``h``: its header, when read); False when
        ``parts`` is something else."""
        if h is None:
            try:
                h = read_header(parts[0].buffer)
            except ProtocolError:
                return False
        if h.type == Msg.AUTH and len(parts) == 2:  # a challenge (or the refusal of an answer)
            if auth.ok:  # already authenticated: a late reply to a repeated AUTH
                return True
            challenge = parts[1].bytes
            if challenge == REFUSED:  # an answer to a challenge the server no longer holds
                log.warning("a parameter server refused our answer to its challenge; trying again")
                auth.started, auth.answered = 0.0, b""
                return True
            if challenge == auth.answered:
                return True
            answer = auth.proof(challenge)
            if answer is None:
                log.warning("a parameter server failed to prove it holds the job secret; not answering")
                return True
            proof, self.mac = answer
            auth.answered = challenge
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(encode(None, Header(int(Msg.AUTH), worker=self.worker, flags=int(Flag.PROOF),
                                                        incarnation=self.incarnation), frames=[proof]), zmq.NOBLOCK)
            return True
        if h.type == Msg.REPLY and h.flags & Flag.PROOF and h.seq == 0:  # accepted
            auth.ok = True
            return True
        return False

    def wait(self, pending: dict[int, int], timeout: float | None = None,
             each: Callable[[int, Message], None] | None = None) -> dict[int, Message | str]:
        """Replies to ``{server: seq}``; a server found restarted maps to :data:`RESTARTED`.
        ``each(server, reply)`` is called on each reply as it is taken.

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
                        if each is not None:
                            each(i, msg)
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
        sock, auth = self.socks[i], self.auth[i]
        while sock.get(zmq.EVENTS) & POLLIN:  # (cheaper than recv until zmq.Again)
            parts = sock.recv_multipart(copy=False)
            try:
                h = read_header(parts[0].buffer)
            except ProtocolError as e:
                log.warning("dropped a reply from server %d: %s", i, e)
                continue
            if h.type in HANDSHAKE and self._auth_step(sock, auth, parts, h):
                if auth.ok and auth.waiting:  # send what waited for the handshake, in order
                    waiting, auth.waiting = auth.waiting, {}
                    for seq in sorted(waiting):
                        self._transmit(i, *waiting[seq])
                continue
            try:
                msg = decode(parts, self.signer, self.max_bytes, require_mac=bool(self.mac), header=h)
            except ProtocolError as e:
                log.warning("dropped a reply from server %d: %s", i, e)
                continue
            req = self.outstanding[i].pop(msg.header.seq, None)
            if msg.type == Msg.ERROR and msg.meta.get("kind") == "unauthenticated":
                if req is not None:  # the server does not know this connection (restarted): again, later
                    auth.waiting[msg.header.seq] = req
                self._start_auth(sock, auth, force=auth.ok)
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
        self.outstanding[i].clear()

    # ---- heartbeats ------------------------------------------------------------------------------------
    def _heartbeats(self) -> None:
        socks = [_socket(self.ctx, ep, self.max_bytes, self.secret, self.worker, self.incarnation)
                 for ep in self.endpoints]
        seq = 0
        try:
            for s, a in socks:
                self._start_auth(s, a)
            while not self._stop.wait(self.heartbeat_s):
                stats = self._stats_fn() if self._stats_fn else None
                for i, (s, a) in enumerate(socks):
                    self._heartbeat_replies(s, a)
                    if not a.ok:
                        self._start_auth(s, a)
                        continue
                    seq += 1
                    h = Header(int(Msg.HEARTBEAT), worker=self.worker, incarnation=self.incarnation, seq=seq)
                    parts = encode(self.signer if self.mac else None, h,
                                   meta={"stats": stats} if stats and i == 0 else None)
                    try:
                        s.send_multipart(parts, zmq.NOBLOCK)
                        self.heartbeat_bytes += sum(len(p) for p in parts)
                    except zmq.ZMQError:
                        pass
        finally:
            for s, _ in socks:
                s.close(linger=0)

    def _heartbeat_replies(self, sock: zmq.Socket, auth: ClientAuth) -> None:
        """Handshake steps on a heartbeat socket; any other message there means "authenticate again"."""
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                return
            if not self._auth_step(sock, auth, parts):
                auth.ok = False  # heartbeats get no replies: this is the server refusing the connection

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


def connect_authenticated(ctx: zmq.Context, endpoint: str, secret: bytes, worker: int, incarnation: int,
                          timeout_s: float = 10.0) -> tuple[zmq.Socket, bool]:
    """A DEALER connected to a server and through both steps (for tools and tests that speak
    the protocol by hand); returns it and whether the server wants MACs.  Raises TimeoutError."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    auth = ClientAuth(secret, gate_socket(sock, secret, worker, incarnation))
    sock.connect(endpoint)
    sock.send_multipart(encode(None, Header(int(Msg.AUTH), worker=worker, incarnation=incarnation)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        parts = sock.recv_multipart()
        h = read_header(parts[0])
        if h.type == Msg.AUTH and len(parts) == 2 and (answer := auth.proof(parts[1])) is not None:
            proof, mac = answer
            sock.send_multipart(encode(None, Header(int(Msg.AUTH), worker=worker, incarnation=incarnation,
                                                    flags=int(Flag.PROOF)), frames=[proof]))
        elif h.type == Msg.REPLY and h.flags & Flag.PROOF:
            return sock, mac
    sock.close(linger=0)
    raise TimeoutError(f"no authenticated connection to {endpoint} within {timeout_s} s")
