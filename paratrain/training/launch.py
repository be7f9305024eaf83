"""Starting a run: the one dispatcher behind ``paratrain train`` and ``paratrain.train()``.

:func:`launch` decides where this process stands:

* under torchrun (RANK / WORLD_SIZE set) it is one rank: a worker, or -- with
  ``parallel.sync = "ps"`` -- a parameter server when ``RANK < ps.servers``;
* otherwise it is the launcher: it verifies the checkpoint a resume would load, writes the run
  dir and the token cache once, and then either trains in this process (one worker, no
  servers) or starts the local job -- parameter servers if any, and ``parallel.nproc`` workers
  under the :class:`~paratrain.training.supervisor.Supervisor`.

A Python caller's objects (model factory, loss, data) travel as ``injected``: in-process they
are used as they are; to worker processes they go pickled through a private temp dir
(:mod:`paratrain.training.handoff`), which also brings back a worker's one-line user error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.data import corpus_for
from paratrain.doctor import multi_host_warning
from paratrain.parallel.sharding import MALLOC_ENV
from paratrain.processes import under_torchrun
from paratrain.ps.launch import local_servers, run_torchrun_role
from paratrain.training import rundir
from paratrain.training.handoff import read_error, save_injected
from paratrain.training.supervisor import JobResult, Supervisor
from paratrain.training.trainer import run_worker, write_summary
from paratrain.training.watchdog import read_diagnosis


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run dir and write the fully resolved config into it."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def prepare_data(cfg: Config) -> None:
    """Build the token cache once, before any worker starts (workers then only memmap it)."""
    if not cfg.data.source.startswith(("synthetic:", "shards:")):
        corpus_for(cfg.data)


def check_resume(cfg: Config) -> None:
    """Verify the checkpoint a resume would load here, so corruption is a clean user error."""
    c = cfg.checkpoint
    if c.path:
        ckpt.verify(Path(c.path))
    elif c.resume:
        found = ckpt.latest(cfg.run_dir / "checkpoints")
        if found is not None:
            ckpt.verify(found)


def launch(cfg: Config, injected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training per ``cfg``; returns rank 0's summary (or an error summary).

    ``injected``: the Python API's objects (``model``, ``loss_fn``, ``train_data``, ``val_data``,
    ``tp_plan``, ``pp_split``), already validated by :func:`paratrain.train`.  The run dir is
    held for the length of the launch (:func:`paratrain.training.rundir.hold`: one writer, runs
    that never mix, a finished run resumed is not trained again).
    """
    with rundir.hold(cfg) as done:
        return done if done is not None else _launch(cfg, dict(injected or {}))


def _launch(cfg: Config, injected: dict[str, Any]) -> dict[str, Any]:
    start_time = time.time()
    own_data = "train_data" not in injected
    if under_torchrun():
        if int(os.environ["RANK"]) == 0:
            prepare_run_dir(cfg)
            _warn_multi_host()
        if own_data:
            prepare_data(cfg)
        if cfg.parallel.sync == "ps":  # roles by rank: servers first, then workers
            if (server_summary := run_torchrun_role(cfg)) is not None:
                return server_summary
        return run_worker(cfg, start_time=start_time, **injected)
    if cfg.parallel.nproc == 1 and cfg.parallel.sync != "ps":
        _prepare(cfg, own_data)
        return run_worker(cfg, start_time=start_time, **injected)
    handoff = Path(tempfile.mkdtemp(prefix="paratrain-handoff-"))
    try:
        args = ["--start-time", repr(start_time), "--handoff", str(handoff)]
        if injected:  # first: an object that cannot go to the workers is an error before anything is written
            args += ["--injected", str(save_injected(handoff, injected, cfg.parallel.nproc))]
        run_dir = _prepare(cfg, own_data)
        result = _run_local_job(cfg, run_dir, args)
        if (error := read_error(handoff)) is not None and not result.ok:
            raise ConfigError(error)
    finally:
        shutil.rmtree(handoff, ignore_errors=True)
    return _job_summary(run_dir, result, start_time)


def _prepare(cfg: Config, own_data: bool) -> Path:
    """The launcher's one-time work before training: verify a resume, write the run dir, build the token cache."""
    check_resume(cfg)
    run_dir = prepare_run_dir(cfg)
    if own_data:
        prepare_data(cfg)
    return run_dir


def _warn_multi_host() -> None:
    if warning := multi_host_warning():
        print(f"paratrain: warning: {warning}", file=sys.stderr)


def _run_local_job(cfg: Config, run_dir: Path, worker_args: list[str]) -> JobResult:
    """Servers (for ``sync = "ps"``) and ``parallel.nproc`` supervised workers on this machine."""
    sup = Supervisor(run_dir / "config.toml", cfg.parallel.nproc, cfg.parallel.max_restarts, worker_args)
    if cfg.parallel.sync == "ps":
        with local_servers(cfg, cfg.parallel.nproc):
            return sup.run("each")
    with _worker_env(cfg):
        return sup.run("group")


def _job_summary(run_dir: Path, result: JobResult, start_time: float) -> dict[str, Any]:
    """Rank 0's summary, or an error summary naming the failed workers (and a hang diagnosis)."""
    path = run_dir / "summary.json"
    done = path.exists() and path.stat().st_mtime >= start_time
    if result.fatal or not done:
        why = "; ".join(f"rank {r}: {f}" for r, f in sorted(result.failures.items())) or "no summary written"
        error = read_diagnosis(run_dir, since=start_time) or f"worker failed: {why}"
        summary = {"status": "error", "error": error, "wall_s": time.time() - start_time}
        write_summary(run_dir, summary)
        return summary
    summary = json.loads(path.read_text())
    if result.failures:  # parameter server: workers the job went on without
        summary["ps_failed_workers"] = {str(r): f for r, f in sorted(result.failures.items())}
        write_summary(run_dir, summary)
    return summary


@contextlib.contextmanager
def _worker_env(cfg: Config) -> Iterator[None]:
    """Environment the workers of a collective job inherit for the length of the launch.

    ZeRO runs get ``MALLOC_MMAP_THRESHOLD_`` (unless already set): with glibc's default, the
    per-block buffers FSDP frees stay in the heap and sharding hardly lowers peak RSS."""
    extra: dict[str, str] = {}
    if cfg.parallel.zero > 0:

        extra.update(MALLOC_ENV)
    extra = {k: v for k, v in extra.items() if k not in os.environ}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k in extra:
            os.environ.pop(k, None)
