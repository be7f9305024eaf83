"""Connection authentication of the parameter server: a transport gate, then a challenge.

Two steps, both keyed with the job's shared secret:

1. **Gate (ZeroMQ ZAP, PLAIN mechanism).**  A worker's DEALER connects with a credential
   ``user = "<worker>.<incarnation>.<random nonce>"``, ``password = HMAC(secret, user)``.
   The server's ZAP handler (:class:`ZapGate`, polled by the server loop) checks it during
   ZeroMQ's own handshake, before the connection may carry a single message: a peer without
   the secret never gets a frame into the server's memory, whatever it sends.  Every message
   of an accepted connection carries the credential's user as its ``User-Id`` property.
2. **Challenge.**  On an accepted connection the worker sends ``AUTH``; the server answers
   with a fresh nonce and proof that it holds the secret too; the worker answers
   ``HMAC(secret, nonce | user)``.  Only then does the server serve requests arriving under
   that ROUTER identity (and User-Id).  So a credential copied off the wire cannot open a
   session: the server's nonce is new for every connection.

Until step 2 is done the server reads nothing but the fixed header of a message (no hashing,
no JSON) and answers ``ERROR "unauthenticated"``; the worker then authenticates and sends
the refused requests again (:class:`ClientAuth`).  :class:`Signer` is the per-message MAC of
``ps.integrity = "mac"``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections import OrderedDict
from typing import Any

import zmq

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"paratrain-ps"
NONCE_SIZE = 32
MAX_PENDING = 1024  # challenges outstanding at once (oldest forgotten first)
MAX_TRUSTED = 65536  # authenticated connections remembered (oldest forgotten first)
CHALLENGE_TTL_S = 60.0


def keyed(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of ``label | len-prefixed parts`` with the job secret."""
    h = hmac.new(secret, label, hashlib.sha256)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


DIGEST_MIN = 65536  # frames this large enter the MAC as their own HMAC (see Signer)
_LEN = struct.Struct("<Q")


class Signer:
    """HMAC-SHA256 with the job's shared secret over a message's frames.

    The MAC covers every frame's length and content; a frame of at least ``DIGEST_MIN`` bytes
    enters through its own HMAC (a two-level MAC), so a server can sign one parameter frame
    once per version for every worker it goes to (``digests``)."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the parameter-server secret must be at least 16 bytes")
        self._key = hmac.new(secret, digestmod=hashlib.sha256)

    def digest(self, part: Any) -> bytes:
        h = self._key.copy()
        h.update(part)
        return h.digest()

    def mac(self, parts: list[Any], digests: dict[int, bytes] | None = None) -> bytes:
        h = self._key.copy()
        for i, p in enumerate(parts):
            n = p.nbytes if hasattr(p, "nbytes") else len(p)
            h.update(_LEN.pack(n))
            if n >= DIGEST_MIN:
                d = digests.get(i) if digests else None
                h.update(d if d is not None else self.digest(p))
            else:
                h.update(p)
        return h.digest()

    def verify(self, parts: list[Any], mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(parts), mac)


def credential(secret: bytes, worker: int, incarnation: int) -> tuple[bytes, bytes]:
    """A fresh (user, password) for one DEALER socket's ZAP/PLAIN handshake."""
    user = f"{worker}.{incarnation}.{secrets.token_hex(8)}".encode()
    return user, keyed(secret, b"zap", user).hex().encode()


def gate_socket(sock: zmq.Socket, secret: bytes, worker: int, incarnation: int) -> bytes:
    """Set a client socket's PLAIN credential (before ``connect``); returns its user."""
    user, password = credential(secret, worker, incarnation)
    sock.setsockopt(zmq.PLAIN_USERNAME, user)
    sock.setsockopt(zmq.PLAIN_PASSWORD, password)
    return user


def parse_user(user: bytes) -> tuple[int, int] | None:
    """(worker, incarnation) of a credential user, or None when it is not one."""
    try:
        w, inc, nonce = user.decode("ascii").split(".")
        if len(nonce) != 16:
            return None
        return int(w), int(inc)
    except (UnicodeDecodeError, ValueError):
        return None


