"""The one supervisor of local worker processes, for every kind of job.

It does what torchrun's elastic agent does for a single host -- hosts the job's c10d store,
starts ``nproc`` ranks with the torchrun environment, restarts them after a failure -- with
one policy per kind of job:

* ``"group"`` (collective jobs: DDP, ZeRO, TP, PP): the ranks share process groups, so one
  failure ends the attempt; every rank is stopped and, while ``parallel.max_restarts`` allows,
  all are started again on a fresh store (they resume from the newest checkpoint).
* ``"each"`` (parameter server): workers share no process group; a dead worker is restarted
  alone or dropped while the others go on.  Rank 0 reports the run, so its loss ends the job.

Workers get ``PR_SET_PDEATHSIG``: a launcher killed with SIGKILL takes its workers with it.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from paratrain.processes import describe_exit, die_with_parent, stop_processes

WORKER_MODULE = "paratrain.training.worker_main"
POLL_S = 0.1


@dataclass
class JobResult:
    """What the supervised workers did: ``failures`` maps rank -> description (empty: all finished)."""

    failures: dict[int, str] = field(default_factory=dict)
    restarts: int = 0
    fatal: bool = False  # the job could not finish (a collective job lost a rank; a PS job lost rank 0)

    @property
    def ok(self) -> bool:
        return not self.failures


class Supervisor:
    """Starts ``nproc`` local workers running ``worker_main CONFIG [ARGS]`` and watches them."""

    def __init__(self, config_path: Path, nproc: int, max_restarts: int, worker_args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.config_path, self.nproc, self.max_restarts = config_path, nproc, max_restarts
        self.worker_args, self.env = tuple(worker_args), dict(env or {})
        self.run_id = f"paratrain-{uuid.uuid4().hex[:8]}"
        self.store = None

    def _new_store(self) -> int:
        """A fresh c10d store for an attempt (restarted ranks must not read a dead attempt's keys)."""
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=600))
        return self.store.port

    def spawn(self, rank: int, attempt: int, port: int | None) -> subprocess.Popen:
        """Start rank ``rank`` with the environment torchrun would give it."""
        env = dict(os.environ, **self.env, RANK=str(rank), WORLD_SIZE=str(self.nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(self.nproc), GROUP_RANK="0", TORCHELASTIC_RUN_ID=self.run_id,
                   TORCHELASTIC_RESTART_COUNT=str(attempt), TORCHELASTIC_MAX_RESTARTS=str(self.max_restarts))
        if port is not None:  # every rank is a client of the store this process hosts
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
        cmd = [sys.executable, "-m", WORKER_MODULE, str(self.config_path), *self.worker_args]
        return subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

    def run(self, policy: str) -> JobResult:
        """Run the job to its end under ``policy`` ("group" or "each"); see the module docstring."""
        if policy not in ("group", "each"):
            raise ValueError(f"unknown restart policy {policy!r}")
        return self._run_group() if policy == "group" else self._run_each()

    def _run_group(self) -> JobResult:
        attempt = 0
        while True:
            port = self._new_store()
            procs = {r: self.spawn(r, attempt, port) for r in range(self.nproc)}
            failures = self._wait_group(procs)
            if not failures:
                return JobResult({}, attempt)
            if attempt >= self.max_restarts:
                return JobResult(failures, attempt, fatal=True)
            attempt += 1
            why = "; ".join(f"rank {r}: {f}" for r, f in sorted(failures.items()))
            print(f"paratrain: {why}; restarting all workers ({attempt}/{self.max_restarts})", file=sys.stderr)

    def _wait_group(self, procs: dict[int, subprocess.Popen]) -> dict[int, str]:
        try:
            while True:
                codes = {r: p.poll() for r, p in procs.items()}
                failed = {r: describe_exit(c) for r, c in codes.items() if c not in (None, 0)}
                if failed:
                    return failed
                if all(c == 0 for c in codes.values()):
                    return {}
                time.sleep(POLL_S)
        finally:
            stop_processes(list(procs.values()))

    def _run_each(self) -> JobResult:
        procs = {r: self.spawn(r, 0, None) for r in range(self.nproc)}
        restarts = dict.fromkeys(range(self.nproc), 0)
        failures: dict[int, str] = {}
        try:
            while procs and 0 not in failures:
                time.sleep(POLL_S)
                for r, p in list(procs.items()):
                    code = p.poll()
                    if code is None:
                        continue
                    del procs[r]
                    if code == 0:
                        continue
                    why = describe_exit(code)
                    if restarts[r] < self.max_restarts:
                        restarts[r] += 1
                        print(f"paratrain: worker {r} {why}; restarting it ({restarts[r]}/{self.max_restarts})",
                              file=sys.stderr)
                        procs[r] = self.spawn(r, restarts[r], None)
                        continue
                    failures[r] = why
                    if r == 0:  # rank 0 reports the run: without it the job cannot finish cleanly
                        break
                    print(f"paratrain: worker {r} {why}; the others go on without it", file=sys.stderr)
        finally:
            stop_processes(list(procs.values()), grace_s=0.0)
        return JobResult(failures, max(restarts.values(), default=0), fatal=0 in failures)
