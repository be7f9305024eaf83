"""Wire format of the parameter server: one fixed binary header, raw tensor frames, an optional MAC.

A message is a ZeroMQ multipart message::

    header (HEADER.size bytes) | [meta: JSON] | [desc: key/frame table] | tensor frames ... | [mac (32 bytes)]

* ``header`` -- magic, protocol version, message type, worker id, the sender's incarnation
  (a random id per process), a sequence number, clock, version, key range, dtype, codec,
  flags, frame count, payload length and three message-specific floats (lr, weights, ...).
* ``meta`` -- a small JSON object for control messages (HELLO, STATS, ...), never for tensors.
* ``desc`` -- for pushes: one record per key (key id, codec, frame count, codec parameters)
  and one record per tensor frame (dtype, shape), so every frame's length is checked.
* tensor frames are sent zero-copy from the tensors' memory and read zero-copy on receipt.
* ``mac`` (flag ``MAC``; every message when ``ps.integrity = "mac"``) -- HMAC-SHA256 with the
  job's shared secret over every preceding frame (its length and content; large frames
  through their own HMAC, see :class:`Signer`).  Without it a message is trusted because its
  connection was authenticated (:mod:`paratrain.ps.auth`).

:func:`decode` checks, in order: frame count and header size, magic/version, sizes against
the limit, the MAC, the message type, frame count and total length, then meta and desc.
Anything wrong raises :class:`ProtocolError`; receivers log it and go on serving.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from paratrain.ps.auth import DIGEST_MIN, Signer  # noqa: F401 - part of the wire format's API

MAGIC = b"PT"
PROTOCOL_VERSION = 3  # 2: 16-byte key and 12-byte frame records; 3: PARAMS replies are one frame
MAC_SIZE = 32
CONTROL_ID = 0xFFFFFFFF  # worker id of the launcher's control client
MAX_META_BYTES = 1 << 20
MAX_META_DEPTH = 8
DESC_CACHE_SIZE = 256  # parsed key/frame tables kept (a few per worker)


class Msg(enum.IntEnum):
    """Message types (requests from workers, replies from servers)."""

    HELLO = 1  # open / probe a session; reply: server state for this worker
    INIT = 2  # first values of the server's keys (ignored once initialised)
    PUSH = 3  # gradients for the server's keys; reply: PARAMS (or PHASE1 in two-phase sync)
    PULL = 4  # reply: PARAMS
    APPLY = 5  # sync two-phase: the clip coefficient of a round; reply: PARAMS
    HEARTBEAT = 6  # no reply
    LEAVE = 7  # the worker is done
    CHECKPOINT = 8  # write shards + optimizer state into meta["path"]
    STATS = 9  # reply: counters, RSS, per-worker stats
    COLLECT = 10  # small collective (sum / gather / barrier) over live workers
    SHUTDOWN = 11
    AUTH = 12  # connection handshake (see paratrain.ps.auth); never carries a MAC
    REPLY = 32  # generic acknowledgement (meta may carry data)
    PARAMS = 33  # one frame: the server's parameter groups (decay, no decay) back to back
    ERROR = 34  # meta["error"]: what was wrong


class Flag:
    """Header flag bits (plain ints: this is on every message's path, and IntFlag arithmetic is slow)."""

    META = 1  # a JSON frame follows the header
    DESC = 2  # a key/frame table follows (after meta)
    PHASE1 = 4  # sync two-phase: reply carries the round's squared gradient norm, no params
    HAS_COEF = 8  # push carries the round's clip coefficient (replay of a finished round)
    PROBE = 16  # HELLO that only asks "are you there, which incarnation"
    DUPLICATE = 32  # push already applied before (replayed); reply carries current params
    PACKED = 64  # the first tensor frame packs the values of every KEY_PACKED key (fp32, in record order)
    MAC = 128  # the last frame is the message's MAC
    PROOF = 256  # AUTH: the frame answers the server's challenge


# magic, version, type, worker, incarnation, seq, clock, version, key_start, key_count,
# dtype, codec, flags, nframes, length, f0, f1, f2
HEADER = struct.Struct("<2sBBIIIqqIIBBHIQddd")
# 16 and 12 bytes: with compressed pushes the table is a few percent of the message
KEYREC = struct.Struct("<IBBBxii")  # key id, codec, tensors, flags, info0, info1
FRAMEREC = struct.Struct("<BBxxII")  # dtype, ndim, d0, d1
DESC_HEAD = struct.Struct("<II")  # number of key records, number of frame records
KEY_SPARSE = 1  # key record flag: frames are [row indices (int64), rows]
KEY_PACKED = 2  # key record flag: no frame of its own; its values are the next ones in the pack frame

DTYPES: list[torch.dtype] = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32,
                             torch.int64, torch.uint8, torch.float64]
