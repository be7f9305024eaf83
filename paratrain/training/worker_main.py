"""Entry point of one worker process started by the local supervisor.

``python -m paratrain.training.worker_main CONFIG [--start-time T] [--handoff DIR] [--injected FILE]``:
T is the job's start (wall clock, for goodput); DIR a private directory where a user error is
reported back to the launcher, which then reports it as its own one line (exit code 2); FILE the
model factory, loss and datasets handed over by ``paratrain.train`` (see
:mod:`paratrain.training.handoff`).  The supervisor starts workers with ``PR_SET_PDEATHSIG``, so a
worker dies with its launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from paratrain.config import Config, ConfigError
from paratrain.fileio import stdout_to_devnull
from paratrain.training.handoff import load_injected, write_error
from paratrain.training.trainer import run_worker
from paratrain.training.user_model import is_own_spec

_HELD: list = []  # the trainer, kept alive until os._exit (see run_worker)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m paratrain.training.worker_main")
    p.add_argument("config")
    p.add_argument("--start-time", type=float, default=None)
    p.add_argument("--handoff", type=Path, default=None)
    p.add_argument("--injected", type=Path, default=None)
    a = p.parse_args(argv)
    try:
        injected = load_injected(a.injected) if a.injected is not None else {}
        cfg = Config.load(a.config, own_model=is_own_spec(injected.get("model")))
        run_worker(cfg, start_time=a.start_time, hold=_HELD, **injected)
    except ConfigError as e:
        if a.handoff is not None:  # the launcher reports it, once
            write_error(a.handoff, str(e))
        else:
            print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout was a pipe whose reader left (`paratrain train ... | head`): end quietly
        stdout_to_devnull()
        return 141
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
