"""Entry point of a server process: ``python -m paratrain.ps.server_main --config RUN/config.toml ...``.

The launcher (``paratrain.ps.launch``) runs it; the shared secret comes from the
``PARATRAIN_PS_SECRET`` environment variable (or ``ps.secret``).  The server logs to
``--log`` and prints ``READY <endpoint>`` once it listens.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.processes import die_with_parent
from paratrain.ps.server import SECRET_ENV, ParameterServer, shard_file

STATE_KEYS = ("shard", "applied", "known", "retired", "clocks", "staleness", "max_gap")


def load_state(path: Path) -> dict:
    """A server checkpoint file, checked for its structure; ConfigError (one line) when it is
    missing or cannot be loaded."""
    fix = "resume from a checkpoint this parameter-server job wrote, or start without checkpoint.resume/path"
    if not path.is_file():
        raise ConfigError(f"parameter-server checkpoint {path} is missing; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["everything"]
        if missing or not isinstance(state["shard"], dict) or "params" not in state["shard"]:
            raise ValueError(f"no {', '.join(missing) or 'shard parameters'}")
    except Exception as e:  # noqa: BLE001 - any failure to load is the same user error
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"parameter-server checkpoint {path} cannot be loaded ({why}); {fix}") from None
    return state


def check_resume(ckpt_dir: Path | None, n_servers: int) -> None:
    """Before a job resumes from ``ckpt_dir``: every server's state is there and loads."""
    if ckpt_dir is not None:
        for i in range(n_servers):
            load_state(Path(ckpt_dir) / shard_file(i))


def find_resume(run_dir: Path, index: int, job_id: str | None) -> Path | None:
    """Newest verified checkpoint under ``run_dir/checkpoints`` holding this server's shard.

    With ``job_id`` only checkpoints written by that job count (a restart must not pick up a
    previous run's state)."""

    for d in reversed(ckpt.list_checkpoints(run_dir / "checkpoints")):
        f = d / shard_file(index)
        if not f.is_file():
            continue
        try:
            ckpt.verify(d)
            if job_id is not None and torch.load(f, map_location="cpu", weights_only=True).get("job_id") != job_id:
                continue
        except Exception:  # corrupt or unreadable: try an older one
            continue
        return f
    return None


def run_server(cfg: Config, index: int, endpoint: str, secret: bytes, n_workers: int, n_servers: int, *,
               restart_count: int = 0, initial: Path | None = None, job_id: str = "", log_path: Path | None = None,
               exit_when_done: bool = False, on_ready: Callable[[str], None] | None = None) -> None:
    """Be parameter server ``index`` until the job ends: the one way a server starts (a process of
    the local launcher, or a rank under torchrun).

    A restarted server (``restart_count`` > 0) resumes from the newest checkpoint of this job
    holding its shard; a first start from ``initial`` (the checkpoint the job resumes from), if any.
    ``on_ready(endpoint)`` runs once the server listens."""
    log = logging.getLogger(f"paratrain.ps.server{index}")
    if log_path is not None:
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter(f"%(asctime)s server{index} %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    resume = find_resume(cfg.run_dir, index, job_id or None) if restart_count > 0 else None
    if resume is None and initial is not None:  # the checkpoint the job started from: never silently skipped
        resume = Path(initial) / shard_file(index)
    if resume is not None:
        load_state(resume)  # a missing or unloadable state is one line, not a crash loop
    server = ParameterServer(cfg, index, endpoint, secret, n_workers, n_servers, restart_count, resume, job_id,
                             log=log, exit_when_done=exit_when_done)
    if on_ready is not None:
        on_ready(server.endpoint)
    try:
        server.serve()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paratrain.ps.server_main")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--servers", type=int, required=True)
    p.add_argument("--restart-count", type=int, default=0)
    p.add_argument("--resume", default="", help="checkpoint dir the job resumes from (empty: none)")
    p.add_argument("--job-id", default="")
    p.add_argument("--log", default="")
    p.add_argument("--exit-when-done", action="store_true")
    a = p.parse_args(argv)
    die_with_parent(signal.SIGTERM)
    torch.set_num_threads(1)
    cfg = Config.load(a.config)
    if not a.log:
        logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(sys.stderr)],
                            format=f"%(asctime)s server{a.index} %(levelname)s %(message)s")
    secret = os.environ.get(SECRET_ENV, "") or cfg.ps.secret
    if len(secret) < 16:
        print(f"paratrain: error: the parameter-server secret (ps.secret or {SECRET_ENV}) must be at least "
              "16 characters", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_server(cfg, a.index, a.endpoint, secret.encode(), a.workers, a.servers, restart_count=a.restart_count,
                   initial=Path(a.resume) if a.resume else None, job_id=a.job_id,
                   log_path=Path(a.log) if a.log else None, exit_when_done=a.exit_when_done,
                   on_ready=lambda ep: print(f"READY {ep}", flush=True))
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
