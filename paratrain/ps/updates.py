"""How a server turns pushes into updates, per consistency mode (a mixin of ParameterServer).

* sync: pushes of one round accumulate (weighted); when every live worker has pushed, the
  mean is applied (clipped by the global norm: directly with one server, after a second
  APPLY phase with several) and every pusher gets the new parameters.
* async: each push is applied on arrival and answered at once.
* ssp: each push is applied on arrival; the answer waits in ``held`` until the worker is no
  more than ``staleness`` clocks ahead of the slowest live worker.

A push whose clock the server already has (a replay after recovery) is a duplicate: it is
not applied again, only answered.  Every push is validated before it touches any state: a
finite learning rate in ``[0, LR_MAX]``, a finite weight and clip coefficient, keys of this
server, sizes that match the key table, and finite gradient values; a push without keys is
acknowledged but is not an optimizer step (as torch skips parameters without a gradient).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from typing import Any

import torch

from paratrain.ps.consistency import SyncRound
from paratrain.ps.placement import KeySpec
from paratrain.ps.protocol import (
    DIGEST_MIN,
    DTYPE_IDS,
    KEY_PACKED,
    Flag,
    Header,
    KeyRecord,
    Message,
    Msg,
    ProtocolError,
    frame_tensors,
)
from paratrain.ps.shard import Grads, Shard, clip_coef
from paratrain.ps.wire import decode_key

LR_MAX = 1e3  # a learning rate above this is taken for a corrupt or hostile message
WEIGHT_MAX = 1e15  # labelled tokens of one push
MAX_PLANS = 64  # push plans kept (one per distinct key table: a few per worker)
SUM_CHECK_MAX = 4  # up to this many tensors are checked by their sums (2x faster than a norm)


def _check_value(what: str, v: float, hi: float) -> None:
    if not (math.isfinite(v) and 0.0 <= v <= hi):
        raise ProtocolError("bad value", f"{what} {v!r} is not a finite number in [0, {hi:g}]")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no element of ``tensors`` is NaN or infinite.

    One read pass: the sum of a tensor is NaN or infinite when any element is (values so large
    that their fp32 sum overflows count as non-finite too).  Many tensors: their fused L2 norms
    (values beyond ~1e19, whose squares overflow, count as non-finite)."""
    ts = [t for t in tensors if t.numel()]
    if len(ts) <= SUM_CHECK_MAX:
        return math.isfinite(sum(float(t.sum()) for t in ts))
    return math.isfinite(float(torch.stack(torch._foreach_norm(ts)).sum()))


class PushPlan:
    """How a push's table maps onto the shard, checked once per distinct table.

    Plain fp32 gradients become *runs*, each a slice of a frame copied to one place in the
    shard's gradient buffers: consecutive packed keys that sit back to back there merge into
    one run (workers pack in the buffers' order), and a key with a frame of its own is a run.
    Records with a codec (or sparse rows) are decoded key by key."""

    def __init__(self, runs: list[tuple[int, int, int, int, int]], coded: list[tuple[KeySpec, KeyRecord, int]],
                 pack_numel: int, nkeys: int):
        self.runs, self.coded, self.pack_numel, self.nkeys = runs, coded, pack_numel, nkeys

    @classmethod
    def make(cls, msg: Message, shard: Shard, packed: bool) -> PushPlan:
        """Check the table (keys held here, each once; packed records well formed) and plan it."""
        runs: list[list[int]] = []  # [frame, start, end, group, offset]
        coded, seen, i, pos = [], set(), int(packed), 0
        for rec in msg.keys:
            key = shard.by_id.get(rec.key)
            if key is None or rec.key in seen:
                raise ProtocolError("malformed", f"key {rec.key} is not held here or repeats")
            seen.add(rec.key)
            g, off = shard.slot[key.id]
            if rec.flags & KEY_PACKED:
                if not packed or rec.ntensors or rec.codec:
                    raise ProtocolError("malformed", f"key {rec.key}: bad packed record")
                last = runs[-1] if runs else None
                if last and last[0] == 0 and last[2] == pos and last[3] == g and last[4] + last[2] - last[1] == off:
                    last[2] += key.numel
                else:
                    runs.append([0, pos, pos + key.numel, g, off])
                pos += key.numel
                continue
            fr = msg.frame_recs[i] if rec.ntensors == 1 else None
            if rec.codec == 0 and not rec.flags and fr is not None and fr.dtype == DTYPE_IDS[torch.float32] \
                    and math.prod(fr.shape) == key.numel:
                runs.append([i, 0, key.numel, g, off])
            else:
                coded.append((key, rec, i))
            i += rec.ntensors
        if packed and not pos:
            raise ProtocolError("malformed", "a pack frame without packed keys")
        return cls([tuple(r) for r in runs], coded, pos, len(seen))