DTYPE_IDS = {d: i for i, d in enumerate(DTYPES)}
DTYPE_SIZES = [torch.empty((), dtype=d).element_size() for d in DTYPES]


class ProtocolError(ValueError):
    """A message that is malformed, unauthenticated, oversized or of an unknown type."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.header: Header | None = None  # set when the message was authenticated (the sender gets an ERROR)


@dataclass
class Header:
    type: int
    worker: int = 0
    incarnation: int = 0
    seq: int = 0
    clock: int = 0
    version: int = 0
    key_start: int = 0
    key_count: int = 0
    dtype: int = 0
    codec: int = 0
    flags: int = 0
    nframes: int = 0
    length: int = 0
    f0: float = 0.0
    f1: float = 0.0
    f2: float = 0.0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, self.type, self.worker, self.incarnation, self.seq,
                           self.clock, self.version, self.key_start, self.key_count, self.dtype, self.codec,
                           self.flags, self.nframes, self.length, self.f0, self.f1, self.f2)


@dataclass
class KeyRecord:
    key: int
    codec: int
    ntensors: int
    flags: int = 0
    info0: int = 0
    info1: int = 0


@dataclass
class FrameRecord:
    dtype: int
    shape: tuple[int, ...]


@dataclass
class Message:
    """A decoded, authenticated message; ``frames`` are zero-copy views of the data frames."""

    header: Header
    meta: dict[str, Any] = field(default_factory=dict)
    keys: list[KeyRecord] = field(default_factory=list)
    frame_recs: list[FrameRecord] = field(default_factory=list)
    frames: list[memoryview] = field(default_factory=list)
    received_at: float = 0.0  # time.perf_counter() when the receiver read it
    desc: bytes = b""  # the raw key/frame table (pushes with the same one share a plan)

    @property
    def type(self) -> int:
        return self.header.type


# ---- tensors <-> frames -------------------------------------------------------------------
def tensor_frame(t: torch.Tensor) -> np.ndarray:
    """A zero-copy view of a CPU tensor's bytes (made contiguous first if it is not)."""
    if t.dtype is torch.float32 and t.is_cpu and not t.requires_grad and t.is_contiguous():
        return t.view(-1).numpy()  # (the common case, in two calls; 1-D: frames are flat everywhere)
    t = t.detach().cpu().contiguous()  # (each returns the tensor itself where it has nothing to do)
    return t.reshape(-1).view(torch.uint8).numpy()


