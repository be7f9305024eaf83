"""One writer per run directory, and runs that never mix.

:func:`hold` wraps a launch.  It checks what only the launching machine can tell (run.dir is a
directory, NCCL has CUDA), then, in the launcher (rank 0 under torchrun):

* locks ``RUN_DIR/.lock`` with ``flock`` and writes the owner's pid, host and start time into it.
  A second run into the same directory stops with one line naming the owner.  The kernel drops
  the lock when its process dies however it dies, so a lock left by a killed job is stale and
  the next run takes it over (and says so);
* refuses a fresh run into a directory that holds checkpoints (``checkpoint.resume = true``
  continues it, ``run.overwrite = true`` clears paratrain's outputs from it first);
* yields the finished summary instead of training when a resumed run already reached
  ``train.steps``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.config_checks import check_runtime
from paratrain.processes import restart_count, under_torchrun

LOCK_FILE = ".lock"
# what run.overwrite = true removes: paratrain's own outputs, never anything else in the directory
OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "goodput.json", "goodput.progress", "hang",
           "tensorboard", "ps", "report.md")

# resolved run dir -> (lock fd, nesting depth, the topmost directory this lock created or None)
_held: dict[Path, tuple[int, int, Path | None]] = {}


@contextlib.contextmanager
def hold(cfg: Config) -> Iterator[dict[str, Any] | None]:
    """The launch's hold on ``cfg.run_dir`` (see the module docstring).

    Yields the saved summary when a resumed run is already finished (the caller then returns it
    without training), else None.  Every process of a torchrun job enters; rank 0 locks."""
    check_runtime(cfg)
    if under_torchrun():
        if int(os.environ["RANK"]) != 0:
            yield finished(cfg)
            return
    run_dir = cfg.run_dir
    key = _acquire(run_dir)
    try:
        if restart_count() == 0:  # a restart continues its own run
            _check_fresh(cfg)
        yield finished(cfg)
    finally:
        _release(key)


def _owner_text(info: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("start_time", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (started {started})"


def _read_owner(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096) or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(info: dict[str, Any]) -> bool:
    """Whether the owner named in a lock file still runs (only knowable on its own host)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(run_dir: Path) -> Path:
    """Lock ``run_dir`` for this process (re-entrant); ConfigError when another process holds it."""
    key = run_dir.resolve()
    if key in _held:
        fd, depth, created = _held[key]
        _held[key] = (fd, depth + 1, created)
        return key
    missing = [d for d in (key, *key.parents) if not d.exists()]
    key.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(run_dir, key / LOCK_FILE)
    except ConfigError:
        _remove_empty(key, missing[-1] if missing else None)
        raise
    previous = _read_owner(fd)
    if previous.get("pid") not in (None, os.getpid()):
        print(f"paratrain: taking over the stale lock of {run_dir} left by {_owner_text(previous)}, "
              "which is no longer running", file=sys.stderr)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = (fd, 1, missing[-1] if missing else None)
    return key


def _lock(run_dir: Path, path: Path) -> int:
    """An open fd of ``path`` holding its flock (or, where the file system has no flock, one whose
    previous owner is gone)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # held by a live process
                owner = _read_owner(fd)
                os.close(fd)
                raise ConfigError(f"run dir {run_dir} is in use by another run ({_owner_text(owner)}); wait for "
                                  "it to finish or stop it, or pick another --run.dir") from None
            locked = False  # no flock on this file system: judge by the owner's pid
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder released (unlinked) it between our open and flock: retry
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous.get("pid") not in (None, os.getpid()) and not locked and _alive(previous):
        os.close(fd)
        raise ConfigError(f"run dir {run_dir} is in use by another run ({_owner_text(previous)}); wait for it "
                          "to finish or stop it, or pick another --run.dir")
    return fd


def _release(key: Path) -> None:
    fd, depth, created = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1, created)
        return
    del _held[key]
    with contextlib.suppress(FileNotFoundError):
        (key / LOCK_FILE).unlink()  # while still locked: a waiter that opened it retries on the new file
    os.close(fd)
    _remove_empty(key, created)


def _remove_empty(key: Path, created: Path | None) -> None:
    """A launch that stopped before writing anything leaves no directory behind."""
    if created is None:
        return
    for d in (key, *key.parents):
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote something), or gone
            return
        if d == created:
            return


def _check_fresh(cfg: Config) -> None:
    """A fresh run must not mix with an earlier run's checkpoints: refuse, or clear with run.overwrite."""
    c, run_dir = cfg.checkpoint, cfg.run_dir
    if c.resume or c.path:
        return
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        return
    if not cfg.run.overwrite:
        raise ConfigError(f"run dir {run_dir} holds checkpoints of an earlier run (newest: {found[-1].name}); "
                          "continue it with --checkpoint.resume=true, start over with --run.overwrite=true, "
                          "or pick another --run.dir")
    for name in OUTPUTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    print(f"paratrain: run.overwrite = true: cleared the earlier run's outputs from {run_dir}", file=sys.stderr)


def finished(cfg: Config) -> dict[str, Any] | None:
    """The summary of a resumed run whose newest checkpoint already reached ``train.steps``, else None."""
    c = cfg.checkpoint
    newest = ckpt.latest(cfg.run_dir / "checkpoints") if c.resume and not c.path else None
    if newest is None:
        return None
    step = int(ckpt.load_file(newest, "meta.json")["step"])
    if step < cfg.train.steps:
        return None
    try:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("status") != "ok" or summary.get("steps") != step:
        summary = {"status": "ok", "steps": step, "final_loss": None}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"paratrain: {cfg.run_dir} already finished at step {step} (train.steps = {cfg.train.steps}); "
              "nothing to do (raise train.steps to train further)", file=sys.stderr)
    return summary