class UpdateRules:
    """Push / APPLY / PULL handling; expects the attributes ParameterServer sets up."""

    shard: Shard | None
    _reply: Any
    _reject: Any
    _plans: dict[tuple[bytes, bool], PushPlan]
    _plans_for: Shard | None

    def _send_params(self, ident: bytes, req: Header, flags: int = 0, stale: int = 0, gap: int = 0,
                     slowest: int | None = None) -> None:
        """The shard's parameters to ``ident``; f2 is the version (sync) or the slowest live clock."""
        frames = [self.shard.wire()]
        if self.integrity == "mac" and self._digest_version != self.shard.version:  # sign once per version
            self._digests = {0: self.signer.digest(frames[0])} if frames[0].nbytes >= DIGEST_MIN else {}
            self._digest_version = self.shard.version
        self._reply(ident, req, Msg.PARAMS, frames=frames, digests=self._digests, track=True, flags=flags,
                    dtype=DTYPE_IDS[torch.float32],
                    clock=self.applied.get(req.worker, 0), f0=float(stale), f1=float(gap),
                    f2=float(self.shard.version if self.mode == "sync" else
                             slowest if slowest is not None else self.clocks.slowest(self.members.live())))

    def _require_shard(self) -> Shard:
        if self.shard is None:
            raise ProtocolError("not initialised", "server has no parameters yet (INIT first)")
        return self.shard

    def _push_plan(self, msg: Message, shard: Shard) -> PushPlan:
        """The push's key table checked against this server's keys, once per distinct table."""
        packed = bool(msg.header.flags & Flag.PACKED)
        if self._plans_for is not shard:  # a new key table (INIT, resume): plans start over
            self._plans, self._plans_for = {}, shard
        plan = self._plans.get((msg.desc, packed))
        if plan is None:
            plan = PushPlan.make(msg, shard, packed)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[(msg.desc, packed)] = plan
        return plan

    def _decode_push(self, msg: Message) -> Grads:
        """The validated gradients of a push (raises ProtocolError)."""
        shard, h = self._require_shard(), msg.header
        _check_value("learning rate", h.f0, LR_MAX)
        _check_value("weight", h.f1, WEIGHT_MAX)
        if h.flags & Flag.HAS_COEF:
            _check_value("clip coefficient", h.f2, 1.0)
        plan = self._push_plan(msg, shard)
        tensors = frame_tensors(msg)
        if plan.pack_numel and tensors[0].numel() != plan.pack_numel:
            raise ProtocolError("wrong length", f"pack frame of {tensors[0].numel()} values, "
                                                f"keys use {plan.pack_numel}")
        runs = []
        for f, a, b, g, off in plan.runs:
            t = tensors[f] if tensors[f].dim() == 1 else tensors[f].view(-1)
            runs.append((g, off, t if a == 0 and b == len(t) else t[a:b]))
        keys = [(key, decode_key(rec, tensors[i:i + rec.ntensors], key)) for key, rec, i in plan.coded]
        # without codecs the gradients are exactly the frames: check those (fewer tensors)
        if not all_finite(tensors if not keys else [t for _, _, t in runs] + [d[-1] for _, d in keys]):
            raise ProtocolError("bad value", "non-finite gradient values; update refused")
        return Grads(runs, keys, plan.nkeys)

    def _on_push(self, ident: bytes, msg: Message) -> None:
        h, w = msg.header, msg.header.worker
        if self.kill_at is not None and h.clock == self.kill_at:
            self.log.warning("debug.kill_server_at_step = %d: killing myself (SIGKILL)", h.clock)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "sync" and self.awaiting_apply:
            self.deferred.append((ident, msg))
            return
        grads = self._decode_push(msg)  # validate before touching any state
        self.counters["pushes"] += 1
        if h.clock <= self.applied.get(w, 0):
            return self._on_duplicate(ident, msg)
        self.applied[w] = h.clock
        if self.mode == "sync":
            return self._push_sync(ident, msg, grads)
        shard = self._require_shard()
        stale = max(0, shard.version - h.version)
        self.staleness[stale] += 1
        if grads:  # an empty push is acknowledged, not a step
            shard.set_grads(grads)
            shard.apply(h.f0)
        self.clocks.advance(w)
        self.held.append((ident, w, h.seq, stale))
        self._release_held()

    def _on_duplicate(self, ident: bytes, msg: Message) -> None:
        h, w = msg.header, msg.header.worker
        self.counters["duplicates"] += 1
        if self.mode == "sync" and w in self.round.weights:
            self.round_replies[w] = (ident, h.seq, 0)  # still waiting for its round
        elif self.mode == "ssp":
            self.held.append((ident, w, h.seq, 0))
            self._release_held()
        else:
            self._send_params(ident, h, flags=Flag.DUPLICATE)

    def _push_sync(self, ident: bytes, msg: Message, grads: Grads) -> None:
        h, w, shard = msg.header, msg.header.worker, self._require_shard()
        rnd = self.round
        if w in rnd.weights:  # a restarted process of a worker already in this round: count it once
            self.round_replies[w] = (ident, h.seq, 0)
            return
        if not rnd.weights:
            shard.zero_grad()
        weight = h.f1 if h.f1 > 0 else 1.0
        shard.add_grads(grads, weight)
        self.round_nonempty = self.round_nonempty or bool(grads)
        rnd.add(w, weight)
        rnd.lr = h.f0
        if h.flags & Flag.HAS_COEF:
            rnd.coef = h.f2
        self.staleness[max(0, shard.version - h.version)] += 1
        self.round_replies[w] = (ident, h.seq, 0)
        self._check_round()

    def _check_round(self) -> None:
        rnd = self.round
        if self.mode != "sync" or self.awaiting_apply or not rnd.ready(self.members.live()):
            return
        shard = self._require_shard()
        shard.scale_grad(1.0 / rnd.weight_sum)
        if self.two_phase and rnd.coef is None:
            sq = shard.grad_sqnorm()
            self.awaiting_apply = True
            for w, (ident, seq, _) in self.round_replies.items():
                req = Header(int(Msg.PUSH), worker=w, seq=seq)
                self._reply(ident, req, Msg.REPLY, flags=Flag.PHASE1, clock=rnd.id, f0=sq)
            return
        coef = rnd.coef if rnd.coef is not None else clip_coef(shard.grad_sqnorm(), self.grad_clip)
        self._finish_round(coef)
        for w, (ident, seq, _) in self.round_replies.items():
            self._send_params(ident, Header(int(Msg.PUSH), worker=w, seq=seq))
        self._next_round()

    def _finish_round(self, coef: float) -> None:
        if self.round_nonempty:  # else every push of the round was empty: no step
            self.shard.apply(self.round.lr, coef)

    def _next_round(self) -> None:
        self.round = SyncRound(self.shard.version + 1)
        self.round_nonempty = False
        self.round_replies = {}
        self.awaiting_apply = False
        deferred, self.deferred = self.deferred, []
        for ident, m in deferred:
            try:
                self._on_push(ident, m)
            except ProtocolError as e:
                self._reject(e.kind, str(e), (ident, m))

    def _on_apply(self, ident: bytes, msg: Message) -> None:
        h, shard = msg.header, self._require_shard()
        _check_value("clip coefficient", h.f0, 1.0)
        if self.awaiting_apply and h.clock == self.round.id:
            self._finish_round(h.f0)
            self._send_params(ident, h)
            self._next_round()
        elif h.clock <= shard.version:
            self._send_params(ident, h)
        else:
            raise ProtocolError("round lost", f"round {h.clock} is not pending here (version {shard.version})")

    def _release_held(self) -> None:
        live = self.members.live()
        clocks = self.clocks
        low = clocks.slowest(live) if live else None  # (releases do not move clocks)
        keep = []
        for ident, w, seq, stale in self.held:
            gap = clocks.release(w, low)
            if gap is not None:
                self._send_params(ident, Header(int(Msg.PUSH), worker=w, seq=seq), stale=stale, gap=gap,
                                  slowest=low or 0)
            else:
                keep.append((ident, w, seq, stale))
        self.held = keep

    def _on_pull(self, ident: bytes, msg: Message) -> None:
        self._require_shard()
        self._send_params(ident, msg.header)