class ZapGate:
    """Server side of step 1: a ZAP handler on the server's context (bind before the ROUTER)."""

    def __init__(self, ctx: zmq.Context, secret: bytes):
        self.secret = secret
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.banned: set[bytes] = set()
        self.refused = 0

    @staticmethod
    def guard(router: zmq.Socket) -> None:
        """Make ``router`` (not yet bound) a PLAIN server whose peers the gate checks."""
        router.setsockopt(zmq.PLAIN_SERVER, 1)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a half-open handshake is dropped after 5 s

    def check(self, frames: list[bytes]) -> tuple[bool, bytes]:
        """(accepted, user) for one ZAP request's frames."""
        if len(frames) != 8 or frames[0] != b"1.0" or frames[2] != ZAP_DOMAIN or frames[5] != b"PLAIN":
            return False, b""
        user, password = frames[6], frames[7]
        if len(user) > 64 or parse_user(user) is None or user in self.banned:
            return False, b""
        want = keyed(self.secret, b"zap", user).hex().encode()
        return hmac.compare_digest(want, password), user

    def handle(self) -> None:
        """Answer every waiting ZAP request (non-blocking)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ok, user = self.check(frames) if len(frames) >= 2 else (False, b"")
            if not ok:
                self.refused += 1
            req_id = frames[1] if len(frames) > 1 else b""
            self.sock.send_multipart([b"1.0", req_id, b"200" if ok else b"400", b"OK" if ok else b"refused",
                                      user if ok else b"", b""])

    def close(self) -> None:
        self.sock.close(linger=0)


class Trust:
    """Server side of step 2: which ROUTER identities have answered a challenge, as which user."""

    def __init__(self, secret: bytes):
        self.secret = secret
        self.pending: OrderedDict[bytes, tuple[bytes, bytes, float]] = OrderedDict()
        self.trusted: OrderedDict[bytes, bytes] = OrderedDict()

    def user_of(self, ident: bytes) -> bytes | None:
        return self.trusted.get(ident)

    def challenge(self, ident: bytes, user: bytes, mac: bool) -> bytes:
        """The challenge frame for a new connection: nonce | integrity mode | the server's proof.

        The proof (that the server holds the secret) covers the mode, so it cannot be altered."""
        mode, now = bytes([int(mac)]), time.monotonic()
        nonce, was_user, at = self.pending.get(ident, (b"", b"", 0.0))
        if was_user != user or now - at > CHALLENGE_TTL_S:  # else: the same nonce to a worker asking again
            nonce = secrets.token_bytes(NONCE_SIZE)
            self.pending[ident] = (nonce, user, now)
        self.pending.move_to_end(ident)
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        return nonce + mode + keyed(self.secret, b"server", nonce, user, mode)

    def answer(self, ident: bytes, user: bytes, proof: bytes) -> bool:
        """Check a worker's answer; on success trust ``ident`` as ``user``."""
        nonce, want_user, at = self.pending.pop(ident, (b"", b"", 0.0))  # each nonce answers once
        if not nonce or user != want_user or time.monotonic() - at > CHALLENGE_TTL_S:
            return False
        if not hmac.compare_digest(proof, keyed(self.secret, b"client", nonce, user)):
            return False
        self.trusted[ident] = user
        while len(self.trusted) > MAX_TRUSTED:
            self.trusted.popitem(last=False)
        return True

    def revoke(self, ident: bytes) -> bytes | None:
        """Forget an identity (a peer that broke the protocol); returns its user."""
        self.pending.pop(ident, None)
        return self.trusted.pop(ident, None)


class ClientAuth:
    """Worker side of step 2 for one socket: handshake state and the requests waiting for it."""

    def __init__(self, secret: bytes, user: bytes):
        self.secret, self.user = secret, user
        self.ok = False
        self.started = 0.0  # when the AUTH request went out (0: not started)
        self.answered = b""  # the challenge last answered (a repeated AUTH brings the same one back)
        self.waiting: dict[int, Any] = {}  # seq -> request to send once authenticated

    def proof(self, challenge: bytes) -> tuple[bytes, bool] | None:
        """(our answer, the server's integrity mode is "mac") for a challenge frame, or None
        when the server's own proof is wrong."""
        nonce, mode, server_proof = challenge[:NONCE_SIZE], challenge[NONCE_SIZE:NONCE_SIZE + 1], \
            challenge[NONCE_SIZE + 1:]
        if len(nonce) != NONCE_SIZE or mode not in (b"\0", b"\1") or not hmac.compare_digest(
                server_proof, keyed(self.secret, b"server", nonce, self.user, mode)):
            return None
        return keyed(self.secret, b"client", nonce, self.user), mode == b"\1"


REFUSED = b"refused"  # the frame of an AUTH reply that refuses a challenge answer
