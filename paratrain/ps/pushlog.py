"""The worker's log of acknowledged pushes, spilled to disk so its memory stays bounded.

A worker keeps every push since the servers' last checkpoint so it can replay them to a
server that comes back from that checkpoint (see :mod:`paratrain.ps.worker`).  Held in memory
that is one encoded gradient per step -- unbounded between checkpoints.  :class:`PushLog`
instead appends each completed push to a file in the run directory from a background thread
(the write overlaps the next step's compute), so memory holds only the pushes not yet written:
at most ``tail`` of them (``append`` blocks while the queue is full).

On disk: one segment file per checkpoint interval (``seg{n}.bin``); each record is a small
header (magic, clock, meta length), a JSON meta (learning rate, weight, clip coefficient,
base versions, per server the key / frame records) and the raw frame bytes.  ``trim(upto)``
starts a new segment and deletes the segments whose pushes all have ``clock <= upto``;
``entries_after(clock)`` reads the later pushes back, in order, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from paratrain.config import ConfigError
from paratrain.ps.protocol import FrameRecord, KeyRecord, nbytes_of

RECORD = struct.Struct("<4sqI")  # magic, clock, meta length
MAGIC = b"PTLG"


@dataclass
class Entry:
    """One step's push: everything needed to send it again."""

    clock: int
    lr: float
    weight: float
    bodies: dict[int, tuple[list[KeyRecord], list[FrameRecord], list[Any], bool]]  # server -> desc, frames, packed
    base: list[int]
    coef: float | None = None
    sent_at: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(f) for body in self.bodies.values() for f in body[2])


def _record(r: Any) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in dataclasses.astuple(r)]


def _unrecord(cls: type, values: list[Any]) -> Any:
    return cls(*[tuple(v) if isinstance(v, list) else v for v in values])


class PushLogError(ConfigError):
    """The push log cannot be written or read (one line, exit code 2)."""


class PushLog:
    """Completed pushes since the last trim, on disk under ``directory`` (a private temp dir if None)."""

    def __init__(self, directory: Path | None = None, tail: int = 2):
        self.own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="paratrain-pushlog-")) if directory is None else Path(directory)
        if not self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)  # a previous process's log: not ours to replay
            self.dir.mkdir(parents=True)
        weakref.finalize(self, shutil.rmtree, str(self.dir), True)  # also when close() is never called
        self.index: list[tuple[int, int, int]] = []  # (clock, segment, offset), clocks increasing
        self.segments: dict[int, int] = {}  # segment -> largest clock in it
        self.seg = 0
        self.file: BinaryIO | None = None
        self.mem_bytes = 0  # bytes of pushes queued or being written (the log's only memory)
        self.peak_mem_bytes = 0
        self.disk_bytes = 0
        self.last_clock = 0  # clock of the newest appended push
        self._lock = threading.Lock()
        self._queue: queue.Queue[Entry | None] = queue.Queue(maxsize=max(1, tail))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._writer, name="ps-pushlog", daemon=True)
        self._thread.start()

    # ---- writing ------------------------------------------------------------------------------
    def append(self, e: Entry) -> None:
        """Queue a completed push for writing (blocks while ``tail`` pushes are already queued)."""
        self._check()
        with self._lock:
            self.mem_bytes += e.nbytes
            self.peak_mem_bytes = max(self.peak_mem_bytes, self.mem_bytes)
        self.last_clock = e.clock
        self._queue.put(e)

    def _writer(self) -> None:
        while (e := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._write(e)
            except Exception as err:  # noqa: BLE001 - reported by the next append / flush
                self._error = err
            finally:
                with self._lock:
                    self.mem_bytes -= e.nbytes
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, e: Entry) -> None:
        bodies = {str(i): {"keys": [_record(r) for r in recs], "frames": [_record(r) for r in frecs],
                           "sizes": [nbytes_of(f) for f in frames], "packed": packed}
                  for i, (recs, frecs, frames, packed) in e.bodies.items()}
        meta = json.dumps({"lr": e.lr, "weight": e.weight, "coef": e.coef, "base": e.base,
                           "bodies": bodies}).encode()
        with self._lock:
            if self.file is None:
                self.file = open(self.dir / f"seg{self.seg}.bin", "ab")  # noqa: SIM115 (kept open)
            f, seg = self.file, self.seg
        offset = f.tell()
        f.write(RECORD.pack(MAGIC, e.clock, len(meta)))
        f.write(meta)
        n = RECORD.size + len(meta)
        for _, _, frames, _ in e.bodies.values():
            for fr in frames:
                f.write(memoryview(fr).cast("B"))
                n += nbytes_of(fr)
        with self._lock:
            self.index.append((e.clock, seg, offset))
            self.segments[seg] = e.clock
            self.disk_bytes += n

    def flush(self) -> None:
        """Wait until every appended push is on disk (in the OS's hands: a server crash, not a
        power loss, is what the log protects against)."""
        self._queue.join()
        self._check()
        if self.file is not None:
            self.file.flush()

    def _check(self) -> None:
        if self._error is not None:
            raise PushLogError(f"cannot write the push log in {self.dir}: {self._error}; free disk space there")

    # ---- trimming and reading -------------------------------------------------------------------
    def trim(self, upto: int) -> None:
        """Forget pushes with ``clock <= upto`` (the servers checkpointed them); later pushes
        go to a new segment so whole files can be deleted."""
        self.flush()
        with self._lock:
            if self.file is not None:
                self.file.close()
                self.file = None
            self.seg += 1
            for seg, last in list(self.segments.items()):
                if last <= upto:
                    path = self.dir / f"seg{seg}.bin"
                    self.disk_bytes -= path.stat().st_size if path.exists() else 0
                    path.unlink(missing_ok=True)
                    del self.segments[seg]
            self.index = [x for x in self.index if x[0] > upto]

    def entries_after(self, clock: int) -> Iterator[Entry]:
        """The logged pushes with a clock above ``clock``, oldest first, read back one at a time."""
        self.flush()
        with self._lock:
            todo = [x for x in self.index if x[0] > clock]
        for c, seg, offset in todo:
            with open(self.dir / f"seg{seg}.bin", "rb") as f:
                f.seek(offset)
                yield self._read(f, c)

    def _read(self, f: BinaryIO, clock: int) -> Entry:
        magic, c, n = RECORD.unpack(f.read(RECORD.size))
        if magic != MAGIC or c != clock:
            raise PushLogError(f"the push log in {self.dir} is damaged (clock {clock}); was it modified?")
        meta = json.loads(f.read(n))
        bodies = {}
        for i, b in meta["bodies"].items():
            frames = []
            for size in b["sizes"]:
                buf = bytearray(size)
                f.readinto(buf)
                frames.append(np.frombuffer(buf, dtype=np.uint8))
            bodies[int(i)] = ([_unrecord(KeyRecord, r) for r in b["keys"]],
                              [_unrecord(FrameRecord, r) for r in b["frames"]], frames, b["packed"])
        return Entry(clock, meta["lr"], meta["weight"], bodies, meta["base"], meta["coef"])

    def close(self) -> None:
        """Stop the writer and delete the log's files (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        with self._lock:
            if self.file is not None:
                self.file.close()
                self.file = None
        shutil.rmtree(self.dir, ignore_errors=True)
