"""Small file helpers shared by checkpoints, data shards and run state: checksums and
atomic JSON writes (a reader sees the old file or the new one, never half of one)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path | str, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (readers never see a partial file; the temp name is per process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
