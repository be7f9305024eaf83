"""Process plumbing shared by the worker supervisor and the parameter-server starter."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence


def under_torchrun() -> bool:
    """Whether this process is one rank of a job torchrun (or paratrain's supervisor) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times this rank's job has been restarted (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (a no-op elsewhere).

    Used as a ``preexec_fn`` (between fork and exec), so a launcher killed with SIGKILL takes
    its workers and servers with it instead of leaving them to write into its run dir."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def describe_exit(code: int) -> str:
    """How a child process ended, in words (the one place failures are described)."""
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 3.0) -> None:
    """SIGTERM every process still running, then SIGKILL what is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.01, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()
