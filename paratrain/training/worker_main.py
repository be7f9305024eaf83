"""Entry point of one worker process started by the local launcher.

``python -m paratrain.training.worker_main CONFIG [--injected FILE]``: FILE holds the model factory,
loss and datasets handed over by ``paratrain.train`` (see :mod:`paratrain.training.handoff`).
A worker dies with its launcher (SIGKILL, see :func:`paratrain.training.rundir.die_with_parent`), and
a user error it hits goes to the launcher, which reports it as its own one line (exit code 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from paratrain.config import Config, ConfigError
from paratrain.fileio import stdout_to_devnull
from paratrain.training.rundir import die_with_parent, write_worker_error
from paratrain.training.trainer import run_worker

_HELD: list = []  # the trainer, kept alive until os._exit (see run_worker)


def main(argv: list[str]) -> int:
    die_with_parent()
    injected_file = Path(argv[argv.index("--injected") + 1]) if "--injected" in argv else None
    try:
        injected = {}
        if injected_file is not None:
            from paratrain.training.handoff import load_injected

            injected = load_injected(injected_file)
        from paratrain.training.user_model import is_own_spec

        cfg = Config.load(argv[0], own_model=is_own_spec(injected.get("model")))
        run_worker(cfg, hold=_HELD, **injected)
    except ConfigError as e:
        write_worker_error(Path(argv[0]).parent, str(e))  # argv[0] is RUN_DIR/config.toml
        if not os.environ.get("TORCHELASTIC_RUN_ID", "").startswith("paratrain-"):  # else the launcher reports it
            print(f"paratrain: error: {e}", file=sys.stderr)
        if injected_file is not None:
            from paratrain.training.handoff import write_error

            write_error(injected_file.parent, str(e))
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
