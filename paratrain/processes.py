"""Process plumbing shared by the worker supervisor and the parameter-server starter."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (a no-op elsewhere).

    Used as a ``preexec_fn`` (between fork and exec), so a launcher killed with SIGKILL takes
    its workers and servers with it instead of leaving them to write into its run dir."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def describe_exit(code: int) -> str:
    """How a child process ended, in words (the one place failures are described)."""
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
