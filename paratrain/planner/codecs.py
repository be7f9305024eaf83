"""Bytes of a compressed data-parallel gradient exchange, from the model's shape alone.

The same formulas as ``grad_compression/codecs.py`` and the byte convention of
docs/compression.md, over the weight matrices :meth:`ModelSpec.matrices` lists (every
other parameter counts as a vector).  Two approximations, both well under 1% here: int8
scales are counted per ``int8_chunk`` elements of the whole gradient (the hooks count
them per bucket), and top-k keeps ``ratio`` of the whole (the hooks round up per tensor).
"""

from __future__ import annotations

import math
from typing import Any

from paratrain.planner.flops import ModelSpec

CODECS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")


def _int8(n: float, chunk: int) -> float:
    return n + 4 * math.ceil(n / chunk) if n else 0.0


def payload_bytes(spec: ModelSpec, comp: Any) -> float:
    """Bytes of one rank's compressed gradient (``comp``: a ``[compression]`` section).

    Also what a parameter-server worker pushes per step.
    """
    n, c = spec.params, comp.gradient
    if c not in CODECS:
        raise ValueError(f"unknown gradient codec {c!r}")
    if c == "none":
        return 4.0 * n
    if c in ("fp16", "bf16"):
        return 2.0 * n
    if c == "int8":
        return _int8(n, comp.int8_chunk)
    if c == "topk":
        return 8.0 * math.ceil(comp.topk_ratio * n)
    factors, factored = powersgd_split(spec, comp.powersgd_rank)
    vectors = n - factored
    vec = _int8(vectors, comp.int8_chunk) if comp.powersgd_vectors == "int8" else 4.0 * vectors
    return 4.0 * factors + vec


def powersgd_split(spec: ModelSpec, rank: int) -> tuple[int, int]:
    """(values PowerSGD sends for the matrices it factors, elements of those matrices)."""
    factors = factored = 0
    for rows, cols in spec.matrices():
        r = min(rank, rows, cols)
        if r * (rows + cols) < rows * cols:
            factors += r * (rows + cols)
            factored += rows * cols
    return factors, factored


def wire_bytes(spec: ModelSpec, comp: Any, d: int) -> float:
    """Bytes one of ``d`` data-parallel ranks sends per step over DDP (ring collectives).

    all-reduce of S bytes: ``2 (d-1)/d S``; all-gather of S bytes from each rank: ``(d-1) S``.
    """
    if d <= 1:
        return 0.0
    c = comp.gradient
    ring, gather = 2 * (d - 1) / d, d - 1
    if c in ("none", "fp16", "bf16"):
        return ring * payload_bytes(spec, comp)
    if c in ("int8", "topk") or comp.powersgd_exchange == "allgather":
        return gather * payload_bytes(spec, comp)
    factors, factored = powersgd_split(spec, comp.powersgd_rank)  # shared exchange: P, Q all-reduced
    vectors = spec.params - factored
    if comp.powersgd_vectors == "int8":
        return ring * 4 * factors + gather * _int8(vectors, comp.int8_chunk)
    return ring * 4 * (factors + vectors)


def collective_hops(comp: Any, d: int) -> int:
    """Latency hops of the exchange: a ring all-reduce 2 (d-1), an all-gather d-1; PowerSGD's
    shared exchange runs two all-reduces (P, then Q)."""
    c = comp.gradient
    if c == "powersgd" and comp.powersgd_exchange == "allreduce":
        return 4 * (d - 1)
    return (d - 1) if c in ("int8", "topk", "powersgd") else 2 * (d - 1)
