"""Which server holds which parameters: keys, chunks and a byte-balanced placement.

Every parameter becomes one or more *keys*, and each server gets about the same bytes:

* ``ordered`` (the default): the parameters are dealt out in reverse order, the order backward
  finishes their gradients, server 0 first; a parameter that crosses a server's fair share
  (total bytes / servers) is cut there, at a row boundary.  So each server's gradients are
  complete at one point of backward, and its push can leave while backward goes on
  (``ps.overlap``; see :mod:`paratrain.ps.overlap`).
* ``balanced``: tensors larger than the fair share are split into chunks, then keys go largest
  first to the least-loaded server (the layout of checkpoints written before ``ordered``).

Chunks are row-aligned, so an embedding's rows stay whole.  Key ids are numbered server by
server, so each server owns one contiguous key range ``[start, start + count)``.  The worker
sends the layout to the servers; its digest guards against a worker whose model differs from
the server's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ParamInfo:
    """What placement needs to know about one parameter."""

    name: str
    shape: tuple[int, ...]
    decay: bool = True  # weight decay applies (AdamW: matrices only; SGD: all)
    sparse: bool = False  # an embedding table: pushes may carry only the touched rows


@dataclass(frozen=True)
class KeySpec:
    """One key: a chunk of rows (or elements) of one parameter, held by one server."""

    id: int
    param: int  # index into the parameter list
    name: str
    offset: int  # first element of the chunk in the flattened parameter
    numel: int
    shape: tuple[int, ...]  # (rows, row_len) for >= 2-D parameters, (numel,) for vectors
    server: int
    decay: bool
    sparse: bool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeySpec:
        return cls(int(d["id"]), int(d["param"]), str(d["name"]), int(d["offset"]), int(d["numel"]),
                   tuple(int(s) for s in d["shape"]), int(d["server"]), bool(d["decay"]), bool(d["sparse"]))


@dataclass
class Layout:
    """All keys of a model over ``n_servers`` servers."""

    keys: list[KeySpec]
    n_servers: int

    def server_keys(self, server: int) -> list[KeySpec]:
        return [k for k in self.keys if k.server == server]

    def key_range(self, server: int) -> tuple[int, int]:
        """(first key id, number of keys) of ``server``."""
        ks = self.server_keys(server)
        return (ks[0].id, len(ks)) if ks else (0, 0)

    def server_bytes(self, server: int, element_size: int = 4) -> int:
        return sum(k.numel for k in self.server_keys(server)) * element_size

    @property
    def digest(self) -> str:
        return layout_digest(self.keys)


def layout_digest(keys: list[KeySpec]) -> str:
    """A short hash of a key table (same model + same servers -> same digest)."""
    text = json.dumps([k.to_json() for k in keys], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chunks(p: ParamInfo, index: int, fair: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(param, offset, numel, shape) pieces of one parameter, each at most about ``fair`` elements."""
    numel = math.prod(p.shape) if p.shape else 1
    if len(p.shape) >= 2:
        rows, row_len = p.shape[0], numel // max(1, p.shape[0])
    else:
        rows, row_len = numel, 1
    n = max(1, min(rows, math.ceil(numel / max(1, fair))))
    per = max(1, math.ceil(rows / n))
    out = []
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        shape = (r1 - r0, row_len) if len(p.shape) >= 2 else ((r1 - r0),)
        out.append((index, r0 * row_len, (r1 - r0) * row_len, shape))
    if not out:  # an empty parameter still gets a (zero-size) key
        out.append((index, 0, 0, (0, row_len) if len(p.shape) >= 2 else (0,)))
    return out


def _ordered(params: list[ParamInfo], n_servers: int, fair: int) -> dict[tuple, int]:
    """Deal the parameters out, last first, in runs of about ``fair`` elements per server,
    cutting at row boundaries: {(param, offset, numel, shape): server}."""
    owner: dict[tuple, int] = {}
    server, room = 0, fair
    for index in reversed(range(len(params))):
        shape = params[index].shape
        numel = math.prod(shape) if shape else 1
        row_len = math.prod(shape[1:]) if len(shape) >= 2 else 1
        rows = shape[0] if len(shape) >= 2 else numel
        end = rows  # rows go from the end of the tensor backwards
        while True:
            last = server == n_servers - 1
            take = end if last or not row_len else min(end, max(0, round(room / row_len)))
            if take or end == 0:
                piece = (take, row_len) if len(shape) >= 2 else (take,)
                owner[(index, (end - take) * row_len, take * row_len, piece)] = server
                end, room = end - take, room - take * row_len
            if end == 0:
                break
            server, room = server + 1, room + fair  # full: the next one, carrying the rounding over
    return owner


def place(params: list[ParamInfo], n_servers: int, order: str = "ordered") -> Layout:
    """Split and assign ``params`` to ``n_servers`` servers, balancing bytes (``order``:
    "ordered" or "balanced", see the module docstring)."""
    if n_servers < 1:
        raise ValueError("need at least one server")
    total = sum(math.prod(p.shape) if p.shape else 1 for p in params)
    fair = math.ceil(total / n_servers) if n_servers > 1 else max(1, total)
    if order == "ordered":
        dealt = _ordered(params, n_servers, fair)
        pieces = list(dealt)
        owner = {(c[0], c[1]): s for c, s in dealt.items()}
    elif order == "balanced":
        pieces = [c for i, p in enumerate(params) for c in _chunks(p, i, fair)]
        load = [0] * n_servers
        owner = {}
        for piece in sorted(pieces, key=lambda c: (-c[2], c[0], c[1])):
            s = min(range(n_servers), key=lambda j: (load[j], j))
            owner[(piece[0], piece[1])] = s
            load[s] += piece[2]
    else:
        raise ValueError(f"unknown placement order {order!r}")
    keys: list[KeySpec] = []
    for s in range(n_servers):
        mine = sorted((c for c in pieces if owner[(c[0], c[1])] == s), key=lambda c: (c[0], c[1]))
        for param, offset, numel, shape in mine:
            p = params[param]
            keys.append(KeySpec(len(keys), param, p.name, offset, numel, shape, s, p.decay, p.sparse))
    return Layout(keys, n_servers)
