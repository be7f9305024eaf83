"""One parameter server: a ZeroMQ ROUTER loop that owns some keys and updates them.

Run by ``python -m paratrain.ps.server_main --config RUN/config.toml --index I --endpoint EP
--workers W --servers S`` (the launcher does this; the shared secret comes from the
``PARATRAIN_PS_SECRET`` environment variable).  The server

* admits only connections that prove they hold the job secret (:mod:`paratrain.ps.auth`),
  bounds, checks and decodes every message (:mod:`paratrain.ps.intake`), rejects and logs bad
  ones (rate-limited) and keeps serving;
* holds its keys' parameters and optimizer state (:class:`~paratrain.ps.shard.Shard`) and
  applies updates itself in the configured consistency mode (:mod:`paratrain.ps.consistency`);
* tracks worker sessions (incarnation + sequence numbers: replayed messages are rejected),
  drops workers silent for ``ps.dead_after_s`` from barriers and lets them rejoin;
* writes its state into the trainer's checkpoints and, restarted, resumes from the newest one
  of this job; workers then replay the pushes it lost (see client/strategy).
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import zmq

from paratrain.config import Config
from paratrain.ps.auth import Trust, ZapGate
from paratrain.ps.consistency import Clocks, Collective, Membership, SyncRound
from paratrain.ps.intake import Intake
from paratrain.ps.placement import KeySpec, layout_digest
from paratrain.ps.protocol import (
    CONTROL_ID,
    Flag,
    Header,
    Message,
    Msg,
    ProtocolError,
    Signer,
    encode,
    frame_tensor,
    send,
)
from paratrain.ps.shard import OptimConfig, Shard, save_shard
from paratrain.ps.updates import UpdateRules, all_finite

SECRET_ENV = "PARATRAIN_PS_SECRET"
REQUESTS = (Msg.HELLO, Msg.INIT, Msg.PUSH, Msg.PULL, Msg.APPLY, Msg.HEARTBEAT, Msg.LEAVE, Msg.CHECKPOINT, Msg.STATS,
            Msg.COLLECT, Msg.SHUTDOWN)
HANDLERS = {int(m): f"_on_{m.name.lower()}" for m in REQUESTS}  # message type -> handler method
JOIN_GRACE_S = 120.0
POLLIN = int(zmq.POLLIN)


def optim_config(cfg: Config) -> OptimConfig:
    """The server-side optimizer: ``ps.optimizer`` or else ``train.optimizer``, as the trainer builds it."""
    t = cfg.train
    return OptimConfig(cfg.ps.optimizer or t.optimizer, t.weight_decay, t.momentum)


def shard_file(index: int) -> str:
    return f"ps_server{index}.pt"


class Session:
    def __init__(self, incarnation: int, seq: int):
        self.incarnation, self.seq, self.hb_seq = incarnation, seq, 0


class ParameterServer(Intake, UpdateRules):
    """The state and message loop of server ``index`` of ``n_servers``."""

    def __init__(self, cfg: Config, index: int, endpoint: str, secret: bytes, n_workers: int, n_servers: int,
                 restart_count: int = 0, resume: Path | None = None, job_id: str = "",
                 log: logging.Logger | None = None, exit_when_done: bool = False):
        ps = cfg.ps
        self.cfg, self.index, self.n_servers, self.job_id = cfg, index, n_servers, job_id
        self.log = log or logging.getLogger(f"paratrain.ps.server{index}")
        self.mode = ps.mode
        self.grad_clip = cfg.train.grad_clip
        self.two_phase = self.mode == "sync" and n_servers > 1 and self.grad_clip > 0
        self.max_bytes = int(ps.max_message_mb * 2**20)
        self.integrity = ps.integrity
        self.signer = Signer(secret)
        self.incarnation = secrets.randbits(31) + 1
        self.restart_count = restart_count
        self.exit_when_done = exit_when_done
        self.run_dir = Path(cfg.run_dir).resolve()
        self.ctx = zmq.Context()
        self.gate = ZapGate(self.ctx, secret)  # bound before the ROUTER: no connection skips it
        self.trust = Trust(secret)
        self._claims: dict[bytes, tuple[int, int]] = {}  # credential -> (worker, incarnation)
        self.sock = self.ctx.socket(zmq.ROUTER)
        ZapGate.guard(self.sock)
        for opt, val in ((zmq.LINGER, 0), (zmq.RCVTIMEO, 1000), (zmq.SNDTIMEO, 1000),
                         (zmq.MAXMSGSIZE, self.max_bytes + 4096), (zmq.SNDHWM, 10000), (zmq.RCVHWM, 1000)):
            self.sock.setsockopt(opt, val)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        now = time.monotonic()
        # workers of a running job re-contact a restarted server within moments; a fresh job may take long
        grace = max(10.0, 2 * ps.dead_after_s) if restart_count else max(JOIN_GRACE_S, ps.dead_after_s)
        self.members = Membership(n_workers, ps.dead_after_s, grace, now)
        self.heartbeat_s = ps.heartbeat_s
        self.sessions: dict[int, Session] = {}
        self.known: dict[int, int] = {}  # worker -> incarnation of its current process
        self.retired: dict[int, list[int]] = {}
        self.applied: dict[int, int] = {}  # worker -> clock of its last push included in the state
        self.clocks = Clocks(ps.staleness if self.mode == "ssp" else (0 if self.mode == "sync" else None))
        self.round = SyncRound(1)
        self.round_nonempty = False  # some push of the open round carried gradients
        self.round_replies: dict[int, tuple[bytes, int, int]] = {}
        self.awaiting_apply = False
        self.deferred: list[tuple[bytes, Message]] = []
        self.held: list[tuple[bytes, int, int, int]] = []  # ssp: (ident, worker, seq, staleness)
        self.collective = Collective()
        self.shard: Shard | None = None
        self._plans, self._plans_for = {}, None  # push plans (updates.PushPlan) and the shard they are for
        self._digests: dict[int, bytes] = {}
        self._digest_version = -1
        self.staleness: Counter[int] = Counter()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.worker_stats: dict[int, dict[str, Any]] = {}
        self._log_window = (0.0, 0)
        self.started = now
        dbg = cfg.debug
        self.kill_at = dbg.kill_server_at_step if dbg.kill_server == index and restart_count == 0 else None
        self.stopping = False
        if resume is not None:
            self._resume(resume)
        if restart_count:  # the job is running: its workers count as live (and silent ones get dropped) now
            for w in self.known:
                if w in self.members.state:
                    self.members.seen(w, now)
        self.log.info("server %d/%d (%s) listening on %s, mode %s, %d workers, incarnation %d", index, n_servers,
                      f"restart {restart_count}" if restart_count else "first start", self.endpoint,
                      self.mode, n_workers, self.incarnation)

    # ---- loop ----------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> None:
        """Serve until SHUTDOWN, ``stop`` is set, or (exit_when_done) every worker is gone."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.gate.sock, zmq.POLLIN)
        tick = max(0.01, min(self.heartbeat_s, self.members.dead_after_s) / 2)
        parent = os.getppid()
        last_check = time.monotonic()
        while not self.stopping and not (stop is not None and stop.is_set()):
            ready = dict(poller.poll(int(tick * 1000)))
            if ready:
                if self.gate.sock in ready:
                    self.gate.handle()
                # EVENTS, not recv until zmq.Again: after a reply the worker's next send races this loop for the CPU
                while not self.stopping and self.sock.get(zmq.EVENTS) & POLLIN:
                    try:
                        self._take()
                    except zmq.Again:
                        break
                    except Exception:  # never exit on input (intake handles all it knows)
                        self.log.exception("unexpected error reading a message")
                        self.rejected["internal"] += 1
            now = time.monotonic()
            if now - last_check >= tick:
                last_check = now
                self._expire(now)
                if self.exit_when_done and self.members.all_gone():
                    self.log.info("every worker has left; exiting")
                    break
                if stop is None and os.getppid() != parent:
                    self.log.warning("launcher is gone; exiting")
                    break

    def close(self) -> None:
        self.sock.close(linger=0)
        self.gate.close()
        self.ctx.term()

    def _reply(self, ident: bytes, req: Header, mtype: Msg, meta: dict | None = None, frames: list = (),
               track: bool = False, digests: dict[int, bytes] | None = None, sign: bool = True,
               **fields: Any) -> None:
        h = Header(int(mtype), worker=req.worker, incarnation=self.incarnation, seq=req.seq,
                   version=self.shard.version if self.shard else 0, **fields)
        signer = self.signer if sign and self.integrity == "mac" else None
        parts = encode(signer, h, meta=meta, frames=frames, digests=digests if signer else None)
        self.counters["bytes_out"] += h.length
        try:
            trackers = send(self.sock, [ident, *parts], track=track)
        except zmq.ZMQError as e:  # the peer is gone (ROUTER drops), or send timed out
            self.log.warning("reply to worker %d failed: %s", req.worker, e)
            return
        if trackers and self.shard is not None:
            self.shard.trackers.extend(trackers)

    # ---- sessions ----------------------------------------------------------------------------------
    def _session(self, msg: Message) -> str:
        """Check incarnation and sequence: "new" (a new worker process said HELLO), "ok" or "ignore"."""
        h = msg.header
        w, s = h.worker, self.sessions.get(h.worker)
        if h.type == Msg.HELLO and h.flags & Flag.PROBE:
            return "ok"
        if h.type == Msg.HEARTBEAT:
            if s is None or s.incarnation != h.incarnation:
                # a sign of life only from the worker process this server knows (e.g. after its restart)
                return "ok" if self.known.get(w) == h.incarnation else "ignore"
            if h.seq <= s.hb_seq:
                raise ProtocolError("replayed", f"heartbeat seq {h.seq} from worker {w} already seen")
            s.hb_seq = h.seq
            return "ok"
        if h.type == Msg.HELLO and (s is None or s.incarnation != h.incarnation):
            if h.incarnation in self.retired.get(w, []):
                raise ProtocolError("replayed", f"HELLO from a retired session of worker {w}")
            new_process = self.known.get(w) != h.incarnation
            if new_process and w in self.known:
                self.retired.setdefault(w, []).append(self.known[w])
                del self.retired[w][:-64]
            self.known[w] = h.incarnation
            self.sessions[w] = Session(h.incarnation, h.seq)
            return "new" if new_process else "ok"
        if s is None or s.incarnation != h.incarnation:
            raise ProtocolError("no session", f"worker {w} must say HELLO first (server restarted?)")
        if h.seq <= s.seq:
            raise ProtocolError("replayed", f"seq {h.seq} from worker {w} already seen")
        s.seq = h.seq
        return "ok"

    def _dispatch(self, ident: bytes, msg: Message) -> None:
        h = msg.header
        name = HANDLERS.get(h.type)
        if name is None:
            raise ProtocolError("unknown type", f"{Msg(h.type).name} is not a request")
        handler = getattr(self, name)
        if h.worker == CONTROL_ID:
            if h.type not in (Msg.HELLO, Msg.STATS, Msg.SHUTDOWN):
                raise ProtocolError("unknown type", f"{Msg(h.type).name} from the control client")
        elif h.worker not in self.members.state:
            raise ProtocolError("malformed", f"worker id {h.worker} is not in this job")
        status = self._session(msg)
        if h.type == Msg.HEARTBEAT and self.members.state.get(h.worker) == "left":
            status = "ignore"  # a heartbeat that crossed the LEAVE does not bring the worker back
        if h.worker != CONTROL_ID and status != "ignore" and h.type != Msg.LEAVE:
            if self.members.seen(h.worker, time.monotonic()) == "rejoined":
                self.log.warning("worker %d rejoined", h.worker)
        if h.type == Msg.HELLO:
            handler(ident, msg, status == "new")
        else:
            handler(ident, msg)

    # ---- handlers ------------------------------------------------------------------------------------
    def _on_hello(self, ident: bytes, msg: Message, new_process: bool) -> None:
        h, w = msg.header, msg.header.worker
        if new_process and w != CONTROL_ID:
            # a (re)started worker process: its clock continues from where it says it is
            self.log.info("worker %d joined (process %d) at clock %d", w, h.incarnation, h.clock)
            restarted = w in self.applied
            self.applied[w] = h.clock
            slowest = self.clocks.slowest(self.members.live() - {w})
            # a restarted worker must not hold the others back: it rejoins at the slowest clock
            self.clocks.set(w, max(h.clock, slowest) if self.mode == "ssp" and restarted else h.clock)
        meta = {"incarnation": self.incarnation, "initialized": self.shard is not None,
                "version": self.shard.version if self.shard else 0, "applied": self.applied.get(w, 0),
                "index": self.index, "mode": self.mode}
        if self.shard is not None:
            meta["digest"] = layout_digest(self.shard.keys)
        self._reply(ident, h, Msg.REPLY, meta=meta, flags=int(h.flags & Flag.PROBE))

    def _on_init(self, ident: bytes, msg: Message) -> None:
        if self.shard is None:
            try:
                keys = [KeySpec.from_json(k) for k in msg.meta["keys"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ProtocolError("malformed", f"INIT key table: {e}") from None
            if len(msg.frames) != len(keys) or any(k.server != self.index for k in keys) \
                    or len({k.id for k in keys}) != len(keys):
                raise ProtocolError("malformed", "INIT frames do not match its key table")
            values = []
            for k, f in zip(keys, msg.frames, strict=False):
                if len(f) != 4 * k.numel:
                    raise ProtocolError("wrong length", f"INIT key {k.id}: {len(f)} bytes for {k.numel} floats")
                values.append(frame_tensor(f, torch.float32, (k.numel,)).clone())
            if not all_finite(values):
                raise ProtocolError("bad value", "INIT values are not all finite")
            self.shard = Shard(keys, values, optim_config(self.cfg))
            self.log.info("initialised by worker %d: %d keys, %.2f MB", msg.header.worker, len(keys),
                          self.shard.numel * 4 / 2**20)
        self._reply(ident, msg.header, Msg.REPLY, meta={"digest": layout_digest(self.shard.keys)})

    def _on_heartbeat(self, ident: bytes, msg: Message) -> None:
        if isinstance(msg.meta.get("stats"), dict) and msg.header.worker in self.members.state:
            self.worker_stats[msg.header.worker] = msg.meta["stats"]

    def _on_leave(self, ident: bytes, msg: Message) -> None:
        w = msg.header.worker
        self.members.leave(w)
        self.log.info("worker %d left", w)
        self._reply(ident, msg.header, Msg.REPLY)
        self._membership_changed()

    def _on_checkpoint(self, ident: bytes, msg: Message) -> None:
        shard = self._require_shard()
        raw = msg.meta.get("path")
        path = Path(raw).resolve() if isinstance(raw, str) and raw and "\0" not in raw else None
        if path is None or not path.is_relative_to(self.run_dir) or path == self.run_dir:
            raise ProtocolError("bad path", f"checkpoint path {str(raw)[:200]!r} is not inside the run directory")
        if not path.is_dir():
            raise ProtocolError("bad path", f"checkpoint dir {path} does not exist")
        save_shard(path / shard_file(self.index), shard, self._bookkeeping())
        self.log.info("checkpoint at version %d -> %s", shard.version, path)
        self._reply(ident, msg.header, Msg.REPLY, meta={"file": shard_file(self.index)})

    def _bookkeeping(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "applied": dict(self.applied), "known": dict(self.known),
                "retired": {w: list(v) for w, v in self.retired.items()}, "clocks": dict(self.clocks.clock),
                "staleness": dict(self.staleness), "max_gap": self.clocks.max_gap, "index": self.index}

    def _resume(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.shard = Shard.from_state_dict(state["shard"])
        self.applied = {int(w): int(c) for w, c in state["applied"].items()}
        self.known = {int(w): int(i) for w, i in state["known"].items()}
        self.retired = {int(w): [int(i) for i in v] for w, v in state["retired"].items()}
        for w, c in state["clocks"].items():
            self.clocks.set(int(w), int(c))
        self.staleness.update({int(k): int(v) for k, v in state["staleness"].items()})
        self.clocks.max_gap = int(state["max_gap"])
        self.round = SyncRound(self.shard.version + 1)
        self.log.info("resumed from %s at version %d", path, self.shard.version)

    def _on_stats(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, msg.header, Msg.REPLY, meta=self.stats())

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "incarnation": self.incarnation, "restarts": self.restart_count,
                "version": self.shard.version if self.shard else 0,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "counters": dict(self.counters), "rejected": dict(self.rejected),
                "refused_connections": self.gate.refused,
                "staleness_hist": {str(k): v for k, v in sorted(self.staleness.items())},
                "max_clock_gap": self.clocks.max_gap,
                "clock_gaps": {str(k): v for k, v in sorted(self.clocks.gaps.items())},
                "dropped": list(self.members.dropped), "live": sorted(self.members.live()),
                "workers": {str(w): s for w, s in sorted(self.worker_stats.items())},
                "uptime_s": time.monotonic() - self.started}

    def _on_collect(self, ident: bytes, msg: Message) -> None:
        op, values = msg.meta.get("op"), msg.meta.get("values", [])
        if op not in ("sum", "gather", "barrier"):
            raise ProtocolError("malformed", f"collective {str(op)[:40]!r}")
        if not isinstance(values, list) or not all(type(v) in (int, float) for v in values):
            raise ProtocolError("malformed", f"collective {op}: values must be a list of numbers")
        if isinstance(msg.meta.get("stats"), dict):
            self.worker_stats[msg.header.worker] = msg.meta["stats"]
        self.collective.add(msg.header.worker, op, [float(v) for v in values], (ident, msg.header))
        self._check_collective()

    def _check_collective(self) -> None:
        if not self.collective.ready(self.members.live()):
            return
        error, result = self.collective.result()
        for _, _, (ident, req) in self.collective.pending.values():
            if error:
                self._reply(ident, req, Msg.ERROR, meta={"error": error, "kind": "collective"})
            else:
                self._reply(ident, req, Msg.REPLY, meta=result)
        self.collective.pending.clear()

    def _on_shutdown(self, ident: bytes, msg: Message) -> None:
        self.log.info("shutdown requested")
        self._reply(ident, msg.header, Msg.REPLY)
        self.stopping = True

    # ---- liveness ------------------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        dropped = self.members.expire(now)
        for w, silent in dropped:
            self.log.warning("worker %d dropped: silent for %.1f s (ps.dead_after_s = %.1f)", w, silent,
                             self.members.dead_after_s)
        if dropped:
            self._membership_changed()

    def _membership_changed(self) -> None:
        if self.shard is not None:
            self._check_round()
            self._release_held()
        self._check_collective()
