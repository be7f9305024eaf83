"""Hang diagnosis: a watchdog thread on every rank that turns a silent hang into a clear exit.

When ``train.hang_timeout_s`` > 0, each rank records the collectives it calls (name,
sequence number, bytes) and publishes that state, its step and where its main thread is,
about once a second, to a side channel that does not go through the (possibly stuck)
process group: the c10d TCPStore at MASTER_ADDR:MASTER_PORT (torch elastic's agent store),
or files under ``RUN_DIR/hang/`` when there is no store.

When no step finishes within the timeout, every rank dumps its Python stacks and its last
collectives (stderr and ``RUN_DIR/hang/rank{r}.txt``); rank 0 compares the ranks' states
and prints one line naming the rank(s) that are behind and the collective they have not
entered (also written to ``RUN_DIR/hang/diagnosis.txt``); then every rank exits with
:data:`HANG_EXIT_CODE` so the job fails instead of hanging.

Collectives are recorded by wrapping the ``torch.distributed`` functions the trainer and
the strategies call (``dist.all_reduce`` etc.).  Calls made from C++ (DDP's initial
broadcast) or through functional collectives (DTensor) are not seen: "last collective" is
best effort, the step counter and stacks are always there.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HANG_EXIT_CODE = 3

_RECORDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "gather", "scatter",
             "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv")


def _nbytes(args: tuple, kwargs: dict) -> int:
    """Bytes of the tensors among a collective's first arguments (lists of tensors included)."""
    total = 0
    for a in list(args[:2]) + [v for k, v in kwargs.items() if k in ("tensor", "input", "input_tensor")]:
        items = a if isinstance(a, (list, tuple)) else [a]
        total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


