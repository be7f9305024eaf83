"""Consistency models of the parameter server, as plain bookkeeping (no sockets, no tensors).

* **sync (BSP)** -- :class:`SyncRound`: a round collects one gradient from every live worker;
  the update is their weighted mean (weights = labelled tokens), so it equals DDP on the same
  global batch.  A worker dropped as dead no longer holds a round up.
* **async (ASP)** -- every push is applied on arrival; replies go out at once.
* **ssp** -- pushes are applied on arrival, but the reply that lets a worker start its next
  step is held until ``clock[w] - min(clock of live workers) <= staleness``.  ``clock[w]`` is
  the number of steps worker ``w`` has completed (pushed).  So no worker ever starts a step
  while more than ``s`` clocks ahead of the slowest live worker; :class:`Clocks` records the
  largest gap it ever released (``max_gap``), which the tests check.

:class:`Membership` decides who is live: workers expected by the job (until they first
report, with a generous join grace), seen within ``dead_after_s``, and not yet left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class Membership:
    """Liveness of workers ``0..n-1``: expected -> live -> (dead | left); dead ones may rejoin."""

    def __init__(self, n_workers: int, dead_after_s: float, join_grace_s: float, now: float):
        self.dead_after_s = dead_after_s
        self.join_grace_s = join_grace_s
        self.start = now
        self.state: dict[int, str] = {w: "expected" for w in range(n_workers)}
        self.last_seen: dict[int, float] = {}
        self.dropped: list[int] = []  # every drop, in order (a worker may appear twice)

    def seen(self, w: int, now: float) -> str | None:
        """Record a message from ``w``; returns "joined"/"rejoined" on a state change."""
        self.last_seen[w] = now
        old = self.state.get(w)
        if old == "live":
            return None
        self.state[w] = "live"
        return "joined" if old in (None, "expected") else "rejoined"

    def leave(self, w: int) -> None:
        self.state[w] = "left"

    def expire(self, now: float) -> list[tuple[int, float]]:
        """Drop workers silent for too long; returns ``(worker, silent seconds)`` of new drops."""
        out = []
        for w, st in self.state.items():
            if st == "live" and now - self.last_seen.get(w, now) > self.dead_after_s:
                out.append((w, now - self.last_seen[w]))
            elif st == "expected" and now - self.start > self.join_grace_s:
                out.append((w, now - self.start))
        for w, _ in out:
            self.state[w] = "dead"
            self.dropped.append(w)
        return out

    def live(self) -> set[int]:
        """Workers barriers wait for: live, and expected ones that have not reported yet."""
        return {w for w, st in self.state.items() if st in ("live", "expected")}

    def all_gone(self) -> bool:
        """True when every worker that ever joined has left or died (and none is still expected)."""
        return bool(self.state) and all(st in ("left", "dead") for st in self.state.values())


@dataclass
class SyncRound:
    """One BSP round: contributions of live workers, ready when every live worker contributed."""

    id: int
    weights: dict[int, float] = field(default_factory=dict)
    coef: float | None = None  # clip coefficient known in advance (replayed round)
    lr: float = 0.0

    def add(self, w: int, weight: float) -> None:
        self.weights[w] = weight

    def ready(self, live: set[int]) -> bool:
        return bool(self.weights) and live <= self.weights.keys()

    @property
    def weight_sum(self) -> float:
        return sum(self.weights.values())


class Clocks:
    """Per-worker clocks for SSP/ASP, the staleness gate, and what it released."""

    def __init__(self, staleness: int | None):
        self.staleness = staleness  # None: no bound (ASP)
        self.clock: dict[int, int] = {}
        self.max_gap = 0
        self.gaps: Counter[int] = Counter()  # clock gap at each release

    def set(self, w: int, clock: int) -> None:
        self.clock[w] = clock

    def advance(self, w: int) -> int:
        self.clock[w] = self.clock.get(w, 0) + 1
        return self.clock[w]

    def slowest(self, live: set[int]) -> int:
        """The smallest clock of the live workers (expected ones count as 0)."""
        return min((self.clock.get(w, 0) for w in live), default=0)

    def release(self, w: int, low: int | None) -> int | None:
        """The staleness gate: ``w``'s clock gap when it may start its next step now (the
        release is counted), None while it is more than ``staleness`` ahead.  ``low``: the
        slowest live clock (:meth:`slowest`; None when no worker is live)."""
        c = self.clock.get(w, 0)
        g = c - min(low, c) if low is not None else 0
        if self.staleness is not None and g > self.staleness:
            return None
        self.max_gap = max(self.max_gap, g)
        self.gaps[g] += 1
        return g


class Collective:
    """A small all-reduce / gather / barrier over live workers, keyed by arrival order."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, list[float], object]] = {}

    def add(self, w: int, op: str, values: list[float], reply_to: object) -> None:
        self.pending[w] = (op, values, reply_to)

    def ready(self, live: set[int]) -> bool:
        return bool(self.pending) and live <= self.pending.keys()

    def result(self) -> tuple[str | None, dict[str, object]]:
        """(error or None, result meta) of the pending contributions."""
        ops = {op for op, _, _ in self.pending.values()}
        if len(ops) != 1:
            return f"workers disagree on the collective: {sorted(ops)}", {}
        op = ops.pop()
        workers = sorted(self.pending)
        rows = [self.pending[w][1] for w in workers]
        if op == "sum":
            if len({len(r) for r in rows}) != 1:
                return "sum of vectors of different lengths", {}
            return None, {"values": [sum(col) for col in zip(*rows, strict=False)], "workers": workers}
        if op == "gather":
            return None, {"rows": rows, "workers": workers}
        return None, {"workers": workers}
