"""Gradient codecs: pure functions over tensors plus an explicit per-tensor state.

A codec turns a tensor into a :class:`Payload` (a few tensors + the meta needed to decode
them) and back.  The all-reduce hooks (``compression.hooks``) and the parameter server
share these codecs:

    codec = make_codec(cfg.compression)            # or get_codec("topk", ratio=0.01)
    state = codec.new_state(error_feedback=True)   # one per tensor, kept by the sender
    payload = codec.encode(grad, state)            # residual of the last step added first
    payload.tensors, payload.meta(), payload.nbytes  # frames, JSON-able meta, exact bytes
    grad_hat = decode(Payload.from_meta(meta, tensors))  # receiver: no codec object needed

Error feedback: with ``state.error_feedback`` the encoder compresses ``x = grad + residual``
and keeps ``residual = x - decode(payload)``, so over any number of steps
``sum(decoded) + residual == sum(inputs)`` (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

CODECS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
POWERSGD_VECTORS = ("fp32", "int8")  # how PowerSGD sends the tensors it cannot factor


@dataclass
class CodecState:
    """What one sender keeps for one tensor between steps."""

    error_feedback: bool = True
    residual: torch.Tensor | None = None  # error feedback: what was not sent yet
    q: torch.Tensor | None = None  # PowerSGD: right factor of the last step (warm start)
    seed: int = 0  # stochastic rounding / PowerSGD initial Q
    generator: torch.Generator | None = None

    def rng(self, device: torch.device | str = "cpu") -> torch.Generator:
        """This tensor's random stream on ``device`` (created on first use from ``seed``)."""
        device = torch.device(device)
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


