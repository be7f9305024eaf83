"""Starting a run: in this process, as one rank of a torchrun job, or as N local workers.

``paratrain train`` without RANK/WORLD_SIZE in the environment prepares the run dir and
the data cache once, then starts ``parallel.nproc`` workers through torch's elastic agent
(the engine behind torchrun), which also restarts them up to ``parallel.max_restarts``
times.  Under torchrun each process is already a rank and trains directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from paratrain.config import Config
from paratrain.training.trainer import run_worker, write_summary


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run dir and write the fully resolved config into it."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def _prepare_data(cfg: Config) -> None:
    """Build the token cache once, before any worker starts (workers then only memmap it)."""
    from paratrain.data import corpus_for

    if not cfg.data.source.startswith(("synthetic:", "shards:")):
        corpus_for(cfg.data)


def _check_resume(cfg: Config) -> None:
    """Verify the checkpoint a resume would load here, so corruption is a clean user error."""
    from paratrain.training import checkpoint as ckpt

    c = cfg.checkpoint
    if c.path:
        ckpt.verify(Path(c.path))
    elif c.resume:
        found = ckpt.latest(cfg.run_dir / "checkpoints")
        if found is not None:
            ckpt.verify(found)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(cfg: Config) -> dict[str, Any]:
    """Run training per the config; returns rank 0's summary (or an error summary)."""
    if under_torchrun():
        os.environ.setdefault("PARATRAIN_START_TIME", repr(time.time()))
        from paratrain.doctor import multi_host_warning

        if (warning := multi_host_warning()) and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"paratrain: warning: {warning}", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_run_dir(cfg)
        _prepare_data(cfg)
        if cfg.parallel.sync == "ps":  # roles by rank: servers first, then workers
            from paratrain.ps.launch import run_torchrun_role

            return run_torchrun_role(cfg)
        return run_worker(cfg)
    os.environ["PARATRAIN_START_TIME"] = repr(time.time())
    _check_resume(cfg)
    run_dir = prepare_run_dir(cfg)
    _prepare_data(cfg)
    if cfg.parallel.nproc == 1 and cfg.parallel.sync != "ps":
        return run_worker(cfg)
    return spawn_workers(cfg, run_dir)


def spawn_workers(cfg: Config, run_dir: Path, worker_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start the local job: parameter servers + workers, or workers under torch's elastic agent."""
    if cfg.parallel.sync == "ps":  # own worker spawner: a dead worker must not stop the others
        from paratrain.ps.launch import launch_local

        return launch_local(cfg, run_dir, worker_args)
    return _launch_local(cfg, run_dir, worker_args)


def _launch_local(cfg: Config, run_dir: Path, worker_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start nproc local workers (``worker_args`` go after the config path) and wait for them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    t0 = float(os.environ["PARATRAIN_START_TIME"])
    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.parallel.nproc,
        run_id=f"paratrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=cfg.parallel.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    config_path = run_dir / "config.toml"
    # workers read the resolved config from the run dir
    with _worker_env(cfg):
        try:
            elastic_launch(lc, entrypoint=sys.executable)("-m", "paratrain.training.worker_main", str(config_path),
                                                          *worker_args)
        except ChildFailedError as e:
            from paratrain.training.watchdog import read_diagnosis

            failures = "; ".join(_describe_failure(r, f.exitcode) for r, f in sorted(e.failures.items()))
            error = read_diagnosis(run_dir, since=t0) or f"worker failed: {failures}"
            summary = {"status": "error", "error": error, "wall_s": time.time() - t0}
            write_summary(run_dir, summary)
            return summary
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "error"}


def _describe_failure(rank: int, exitcode: int) -> str:
    import signal

    if exitcode < 0:
        return f"rank {rank} was killed by {signal.Signals(-exitcode).name}"
    return f"rank {rank} exited with code {exitcode}"


@contextlib.contextmanager
def _worker_env(cfg: Config):
    """Environment the spawned workers inherit for the length of the launch.

    ZeRO runs get ``MALLOC_MMAP_THRESHOLD_`` (unless already set): with glibc's default, the
    per-block buffers FSDP frees stay in the heap and sharding hardly lowers peak RSS.
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (read by the agent) gives each restart a fresh
    c10d store: with the agent's shared store, restarted workers can read the dead attempt's
    gloo addresses (same keys) and fail to connect (see docs/operations.md).
    """
    extra: dict[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if cfg.parallel.zero > 0:
        from paratrain.parallel.sharding import MALLOC_ENV

        extra.update(MALLOC_ENV)
    extra = {k: v for k, v in extra.items() if k not in os.environ}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k in extra:
            os.environ.pop(k, None)
