"""Entry point of one worker process started by the local launcher.

``python -m paratrain.train.worker CONFIG [--injected FILE]``: FILE holds the model factory,
loss and datasets handed over by ``paratrain.train`` (see :mod:`paratrain.train.handoff`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from paratrain.config import Config, ConfigError
from paratrain.train.trainer import run_worker


def main(argv: list[str]) -> int:
    injected_file = Path(argv[argv.index("--injected") + 1]) if "--injected" in argv else None
    try:
        cfg = Config.load(argv[0])
        injected = {}
        if injected_file is not None:
            from paratrain.train.handoff import load_injected

            injected = load_injected(injected_file)
        run_worker(cfg, **injected)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        if injected_file is not None:
            from paratrain.train.handoff import write_error

            write_error(injected_file.parent, str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
