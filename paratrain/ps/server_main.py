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
from pathlib import Path

import torch

from paratrain.config import Config, ConfigError
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
    from paratrain.training import checkpoint as ckpt

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


def _set_parent_death_signal() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paratrain.ps.server")
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
    _set_parent_death_signal()
    torch.set_num_threads(1)
    cfg = Config.load(a.config)
    handlers = [logging.FileHandler(a.log)] if a.log else [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format=f"%(asctime)s server{a.index} %(levelname)s %(message)s")
    secret = os.environ.get(SECRET_ENV, "") or cfg.ps.secret
    if len(secret) < 16:
        print(f"paratrain: error: the parameter-server secret (ps.secret or {SECRET_ENV}) must be at least "
              "16 characters", file=sys.stderr)
        return 2
    resume = None
    if a.restart_count > 0:  # restarted after a crash: the newest checkpoint this job wrote
        resume = find_resume(cfg.run_dir, a.index, a.job_id or None)
    if resume is None and a.resume:  # the checkpoint the job started from: never silently skipped
        resume = Path(a.resume) / shard_file(a.index)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if resume is not None:
            load_state(resume)
        server = ParameterServer(cfg, a.index, a.endpoint, secret.encode(), a.workers, a.servers,
                                 a.restart_count, resume, a.job_id, exit_when_done=a.exit_when_done)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    print(f"READY {server.endpoint}", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
