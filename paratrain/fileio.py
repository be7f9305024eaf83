"""Small file helpers shared by checkpoints, data shards and run state: checksums, strict JSON
(no NaN/Infinity: non-finite floats become null) and atomic JSON writes (a reader sees the old
file or the new one, never half of one)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf), at any depth, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (RFC 8259: non-finite floats written as null)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: Path | str, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (readers never see a partial file; the temp name is per process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = dumps_strict(obj, indent)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stdout_to_devnull() -> None:
    """Point this process's stdout at /dev/null: after its reader left (``| head``), later writes
    and the interpreter's final flush succeed silently instead of raising BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
