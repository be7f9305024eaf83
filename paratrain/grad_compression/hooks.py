"""DDP communication hooks built on the gradient codecs.

Each hook sees one flat DDP bucket, averages it over the data-parallel group through a
compressed exchange, and adds the bytes this rank sent to ``strategy.comm_bytes``:

- fp16 / bf16: all-reduce of the cast values (error feedback keeps the cast error locally);
- int8 / top-k: all-gather of every rank's payload (packed into one byte buffer), decoded
  and summed locally (int8 sums would overflow; top-k index sets differ per rank);
- PowerSGD: all-reduce of P (+ the bucket's vectors, sent raw; or, with
  ``powersgd_vectors = "int8"``, an all-gather of their int8 payloads), orthonormalize,
  then all-reduce of Q; residual ``M - P Q_local^T`` kept for error feedback; Q
  warm-starts the next step (identical on all ranks).

Byte convention (docs/compression.md): an all-reduce of S bytes costs each rank
``2 (n-1)/n * S`` (ring), an all-gather of S bytes per rank costs ``(n-1) * S``.
While the loss safeguard falls back, buckets go uncompressed (fp32 all-reduce of the
gradient plus any pending residual).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from paratrain.grad_compression.codecs import (
    Payload,
    decode,
    initial_q,
    matrix_shape,
    orthonormalize,
    powersgd_applies,
    valid_q,
)
from paratrain.grad_compression.compressor import GradientCompressor


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (world - 1) * nbytes // world


def allgather_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather where each rank contributes ``nbytes``."""
    return (world - 1) * nbytes


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors' raw bytes into one uint8 tensor (one collective instead of several)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a ``pack``-ed buffer back into tensors shaped and typed like ``like``."""
    out, off = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        out.append(buf[off:off + n].clone().view(t.dtype).reshape(t.shape))
        off += n
    return out


class CompressionHookState:
    """State shared by the hook calls of one DDP model: codec states, byte counts, safeguard."""

    def __init__(self, strategy: Any):
        self.strategy = strategy
        self.dims = strategy.dims
        self.cfg = strategy.cfg.compression
        self.group = self.dims.dp_group
        self.world = self.dims.dp
        self.compressor = GradientCompressor.from_config(self.cfg, seed=self.dims.rank + 1)
        self.qs: dict[tuple, list[torch.Tensor]] = {}  # PowerSGD warm start per bucket
        self.layouts: dict[tuple, list[tuple[int, int]]] = {}  # bucket key -> (param address, numel) in order
        self.payload_bytes = 0  # sum of codec payload sizes handed to collectives (tests)
        self.step_compressed = False

    # ---- collectives that count what they send ----------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.futures.Future:
        self.strategy.comm_bytes += ring_allreduce_bytes(t.numel() * t.element_size(), self.world)
        return dist.all_reduce(t, group=self.group, async_op=True).get_future()

    def all_gather(self, t: torch.Tensor) -> tuple[list[torch.Tensor], torch.futures.Future]:
        self.strategy.comm_bytes += allgather_bytes(t.numel() * t.element_size(), self.world)
        out = [torch.empty_like(t) for _ in range(self.world)]
        return out, dist.all_gather(out, t, group=self.group, async_op=True).get_future()

    # ---- safeguard ------------------------------------------------------------------------------
    @property
    def safeguard_enabled(self) -> bool:
        g = self.compressor.safeguard
        return g is not None and g.steps > 0

    def observe_loss(self, loss_sum: torch.Tensor, n_global: float) -> None:
        """Feed the global mean loss of a step (one small all-reduce) to the safeguard."""
        if not self.safeguard_enabled:
            self.compressor.tick()  # the warm-up counts steps even without the safeguard
            return
        t = loss_sum.detach().reshape(1).to(self.dims.device, torch.float64, copy=True)
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        if self.compressor.observe_loss(float(t[0]) / max(n_global, 1.0)) and self.dims.is_main:
            print(f"paratrain: compression: {self.compressor.safeguard.last_event}", file=sys.stderr, flush=True)

    def step_metrics(self) -> dict[str, Any]:
        return {"compressed": self.step_compressed}

    def summary(self) -> dict[str, Any]:
        return self.compressor.summary()


def bucket_key(bucket) -> tuple[int, ...]:
    """Identity of a bucket's layout: its parameters' addresses, in order.

    DDP rebuilds its buckets after the first step; a state keyed by index alone could then
    add a residual to the wrong coordinates.
    """
    return tuple(p.data_ptr() for p in bucket.parameters())


