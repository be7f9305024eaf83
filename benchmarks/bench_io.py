"""What every benchmark script shares: one strict JSON object on stdout, progress elsewhere;
CPU time from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Progress lines (this process's and its children's) go to stderr: stdout stays one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit_json(out: dict[str, Any], path: str = "") -> None:
    """Print ``out`` as strict JSON (NaN is an error), and write it to ``path`` when given."""
    text = json.dumps(out, indent=1, allow_nan=False)
    if path:
        Path(path).write_text(text)
    print(text)


def stat_cpu_s(stat_path: str) -> tuple[str, float]:
    """(name, user + system CPU seconds so far) of the process or thread whose Linux
    ``/proc/.../stat`` file is ``stat_path``."""
    stat = Path(stat_path).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