class CollectiveLog:
    """Records every ``torch.distributed`` collective this process calls, with a sequence number."""

    def __init__(self, keep: int = 8):
        self.seq = 0
        self.keep = keep
        self.history: list[dict[str, Any]] = []
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        for name in _RECORDED:
            fn = getattr(dist, name, None)
            if fn is not None and name not in self._saved:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            self.seq += 1
            entry = {"seq": self.seq, "name": name, "bytes": _nbytes(args, kwargs), "state": "in progress",
                     "t": time.time()}
            self.history = (self.history + [entry])[-self.keep:]
            out = fn(*args, **kwargs)
            entry["state"] = "issued (async)" if kwargs.get("async_op") or name in ("isend", "irecv") else "done"
            return out

        return recorded

    @property
    def last(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


# ---- the side channel -----------------------------------------------------------------------
class _FileChannel:
    """Key/value files in a directory (one host, or a run dir on a shared file system)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def set(self, key: str, value: str) -> None:
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(value)
        os.replace(tmp, self.root / key)

    def get(self, key: str) -> str | None:
        p = self.root / key
        return p.read_text() if p.exists() else None


class _StoreChannel:
    """Keys in the job's c10d TCPStore (reachable from every host of a torchrun job)."""

    def __init__(self, store: Any, prefix: str):
        self.store, self.prefix = store, prefix

    def set(self, key: str, value: str) -> None:
        self.store.set(self.prefix + key, value)

    def get(self, key: str) -> str | None:
        k = self.prefix + key
        return self.store.get(k).decode() if self.store.check([k]) else None


def _open_channel(run_dir: Path) -> _FileChannel | _StoreChannel:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            store = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
            return _StoreChannel(store, f"paratrain/watchdog/{run_id}/{attempt}/")
        except Exception:  # noqa: BLE001 - fall back to files: the watchdog must not break training
            pass
    return _FileChannel(run_dir / "hang" / "state" / f"{run_id}-{attempt}")


# ---- where a thread is ------------------------------------------------------------------------
def _where(frame) -> str:
    """The innermost paratrain frame of a stack (else the innermost frame), as 'file:line in func'."""
    frames = traceback.extract_stack(frame)
    ours = [f for f in frames if f"{os.sep}paratrain{os.sep}" in f.filename and "watchdog" not in f.filename]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def _stacks() -> str:
    """Python stacks of every thread but the watchdog's own."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident != me:
            out.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def _describe(c: dict[str, Any] | None, state: bool = True) -> str:
    if not c:
        return "no collective yet"
    return f"#{c['seq']} {c['name']} ({c['bytes']:,} B" + (f", {c['state']})" if state else ")")


# ---- the diagnosis ------------------------------------------------------------------------------
def diagnose(states: dict[int, dict[str, Any] | None], timeout_s: float) -> str:
    """One line naming the rank(s) that are behind and the collective they have not entered.

    ``states`` maps every rank to its last published state (None if it never reported).
    """
    head = f"hang: no training step finished in {timeout_s:g}s"
    silent = sorted(r for r, s in states.items() if s is None)
    live = {r: s for r, s in states.items() if s is not None}
    if silent:
        return f"{head}; rank(s) {_ranks(silent)} never reported (dead, or stuck before training began)"
    now = time.time()
    stale = sorted(r for r, s in live.items() if now - s["t"] > max(5.0, timeout_s))
    seqs = {r: (s["coll"] or {}).get("seq", 0) for r, s in live.items()}
    steps = {r: s["step"] for r, s in live.items()}
    behind = sorted(r for r in live if seqs[r] < max(seqs.values()))
    if not behind:
        behind = sorted(r for r in live if steps[r] < max(steps.values()))
    if not behind:
        if stale:
            return f"{head}; rank(s) {_ranks(stale)} stopped reporting (process frozen?)"
        where = "; ".join(f"rank {r} at {s['where']}" for r, s in sorted(live.items()))
        return (f"{head}; no rank is behind: all are at step {max(steps.values())}, last collective "
                f"{_describe(live[min(live)]['coll'])}; {where}")
    leaders = sorted(r for r in live if r not in behind)
    # the first collective a behind rank has not entered, as the leaders recorded it
    first = min(seqs[r] for r in behind) + 1
    missing = next((c for r in leaders for c in live[r]["history"] if c["seq"] == first), None)
    parts = [f"rank {r} (step {steps[r]}, last collective {_describe(live[r]['coll'])}, at {live[r]['where']}"
             + (", not reporting" if r in stale else "") + ")" for r in behind]
    miss = _describe(missing, state=False) if missing else f"#{first}"
    return (f"{head}; behind: {'; '.join(parts)}; missing collective {miss}, "
            f"which rank(s) {_ranks(leaders)} are waiting in")


def _ranks(rs: list[int]) -> str:
    return ", ".join(str(r) for r in rs)


# ---- the watchdog thread ----------------------------------------------------------------------
class Watchdog:
    """Per-rank hang detector; ``step_done`` from the training loop, ``stop`` at the end."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, run_dir: Path, record: bool = True):
        self.timeout_s, self.rank, self.world = timeout_s, rank, world_size
        self.run_dir = Path(run_dir)
        self.interval = min(2.0, max(0.2, timeout_s / 5))
        self.log = CollectiveLog()
        self.record = record and world_size > 1
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread: threading.Thread | None = None
        self.channel: _FileChannel | _StoreChannel | None = None
        self.exit = os._exit  # replaced in tests

    def start(self) -> Watchdog:
        if self.record:
            self.log.install()
        if self.world > 1:
            self.channel = _open_channel(self.run_dir)
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="paratrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def step_done(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.log.uninstall()

    # -- thread side
    def state(self) -> dict[str, Any]:
        frame = sys._current_frames().get(self._main)
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                "t": time.time(), "coll": self.log.last, "history": list(self.log.history),
                "where": _where(frame) if frame is not None else "?"}

    def _publish(self, extra: dict[str, Any] | None = None) -> None:
        if self.channel is not None:
            self.channel.set(f"rank{self.rank}", json.dumps({**self.state(), **(extra or {})}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if time.monotonic() - self._last > self.timeout_s:
                    self._fire()
                    return
                self._publish()
            except Exception as e:  # noqa: BLE001 - never let the watchdog break training
                print(f"[rank {self.rank}] watchdog: {e}", file=sys.stderr)

    def _fire(self) -> None:
        last = self.log.last
        dump = (f"[rank {self.rank}] no step finished in {self.timeout_s:g}s (last finished step {self.step}); "
                f"last collective {_describe(last)}; {self.log.seq} collectives so far\n"
                + "".join(f"[rank {self.rank}]   recent collective {_describe(c)}\n" for c in self.log.history)
                + _stacks())
        sys.stderr.write(dump + "\n")
        sys.stderr.flush()
        hang_dir = self.run_dir / "hang"
        try:
            hang_dir.mkdir(parents=True, exist_ok=True)
            (hang_dir / f"rank{self.rank}.txt").write_text(dump)
        except OSError:
            pass
        self._publish({"hung": True})
        deadline = time.monotonic() + max(3.0, min(self.timeout_s, 15.0))
        if self.rank == 0:
            states = self._collect(deadline)
            line = "paratrain: " + diagnose(states, self.timeout_s)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            try:
                (hang_dir / "diagnosis.txt").write_text(line + "\n")
            except OSError:
                pass
            if self.channel is not None:
                self.channel.set("diagnosed", "1")
        elif self.channel is not None:
            # give rank 0 time to read every state and print before the agent tears the job down
            while time.monotonic() < deadline and self.channel.get("diagnosed") is None:
                time.sleep(0.1)
        self.exit(HANG_EXIT_CODE)

    def _collect(self, deadline: float) -> dict[int, dict[str, Any] | None]:
        """Rank 0: every rank's state, waiting (until ``deadline``) for the others to time out too."""
        states: dict[int, dict[str, Any] | None] = {0: self.state()}
        while True:
            for r in range(1, self.world):
                raw = self.channel.get(f"rank{r}") if self.channel is not None else None
                states[r] = json.loads(raw) if raw else None
            others = [states[r] for r in range(1, self.world)]
            if all(s and s.get("hung") for s in others) or time.monotonic() > deadline:
                return states
            time.sleep(0.1)


def start_watchdog(timeout_s: float, rank: int, world_size: int, run_dir: Path) -> Watchdog | None:
    """Start the watchdog when ``timeout_s`` > 0 (else None)."""
    if timeout_s <= 0:
        return None
    return Watchdog(timeout_s, rank, world_size, run_dir).start()


def read_diagnosis(run_dir: Path, since: float) -> str | None:
    """The hang diagnosis line rank 0 wrote in this run (newer than ``since``), if any."""
    p = Path(run_dir) / "hang" / "diagnosis.txt"
    try:
        if p.stat().st_mtime >= since:
            return p.read_text().strip().removeprefix("paratrain: ")
    except OSError:
        pass
    return None
