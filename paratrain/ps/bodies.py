"""A push's body for one server: key records, frame records and the gradient frames.

:class:`PushBodies` builds what :class:`~paratrain.ps.worker.PSWorker` sends to each server.
A *plain* push (no codec, every gradient of the server's keys present, fp32) follows a plan
made once per server: the small keys packed into one frame in the server's buffer order, a
frame of its own for each large key (zero-copy where the gradient is contiguous), and the
desc frame packed in advance.  Anything else (a codec, sparse embedding rows, a missing
gradient) is encoded key by key with the :class:`~paratrain.ps.wire.PushEncoder`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch._C._nn import flatten_dense_tensors

from paratrain.ps.placement import KeySpec
from paratrain.ps.protocol import (
    DTYPE_IDS,
    KEY_PACKED,
    FrameRecord,
    KeyRecord,
    frame_record,
    pack_desc,
    tensor_frame,
)
from paratrain.ps.shard import group_slots
from paratrain.ps.wire import PushEncoder

PACK_BELOW = 1 << 16  # dense fp32 keys smaller than this share one frame
Body = tuple[list[KeyRecord], list[FrameRecord], list[Any], bool]  # records, frame records, frames, packed


class PlainPush(NamedTuple):
    """What a plain push (fp32, every gradient present) to one server always looks like."""

    recs: list[KeyRecord]
    frecs: list[FrameRecord]
    small: list[tuple[int, int, int, bool]]  # packed: (param, start, end, the whole parameter)
    big: list[tuple[int, int, int, bool]]  # a frame each
    desc: bytes  # pack_desc(recs, frecs)
    params: list[int]  # the parameters whose gradients it reads


class PushBodies:
    """Push bodies for the servers holding ``keys_of[i]`` of ``params``."""

    def __init__(self, params: list[torch.Tensor], keys_of: list[list[KeySpec]], encoder: PushEncoder):
        self.params, self.keys_of, self.encoder = params, keys_of, encoder
        self.plans = [self._plan(keys) for keys in keys_of]

    def _plan(self, keys: list[KeySpec]) -> PlainPush | None:
        """A server's plain push; None when a key may go as sparse rows (its records depend on
        the gradient)."""
        slot = group_slots(keys)[1]  # packed in the server's buffer order: it copies runs, not keys
        keys = [k for k in keys if k.numel]
        if any(k.sparse and len(k.shape) == 2 and k.shape[0] > 1 for k in keys):
            return None
        small = sorted((k for k in keys if k.numel * 4 < PACK_BELOW), key=lambda k: slot[k.id])
        big = [k for k in keys if k.numel * 4 >= PACK_BELOW]
        recs = [KeyRecord(k.id, 0, 0, KEY_PACKED) for k in small] + [KeyRecord(k.id, 0, 1) for k in big]
        frecs = ([FrameRecord(DTYPE_IDS[torch.float32], (sum(k.numel for k in small),))] if small else []) \
            + [FrameRecord(DTYPE_IDS[torch.float32], (k.numel,) if len(k.shape) == 1 else k.shape) for k in big]
        cut = lambda k: (k.param, k.offset, k.offset + k.numel, k.numel == self.params[k.param].numel())  # noqa: E731
        return PlainPush(recs, frecs, [cut(k) for k in small], [cut(k) for k in big], pack_desc(recs, frecs),
                         sorted({k.param for k in keys}))

    def desc(self, i: int, recs: list[KeyRecord]) -> bytes | None:
        """Server ``i``'s packed desc frame when ``recs`` are its plan's (else None: pack them)."""
        plan = self.plans[i]
        return plan.desc if plan is not None and recs is plan.recs else None

    def body(self, i: int) -> Body:
        """Server ``i``'s push body from the parameters' current gradients."""
        grads = [p.grad for p in self.params]
        plan = self.plans[i]
        if plan is not None and self.encoder.active == "none" and all(
                grads[p] is not None and grads[p].dtype == torch.float32 for p in plan.params):
            return self._plain(plan, grads)
        recs, frecs, frames, pack = [], [], [], []
        for k in self.keys_of[i]:
            g = grads[k.param]
            if g is None or k.numel == 0:
                continue
            g = g.reshape(-1)[k.offset:k.offset + k.numel].view(k.shape)
            rec, tensors = self.encoder.encode(k, g)
            recs.append(rec)
            if rec.codec == 0 and not rec.flags and k.numel * 4 < PACK_BELOW:
                rec.ntensors, rec.flags = 0, KEY_PACKED  # small dense key: rides in the pack frame
                pack.append(tensors[0].reshape(-1))
                continue
            for t in tensors:
                frecs.append(frame_record(t))
                frames.append(tensor_frame(t))
        if pack:  # one frame instead of many small ones (each frame costs ~10 us per hop)
            packed = torch.cat(pack) if len(pack) > 1 else pack[0].clone()
            frecs.insert(0, frame_record(packed))
            frames.insert(0, tensor_frame(packed))
        return recs, frecs, frames, bool(pack)

    @staticmethod
    def _plain(plan: PlainPush, grads: list[torch.Tensor]) -> Body:
        """One pack frame for the small keys (one C++ call flattens and joins them; whole
        parameters need no slicing), one frame per large key."""
        frames = [tensor_frame(grads[p].reshape(-1)[a:b]) for p, a, b, _ in plan.big]
        if len(plan.small) == 1 and plan.small[0][3]:  # one whole parameter: its own bytes
            frames.insert(0, tensor_frame(grads[plan.small[0][0]]))
        elif plan.small:
            parts = [grads[p] if whole else grads[p].reshape(-1)[a:b] for p, a, b, whole in plan.small]
            frames.insert(0, tensor_frame(flatten_dense_tensors(parts)))
        return plan.recs, plan.frecs, frames, bool(plan.small)