def adopt_state(state: CompressionHookState, key: tuple, bucket) -> None:
    """First sight of a bucket layout: carry the residuals of the parameters it holds over from
    the buckets that held them before, then drop those buckets' states once fully carried over.

    DDP rebuilds its buckets after the first iteration (in gradient-ready order), so the
    buckets of step 2 on differ from step 1's; without this the residuals of step 1 would
    be dropped and their states kept forever.  Matching is per parameter, so a parameter's
    error-feedback residual always lands on that parameter's coordinates.
    """
    if key in state.layouts:
        return
    layout = [(p.data_ptr(), p.numel()) for p in bucket.parameters()]
    state.layouts[key] = layout
    comp = state.compressor
    owners = {ptr: old for old, lay in state.layouts.items() if old != key for ptr, _ in lay}
    if not owners:
        return
    wanted = {ptr for ptr, _ in layout}
    pieces: dict[int, torch.Tensor] = {}
    for old in {owners[ptr] for ptr in wanted if ptr in owners}:
        st = comp.states.get(old)
        off = 0
        for ptr, n in state.layouts[old]:
            if ptr in wanted and st is not None and st.residual is not None and st.residual.numel() >= off + n:
                pieces[ptr] = st.residual.reshape(-1)[off:off + n]
            off += n
    if pieces:
        ref = next(iter(pieces.values()))
        comp.state(key).residual = torch.cat([pieces.get(ptr, ref.new_zeros(n)) for ptr, n in layout])
    # an old layout whose parameters all sit in other layouts now is obsolete
    for old in {owners[ptr] for ptr in wanted if ptr in owners}:
        others = {ptr for k, lay in state.layouts.items() if k != old for ptr, _ in lay}
        if all(ptr in others for ptr, _ in state.layouts[old]):
            del state.layouts[old]
            comp.states.pop(old, None)
            state.qs.pop(old, None)


def _plain(state: CompressionHookState, x: torch.Tensor, key: tuple) -> torch.futures.Future:
    """Uncompressed all-reduce of an already averaged bucket (residual flushed by the identity codec)."""
    payload = state.compressor.plain.encode(x, state.compressor.state(key))
    wire = payload.tensors[0]
    state.payload_bytes += payload.nbytes
    return state.all_reduce(wire).then(lambda f: f.value()[0])


def _open_bucket(state: CompressionHookState, bucket) -> tuple[torch.Tensor, torch.Tensor, tuple,
                                                                torch.futures.Future | None]:
    """What every hook starts with: (the bucket's buffer, its average share ``buffer / world``,
    its state key, and the future of the uncompressed all-reduce when this step is not compressed
    (safeguard fallback, warm-up) or None)."""
    buf = bucket.buffer()
    x = buf.div(state.world)
    key = bucket_key(bucket)
    adopt_state(state, key, bucket)
    state.step_compressed = state.compressor.active
    return buf, x, key, None if state.step_compressed else _plain(state, x, key)


def _like(payload: Payload, tensors: list[torch.Tensor]) -> Payload:
    """``payload``'s codec, shape and parameters around another rank's tensors."""
    return Payload(payload.codec, payload.shape, payload.dtype, tensors, payload.info)


def codec_hook(state: CompressionHookState, bucket):  # no annotations: DDP compares them to real types
    """fp16 / bf16 / int8 / top-k hook: encode the averaged bucket, exchange, decode."""
    buf, x, key, plain = _open_bucket(state, bucket)
    if plain is not None:
        return plain
    comp = state.compressor
    payload = comp.encode(key, x, segments=[g.numel() for g in bucket.gradients()])
    state.payload_bytes += payload.nbytes
    if payload.codec in ("fp16", "bf16"):
        wire = payload.tensors[0]

        def cast_back(fut: torch.futures.Future) -> torch.Tensor:
            return buf.copy_(decode(_like(payload, [fut.value()[0]])))

        return state.all_reduce(wire).then(cast_back)
    gathered, fut = state.all_gather(pack(payload.tensors))

    def decode_sum(_: torch.futures.Future) -> torch.Tensor:
        out = torch.zeros_like(buf)
        for g in gathered:
            out += decode(_like(payload, unpack(g, payload.tensors)))
        return buf.copy_(out)

    return fut.then(decode_sum)


