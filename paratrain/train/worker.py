"""Entry point of one worker process started by the local launcher: ``python -m paratrain.train.worker CONFIG``."""

from __future__ import annotations

import sys

from paratrain.config import Config, ConfigError
from paratrain.train.trainer import run_worker


def main(argv: list[str]) -> int:
    try:
        cfg = Config.load(argv[0])
        run_worker(cfg)
    except ConfigError as e:
        print(f"paratrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
