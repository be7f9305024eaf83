"""How a server takes messages off its ROUTER socket: authenticate, bound, decode (a mixin).

A message is read frame by frame.  The connection it came on passed the ZAP gate (its
``User-Id`` names a worker process, see :mod:`paratrain.ps.auth`); until that connection has
answered a challenge, only the fixed header is read -- an ``AUTH`` handshake step is served,
anything else is drained unread and answered ``ERROR "unauthenticated"``.  From a trusted
connection the header's declared frame count and length must fit ``ps.max_message_mb`` before
further frames are taken, and the frames must add up to what it declared: a peer that lies
is disconnected from the trust table and its credential banned.  Every error of any message
is logged (rate-limited), counted and, where the sender is trusted, answered; nothing a peer
sends makes the server exit.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from paratrain.ps.auth import REFUSED, parse_user
from paratrain.ps.protocol import MAC_SIZE, Flag, Header, Message, Msg, ProtocolError, decode, read_header

MAX_FRAMES = 1 << 16  # tensor frames per message (the largest model has a few thousand keys)
AUTH_FRAME_MAX = 64  # the only frame an unauthenticated connection may send (a 32-byte proof)
MAX_CLAIMS = 4096  # parsed credentials kept (users that passed the ZAP gate)


class Intake:
    """Receiving side of :class:`~paratrain.ps.server.ParameterServer` (expects its attributes)."""

    sock: Any
    log: Any
    _claims: dict[bytes, tuple[int, int]]

    def _drain(self) -> int:
        """Discard the rest of a multipart message; returns the frames dropped."""
        n = 0
        while self.sock.getsockopt(zmq.RCVMORE):
            self.sock.recv(copy=False)
            n += 1
        return n

    def _take(self) -> None:
        """Read and handle one message (raises zmq.Again when none is waiting)."""
        ident_frame = self.sock.recv(zmq.NOBLOCK, copy=False)
        ident = ident_frame.bytes
        if not ident_frame.more:
            return self._reject("malformed", "empty message", None)
        head = self.sock.recv(copy=False)
        try:
            user = head.get("User-Id").encode()
        except (zmq.ZMQError, AttributeError):  # a connection that did not pass the ZAP gate
            user = b""
        try:
            h = read_header(head.buffer)
        except ProtocolError as e:
            self._drain()
            return self._reject(e.kind, str(e), None)
        claimed = self._claims.get(user) or self._claim(user)
        if claimed is None or claimed != (h.worker, h.incarnation):
            self._drain()
            return self._reject("malformed", f"worker {h.worker} on a connection of {user!r}", None)
        if h.type == Msg.AUTH or self.trust.user_of(ident) != user:  # AUTH: a (repeated) handshake
            return self._untrusted(ident, user, h)
        limit = self.max_bytes
        if h.nframes > MAX_FRAMES or h.length > limit:
            self._drain()
            return self._liar(ident, h, f"declares {h.nframes} frames / {h.length} bytes (limit {limit})")
        parts, total, f = [head], 0, head
        signed = bool(h.flags & Flag.MAC)
        want = h.nframes + int(signed)
        while f.more:  # (a frame's ``more`` is its RCVMORE, without a getsockopt call)
            if len(parts) - 1 >= want:
                self._drain()
                return self._liar(ident, h, f"sent more than the {h.nframes} frames it declared")
            f = self.sock.recv(copy=False)
            total += len(f)
            if total > h.length + MAC_SIZE * signed:
                self._drain()
                return self._liar(ident, h, f"sent more than the {h.length} bytes it declared")
            parts.append(f)
        self._on_parts(ident, parts, h)

    def _claim(self, user: bytes) -> tuple[int, int] | None:
        """``parse_user`` of a credential, remembered (the same few users send every message)."""
        claimed = parse_user(user)
        if claimed is not None and len(self._claims) < MAX_CLAIMS:
            self._claims[user] = claimed
        return claimed

    def _untrusted(self, ident: bytes, user: bytes, h: Header) -> None:
        """A connection that has not answered a challenge: serve AUTH steps, refuse the rest unread."""
        if h.type != Msg.AUTH or h.nframes > 1 or h.length > AUTH_FRAME_MAX or user in self.gate.banned:
            self._drain()
            self.counters["unauthenticated"] += 1
            return self._reply(ident, h, Msg.ERROR, meta={"error": "connection not authenticated",
                                                          "kind": "unauthenticated"})
        frame = self.sock.recv(copy=False).bytes if self.sock.getsockopt(zmq.RCVMORE) else b""
        if self._drain():
            return self._reject("malformed", "AUTH with extra frames", None)
        if not h.flags & Flag.PROOF:
            return self._reply(ident, h, Msg.AUTH, frames=[self.trust.challenge(ident, user, self.integrity == "mac")],
                               sign=False)
        if self.trust.answer(ident, user, frame):
            return self._reply(ident, h, Msg.REPLY, flags=int(Flag.PROOF), sign=False)
        self._reject("bad proof", f"wrong challenge answer from {user.decode(errors='replace')}", None)
        self._reply(ident, h, Msg.AUTH, frames=[REFUSED], sign=False)

    def _liar(self, ident: bytes, h: Header, what: str) -> None:
        """A trusted peer broke the size rules: forget its connection and ban its credential."""
        user = self.trust.revoke(ident)
        if user is not None:
            self.gate.banned.add(user)
        self._reject("oversized", f"worker {h.worker} {what}; its connection is dropped", None)

    def _on_parts(self, ident: bytes, parts: list[Any], header: Header | None = None) -> None:
        try:
            msg = decode(parts, self.signer, self.max_bytes, require_mac=self.integrity == "mac", header=header)
        except ProtocolError as e:  # authenticated senders get an ERROR back, others nothing
            return self._reject(e.kind, str(e), (ident, Message(e.header)) if e.header else None)
        self.counters["bytes_in"] += msg.header.length
        try:
            self._dispatch(ident, msg)
        except ProtocolError as e:
            self._reject(e.kind, str(e), (ident, msg))
        except Exception as e:  # a message we could not process: keep serving
            if self.rejected["internal"] < 5:  # the first tracebacks only (a peer could flood the log)
                self.log.exception("error handling %s from worker %d", Msg(msg.type).name, msg.header.worker)
            self._reject("internal", f"{type(e).__name__}: {e}", (ident, msg))

    def _reject(self, kind: str, detail: str, reply_to: tuple[bytes, Message] | None) -> None:
        """Count + log (at most 20 lines per 10 s) a rejected message; answer authenticated senders."""
        self.rejected[kind] += 1
        start, n = self._log_window
        now = time.monotonic()
        if now - start > 10.0:
            if n > 20:
                self.log.warning("... %d more rejected messages not logged", n - 20)
            start, n = now, 0
        if n < 20:
            who = f" from worker {reply_to[1].header.worker}" if reply_to else ""
            self.log.warning("rejected message%s: %s", who, detail[:300])
        self._log_window = (start, n + 1)
        if reply_to is not None:
            self._reply(reply_to[0], reply_to[1].header, Msg.ERROR, meta={"error": detail[:300], "kind": kind})