def frame_tensor(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over a received frame (a byte memoryview of ``prod(shape)`` elements, as
    ``decode`` checked): zero-copy when the frame is aligned, else one copy."""
    if not len(buf):
        return torch.empty(shape, dtype=dtype)
    if buf.readonly or len(buf) < COPY_THRESHOLD:
        # torch views only writable memory; and small frames often sit unaligned in ZeroMQ's read
        # buffer: a bytearray copy is aligned and cheaper than checking and cloning (a torch op each)
        t = torch.frombuffer(bytearray(buf), dtype=dtype)
    else:
        t = torch.frombuffer(buf, dtype=dtype)
        if t.data_ptr() % t.element_size():
            t = t.clone()
    return t if len(shape) == 1 else t.view(shape)


def nbytes_of(part: Any) -> int:
    """Bytes of a frame to send: bytes, or an array / memoryview (``nbytes``)."""
    return len(part) if isinstance(part, (bytes, bytearray)) else part.nbytes


# ---- encode / decode ---------------------------------------------------------------------------
def pack_desc(keys: list[KeyRecord], frame_recs: list[FrameRecord]) -> bytes:
    """The desc frame: a key record per key, a frame record per tensor frame."""
    desc = [DESC_HEAD.pack(len(keys), len(frame_recs))]
    desc += [KEYREC.pack(k.key, k.codec, k.ntensors, k.flags, k.info0, k.info1) for k in keys]
    desc += [FRAMEREC.pack(r.dtype, len(r.shape), *(list(r.shape) + [0, 0])[:2]) for r in frame_recs]
    return b"".join(desc)


def encode(signer: Signer | None, header: Header, meta: dict[str, Any] | None = None,
           keys: list[KeyRecord] | None = None, frame_recs: list[FrameRecord] | None = None,
           frames: list[Any] = (), digests: dict[int, bytes] | None = None, desc: bytes | None = None) -> list[Any]:
    """The multipart message for ``header`` + optional meta + optional desc + tensor frames.

    ``desc``: ``pack_desc(keys, frame_recs)`` when the caller has it already.  With a
    ``signer`` a MAC frame ends the message (``ps.integrity = "mac"``); ``digests`` maps
    indices into ``frames`` to their precomputed ``Signer.digest``."""
    body: list[Any] = []
    flags = header.flags & ~(Flag.META | Flag.DESC | Flag.MAC)
    if meta is not None:
        body.append(json.dumps(meta, separators=(",", ":")).encode())
        flags |= Flag.META
    if keys is not None:
        body.append(desc if desc is not None else pack_desc(keys, frame_recs or []))
        flags |= Flag.DESC
    body += list(frames)
    if signer is not None:
        flags |= Flag.MAC
    header.flags = int(flags)
    header.nframes = len(body)
    header.length = sum(nbytes_of(p) for p in body)
    head = header.pack()
    if signer is None:
        return [head, *body]
    if digests:
        first = 1 + len(body) - len(frames)  # part index of frames[0]
        digests = {first + i: d for i, d in digests.items()}
    return [head, *body, signer.mac([head, *body], digests)]


def read_header(buf: Any) -> Header:
    """The fixed header of a message (first frame), checked for size, magic and version only."""
    if len(buf) != HEADER.size:
        raise ProtocolError("malformed", f"header of {len(buf)} bytes")
    fields = HEADER.unpack(buf)
    if fields[0] != MAGIC or fields[1] != PROTOCOL_VERSION:
        raise ProtocolError("malformed", f"bad magic/version {fields[0]!r}/{fields[1]}")
    return Header(*fields[2:])


def decode(parts: list[Any], signer: Signer | None, max_bytes: int, require_mac: bool = True,
           header: Header | None = None) -> Message:
    """Check and parse one received multipart message (frames as zmq.Frame or bytes).

    A message with the ``MAC`` flag is verified with ``signer``; one without is accepted only
    when not ``require_mac`` (``ps.integrity = "none"``: its connection was authenticated).
    ``header``: ``read_header`` of the first part, when the caller has it already."""
    bufs = [p.buffer if hasattr(p, "buffer") else memoryview(p) for p in parts]
    if not bufs:
        raise ProtocolError("malformed", "empty message")
    h = header if header is not None else read_header(bufs[0])
    signed = bool(h.flags & Flag.MAC)
    body = bufs[1:-1] if signed else bufs[1:]
    if signed and (len(bufs) < 2 or len(bufs[-1]) != MAC_SIZE):
        raise ProtocolError("malformed", f"{len(bufs)} frame(s) and no {MAC_SIZE}-byte MAC")
    sizes = [len(b) for b in body]
    total = sum(sizes)
    if total > max_bytes:
        raise ProtocolError("oversized", f"{total} bytes in {len(sizes)} frame(s), limit {max_bytes}")
    if signed and (signer is None or not signer.verify(bufs[:-1], bytes(bufs[-1]))):
        raise ProtocolError("bad MAC", "message not signed with this job's secret")
    if not signed and require_mac:
        raise ProtocolError("bad MAC", "message without a MAC (ps.integrity = 'mac')")
    try:
        return _parse(h, sizes, total, body)
    except ProtocolError as e:
        e.header = h
        raise
    except (RecursionError, MemoryError, OverflowError, struct.error, TypeError, ValueError) as e:
        err = ProtocolError("malformed", f"{type(e).__name__} while parsing")
        err.header = h
        raise err from None


def _parse(h: Header, sizes: list[int], total: int, body: list[memoryview]) -> Message:
    if h.type not in Msg._value2member_map_:
        raise ProtocolError("unknown type", f"message type {h.type}")
    if h.nframes != len(sizes) or h.length != total:
        raise ProtocolError("wrong length", f"header says {h.nframes} frames / {h.length} bytes, "
                                            f"got {len(sizes)} / {total}")
    msg = Message(h)
    if h.flags & Flag.META:
        if not body or len(body[0]) > MAX_META_BYTES:
            raise ProtocolError("malformed", "missing or oversized meta frame")
        try:
            meta = json.loads(bytes(body[0]))
        except (ValueError, RecursionError):  # e.g. 100,000 nested brackets
            raise ProtocolError("malformed", "meta frame is not JSON (or nested too deeply)") from None
        if not isinstance(meta, dict) or _depth(meta) > MAX_META_DEPTH:
            raise ProtocolError("malformed", f"meta frame is not a JSON object of depth <= {MAX_META_DEPTH}")
        msg.meta, body = meta, body[1:]
    if h.flags & Flag.DESC:
        if not body:
            raise ProtocolError("malformed", "missing desc frame")
        msg.desc = bytes(body[0])
        msg.keys, msg.frame_recs = _parsed_desc(msg.desc)
        body = body[1:]
        _check_frames(msg.keys, msg.frame_recs, body, bool(h.flags & Flag.PACKED))
    msg.frames = body
    return msg


def _depth(obj: Any) -> int:
    """Nesting depth of a decoded JSON value (iterative: safe on any input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_META_DEPTH:
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


_DESC_CACHE: dict[bytes, tuple[list[KeyRecord], list[FrameRecord]]] = {}


def _parsed_desc(desc: bytes) -> tuple[list[KeyRecord], list[FrameRecord]]:
    """``_parse_desc``, remembered: a worker's pushes repeat the same table step after step
    (callers only read the records)."""
    hit = _DESC_CACHE.get(desc)
    if hit is None:
        hit = _parse_desc(memoryview(desc))
        if len(_DESC_CACHE) >= DESC_CACHE_SIZE:
            _DESC_CACHE.clear()
        if len(desc) <= COPY_THRESHOLD:  # (bounds the cache's memory: ~4000 keys per table)
            _DESC_CACHE[desc] = hit
    return hit


def _parse_desc(buf: memoryview) -> tuple[list[KeyRecord], list[FrameRecord]]:
    if len(buf) < DESC_HEAD.size:
        raise ProtocolError("malformed", "desc frame too short")
    nk, nf = DESC_HEAD.unpack_from(buf, 0)
    if len(buf) != DESC_HEAD.size + nk * KEYREC.size + nf * FRAMEREC.size:
        raise ProtocolError("wrong length", f"desc frame of {len(buf)} bytes for {nk} keys / {nf} frames")
    off = DESC_HEAD.size
    keys = [KeyRecord(*KEYREC.unpack_from(buf, off + i * KEYREC.size)) for i in range(nk)]
    off += nk * KEYREC.size
    recs = []
    for i in range(nf):
        dt, ndim, d0, d1 = FRAMEREC.unpack_from(buf, off + i * FRAMEREC.size)
        if dt >= len(DTYPES) or ndim not in (1, 2) or d0 < 0 or d1 < 0:
            raise ProtocolError("malformed", f"frame record {i}: dtype {dt}, ndim {ndim}, dims {d0}x{d1}")
        recs.append(FrameRecord(dt, (d0,) if ndim == 1 else (d0, d1)))
    return keys, recs


def _check_frames(keys: list[KeyRecord], recs: list[FrameRecord], frames: list[memoryview], packed: bool) -> None:
    want = sum(k.ntensors for k in keys) + int(packed)
    if want != len(recs) or len(recs) != len(frames):
        raise ProtocolError("wrong length", f"{len(keys)} keys describe {want} tensors, {len(recs)} records, "
                                            f"{len(frames)} frames")
    if packed and (recs[0].dtype != DTYPE_IDS[torch.float32] or len(recs[0].shape) != 1):
        raise ProtocolError("malformed", "the pack frame must be a 1-D float32 tensor")
    for i, (r, f) in enumerate(zip(recs, frames, strict=False)):
        n = 1
        for s in r.shape:
            n *= s
        want = n * DTYPE_SIZES[r.dtype]
        if len(f) != want:
            raise ProtocolError("wrong length", f"frame {i}: {len(f)} bytes, its record says {want}")


def frame_tensors(msg: Message) -> list[torch.Tensor]:
    """The desc-described frames of ``msg`` as tensors (zero-copy where aligned)."""
    return [frame_tensor(f, DTYPES[r.dtype], r.shape) for r, f in zip(msg.frame_recs, msg.frames, strict=False)]


def frame_record(t: torch.Tensor) -> FrameRecord:
    """The desc record of a tensor sent as one frame (1-D or 2-D)."""
    if t.dtype not in DTYPE_IDS:
        raise ValueError(f"dtype {t.dtype} cannot go on the wire")
    shape = tuple(t.shape) if t.dim() in (1, 2) else (t.numel(),)
    return FrameRecord(DTYPE_IDS[t.dtype], shape)


COPY_THRESHOLD = 65536  # smaller frames are copied by ZeroMQ anyway
SNDMORE = 2  # zmq.SNDMORE as a plain int (flag enums cost a microsecond per operation)


def send(sock: Any, parts: list[Any], flags: int = 0, track: bool = False) -> list[Any]:
    """Send a multipart message, large frames zero-copy; returns trackers of the tracked frames."""
    trackers = []
    last = len(parts) - 1
    flags = int(flags)
    for i, p in enumerate(parts):
        f = flags | SNDMORE if i < last else flags
        if nbytes_of(p) >= COPY_THRESHOLD:
            t = sock.send(p, f, copy=False, track=track)
            if track:
                trackers.append(t)
        else:
            sock.send(p, f, copy=True)
    return trackers