def powersgd_hook(state: CompressionHookState, bucket):  # no annotations (see codec_hook)
    """PowerSGD over the bucket's matrices: two all-reduces (P, then Q) per bucket."""
    buf, x, key, plain = _open_bucket(state, bucket)
    if plain is not None:
        return plain
    comp = state.compressor
    st = comp.state(key)
    ef = st.error_feedback
    if ef and st.residual is not None and st.residual.shape == x.shape:
        x += st.residual
    rank = comp.codec.rank
    mats, raw = [], []  # (offset, n, m, r) and (offset, numel)
    off = 0
    for g in bucket.gradients():
        numel = g.numel()
        if powersgd_applies(tuple(g.shape), rank):
            n, m = matrix_shape(tuple(g.shape))
            mats.append((off, n, m, min(rank, n, m)))
        else:
            raw.append((off, numel))
        off += numel
    qs = state.qs.get(key)
    if qs is None or len(qs) != len(mats) or not all(
            valid_q(q, m, r) for q, (_, _, m, r) in zip(qs, mats, strict=True)):
        qs = [initial_q(m, r, seed=1000 * bucket.index() + i).to(x.device) for i, (_, _, m, r) in enumerate(mats)]
    ms = [x[o:o + n * m].view(n, m) for o, n, m, _ in mats]
    int8 = comp.codec.vectors if raw else None  # the unfactorable tensors as int8 (all-gathered) or raw
    if int8 is not None:
        vec = torch.cat([x[o:o + k] for o, k in raw])
        vpay = int8._encode(vec, st)
        state.payload_bytes += vpay.nbytes
        gathered, gfut = state.all_gather(pack(vpay.tensors))
    first = torch.cat([(mat @ q).reshape(-1) for mat, q in zip(ms, qs, strict=True)]
                      + ([] if int8 is not None else [x[o:o + k] for o, k in raw])) if (mats or raw) else x[:0]
    state.payload_bytes += first.numel() * first.element_size()
    state.all_reduce(first).wait()
    if int8 is not None:  # issued first on the same group, so already complete
        gfut.wait()
        vsum = sum(decode(_like(vpay, unpack(g, vpay.tensors))) for g in gathered)
    ps, pos = [], 0
    for _, n, _, r in mats:
        ps.append(orthonormalize(first[pos:pos + n * r].view(n, r)))
        pos += n * r
    q_local = [mat.t() @ p for mat, p in zip(ms, ps, strict=True)]
    if ef:
        residual = x.clone()
        for (o, n, m, _), p, q in zip(mats, ps, q_local, strict=True):
            residual[o:o + n * m] -= (p @ q.t()).reshape(-1)
        # the vectors' residual: what the others decode from this rank misses (raw: nothing)
        lost = vec - decode(vpay) if int8 is not None else None
        vpos = 0
        for o, k in raw:
            residual[o:o + k] = lost[vpos:vpos + k] if lost is not None else 0
            vpos += k
        st.residual = residual
    second = torch.cat([q.reshape(-1) for q in q_local]) if q_local else x[:0]
    state.payload_bytes += second.numel() * second.element_size()

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        qsum = fut.value()[0]
        new_qs, qpos = [], 0
        for (o, n, m, r), p in zip(mats, ps, strict=True):
            q = qsum[qpos:qpos + m * r].view(m, r).clone()
            qpos += m * r
            buf[o:o + n * m].copy_((p @ q.t()).reshape(-1))
            new_qs.append(q)
        state.qs[key] = new_qs
        rpos, src = (0, vsum) if int8 is not None else (pos, first)
        for o, k in raw:
            buf[o:o + k].copy_(src[rpos:rpos + k])
            rpos += k
        return buf

    if not mats:
        fut = torch.futures.Future()
        fut.set_result([second])
        return fut.then(decompress)
    return state.all_reduce(second).then(decompress)


def per_rank_factors_hook(state: CompressionHookState, bucket):  # no annotations (see codec_hook)
    """PowerSGD with ``powersgd_exchange = "allgather"``: each rank factorizes its own gradients
    (its own P, Q and warm start; the PowerSGD codec per tensor, the way a parameter-server
    worker pushes) and the ranks all-gather their factors, decode and sum.  n ranks then add up
    to rank n*r instead of one shared rank-r P; it costs (n-1) * S against the all-reduce's
    2(n-1)/n * S: the same bytes at 2 ranks, n/2 times more beyond."""
    buf, x, _, plain = _open_bucket(state, bucket)
    if plain is not None:
        return plain
    comp = state.compressor
    payloads, off = [], 0
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        # states keyed by parameter: they survive DDP's bucket rebuild as they are
        payloads.append(comp.encode(("param", p.data_ptr()), x[off:off + g.numel()].view(g.shape)))
        off += g.numel()
    tensors = [t for pl in payloads for t in pl.tensors]
    state.payload_bytes += sum(pl.nbytes for pl in payloads)
    gathered, fut = state.all_gather(pack(tensors))

    def decode_sum(_: torch.futures.Future) -> torch.Tensor:
        out = torch.zeros_like(buf)
        for g in gathered:  # every rank's payloads have this rank's layout (shapes fix their sizes)
            theirs, pos, off = unpack(g, tensors), 0, 0
            for pl in payloads:
                k = len(pl.tensors)
                out[off:off + pl.numel] += decode(_like(pl, theirs[pos:pos + k])).reshape(-1)
                pos, off = pos + k, off + pl.numel
        return buf.copy_(out)

    return fut.then(decode_sum)


def register_compression_hook(ddp: DDP, strategy: Any) -> CompressionHookState:
    """Register the hook for ``strategy.cfg.compression.gradient`` on ``ddp``; return its state."""
    state = CompressionHookState(strategy)
    hook = codec_hook
    if state.compressor.name == "powersgd":
        hook = per_rank_factors_hook if state.cfg.powersgd_exchange == "allgather" else powersgd_hook
    ddp.register_comm_hook(state, hook)
    return state
