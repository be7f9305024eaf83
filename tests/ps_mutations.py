"""Mutated parameter-server pushes for the hostile-input tests: valid pushes of every gradient
codec with one thing broken (a key or frame record field, a value, a record dropped or
repeated, desc bytes flipped, a frame cut or extended) and odd header fields."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import torch

from paratrain.config import Config
from paratrain.ps.placement import KeySpec
from paratrain.ps.protocol import KeyRecord, frame_record, pack_desc, tensor_frame
from paratrain.ps.wire import PushEncoder

CODECS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")


def valid_bodies(keys: list[KeySpec], seed: int = 0) -> list[tuple[list[KeyRecord], list[torch.Tensor]]]:
    """One valid push body (key records, wire tensors) of ``keys`` per codec."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for codec in CODECS:
        enc = PushEncoder(Config.load(None, ["--parallel.sync=ps", f"--compression.gradient={codec}"]).compression)
        recs, tensors = [], []
        for k in keys:
            grad = torch.randn(k.shape, generator=g) * 0.01
            if k.sparse:
                grad[1:] = 0  # (sent as sparse rows)
            r, t = enc.encode(k, grad)
            recs.append(r)
            tensors += t
        out.append((recs, tensors))
    return out


def mutated_pushes(keys: list[KeySpec], n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` keyword sets for ``Peer.send(Msg.PUSH, clock=..., **kw)``, each a valid push broken once."""
    rng = random.Random(seed)
    bodies = valid_bodies(keys, seed)
    ints = [0, 1, 2, 3, 5, 255, -1, 2**31 - 1, -(2**31)]
    for _ in range(n):
        recs0, tensors0 = rng.choice(bodies)
        recs = [KeyRecord(r.key, r.codec, r.ntensors, r.flags, r.info0, r.info1) for r in recs0]
        tensors = [t.clone() for t in tensors0]
        frecs = [frame_record(t) for t in tensors]
        kind = rng.randrange(7)
        if kind == 0:  # a key record field
            r = rng.choice(recs)
            name = rng.choice(["key", "codec", "ntensors", "flags", "info0", "info1"])
            pool = ints if name.startswith("info") else [v for v in ints if 0 <= v < 256]
            setattr(r, name, rng.choice(pool) if name != "key" else rng.choice([0, 99, 2**32 - 1]))
        elif kind == 1:  # a frame record: shape or dtype
            fr = rng.choice(frecs)
            shape = list(fr.shape)
            j = rng.randrange(len(shape))
            shape[j] = rng.choice([0, 1, shape[j] + 1, max(0, shape[j] - 1)])
            fr.shape, fr.dtype = tuple(shape), rng.randrange(8) if rng.random() < 0.3 else fr.dtype
        elif kind == 2:  # one value
            t = rng.choice([t for t in tensors if t.numel()])
            bad = [float("nan"), float("inf"), 3e38] if t.is_floating_point() else [-1, 127, 10**6]
            t.view(-1)[rng.randrange(t.numel())] = rng.choice(bad) if t.dtype != torch.int8 else rng.choice([-128, 127])
        elif kind == 3:  # a record dropped or repeated
            if rng.random() < 0.5:
                recs.pop(rng.randrange(len(recs)))
            else:
                recs.append(rng.choice(recs))
        kw: dict[str, Any] = dict(keys=recs, frame_recs=frecs, frames=[tensor_frame(t) for t in tensors],
                                  f0=rng.choice([0.1, 0.0, float("nan"), -1.0]), f1=rng.choice([1.0, 0.0, -1.0]),
                                  f2=rng.choice([0.0, 0.5, 2.0]), flags=rng.choice([0, 0, 8, 64, rng.randrange(512)]),
                                  version=rng.choice([0, 10**9]), key_start=keys[0].id, key_count=len(keys))
        if kind == 4:  # desc bytes flipped
            desc = bytearray(pack_desc(recs, frecs))
            for _ in range(rng.randint(1, 4)):
                desc[rng.randrange(len(desc))] = rng.randrange(256)
            kw["desc"] = bytes(desc)
        elif kind == 5:  # a frame cut short or extended
            i = rng.randrange(len(kw["frames"]))
            b = bytes(kw["frames"][i])
            kw["frames"][i] = b[:rng.randrange(len(b) + 1)] if rng.random() < 0.5 else b + os.urandom(rng.randint(1, 9))
        yield kw
