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
from paratrain.train.trainer import run_worker, write_summary


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run dir and write the fully resolved config into it."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def _prepare_data(cfg: Config) -> None:
    """Build the token cache once, before any worker starts (workers then only memmap it)."""
    from paratrain.data import cached_corpus

    src = cfg.data.source
    if src == "stdlib" or src.startswith("text:"):
        cached_corpus(src, cfg.data.tokenizer)


def _check_resume(cfg: Config) -> None:
    """Verify the checkpoint a resume would load here, so corruption is a clean user error."""
    from paratrain.train import checkpoint as ckpt

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
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_run_dir(cfg)
        _prepare_data(cfg)
        return run_worker(cfg)
    os.environ["PARATRAIN_START_TIME"] = repr(time.time())
    _check_resume(cfg)
    run_dir = prepare_run_dir(cfg)
    _prepare_data(cfg)
    if cfg.parallel.nproc == 1 and cfg.parallel.sync != "ps":
        return run_worker(cfg)
    return _launch_local(cfg, run_dir)


def _launch_local(cfg: Config, run_dir: Path) -> dict[str, Any]:
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
    # workers read the resolved config from the run dir; extra roles (PS servers) start first
    with _extra_roles(cfg):
        try:
            elastic_launch(lc, entrypoint=sys.executable)("-m", "paratrain.train.worker", str(config_path))
        except ChildFailedError as e:
            failures = "; ".join(_describe_failure(r, f.exitcode) for r, f in sorted(e.failures.items()))
            summary = {"status": "error", "error": f"worker failed: {failures}", "wall_s": time.time() - t0}
            write_summary(run_dir, summary)
            return summary
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "error"}


def _describe_failure(rank: int, exitcode: int) -> str:
    import signal

    if exitcode < 0:
        return f"rank {rank} was killed by {signal.Signals(-exitcode).name}"
    return f"rank {rank} exited with code {exitcode}"


def _extra_roles(cfg: Config) -> contextlib.AbstractContextManager:
    """Processes that live around the workers: the parameter servers when sync = "ps"."""
    if cfg.parallel.sync == "ps":
        from paratrain.ps.launch import local_servers

        return local_servers(cfg)
    return contextlib.nullcontext()
