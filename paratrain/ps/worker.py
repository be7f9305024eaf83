"""A worker's side of the parameter-server protocol, on the model's tensors.

:class:`PSWorker` pushes one step's gradients to every server in parallel (one request in
flight per server), installs the parameters the servers send back, and handles the
consistency modes' differences:

* ``sync``: push, wait for the round; with several servers and gradient clipping, a second
  phase sends the global clip coefficient (the servers report their shard's squared norm).
* ``ssp``: push, wait (the server holds the reply while this worker is too far ahead).
* ``async``: push and return at once -- the next step's forward/backward runs while the push
  and the parameter reply travel; the reply is installed before the following push.

With ``wait=False`` (the trainer's path in sync and ssp mode) :meth:`PSWorker.step` returns
once the push is out, and the reply is installed by :meth:`PSWorker.finish`, which the
strategy calls just before the next forward: the round trip overlaps the trainer's
bookkeeping and the next batch's loading, and no forward ever runs on parameters older than
the mode allows.  In sync and ssp mode a server's push can also leave during backward
(:meth:`PSWorker.push_early`, driven by :mod:`paratrain.ps.overlap`); ``step`` then pushes
only the servers whose gradients were not complete yet.  Push bodies are built by
:class:`~paratrain.ps.bodies.PushBodies`.

Recovery: each completed push (its encoded frames, learning rate, weight and clip
coefficient) goes to a :class:`~paratrain.ps.pushlog.PushLog` on disk until the servers have
checkpointed past it.  When a server comes back as a new process it reports the last clock of
ours it has; the worker reads the later pushes back and replays them in order, so every update
the worker saw acknowledged is in the restored state.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paratrain.ps.bodies import PushBodies
from paratrain.ps.client import RESTARTED, PSClient, PSError
from paratrain.ps.landing import Landing
from paratrain.ps.placement import KeySpec, Layout, layout_digest
from paratrain.ps.protocol import (
    Flag,
    Message,
    Msg,
    tensor_frame,
)
from paratrain.ps.pushlog import Entry, PushLog
from paratrain.ps.shard import clip_coef
from paratrain.ps.wire import PushEncoder

log = logging.getLogger("paratrain.ps.worker")


@dataclass
class StepStats:
    rtt_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)
    staleness: Counter = field(default_factory=Counter)
    max_gap: int = 0
    pushes: int = 0
    early: int = 0  # server pushes sent during backward


class PSWorker:
    """Pushes, pulls and recovery for the model parameters ``params`` laid out as ``layout``."""

    def __init__(self, client: PSClient, layout: Layout, params: list[torch.Tensor], encoder: PushEncoder,
                 mode: str, two_phase: bool, keep_log: bool, max_norm: float = 0.0, log_dir: Path | None = None):
        """``keep_log``: keep pushes for replay, in ``log_dir`` (a private temp dir when None)."""
        self.client, self.layout, self.params, self.encoder = client, layout, params, encoder
        self.mode, self.two_phase, self.keep_log, self.max_norm = mode, two_phase, keep_log, max_norm
        self.servers = list(range(layout.n_servers))
        self.keys_of = [layout.server_keys(i) for i in self.servers]
        self.key_ranges = [layout.key_range(i) for i in self.servers]
        self.landing = Landing(params, self.keys_of)  # where PARAMS replies go (one frame per server)
        self.reply_numel = [self.landing.numel(i) for i in self.servers]
        self.clock = 0  # pushes sent
        self.clock_done = 0  # pushes whose reply was installed
        self.versions = [0] * layout.n_servers
        self.pushlog = PushLog(log_dir) if keep_log else None
        self.bodies = PushBodies(params, self.keys_of, encoder)
        self.inflight: dict[int, int] = {}
        self.early: Entry | None = None  # this step's entry, while push_early has sent part of it
        self.current: Entry | None = None
        self.stats = StepStats()
        self.recoveries = 0

    # ---- setup -------------------------------------------------------------------------------
    def connect(self, clock: int) -> None:
        """HELLO every server; initialise the ones without parameters; pull the current values."""
        self.clock = self.clock_done = clock
        metas = {i: self._hello(i) for i in self.servers}
        for i, meta in metas.items():
            if not meta["initialized"]:
                self._init(i)
            elif meta.get("digest") != layout_digest(self.keys_of[i]):
                raise PSError(f"parameter server {i} holds a different model (layout {meta.get('digest')} vs "
                              f"{layout_digest(self.keys_of[i])}); start it for this config or remove its checkpoint "
                              "(one from before ps.placement = 'ordered' resumes with ps.placement = 'balanced')")
        self.pull()

    def _hello(self, i: int) -> dict[str, Any]:
        while True:
            self.client.reset_server(i)
            rep = self.client.call(i, Msg.HELLO, clock=self.clock_done)
            if rep != RESTARTED:
                return rep.meta

    def _init(self, i: int) -> None:
        keys = self.keys_of[i]
        frames = [tensor_frame(self._param_view(k)) for k in keys]
        rep = self.client.call(i, Msg.INIT, meta={"keys": [k.to_json() for k in keys]}, frames=frames)
        if rep == RESTARTED:
            raise PSError(f"parameter server {i} restarted during initialisation")

    def _param_view(self, k: KeySpec) -> torch.Tensor:
        return self.params[k.param].data.view(-1)[k.offset:k.offset + k.numel]

    def pull(self) -> None:
        """Fetch the latest parameters from every server."""
        replies = self._exchange({i: self.client.send(i, Msg.PULL) for i in self.servers},
                                 lambda i: self.client.send(i, Msg.PULL))
        for i, m in replies.items():
            self._install(i, m, record=False)

    def _install(self, i: int, msg: Message, record: bool = True) -> None:
        n = self.reply_numel[i]
        got = [len(f) for f in msg.frames]
        if msg.type != Msg.PARAMS or got != [4 * n]:
            raise PSError(f"parameter server {i} sent {Msg(msg.type).name} with frames of {got} bytes where "
                          f"one frame of {4 * n} bytes (its parameters) was expected")
        self.landing.land(i, msg.frames[0])
        self.versions[i] = msg.header.version
        if record:
            self.stats.staleness[int(msg.header.f0)] += 1
            self.stats.max_gap = max(self.stats.max_gap, int(msg.header.f1))

    # ---- pushes --------------------------------------------------------------------------------
    def _new_entry(self, lr: float, weight: float) -> Entry:
        self.clock += 1
        return Entry(self.clock, lr, weight, {}, list(self.versions))

    def _send_push(self, i: int, e: Entry) -> int:
        recs, frecs, frames, packed = e.bodies[i]
        start, count = self.key_ranges[i]
        flags = (Flag.HAS_COEF if e.coef is not None else 0) | (Flag.PACKED if packed else 0)
        e.sent_at = time.perf_counter()
        return self.client.send(i, Msg.PUSH, keys=recs, frame_recs=frecs, frames=frames, clock=e.clock,
                                desc=self.bodies.desc(i, recs),
                                version=e.base[i], key_start=start, key_count=count, flags=int(flags),
                                f0=e.lr, f1=e.weight, f2=e.coef or 0.0)

    def step(self, lr: float, weight: float, wait: bool = True) -> None:
        """Push this step's gradients (then drop them) and install fresh parameters per the mode.

        ``async`` never waits here (the reply is installed before the next push); with
        ``wait=False`` sync and ssp do not either: call :meth:`finish` before the parameters
        are next used.  Servers already pushed by :meth:`push_early` this step are not pushed
        again."""
        e, self.early = self.early, None
        early = e is not None
        if e is None:
            e = self._new_entry(lr, weight)
        for i in self.servers:
            if i not in e.bodies:
                e.bodies[i] = self.bodies.body(i)
        for p in self.params:
            p.grad = None
        if not early:  # (push_early ran only with nothing in flight)
            self.finish()
        self.current = e
        for i in self.servers:
            if i not in self.inflight:
                self.inflight[i] = self._send_push(i, e)
        if wait and self.mode != "async":
            self._complete()

    def push_early(self, i: int, lr: float, weight: float) -> None:
        """Push server ``i``'s share of this step's gradients now, while backward still runs
        (sync / ssp: nothing is in flight then).  The caller guarantees they are final;
        :meth:`step` pushes the other servers."""
        if self.inflight and self.early is None:
            raise RuntimeError("push_early with a push in flight: finish() it first (sync / ssp only)")
        if self.early is None:
            self.early = self._new_entry(lr, weight)
            self.current = self.early
        e = self.early
        e.bodies[i] = self.bodies.body(i)
        self.inflight[i] = self._send_push(i, e)
        self.stats.early += 1

    def _complete(self) -> None:
        e = self.current
        t0 = time.perf_counter()
        installed: set[int] = set()

        def land(i: int, m: Message) -> None:  # install each server's parameters as they arrive
            if m.type == Msg.PARAMS:
                self._install(i, m)
                installed.add(i)

        replies = self._exchange(self.inflight, lambda i: self._send_push(i, e), land)
        phase1 = {i: m for i, m in replies.items() if m.header.flags & Flag.PHASE1}
        if phase1:  # sync, several servers, clipping: every server needs the global norm
            e.coef = clip_coef(sum(m.header.f0 for m in phase1.values()), self.max_norm)
            rounds = {i: int(m.header.clock) for i, m in phase1.items()}
            send = lambda i: self.client.send(i, Msg.APPLY, clock=rounds[i], f0=e.coef)
            replies.update(self._exchange({i: send(i) for i in phase1}, send, land))
        now = time.perf_counter()
        self.stats.wait_ms.append((now - t0) * 1000)
        arrived = max((m.received_at for m in replies.values()), default=now) or now
        self.stats.rtt_ms.append((arrived - e.sent_at) * 1000)  # push out -> parameters back
        for i, m in replies.items():
            if i not in installed:  # (a reply that came through a recovery)
                self._install(i, m)
        self.inflight = {}
        self.clock_done = e.clock
        self.stats.pushes += 1
        if self.pushlog is not None:  # acknowledged: kept (on disk) until the servers checkpoint it
            self.pushlog.append(e)

    def finish(self) -> None:
        """Complete the push in flight, if any (async mode)."""
        if self.inflight:
            self._complete()

    def _exchange(self, pending: dict[int, int], resend: Callable[[int], int],
                  each: Callable[[int, Message], None] | None = None) -> dict[int, Message]:
        """Wait for ``pending``; a restarted server is recovered, then asked again.  ``each`` is
        called on every reply as it arrives (while others are still on their way)."""
        out: dict[int, Message] = {}
        while pending:
            again = {}
            for i, m in self.client.wait(pending, each=each).items():
                if m == RESTARTED:
                    rep = self.recover(i)
                    if rep is not None:
                        out[i] = rep
                    else:
                        again[i] = resend(i)
                else:
                    out[i] = m
            pending = again
        return out

    def recover(self, i: int) -> Message | None:
        """Re-open server ``i`` after a restart and replay the pushes it lost.

        Returns the server's reply to the current push when the replay included it."""
        self.recoveries += 1
        meta = self._hello(i)
        if not meta["initialized"]:
            log.warning("server %d restarted without a checkpoint: re-seeding it from this worker "
                        "(its optimizer state starts over)", i)
            self._init(i)
            applied = self.clock_done
        else:
            applied = int(meta["applied"])
        last: tuple[Entry, Message] | None = None
        replayed = 0
        for e in self._replayable(applied):
            rep = self.client.wait({i: self._send_push(i, e)})[i]
            if rep == RESTARTED:
                return self.recover(i)
            last, replayed = (e, rep), replayed + 1
            if rep.type == Msg.PARAMS:
                self._install(i, rep)
        log.warning("server %d recovered: it had our clock %d, replayed %d push(es)", i, applied, replayed)
        return last[1] if last is not None and last[0] is self.current and self.inflight else None

    def _replayable(self, applied: int) -> Iterator[Entry]:
        """Pushes the restarted server lacks, oldest first: the logged ones (read back from
        disk), then the push in flight (logged only once complete)."""
        done = applied
        logged = self.pushlog.entries_after(applied) if self.pushlog is not None else iter(())
        for e in itertools.chain(logged, [self.current] if self.current is not None else []):
            if e.clock > done and not (self.two_phase and e.coef is None):
                done = e.clock
                yield e

    def trim(self, upto: int) -> None:
        """Forget pushes the servers have checkpointed (clock <= ``upto``)."""
        if self.pushlog is not None:
            self.pushlog.trim(upto)

    def log_stats(self) -> dict[str, int]:
        """Push-log bytes in memory (the most since the last call) and on disk now."""
        lg = self.pushlog
        if lg is None:
            return {}
        out = {"mem": lg.peak_mem_bytes, "disk": lg.disk_bytes}
        lg.peak_mem_bytes = lg.mem_bytes
        return out

    # ---- other requests ----------------------------------------------------------------------------
    def request(self, i: int, mtype: Msg, meta: dict[str, Any]) -> dict[str, Any]:
        """A control request (collective, checkpoint) that must succeed, across server restarts."""
        self.finish()
        send = lambda j: self.client.send(j, mtype, meta=meta)
        return self._exchange({i: send(i)}, send)[i].meta

    def try_stats(self, i: int) -> dict[str, Any] | None:
        """Server ``i``'s counters, or None when it is being restarted (best effort)."""
        rep = self.client.wait({i: self.client.send(i, Msg.STATS)})[i]
        return None if rep == RESTARTED else rep.meta

    def leave(self) -> None:
        """Finish the last push and tell every server this worker is done."""
        self.finish()
        pending = {i: self.client.send(i, Msg.LEAVE) for i in self.servers}
        try:
            self.client.wait(pending, timeout=5.0)
        except PSError:
            pass
        self.close_log()

    def close_log(self) -> None:
        """Delete the push log (the worker is done with it)."""
        if self.pushlog is not None:
            self.pushlog.close()