@dataclass
class Payload:
    """A compressed tensor: ``tensors`` go on the wire as raw frames; the rest is small meta."""

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    info: dict[str, int] = field(default_factory=dict)  # codec parameters the decoder needs

    @property
    def nbytes(self) -> int:
        """Exact bytes of the payload's tensors (what a transport sends besides the meta)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def meta(self) -> dict[str, Any]:
        """JSON-able description: with the tensors it rebuilds the payload (``from_meta``)."""
        return {"codec": self.codec, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "info": dict(self.info)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: list[torch.Tensor]) -> Payload:
        """Rebuild a payload from ``meta()`` and the received tensors (in ``tensors`` order).

        ``decode`` checks the tensors against the shape; a receiver should take the shape from
        what it knows (the parameter's shape) or bound it, since decoding allocates that many elements.
        """
        codec = meta["codec"]
        if codec not in CODECS:
            raise ValueError(f"unknown gradient codec {codec!r}")
        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {meta['dtype']!r}")
        return cls(codec, tuple(int(s) for s in meta["shape"]), dtype, list(tensors),
                   {k: int(v) for k, v in meta.get("info", {}).items()})


def nbytes(payload: Payload) -> int:
    """Exact byte size of a payload's tensors."""
    return payload.nbytes


class Codec:
    """Base codec: ``encode`` (with error feedback) and ``decode``; subclasses fill ``_encode``."""

    name = "none"

    def new_state(self, error_feedback: bool = True, seed: int = 0) -> CodecState:
        return CodecState(error_feedback=error_feedback, seed=seed)

    def encode(self, tensor: torch.Tensor, state: CodecState | None = None,
               segments: list[int] | None = None) -> Payload:
        """Compress ``tensor`` (plus the state's residual when error feedback is on).

        ``segments``: sizes of the tensors a flat ``tensor`` concatenates (a DDP bucket); top-k
        then keeps ``ceil(ratio * size)`` entries of each segment rather than of the whole.
        """
        x = tensor.detach()
        ef = state is not None and state.error_feedback
        if ef and state.residual is not None and state.residual.shape == x.shape:
            x = x + state.residual
        payload = self._encode(x, state, segments)
        if ef:  # the identity codec (also the safeguard's fallback) sends everything: nothing left
            state.residual = None if payload.codec == "none" else x - decode(payload).to(x.dtype)
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        return decode(payload)

    def nbytes(self, payload: Payload) -> int:
        return payload.nbytes

    def _encode(self, x: torch.Tensor, state: CodecState | None, segments: list[int] | None = None) -> Payload:
        return Payload("none", tuple(x.shape), x.dtype, [x.contiguous().clone()])


class CastCodec(Codec):
    """fp16 / bf16: the tensor cast to a 2-byte float (our own bf16: the built-in hook needs NCCL)."""

    def __init__(self, name: str):
        self.name = name
        self.wire_dtype = torch.float16 if name == "fp16" else torch.bfloat16

    def _encode(self, x: torch.Tensor, state: CodecState | None, segments: list[int] | None = None) -> Payload:
        y = x.contiguous()
        if self.wire_dtype == torch.float16:
            y = y.clamp(-65504.0, 65504.0)  # saturate instead of inf; error feedback carries the rest
        return Payload(self.name, tuple(x.shape), x.dtype, [y.to(self.wire_dtype)])


class Int8Codec(Codec):
    """int8 with one fp32 scale (max |x| / 127) per chunk of ``chunk`` elements."""

    name = "int8"

    def __init__(self, chunk: int = 1024, rounding: str = "nearest"):
        if chunk < 1 or rounding not in ("nearest", "stochastic"):
            raise ValueError(f"bad int8 codec parameters chunk={chunk} rounding={rounding!r}")
        self.chunk, self.rounding = chunk, rounding

    def _encode(self, x: torch.Tensor, state: CodecState | None, segments: list[int] | None = None) -> Payload:
        flat = x.reshape(-1).float()
        n, c = flat.numel(), self.chunk
        chunks = max(1, -(-n // c))
        padded = torch.nn.functional.pad(flat, (0, chunks * c - n)).view(chunks, c)
        scale = padded.abs().amax(dim=1) / 127.0
        y = padded / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        if self.rounding == "stochastic":
            gen = state.rng(y.device) if state is not None else None
            y = torch.floor(y + torch.rand(y.shape, generator=gen, device=y.device))
        else:
            y = torch.round(y)
        q = y.clamp_(-127, 127).to(torch.int8).reshape(-1)[:n].clone()
        return Payload("int8", tuple(x.shape), x.dtype, [q, scale], {"chunk": c})


def topk_count(numel: int, ratio: float) -> int:
    """How many entries top-k keeps: ``ceil(ratio * numel)``, at least 1, at most ``numel``."""
    return max(1, min(numel, math.ceil(ratio * numel - 1e-9)))


def warmup_ratios(target: float, start: float = 0.25, factor: float = 4.0) -> list[float]:
    """The kept fractions of a Deep Gradient Compression warm-up (Lin et al. 2018), above ``target``.

    ``start``, ``start / factor``, ... while larger than ``target``: for 1% that is
    25%, 6.25%, 1.5625% (sparsity 75%, 93.75%, 98.4%), then the target itself.
    """
    out, r = [], start
    while r > target * (1 + 1e-9):
        out.append(r)
        r /= factor
    return out


def warmup_ratio(step: int, warmup_steps: int, target: float, start: float = 0.25, factor: float = 4.0) -> float:
    """Top-k kept fraction at 0-based ``step`` of a warm-up of ``warmup_steps`` steps.

    The warm-up is split into equal stages, one per ratio of :func:`warmup_ratios`
    (exponentially increasing sparsity); from ``warmup_steps`` on it is ``target``.
    """
    stages = warmup_ratios(target, start, factor)
    if step >= warmup_steps or not stages:
        return target
    return stages[min(len(stages) - 1, max(0, step) * len(stages) // warmup_steps)]


class TopKCodec(Codec):
    """The ``ceil(ratio * numel)`` largest-magnitude entries: values (input dtype) + int32 indices."""

    name = "topk"

    def __init__(self, ratio: float = 0.01):
        if not 0 < ratio <= 1:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def _encode(self, x: torch.Tensor, state: CodecState | None, segments: list[int] | None = None) -> Payload:
        flat = x.reshape(-1)
        if flat.numel() >= 2**31:
            raise ValueError("topk codec: tensor too large for int32 indices")
        mag = flat.abs()
        if segments is None or len(segments) <= 1:
            idx = mag.topk(topk_count(flat.numel(), self.ratio), sorted=False).indices
        else:
            if sum(segments) != flat.numel():
                raise ValueError(f"topk segments sum to {sum(segments)}, tensor has {flat.numel()} elements")
            parts, off = [], 0
            for size in segments:
                if size:
                    parts.append(mag[off:off + size].topk(topk_count(size, self.ratio), sorted=False).indices + off)
                off += size
            idx = torch.cat(parts)
        return Payload("topk", tuple(x.shape), x.dtype, [flat[idx].contiguous(), idx.to(torch.int32)])


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bytes, eight elements to a byte (element i: bit i % 8), zero-padded."""
    bits = torch.nn.functional.pad(mask.reshape(-1).to(torch.uint8), (0, -mask.numel() % 8))
    return (bits.view(-1, 8) * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` elements of the bool tensor :func:`pack_bits` packed."""
    return (packed[:, None] & _BITS.to(packed.device)).ne(0).view(-1)[:n]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view PowerSGD compresses: first dimension x the rest."""
    return shape[0], math.prod(shape[1:])


def powersgd_applies(shape: tuple[int, ...], rank: int) -> bool:
    """True when a rank-``rank`` factorization is smaller than the tensor itself."""
    if len(shape) < 2:
        return False
    n, m = matrix_shape(shape)
    r = min(rank, n, m)
    return r * (n + m) < n * m


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p``'s columns (reduced QR, computed in float32)."""
    return torch.linalg.qr(p.float(), mode="reduced").Q


def initial_q(m: int, rank: int, seed: int) -> torch.Tensor:
    """The random right factor PowerSGD starts from (the same on every rank for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=gen)


def valid_q(q: torch.Tensor | None, m: int, rank: int) -> bool:
    """A warm-start Q that can be reused: right shape, finite, not all zero."""
    return q is not None and q.shape == (m, rank) and bool(torch.isfinite(q).all()) and bool(q.abs().sum() > 0)


class PowerSGDCodec(Codec):
    """Rank-r factorization M ~ P Q^T by ``iterations`` power iterations per step, warm-started
    from last Q (a sender that factorizes alone, as a parameter-server worker or a rank with
    ``powersgd_exchange = "allgather"`` does, gets more of them for compute only).

    Tensors it cannot factor with a gain (vectors: biases, norm weights; tiny matrices) go
    ``vectors = "fp32"``: raw (``info['raw'] = 1``), as torch's hook sends them, or
    ``vectors = "int8"``: through :class:`Int8Codec` (an ``int8`` payload, error feedback
    alike).  At rank 4 on a 128-wide model the vectors are 15% of PowerSGD's bytes raw.
    """

    name = "powersgd"

    def __init__(self, rank: int = 2, vectors: str = "fp32", chunk: int = 1024, rounding: str = "nearest",
                 iterations: int = 1):
        if rank < 1 or iterations < 1:
            raise ValueError(f"powersgd rank and iterations must be >= 1, got {rank} and {iterations}")
        if vectors not in POWERSGD_VECTORS:
            raise ValueError(f"powersgd vectors must be one of {', '.join(POWERSGD_VECTORS)}, got {vectors!r}")
        self.rank, self.iterations = rank, iterations
        self.vectors = Int8Codec(chunk, rounding) if vectors == "int8" else None

    def _encode(self, x: torch.Tensor, state: CodecState | None, segments: list[int] | None = None) -> Payload:
        shape = tuple(x.shape)
        if not powersgd_applies(shape, self.rank):
            if self.vectors is not None:
                return self.vectors._encode(x, state)
            return Payload("powersgd", shape, x.dtype, [x.contiguous().clone()], {"raw": 1})
        n, m = matrix_shape(shape)
        r = min(self.rank, n, m)
        mat = x.reshape(n, m).float()
        q = state.q if state is not None else None
        if not valid_q(q, m, r):
            q = initial_q(m, r, state.seed if state is not None else 0).to(mat.device)
        for _ in range(self.iterations):  # from the warm start towards the best rank-r approximation
            p = orthonormalize(mat @ q)
            q = mat.t() @ p
        if state is not None:
            state.q = q
        return Payload("powersgd", shape, x.dtype, [p.contiguous(), q.contiguous()], {"raw": 0})


def check(payload: Payload) -> None:
    """Raise ValueError unless the payload's tensors fit its codec and shape (cheap; run before decoding
    anything received, so a malformed message cannot make the receiver allocate or index wildly)."""
    c, ts, n = payload.codec, payload.tensors, payload.numel

    def bad(why: str) -> ValueError:
        return ValueError(f"malformed {c} payload for shape {tuple(payload.shape)}: {why}")

    if any(s < 0 for s in payload.shape):
        raise bad("negative dimension")
    raw = c == "none" or (c == "powersgd" and payload.info.get("raw", 0))
    want = {"fp16": 1, "bf16": 1, "int8": 2, "topk": 2, "powersgd": 1 if raw else 2}.get(c, 1)
    if len(ts) != want:
        raise bad(f"{len(ts)} tensors, expected {want}")
    if raw or c in ("fp16", "bf16"):
        wire = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(c)
        if ts[0].numel() != n or (wire is not None and ts[0].dtype != wire):
            raise bad(f"{ts[0].numel()} {ts[0].dtype} elements")
    elif c == "int8":
        chunk = payload.info.get("chunk", 0)
        if chunk < 1 or ts[0].dtype != torch.int8 or ts[0].numel() != n or ts[1].dtype != torch.float32:
            raise bad("int8 values / fp32 scales / chunk do not match")
        if ts[1].numel() != max(1, -(-n // chunk)):
            raise bad(f"{ts[1].numel()} scales for chunk {chunk}")
    elif c == "topk":
        values, idx = ts
        if idx.dtype != torch.int32 or values.dim() != 1 or idx.shape != values.shape or values.numel() > n:
            raise bad("values / int32 indices do not match")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise bad("index out of range")
    elif c == "powersgd":
        p, q = ts
        rows, cols = matrix_shape(payload.shape) if len(payload.shape) >= 2 else (-1, -1)
        if p.dim() != 2 or q.dim() != 2 or p.shape[0] != rows or q.shape[0] != cols or p.shape[1] != q.shape[1]:
            raise bad(f"factors {tuple(p.shape)} x {tuple(q.shape)}")


def decode(payload: Payload) -> torch.Tensor:
    """The tensor a payload stands for (any codec; no codec object or state needed).

    Raises ValueError for a payload that does not fit its codec (see :func:`check`).
    """
    check(payload)
    c, shape, dtype, ts = payload.codec, payload.shape, payload.dtype, payload.tensors
    if c == "none" or (c == "powersgd" and payload.info.get("raw", 0)):
        return ts[0].reshape(shape).to(dtype)
    if c in ("fp16", "bf16"):
        return ts[0].to(dtype).reshape(shape)
    if c == "int8":
        q, scale = ts
        chunk, n = payload.info["chunk"], q.numel()
        chunks = scale.numel()
        padded = torch.nn.functional.pad(q.float(), (0, chunks * chunk - n)).view(chunks, chunk)
        return (padded * scale.float().unsqueeze(1)).reshape(-1)[:n].reshape(shape).to(dtype)
    if c == "topk":
        values, idx = ts
        out = torch.zeros(payload.numel, dtype=values.dtype, device=values.device)
        out.scatter_(0, idx.long(), values)
        return out.reshape(shape).to(dtype)
    if c == "powersgd":
        p, q = ts
        return (p @ q.t()).reshape(shape).to(dtype)
    raise ValueError(f"unknown gradient codec {c!r}")


def get_codec(name: str, *, ratio: float = 0.01, rank: int = 2, chunk: int = 1024,
              rounding: str = "nearest", vectors: str = "fp32", iterations: int = 1) -> Codec:
    """A codec by name with its parameters (the ones it does not use are ignored)."""
    if name == "none":
        return Codec()
    if name in ("fp16", "bf16"):
        return CastCodec(name)
    if name == "int8":
        return Int8Codec(chunk, rounding)
    if name == "topk":
        return TopKCodec(ratio)
    if name == "powersgd":
        return PowerSGDCodec(rank, vectors, chunk, rounding, iterations)
    raise ValueError(f"unknown gradient codec {name!r} (one of {', '.join(CODECS)})")


def make_codec(comp: Any) -> Codec:
    """The codec a ``[compression]`` config section asks for."""
    return get_codec(comp.gradient, ratio=comp.topk_ratio, rank=comp.powersgd_rank,
                     chunk=comp.int8_chunk, rounding=comp.int8_rounding,
                     vectors=getattr(comp, "powersgd_vectors", "fp32"),
                     iterations=getattr(comp, "powersgd_iterations", 1))
